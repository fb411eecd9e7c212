//! The plugin socket, shared by the instance actor and blocking callers.
//!
//! Async calls go through the instance actor (one task per instance). A host
//! that runs its own engine thread can instead call with
//! [`crate::PluginHandle::call_blocking`]: the calling thread writes the Call
//! frame itself and reads the Reply itself, with no task, channel or thread
//! hand-off on the way — the same two wake-ups per round trip as a raw
//! socketpair ping-pong.
//!
//! While a blocking caller waits it owns the read side (`read`); the actor
//! then leaves the socket alone, and anything else the caller reads (pongs,
//! logs, replies to async calls) goes to the actor's `inbox`. Writes from both
//! go through one buffer (`write`), so frames never interleave. After its
//! call, the caller wakes the actor only if it must: something is in the
//! inbox, bytes are waiting that the actor did not see (it clears its
//! readiness while a caller reads), or the instance is stopping and waits for
//! the caller to be done.

use parking_lot::{Condvar, Mutex, MutexGuard};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::MsgFlags;

use plugin_proto::frame::{encode_frame, FrameDecoder};
use plugin_proto::{Call, CallError, ErrorCode, Message, Payload};

/// Size of one read from a plugin socket.
pub(crate) const READ_CHUNK: usize = 64 * 1024;

use plugin_proto::frame::RECORD_MAX;

// Every read offers a whole record's room.
const _: () = assert!(READ_CHUNK >= RECORD_MAX);

/// What [`read_available`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Filled {
    /// The socket is empty now.
    Drained,
    /// The scratch buffer filled up; there may be more.
    More,
    /// End of stream.
    Eof,
}

/// Reads from the socket into `rbuf` without waiting, until it is empty (or one read's
/// worth came in). `records`: the socket is `SOCK_SEQPACKET` (see [`recv_into`]).
pub(crate) fn read_available(
    sock: &UnixStream,
    rbuf: &mut Vec<u8>,
    records: bool,
) -> io::Result<Filled> {
    recv_into(sock, rbuf, MsgFlags::MSG_DONTWAIT, records)
}

/// One `recv` of up to [`READ_CHUNK`] bytes straight into `rbuf`'s spare room (no copy
/// through a scratch buffer). Without `MSG_DONTWAIT` it waits (the socket itself is in
/// blocking mode, see [`Wire`]) up to the socket's receive timeout, which reports as
/// [`io::ErrorKind::WouldBlock`]. On a record socket (`records`) one recv returns one
/// record, so a short read says nothing about what else is queued, and a record longer than
/// the room offered is an error rather than a silently cut frame.
fn recv_into(
    sock: &UnixStream,
    rbuf: &mut Vec<u8>,
    flags: MsgFlags,
    records: bool,
) -> io::Result<Filled> {
    // A buffer that grew for one huge frame does not stay huge.
    if rbuf.is_empty() && rbuf.capacity() > 16 * READ_CHUNK {
        *rbuf = Vec::new();
    }
    rbuf.reserve(READ_CHUNK);
    // With MSG_TRUNC a record socket reports a record's whole length even if it was cut.
    let flags = if records { flags | MsgFlags::MSG_TRUNC } else { flags };
    loop {
        let spare = rbuf.spare_capacity_mut();
        // SAFETY: the pointer and length describe `rbuf`'s spare capacity (at least
        // READ_CHUNK bytes after the reserve above), which recv may write; set_len below
        // covers only the bytes recv reports written, so nothing uninitialised is exposed.
        let n = unsafe {
            libc::recv(sock.as_raw_fd(), spare.as_mut_ptr().cast(), READ_CHUNK, flags.bits())
        };
        match n {
            0 => return Ok(Filled::Eof),
            n if n < 0 => match Errno::last() {
                Errno::EAGAIN if flags.contains(MsgFlags::MSG_DONTWAIT) => {
                    return Ok(Filled::Drained)
                }
                Errno::EINTR => {}
                e => return Err(e.into()),
            },
            n if n as usize > READ_CHUNK => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the plugin sent a {n}-byte record; records on a seqpacket socket are at most {RECORD_MAX} bytes"
                    ),
                ))
            }
            n => {
                let n = n as usize;
                // SAFETY: recv wrote n (<= READ_CHUNK <= spare capacity) bytes after len.
                unsafe { rbuf.set_len(rbuf.len() + n) };
                // A stream socket returns less than asked only when it has no more queued.
                return Ok(if n < READ_CHUNK && !records { Filled::Drained } else { Filled::More });
            }
        }
    }
}

/// Writes as much of `buf` as the socket takes now; what is left stays in `buf`.
pub(crate) fn write_available(sock: &UnixStream, buf: &mut Vec<u8>) -> io::Result<()> {
    while !buf.is_empty() {
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        // At most one record's worth at a time (a stream socket takes it all the same).
        let chunk = &buf[..buf.len().min(RECORD_MAX)];
        match nix::sys::socket::send(sock.as_raw_fd(), chunk, flags) {
            Ok(n) => {
                buf.drain(..n);
            }
            Err(Errno::EAGAIN) => return Ok(()),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The read side: bytes read but not yet decoded.
pub(crate) struct ReadSide {
    /// Undecoded bytes (reads land in its spare room).
    pub rbuf: Vec<u8>,
    /// Frame splitter (checks the size limit).
    pub decoder: FrameDecoder,
    /// The receive timeout set on the socket for blocking callers (None: not set yet).
    armed: Option<Duration>,
    /// The socket carries records (`SOCK_SEQPACKET`), not a byte stream.
    pub records: bool,
    /// Why reading stopped, if the plugin broke the transport's rules (reported as a
    /// protocol violation by whoever decodes next).
    pub fault: Option<String>,
}

/// The longest single wait of a blocking call without a deadline (it then waits again).
const LONG_WAIT: Duration = Duration::from_secs(60);

/// How much later than its deadline a blocking call may notice it, to spare a syscall.
const DEADLINE_SLACK: Duration = Duration::from_millis(1);

impl ReadSide {
    /// Reads what is there now, without waiting. A record too long for the transport ends
    /// the stream, and leaves its explanation in `fault`.
    pub fn fill(&mut self, sock: &UnixStream) -> io::Result<Filled> {
        match read_available(sock, &mut self.rbuf, self.records) {
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                self.fault = Some(e.to_string());
                Ok(Filled::Eof)
            }
            other => other,
        }
    }

    /// Sets the socket's receive timeout (what a blocking recv waits at most) to about
    /// `wait`: only when the one set would end more than [`DEADLINE_SLACK`] after `wait`, or
    /// well before it — so back-to-back calls with the same deadline make no syscall for it.
    fn arm(&mut self, sock: &UnixStream, wait: Duration) -> io::Result<()> {
        let wait = wait.clamp(Duration::from_micros(1), LONG_WAIT);
        let stale = match self.armed {
            None => true,
            Some(set) => set > wait + DEADLINE_SLACK || set < wait / 2,
        };
        if stale {
            let tv = nix::sys::time::TimeVal::new(
                wait.as_secs() as libc::time_t,
                wait.subsec_micros() as libc::suseconds_t,
            );
            nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::ReceiveTimeout, &tv)?;
            self.armed = Some(wait);
        }
        Ok(())
    }
}

/// What a blocking caller leaves for the actor.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// A frame that is not the caller's reply.
    Frame(Message),
    /// A blocking call missed its deadline (the actor counts these toward "hung").
    MissedDeadline,
    /// The socket reached end of stream.
    Eof,
    /// The plugin sent something that is not a valid frame.
    Fault(String),
}

/// The socket and what both sides share about it.
pub(crate) struct Wire {
    /// A duplicate of the instance's socket (the same open file). It is in blocking mode:
    /// every read and write passes `MSG_DONTWAIT` except a blocking caller's wait for its
    /// reply, which is then a single `recv`.
    sock: UnixStream,
    /// Call ids, unique on this socket across async and blocking calls.
    pub next_id: AtomicU64,
    /// Bytes not yet written (frames are appended whole).
    pub write: Mutex<Vec<u8>>,
    /// The read side; a blocking caller holds it for the whole call.
    pub read: Mutex<ReadSide>,
    /// Frames and events for the actor.
    pub inbox: Mutex<Vec<Inbound>>,
    /// Wakes the actor (inbox, unwritten bytes, unread bytes, a caller finished).
    pub wake: tokio::sync::Notify,
    /// Set when the instance stops or hands over: blocking callers go elsewhere.
    pub closing: AtomicBool,
    /// Blocking calls answered in time (the actor's "missed deadlines in a row" resets on it).
    pub answered: AtomicU64,
    /// Engine mode: the actor stays off the runtime's epoll for this socket and reads on a
    /// short tick instead, so an engine thread's replies wake nobody but that thread.
    pub engine: AtomicBool,
    /// True while a new instance holds calls during a hot update; cleared on release.
    held: Mutex<bool>,
    /// `held`, readable without the lock (callers look at it on every call).
    holding: AtomicBool,
    released: Condvar,
    name: String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock()
}

/// Why a blocking call did not even start.
pub(crate) enum NotSent {
    /// The instance is stopping or handed over: try the current route again (payload back).
    Closing(Payload),
    /// A definite answer.
    Failed(CallError),
}

impl Wire {
    /// Shares `sock` (a duplicate of the instance's socket).
    pub fn new(sock: UnixStream, max_frame: u32, hold: bool, engine: bool, name: &str) -> Wire {
        // Asked of the socket itself, so an instance adopted across an upgrade is right too.
        let records = matches!(
            nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::SockType),
            Ok(nix::sys::socket::SockType::SeqPacket)
        );
        Wire {
            sock,
            next_id: AtomicU64::new(1),
            write: Mutex::new(Vec::with_capacity(4096)),
            read: Mutex::new(ReadSide {
                rbuf: Vec::with_capacity(READ_CHUNK),
                decoder: FrameDecoder::new(max_frame),
                armed: None,
                records,
                fault: None,
            }),
            inbox: Mutex::new(Vec::new()),
            wake: tokio::sync::Notify::new(),
            closing: AtomicBool::new(false),
            answered: AtomicU64::new(0),
            engine: AtomicBool::new(engine),
            held: Mutex::new(hold),
            holding: AtomicBool::new(hold),
            released: Condvar::new(),
            name: name.to_string(),
        }
    }

    /// The shared socket; use [`read_available`] and [`write_available`], which never wait.
    pub fn sock(&self) -> &UnixStream {
        &self.sock
    }

    /// Lets blocking calls through after a hot update's hand-over.
    pub fn release(&self) {
        *lock(&self.held) = false;
        self.holding.store(false, Ordering::Release);
        self.released.notify_all();
    }

    /// Stops new blocking calls; true if none is in flight right now.
    pub fn close(&self) -> bool {
        self.closing.store(true, Ordering::SeqCst);
        self.release(); // a caller waiting for a release must see the close
        self.read.try_lock().is_some()
    }

    /// True if no blocking call holds the socket.
    pub fn idle(&self) -> bool {
        self.read.try_lock().is_some()
    }

    fn push(&self, item: Inbound) {
        lock(&self.inbox).push(item);
        self.wake.notify_one();
    }

    /// Takes everything blocking callers left for the actor.
    pub fn take_inbox(&self) -> Vec<Inbound> {
        std::mem::take(&mut *lock(&self.inbox))
    }

    /// True if bytes wait in the socket (a peek; nothing is consumed).
    fn unread_bytes(&self) -> bool {
        let mut one = [0u8; 1];
        matches!(
            nix::sys::socket::recv(
                std::os::fd::AsRawFd::as_raw_fd(&self.sock),
                &mut one,
                nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            ),
            Ok(n) if n > 0
        )
    }

    /// One call on the calling thread: write the Call, wait for its Reply on the socket.
    /// `now` is the caller's recent clock reading (spares a read on the hot path).
    pub fn call_blocking(
        &self,
        method: &str,
        payload: Payload,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Result<Result<Payload, CallError>, NotSent> {
        // A new instance of a hot update takes calls only once the old one handed over.
        if self.holding.load(Ordering::Acquire) {
            let mut held = lock(&self.held);
            while *held {
                let wait = match deadline {
                    Some(d) => d.saturating_duration_since(Instant::now()),
                    None => std::time::Duration::from_secs(3600),
                };
                if wait.is_zero() {
                    return Err(NotSent::Failed(self.deadline_error()));
                }
                self.released.wait_for(&mut held, wait);
            }
        }
        let mut read = lock(&self.read);
        // Checked under the read lock: an actor that set `closing` and then found the lock
        // free will not see a call from us.
        if self.closing.load(Ordering::SeqCst) {
            return Err(NotSent::Closing(payload));
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let deadline_us = match deadline {
            Some(d) if d <= now => return Err(NotSent::Failed(self.deadline_error())),
            Some(d) => (d - now).as_micros().max(1) as u64,
            None => 0,
        };
        let msg = Message::Call(Call { id, method: method.to_string(), deadline_us, payload });
        {
            let mut w = lock(&self.write);
            if let Err(e) = encode_frame(&msg, &mut w) {
                return Err(NotSent::Failed(CallError::new(ErrorCode::Internal, e.to_string())));
            }
            match write_available(&self.sock, &mut w) {
                Ok(()) if w.is_empty() => {}
                // The socket is full: the actor writes the rest when it can.
                Ok(()) => self.wake.notify_one(),
                Err(e) => {
                    w.clear();
                    drop(w);
                    self.push(Inbound::Eof);
                    return Ok(Err(self.gone(&e.to_string())));
                }
            }
        }
        let result = self.await_reply(&mut read, id, deadline, now);
        // Frames read together with our reply are still undecoded in the buffer.
        let leftover = !read.rbuf.is_empty();
        drop(read);
        // Those, and bytes that arrived while we held the socket, were not seen by the actor
        // (it clears its readiness then); a stopping actor waits for us. So it must look now.
        // In engine mode the actor reads on its tick once calls pause, so no peek is needed.
        if leftover
            || self.closing.load(Ordering::SeqCst)
            || (!self.engine.load(Ordering::Relaxed) && self.unread_bytes())
        {
            self.wake.notify_one();
        }
        Ok(result)
    }

    fn await_reply(
        &self,
        read: &mut ReadSide,
        id: u64,
        deadline: Option<Instant>,
        sent: Instant,
    ) -> Result<Payload, CallError> {
        let mut sent = Some(sent);
        loop {
            // Whole frames already read first (the actor may have left some).
            loop {
                let ReadSide { rbuf, decoder, .. } = &mut *read;
                match decoder.next(rbuf) {
                    Ok(Some(Message::Reply(r))) if r.id == id => {
                        self.answered.fetch_add(1, Ordering::Relaxed);
                        return r.result;
                    }
                    // A blocking call has no one to stream pieces to.
                    Ok(Some(Message::Chunk { id: cid, .. })) if cid == id => {}
                    Ok(Some(other)) => self.push(Inbound::Frame(other)),
                    Ok(None) => break,
                    Err(e) => {
                        self.push(Inbound::Fault(e.to_string()));
                        return Err(self.gone(&format!("protocol violation: {e}")));
                    }
                }
            }
            let wait = match deadline {
                Some(d) => {
                    // The first wait counts from when the call was sent; later ones from now.
                    let now = sent.take().unwrap_or_else(Instant::now);
                    let left = d.saturating_duration_since(now);
                    if left.is_zero() {
                        self.give_up(id);
                        return Err(CallError::new(
                            ErrorCode::DeadlineExceeded,
                            format!("plugin {} did not reply in time", self.name),
                        ));
                    }
                    left
                }
                None => LONG_WAIT,
            };
            // One blocking recv is the whole wait: no poll before it.
            if let Err(e) = read.arm(&self.sock, wait) {
                return Err(self.gone(&format!("cannot set the receive timeout: {e}")));
            }
            let records = read.records;
            match recv_into(&self.sock, &mut read.rbuf, MsgFlags::empty(), records) {
                Ok(Filled::Drained | Filled::More) => {}
                Ok(Filled::Eof) => {
                    self.push(Inbound::Eof);
                    return Err(self.gone("closed its socket"));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The receive timeout ran out (the deadline check above answers next) —
                    // or the socket is not in blocking mode after all. Waiting in poll for
                    // what is left of the wait makes sure this loop never spins either way.
                    let left = match deadline {
                        Some(d) => d.saturating_duration_since(Instant::now()),
                        None => LONG_WAIT,
                    };
                    if !left.is_zero() {
                        let ms = left.as_micros().div_ceil(1000);
                        let timeout = nix::poll::PollTimeout::try_from(ms)
                            .unwrap_or(nix::poll::PollTimeout::MAX);
                        let mut fds = [nix::poll::PollFd::new(
                            self.sock.as_fd(),
                            nix::poll::PollFlags::POLLIN,
                        )];
                        match nix::poll::poll(&mut fds, timeout) {
                            Ok(_) | Err(Errno::EINTR) => {}
                            Err(e) => return Err(self.gone(&e.to_string())),
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    self.push(Inbound::Fault(e.to_string()));
                    return Err(self.gone(&format!("protocol violation: {e}")));
                }
                Err(e) => {
                    self.push(Inbound::Eof);
                    return Err(self.gone(&e.to_string()));
                }
            }
        }
    }

    /// A call that missed its deadline: tell the plugin, and the actor (which counts them).
    fn give_up(&self, id: u64) {
        let mut w = lock(&self.write);
        if encode_frame(&Message::Cancel { id }, &mut w).is_ok() {
            let _ = write_available(&self.sock, &mut w);
        }
        drop(w);
        self.push(Inbound::MissedDeadline);
    }

    fn deadline_error(&self) -> CallError {
        CallError::new(
            ErrorCode::DeadlineExceeded,
            format!("plugin {}: deadline passed before the call was sent", self.name),
        )
    }

    fn gone(&self, why: &str) -> CallError {
        CallError::new(
            ErrorCode::PluginExited,
            format!("plugin {} ended before it replied ({why})", self.name),
        )
    }
}
