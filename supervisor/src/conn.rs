//! The connection core: one plugin socket and the calls in flight on it, shared by both
//! call paths.
//!
//! A caller — an async task ([`Conn::call`]) or a host's engine thread
//! ([`Conn::call_blocking`]) — starts its call in the [`CallTable`] and appends its Call
//! frame to the write buffer in one step under the table's lock, then writes what the
//! socket takes itself. Only the reply is demultiplexed: whoever reads the socket (the
//! instance actor, or an engine thread waiting for its own reply) hands every Reply to
//! [`Conn::deliver`], which completes the call it answers, and leaves every other frame
//! (pongs, logs, state) in the actor's inbox. An async call therefore costs the wake-up of
//! the reader and of the caller, with no hop through the actor on the way out. Deadlines,
//! "did not reply in time", the Cancel sent on a miss, the count of misses in a row and
//! encode failures are each written once, here, for both paths.
//!
//! An engine thread owns the read side for the whole of its call and waits in one blocking
//! `recv` — the same two wake-ups per round trip as a raw socketpair ping-pong. The actor
//! reads only when that lock is free; an engine thread wakes it after its call only if it
//! must (frames left in the inbox or the buffer, bytes the actor did not see, or the
//! instance waiting to stop).
//!
//! Lock order: the read side, then the table, then the write buffer; no lock is held
//! across a `send` (see [`Conn::write_out`]).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::MsgFlags;
use parking_lot::{Condvar, Mutex, MutexGuard};
use plugin_proto::frame::{encode_call_frame, encode_frame};
use plugin_proto::shm;
use plugin_proto::{
    Call, CallError, CallRef, ErrorCode, Message, Payload, Reply, PROTO_CALL_CFG, PROTO_HOST_CALLS,
    PROTO_RING_HOST_CALLS,
};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::calls::{CallTable, Completed, Expired, Gate};
use crate::host::{run_guarded, HostMethods, Served};
use crate::wire::{recv_into, write_available, Filled, ReadSide, LONG_WAIT};

/// What waits for a call's reply.
pub(crate) enum Waiter {
    /// An async caller: the reply goes here, and streamed pieces too if it wants them.
    Async {
        reply: oneshot::Sender<Result<Payload, CallError>>,
        chunks: Option<mpsc::UnboundedSender<Payload>>,
    },
    /// An engine thread, which reads its own reply.
    Blocking,
}

/// What other readers (and callers) leave for the instance actor.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// A frame that is not a reply (those are delivered where they belong).
    Frame(Message),
    /// A call to the host the plugin put on the replies ring (protocol 4).
    RingHostCall(Call),
    /// The socket reached end of stream, or broke.
    Eof,
    /// The plugin sent something that is not a valid frame.
    Fault(String),
    /// Calls missed their deadline too many times in a row.
    Hung(String),
}

/// Why a call did not even start.
pub(crate) enum NotSent {
    /// The instance is stopping or handed over: try the current route (payload back).
    Closing(Payload),
    /// A definite answer.
    Failed(CallError),
}

/// One plugin socket and its calls (see the module doc).
pub(crate) struct Conn {
    /// A duplicate of the instance's socket (the same open file), in blocking mode: every
    /// read and write passes `MSG_DONTWAIT` except an engine thread's wait for its reply.
    sock: UnixStream,
    name: String,
    table: Mutex<CallTable<Waiter>>,
    /// The table's gate, readable without its lock (a hint for fast paths; decisions are
    /// taken under the lock).
    gate: AtomicU8,
    /// Wakes engine threads waiting for a held connection.
    released: Condvar,
    /// Wakes async callers waiting for a held connection.
    released_async: Notify,
    /// Frames not yet written (appended whole), and whether a thread is writing them.
    out: Mutex<Outbox>,
    /// Bytes read but not decoded; an engine thread holds it for its whole call.
    pub read: Mutex<ReadSide>,
    inbox: Mutex<Vec<Inbound>>,
    /// Wakes the actor: the inbox, unwritten or unread bytes, or idle while closing.
    pub wake: Notify,
    /// Engine mode: the actor stays off the runtime's epoll for this socket and reads on a
    /// tick instead, so an engine thread's replies wake nobody but that thread. The
    /// plugin's own flag (shared with every connection it has had), so it is held once.
    pub engine: Arc<AtomicBool>,
    /// Engine-thread calls made (the actor's read tick backs off while it moves).
    pub engine_calls: AtomicU64,
    /// Calls sent through the shared-memory rings (the rest went by the socket).
    pub ring_calls: AtomicU64,
    /// Host calls that came on the replies ring and were answered on the calls ring
    /// (protocol 4 on shared memory).
    pub ring_host_calls: AtomicU64,
    /// Whether the socket keeps message boundaries (`transport = "seqpacket"`).
    records: bool,
    /// The protocol version the handshake settled on (host calls need 2).
    proto: AtomicU16,
    /// What the plugin may call on the host.
    host: Arc<HostMethods>,
    /// The supervisor's runtime, where an engine thread runs an async host method.
    rt: Option<tokio::runtime::Handle>,
    /// Async host calls of this plugin in flight: while it waits on the host, a call of ours
    /// that misses its deadline does not count toward "hung" (a cycle of plugin calls ends
    /// at the deadline; it is not a hang).
    host_in_flight: std::sync::atomic::AtomicU32,
    /// The shared-memory rings (`transport = "shm"`): engine-thread calls go through them
    /// once the plugin said it reads them (`plugd.shm`).
    shm: Option<ShmSide>,
    /// The socket reached its end or broke (an engine thread waiting on a ring gives up).
    closed: AtomicBool,
    /// The largest frame the plugin may send.
    max_frame: u32,
}

/// This connection's side of a shared mapping.
pub(crate) struct ShmSide {
    /// Set when the plugin's SDK took the mapping (`Notify "plugd.shm"` before Ready).
    active: AtomicBool,
    /// The calls ring's writing end, and the buffer a Call frame is encoded in (reused).
    calls: Mutex<(shm::Producer, Vec<u8>)>,
    /// The replies ring's reading end and the buffer a reply is copied into (reused): an
    /// engine thread holds it for its whole call.
    replies: Mutex<(shm::Consumer, Vec<u8>)>,
    /// The calls ring, for the doorbell (the socket has news for the plugin).
    bell: shm::Ring,
    /// The replies ring, to ask the plugin for a socket nudge after each reply.
    replies_ring: shm::Ring,
    /// Async callers waiting on the socket for a ring reply (the nudge is on while any).
    nudged: Mutex<u32>,
    /// Set once a reply frame broke the ring's rules: no one reads it any more.
    broken: AtomicBool,
    /// How an engine thread waits for a reply.
    wait: shm::WaitStrategy,
    /// The mapping's memfd, kept to hand over on an in-place upgrade.
    memfd: OwnedFd,
}

/// An async caller's request for socket nudges; dropping it withdraws the request.
struct Nudged<'a>(&'a ShmSide);

impl ShmSide {
    /// Asks the plugin to say on the socket whenever it puts a reply in the ring.
    fn nudge(&self) -> Nudged<'_> {
        let mut n = self.nudged.lock();
        *n += 1;
        if *n == 1 {
            self.replies_ring.ask_nudge(true);
        }
        Nudged(self)
    }
}

impl Drop for Nudged<'_> {
    fn drop(&mut self) {
        let mut n = self.0.nudged.lock();
        *n -= 1;
        if *n == 0 {
            self.0.replies_ring.ask_nudge(false);
        }
    }
}

impl ShmSide {
    /// Our ends of `map`'s rings (from the positions the mapping holds), waiting per
    /// `wait`; `memfd` is the mapping's descriptor.
    pub fn new(map: Arc<shm::Mapping>, wait: shm::WaitStrategy, memfd: OwnedFd) -> ShmSide {
        ShmSide {
            memfd,
            active: AtomicBool::new(false),
            calls: Mutex::new((map.calls().producer(), Vec::with_capacity(256))),
            replies: Mutex::new((map.replies().consumer(), Vec::with_capacity(256))),
            bell: map.calls(),
            replies_ring: map.replies(),
            nudged: Mutex::new(0),
            broken: AtomicBool::new(false),
            wait,
        }
    }
}

/// How many bytes may wait unwritten to a plugin before an answer to one of its host calls
/// is refused and the plugin killed as a protocol violation (or four of its largest
/// frames, if more): a plugin that calls the host without reading must not make plugd's
/// memory grow without bound.
const UNWRITTEN_ANSWERS_MAX: usize = 64 << 20;

/// How long an async caller looks at the replies ring itself before it waits for the
/// plugin's nudge on the socket (a plugin with `wait = "futex"`: not at all).
const ASYNC_SPIN: Duration = Duration::from_micros(50);

/// How long an engine thread waiting on a ring sleeps at most before it checks that the
/// connection is still there.
const SHM_SLICE: std::time::Duration = std::time::Duration::from_millis(10);

/// Frames waiting to be written, and whether a thread is writing a batch of them now.
struct Outbox {
    bytes: Vec<u8>,
    /// A thread is in `send` with a batch taken from `bytes`: others append and leave.
    writing: bool,
}

fn gate_code(g: Gate) -> u8 {
    match g {
        Gate::Held => 0,
        Gate::Open => 1,
        Gate::Closing => 2,
    }
}

/// Forgets call `id` if its caller leaves before the reply (a dropped future), and tells
/// the plugin so it can stop working on it.
struct Leave<'a> {
    conn: &'a Conn,
    id: Option<u64>,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            let mut t = self.conn.table.lock();
            if t.abandon(id) {
                self.conn.cancel(&mut t, id);
                drop(t);
                let _ = self.conn.send_now();
            }
        }
    }
}

impl Conn {
    /// Shares `sock` (a duplicate of the instance's socket). `hold`: a hot update's new
    /// instance, whose calls wait for [`Conn::release`]; `missed_limit`: calls in a row
    /// past their deadline that mean hung (0: never).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        sock: UnixStream,
        max_frame: u32,
        hold: bool,
        engine: Arc<AtomicBool>,
        name: &str,
        missed_limit: u32,
        host: Arc<HostMethods>,
        shm: Option<ShmSide>,
    ) -> Conn {
        // Asked of the socket itself, so an instance adopted across an upgrade is right too.
        let records = matches!(
            nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::SockType),
            Ok(nix::sys::socket::SockType::SeqPacket)
        );
        let table = CallTable::new(hold, missed_limit);
        Conn {
            sock,
            name: name.to_string(),
            gate: AtomicU8::new(gate_code(table.gate())),
            table: Mutex::new(table),
            released: Condvar::new(),
            released_async: Notify::new(),
            out: Mutex::new(Outbox { bytes: Vec::with_capacity(4096), writing: false }),
            read: Mutex::new(ReadSide::new(max_frame, records)),
            inbox: Mutex::new(Vec::new()),
            wake: Notify::new(),
            engine,
            engine_calls: AtomicU64::new(0),
            ring_calls: AtomicU64::new(0),
            ring_host_calls: AtomicU64::new(0),
            records,
            proto: AtomicU16::new(plugin_proto::PROTO_MIN),
            host,
            rt: tokio::runtime::Handle::try_current().ok(),
            host_in_flight: Default::default(),
            shm,
            closed: AtomicBool::new(false),
            max_frame,
        }
    }

    /// The plugin said it reads the shared-memory rings: engine-thread calls go through
    /// them from now on. False if this connection has no mapping.
    pub fn activate_shm(&self) -> bool {
        match &self.shm {
            Some(s) => {
                s.active.store(true, Ordering::Release);
                true
            }
            None => false,
        }
    }

    /// The mapping's descriptor and wait strategy, for a successor plugd (an upgrade), if
    /// the plugin reads the rings.
    pub fn shm_handover(&self) -> Option<(OwnedFd, shm::WaitStrategy)> {
        let s = self.shm.as_ref().filter(|s| s.active.load(Ordering::Acquire))?;
        Some((s.memfd.try_clone().ok()?, s.wait))
    }

    /// Whether this connection was given a shared mapping (`transport = "shm"`).
    pub fn has_shm(&self) -> bool {
        self.shm.is_some()
    }

    /// How calls reach the plugin, for status: `stream`, `seqpacket`, `shm (WAIT)`, or the
    /// socket with a note when the plugin was given a mapping its SDK did not take.
    pub fn transport(&self) -> String {
        let socket = if self.records { "seqpacket" } else { "stream" };
        match &self.shm {
            Some(s) if s.active.load(Ordering::Acquire) => format!("shm ({})", s.wait.word()),
            Some(_) => format!("{socket} (shm asked for; the plugin's SDK does not read it)"),
            None => socket.to_string(),
        }
    }

    /// The wait strategy, if calls go through shared memory.
    pub fn shm_wait(&self) -> Option<shm::WaitStrategy> {
        self.shm.as_ref().filter(|s| s.active.load(Ordering::Acquire)).map(|s| s.wait)
    }

    /// Records the protocol version the handshake settled on.
    pub fn set_proto(&self, proto: u16) {
        self.proto.store(proto, Ordering::Relaxed);
    }

    /// The protocol version in use.
    pub fn proto(&self) -> u16 {
        self.proto.load(Ordering::Relaxed)
    }

    /// Serves a call the plugin made to the host, from the instance actor: a sync method
    /// on this task, an async one as a task of its own that answers when done. `by_ring`:
    /// the call came on the replies ring.
    pub fn serve_host_call(self: &Arc<Self>, call: Call, by_ring: bool) {
        let (id, method) = (call.id, call.method.clone());
        match self.host.serve(&self.name, call) {
            Served::Now(answer) => self.answer_host_call(id, &method, answer, by_ring),
            // A hostile plugin must not grow the host's tasks without bound.
            Served::Later(_) if self.host_in_flight.load(Ordering::SeqCst) >= HOST_CALLS_MAX => {
                let err = CallError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "plugin {} has {HOST_CALLS_MAX} calls to the host in flight already; wait for their answers",
                        self.name
                    ),
                );
                self.answer_host_call(id, &method, Err(err), by_ring);
            }
            Served::Later(fut) => {
                let conn = self.clone();
                self.host_in_flight.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let answer = run_guarded(method.clone(), fut).await;
                    conn.host_in_flight.fetch_sub(1, Ordering::SeqCst);
                    conn.answer_host_call(id, &method, answer, by_ring);
                });
            }
        }
    }

    /// Serves a call the plugin made to the host on this (engine) thread, async methods
    /// included (run to the end on the supervisor's runtime while this thread waits).
    fn serve_host_call_inline(&self, call: Call, by_ring: bool) {
        let (id, method) = (call.id, call.method.clone());
        let answer = match self.host.serve(&self.name, call) {
            Served::Now(answer) => answer,
            Served::Later(fut) => match &self.rt {
                Some(rt) if tokio::runtime::Handle::try_current().is_err() => {
                    self.host_in_flight.fetch_add(1, Ordering::SeqCst);
                    let answer = rt.block_on(run_guarded(method.clone(), fut));
                    self.host_in_flight.fetch_sub(1, Ordering::SeqCst);
                    answer
                }
                _ => Err(CallError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "host method {method} is async and the call to plugin {} was made with call_blocking from an async runtime's thread; call from a thread of your own",
                        self.name
                    ),
                )),
            },
        };
        self.answer_host_call(id, &method, answer, by_ring);
    }

    /// Writes the Reply to the plugin's host call `id`: on the calls ring when the plugin
    /// speaks protocol 4 there (it then waits on the ring and the socket both), else (or
    /// when it does not fit the ring now) on the socket.
    fn answer_host_call(
        &self,
        id: u64,
        method: &str,
        answer: Result<Payload, CallError>,
        by_ring: bool,
    ) {
        let reply = Message::Reply(Reply { id, result: answer });
        if self.answer_on_ring(&reply, by_ring) {
            return;
        }
        // A plugin that calls the host without reading the answers would have them pile
        // up here for ever: past the bound it is a protocol violation (the actor kills it).
        let unwritten = self.out.lock().bytes.len();
        let most = UNWRITTEN_ANSWERS_MAX.max(4 * self.max_frame as usize);
        if unwritten > most {
            // Said once: the actor ends the connection on the first.
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            self.push(Inbound::Fault(format!(
                "it calls the host without reading the answers ({} MiB of them and plugd's calls unread; at most {} MiB)",
                unwritten >> 20,
                most >> 20
            )));
            return;
        }
        let encoded = encode_frame(&reply, &mut self.out.lock().bytes);
        if let Err(e) = encoded {
            // The answer does not fit a frame: say so instead (that always fits).
            let err = CallError::new(
                ErrorCode::Internal,
                format!("the host's answer to {method} cannot be sent: {e}"),
            );
            let reply = Message::Reply(Reply { id, result: Err(err) });
            let _ = encode_frame(&reply, &mut self.out.lock().bytes);
        }
        let _ = self.send_now();
    }

    /// Puts `reply` (to a host call) on the calls ring; false if it goes by the socket.
    /// A call that came by the ring and is answered there is counted (`ring_host_calls`).
    fn answer_on_ring(&self, reply: &Message, by_ring: bool) -> bool {
        if self.proto() < PROTO_RING_HOST_CALLS {
            return false;
        }
        let Some(shm) = self.shm.as_ref().filter(|s| s.active.load(Ordering::Acquire)) else {
            return false;
        };
        if shm.broken.load(Ordering::Acquire) {
            return false;
        }
        let mut calls = shm.calls.lock();
        let (ring, frame) = &mut *calls;
        frame.clear();
        // One that does not encode goes the socket's way, which says why to the plugin.
        if encode_frame(reply, frame).is_err() {
            return false;
        }
        match ring.push(frame) {
            Ok(pushed) => {
                if pushed && by_ring {
                    self.ring_host_calls.fetch_add(1, Ordering::Relaxed);
                }
                pushed
            }
            Err(e) => {
                drop(calls);
                shm.broken.store(true, Ordering::Release);
                self.push(Inbound::Fault(e.to_string()));
                true
            }
        }
    }

    /// The shared socket; use [`crate::wire::read_available`] and [`write_available`],
    /// which never wait.
    pub fn sock(&self) -> &UnixStream {
        &self.sock
    }

    // ----- the instance actor's side -----

    fn gate_moved(&self, t: &CallTable<Waiter>) {
        self.gate.store(gate_code(t.gate()), Ordering::SeqCst);
        self.released.notify_all();
        self.released_async.notify_waiters();
    }

    /// Lets calls start (a hot update's hand-over is done).
    pub fn release(&self) {
        let mut t = self.table.lock();
        t.release();
        self.gate_moved(&t);
    }

    /// No new call starts: callers go to the next route.
    pub fn close(&self) {
        let mut t = self.table.lock();
        t.close();
        self.gate_moved(&t);
    }

    /// Closed and no call in flight (async or engine thread).
    pub fn idle(&self) -> bool {
        self.table.lock().idle()
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> usize {
        self.table.lock().in_flight()
    }

    /// Closes, and answers every async call in flight with `code` and `why`; returns how
    /// many. (An engine thread's call ends with the socket: it reads the end of stream.)
    pub fn fail_in_flight(&self, code: ErrorCode, why: &str) -> usize {
        // An engine thread waiting on a shared-memory ring sees this and gives up.
        self.closed.store(true, Ordering::Release);
        let failed = {
            let mut t = self.table.lock();
            let failed = t.fail_all(|w| matches!(w, Waiter::Async { .. }));
            self.gate_moved(&t);
            failed
        };
        let n = failed.len();
        for w in failed {
            if let Waiter::Async { reply, .. } = w {
                let _ =
                    reply.send(Err(CallError::new(code, format!("plugin {}: {why}", self.name))));
            }
        }
        n
    }

    /// Takes everything other readers left for the actor.
    pub fn take_inbox(&self) -> Vec<Inbound> {
        std::mem::take(&mut *self.inbox.lock())
    }

    fn push(&self, item: Inbound) {
        if matches!(item, Inbound::Eof | Inbound::Fault(_)) {
            self.closed.store(true, Ordering::Release);
        }
        self.inbox.lock().push(item);
        self.wake.notify_one();
    }

    /// Encodes a frame into the write buffer and writes what the socket takes now.
    pub fn queue(&self, msg: &Message) -> io::Result<()> {
        self.encode(msg).map_err(io::Error::other)?;
        self.flush()
    }

    /// Appends a frame to the write buffer (written by the next flush).
    pub fn encode(&self, msg: &Message) -> Result<(), plugin_proto::CodecError> {
        encode_frame(msg, &mut self.out.lock().bytes)
    }

    /// Writes what the socket takes now of the write buffer (see [`Conn::write_out`]); for
    /// the instance actor, which watches for room to write itself.
    pub fn flush(&self) -> io::Result<()> {
        self.write_out(false)
    }

    /// Drops what was never written (the socket broke).
    pub fn discard_unwritten(&self) {
        self.out.lock().bytes.clear();
    }

    /// True if frames wait to be written (or are being written).
    pub fn unwritten(&self) -> bool {
        let o = self.out.lock();
        o.writing || !o.bytes.is_empty()
    }

    /// Writes what the socket takes now, combining writers: a thread that finds another
    /// one writing leaves its frames to it, and the writer takes every batch appended
    /// meanwhile before it stops. Concurrent callers so share `send` calls (and the plugin
    /// its reads) instead of queueing for a lock to make one each. What the socket does not
    /// take goes back in front and waits for the actor (it watches for room to write):
    /// `wake_actor` tells it, unless the actor is the writer (it would wake itself at once,
    /// for as long as the plugin does not read: a busy loop that starves its timers).
    fn write_out(&self, wake_actor: bool) -> io::Result<()> {
        let Some(shm) = self.shm.as_ref().filter(|s| s.active.load(Ordering::Acquire)) else {
            return self.write_out_now(wake_actor);
        };
        if self.out.lock().bytes.is_empty() {
            return Ok(());
        }
        let written = self.write_out_now(wake_actor);
        // The plugin may be waiting on its calls ring rather than on the socket: told once
        // the bytes are there to read.
        shm.bell.doorbell();
        written
    }

    fn write_out_now(&self, wake_actor: bool) -> io::Result<()> {
        let mut batch = {
            let mut o = self.out.lock();
            if o.writing || o.bytes.is_empty() {
                return Ok(());
            }
            o.writing = true;
            std::mem::take(&mut o.bytes)
        };
        loop {
            let sent = write_available(&self.sock, &mut batch);
            let mut o = self.out.lock();
            match sent {
                Err(e) => {
                    o.bytes.clear();
                    o.writing = false;
                    return Err(e);
                }
                Ok(()) if !batch.is_empty() => {
                    batch.extend_from_slice(&o.bytes);
                    o.bytes = batch;
                    o.writing = false;
                    drop(o);
                    if wake_actor {
                        self.wake.notify_one();
                    }
                    return Ok(());
                }
                Ok(()) => {
                    // `batch` is empty now: it trades places with what came meanwhile (the
                    // buffer keeps its allocation either way).
                    std::mem::swap(&mut o.bytes, &mut batch);
                    if batch.is_empty() {
                        o.writing = false;
                        return Ok(());
                    }
                }
            }
        }
    }

    // ----- any reader -----

    /// A Reply came in: completes the call it answers. Err: it answers a call never made.
    pub fn deliver(&self, reply: Reply) -> Result<(), String> {
        let done = {
            let mut t = self.table.lock();
            let done = t.complete(reply.id);
            self.settled(&t);
            done
        };
        match done {
            Completed::Waiting(Waiter::Async { reply: tx, .. }) => {
                let _ = tx.send(reply.result);
            }
            // An engine thread holds the read side until it has its own reply, so no one
            // else reads it; nothing to do if that ever changed.
            Completed::Waiting(Waiter::Blocking) | Completed::Late => {}
            Completed::Unknown => {
                return Err(format!("reply to call {} that was never made", reply.id))
            }
        }
        Ok(())
    }

    /// A streamed piece of call `id`'s answer: to its caller if it asked for pieces; for
    /// any other call (or one already answered) it is legal and dropped.
    pub fn deliver_chunk(&self, id: u64, payload: Payload) {
        if let Some(Waiter::Async { chunks: Some(tx), .. }) = self.table.lock().waiter(id) {
            let _ = tx.send(payload);
        }
    }

    /// After a call left the table: a closing connection that just became idle wakes the
    /// actor, which waits for that to shut down or hand over.
    fn settled(&self, t: &CallTable<Waiter>) {
        if t.idle() {
            self.wake.notify_one();
        }
    }

    // ----- starting and ending a call -----

    /// The Call's `deadline_us` (0: none), or the error for a deadline already passed.
    fn deadline_us(&self, deadline: Option<Instant>, now: Instant) -> Result<u64, NotSent> {
        match deadline {
            Some(d) if d <= now => Err(NotSent::Failed(CallError::new(
                ErrorCode::DeadlineExceeded,
                format!("plugin {}: deadline passed before the call was sent", self.name),
            ))),
            Some(d) => Ok((d - now).as_micros().max(1) as u64),
            None => Ok(0),
        }
    }

    /// Starts a call and appends its frame to the write buffer, in one step under the
    /// table's lock: no Shutdown or hand-over can come between the two (see `calls`'
    /// model test).
    #[allow(clippy::too_many_arguments)]
    fn begin(
        &self,
        t: &mut CallTable<Waiter>,
        waiter: Waiter,
        method: &str,
        payload: Payload,
        cfg: Option<&Payload>,
        deadline_us: u64,
        probe: bool,
        ring: Option<&ShmSide>,
    ) -> Result<(u64, bool), NotSent> {
        if cfg.is_some() && self.proto() < PROTO_CALL_CFG {
            return Err(NotSent::Failed(CallError::new(
                ErrorCode::BadPayload,
                format!(
                    "plugin {} speaks protocol {}, which has no per-call cfg (protocol {PROTO_CALL_CFG} has); rebuild it with a current SDK, or call {method} without cfg",
                    self.name,
                    self.proto()
                ),
            )));
        }
        let Ok(id) = t.begin_as(waiter, probe) else {
            return Err(NotSent::Closing(payload));
        };
        let call = Call { id, method: method.to_string(), deadline_us, payload };
        let msg = match cfg {
            None => Message::Call(call),
            Some(cfg) => Message::CallCfg { call, cfg: cfg.clone() },
        };
        let cannot_encode = |e: plugin_proto::CodecError| {
            NotSent::Failed(CallError::new(
                ErrorCode::Internal,
                format!("plugin {}: cannot encode the call to {method}: {e}", self.name),
            ))
        };
        let Some(shm) = ring else {
            if let Err(e) = encode_frame(&msg, &mut self.out.lock().bytes) {
                t.abandon(id);
                return Err(cannot_encode(e));
            }
            return Ok((id, false));
        };
        let mut calls = shm.calls.lock();
        let (producer, frame) = &mut *calls;
        frame.clear();
        if let Err(e) = encode_frame(&msg, frame) {
            t.abandon(id);
            return Err(cannot_encode(e));
        }
        match producer.push(frame) {
            Ok(true) => Ok((id, true)),
            // No room now, or too big for the ring: by the socket.
            Ok(false) => {
                self.out.lock().bytes.extend_from_slice(frame);
                Ok((id, false))
            }
            Err(e) => {
                t.abandon(id);
                drop(calls);
                shm.broken.store(true, Ordering::Release);
                self.push(Inbound::Fault(e.to_string()));
                Err(NotSent::Failed(self.gone("it broke its shared memory")))
            }
        }
    }

    /// Writes what the socket takes now; what is left the actor writes when there is room.
    /// Err: the socket is broken (the actor hears of it as the end of the stream).
    fn send_now(&self) -> Result<(), String> {
        self.write_out(true).map_err(|e| {
            self.push(Inbound::Eof);
            e.to_string()
        })
    }

    /// Tells the plugin call `id` is no longer wanted: appends the Cancel under the table's
    /// lock, so it cannot follow a Shutdown sent once the table is idle. The caller sends
    /// it once it has let go of the table.
    fn cancel(&self, t: &mut CallTable<Waiter>, id: u64) {
        let _ = encode_frame(&Message::Cancel { id }, &mut self.out.lock().bytes);
        self.settled(t);
    }

    /// Call `id` missed its deadline: cancels it and counts the miss (a health probe's miss
    /// is the health watch's to count, not the hang rule's). False if its reply (or a
    /// failure) got there first.
    fn expire(&self, id: u64, probe: bool) -> bool {
        let waiting_on_host = self.host_in_flight.load(Ordering::SeqCst) > 0;
        let mut t = self.table.lock();
        let expired = t.expire(id, !waiting_on_host && !probe);
        if expired == Expired::NotPending {
            return false;
        }
        self.cancel(&mut t, id);
        drop(t);
        let _ = self.send_now();
        if let Expired::Hung { limit } = expired {
            self.push(Inbound::Hung(format!("{limit} calls in a row missed their deadline")));
        }
        true
    }

    /// Forgets call `id` without telling the plugin (the socket is gone anyway).
    fn forget(&self, id: u64) {
        let mut t = self.table.lock();
        t.abandon(id);
        self.settled(&t);
    }

    fn late(&self) -> CallError {
        CallError::new(
            ErrorCode::DeadlineExceeded,
            format!("plugin {} did not reply in time", self.name),
        )
    }

    fn gone(&self, why: &str) -> CallError {
        CallError::new(
            ErrorCode::PluginExited,
            format!("plugin {} ended before it replied ({why})", self.name),
        )
    }

    fn deadline_passed(&self) -> NotSent {
        NotSent::Failed(CallError::new(
            ErrorCode::DeadlineExceeded,
            format!("plugin {}: deadline passed before the call was sent", self.name),
        ))
    }

    // ----- the async path -----

    /// One call from an async task: writes its frame, waits for the reply (delivered by
    /// whoever reads the socket) or the deadline. Dropping the future cancels the call.
    pub async fn call(
        &self,
        method: &str,
        payload: Payload,
        deadline: Option<Instant>,
        chunks: Option<mpsc::UnboundedSender<Payload>>,
    ) -> Result<Result<Payload, CallError>, NotSent> {
        self.call_as(method, payload, None, deadline, chunks, false).await
    }

    /// [`Conn::call`] with the caller's per-call configuration (protocol 3's `CallCfg`).
    pub async fn call_cfg(
        &self,
        method: &str,
        payload: Payload,
        cfg: &Payload,
        deadline: Option<Instant>,
        chunks: Option<mpsc::UnboundedSender<Payload>>,
    ) -> Result<Result<Payload, CallError>, NotSent> {
        self.call_as(method, payload, Some(cfg), deadline, chunks, false).await
    }

    /// plugd's own health check of this instance: a call that is not held back while a
    /// hot update's new instance waits to be released (it must prove healthy first).
    pub async fn probe(
        &self,
        method: &str,
        payload: Payload,
        deadline: Instant,
    ) -> Result<Payload, CallError> {
        match self.call_as(method, payload, None, Some(deadline), None, true).await {
            Ok(answer) => answer,
            Err(NotSent::Failed(e)) => Err(e),
            Err(NotSent::Closing(_)) => Err(self.gone("it is stopping")),
        }
    }

    async fn call_as(
        &self,
        method: &str,
        payload: Payload,
        cfg: Option<&Payload>,
        deadline: Option<Instant>,
        chunks: Option<mpsc::UnboundedSender<Payload>>,
        probe: bool,
    ) -> Result<Result<Payload, CallError>, NotSent> {
        let (tx, mut rx) = oneshot::channel();
        // Through the rings once the plugin reads them; a call that wants streamed pieces
        // keeps the socket (the pieces come by it, and must not pass the reply).
        let ring = self
            .shm
            .as_ref()
            .filter(|s| chunks.is_none() && s.active.load(Ordering::Acquire))
            .filter(|s| !s.broken.load(Ordering::Acquire));
        let (id, via_ring) = loop {
            {
                let mut t = self.table.lock();
                if t.gate() != Gate::Held || probe {
                    let deadline_us = self.deadline_us(deadline, Instant::now())?;
                    let waiter = Waiter::Async { reply: tx, chunks };
                    break self.begin(
                        &mut t,
                        waiter,
                        method,
                        payload,
                        cfg,
                        deadline_us,
                        probe,
                        ring,
                    )?;
                }
            }
            self.wait_released(deadline).await?;
        };
        let mut leave = Leave { conn: self, id: Some(id) };
        let ring = ring.filter(|_| via_ring);
        if ring.is_some() {
            self.ring_calls.fetch_add(1, Ordering::Relaxed);
        } else if let Err(why) = self.send_now() {
            leave.id = None;
            self.forget(id);
            return Ok(Err(self.gone(&why)));
        }
        let answer = match deadline {
            None => self.reply_of(&mut rx, ring).await,
            Some(d) => {
                let until = tokio::time::Instant::from_std(d);
                match tokio::time::timeout_at(until, self.reply_of(&mut rx, ring)).await {
                    Ok(answer) => answer,
                    Err(_) => {
                        leave.id = None;
                        if self.expire(id, probe) {
                            return Ok(Err(self.late()));
                        }
                        // The reply won the race: it is in the channel, or about to be.
                        (&mut rx).await
                    }
                }
            }
        };
        leave.id = None;
        Ok(answer.unwrap_or_else(|_| Err(self.gone("its connection closed"))))
    }

    /// Waits until a held connection is released or closed (at most until `deadline`).
    async fn wait_released(&self, deadline: Option<Instant>) -> Result<(), NotSent> {
        loop {
            let released = self.released_async.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.table.lock().gate() != Gate::Held {
                return Ok(());
            }
            match deadline {
                Some(d) => {
                    let until = tokio::time::Instant::from_std(d);
                    if tokio::time::timeout_at(until, released).await.is_err() {
                        return Err(self.deadline_passed());
                    }
                }
                None => released.await,
            }
        }
    }

    /// An async call's answer: from its channel, which the reader of the socket fills, or
    /// for a call that went through the calls ring, first by looking at the replies ring
    /// itself (a bounded, cooperative spin: it yields to the CPU and to the runtime every
    /// few looks), then by asking the plugin to nudge the socket and waiting there.
    async fn reply_of(
        &self,
        rx: &mut oneshot::Receiver<Result<Payload, CallError>>,
        ring: Option<&ShmSide>,
    ) -> Result<Result<Payload, CallError>, oneshot::error::RecvError> {
        use oneshot::error::TryRecvError;
        let Some(shm) = ring else { return rx.await };
        let taken = |rx: &mut oneshot::Receiver<_>| match rx.try_recv() {
            Ok(answer) => Some(Ok(answer)),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Closed) => Some(Err(())),
        };
        let futex = shm.wait == shm::WaitStrategy::Futex;
        let spin = if futex { Duration::ZERO } else { ASYNC_SPIN };
        let until = Instant::now() + spin;
        let mut looks = 0u32;
        loop {
            self.drain_ring(shm);
            match taken(rx) {
                Some(Ok(answer)) => return Ok(answer),
                Some(Err(())) => return rx.await,
                None => {}
            }
            looks += 1;
            if looks % shm::LOOKS_PER_YIELD == 0 {
                if Instant::now() >= until {
                    break;
                }
                // A plugin pinned to this CPU gets to run; so do this runtime's other tasks.
                std::thread::yield_now();
                tokio::task::yield_now().await;
            }
            std::hint::spin_loop();
        }
        // Slow path: the plugin also says on the socket when a reply is in the ring. One
        // look at the ring after asking (someone else may hold it: then until it can)
        // catches a reply put there before the plugin saw the request.
        let _nudged = shm.nudge();
        self.drain_ring_eventually(shm).await;
        rx.await
    }

    /// [`Conn::drain_ring`] once, however long someone else holds the ring: tries again
    /// after yielding to the runtime, and between rounds of tries sleeps a millisecond
    /// (an engine thread may hold it for a whole slow call). Gives up if the connection
    /// closes.
    async fn drain_ring_eventually(&self, shm: &ShmSide) {
        loop {
            for _ in 0..64 {
                if self.drain_ring(shm) || self.closed.load(Ordering::Acquire) {
                    return;
                }
                tokio::task::yield_now().await;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Takes every reply waiting in the replies ring and hands each to its caller. False
    /// if someone else holds the ring now (an engine thread in a call, or another async
    /// caller looking): they hand over what they read the same way. A frame that breaks
    /// the ring's rules is a protocol violation (the actor kills the plugin).
    fn drain_ring(&self, shm: &ShmSide) -> bool {
        if shm.broken.load(Ordering::Acquire) {
            return true;
        }
        let Some(mut replies) = shm.replies.try_lock() else { return false };
        let (replies, body) = &mut *replies;
        let max = self.max_frame as usize;
        loop {
            let why = match replies.pop_into(max, body) {
                Ok(false) => return true,
                Ok(true) => match plugin_proto::frame::decode_body(body) {
                    Ok(Message::Reply(r)) => match self.deliver(r) {
                        Ok(()) => continue,
                        Err(e) => e,
                    },
                    Ok(Message::Chunk { .. }) => continue,
                    // The plugin calls the host from a ring call's handler: the actor serves
                    // it (a sync method at once, an async one as a task of its own).
                    Ok(Message::Call(c)) if self.proto() >= PROTO_RING_HOST_CALLS => {
                        self.push(Inbound::RingHostCall(c));
                        continue;
                    }
                    Ok(other) => format!("a {} on the replies ring", other.kind()),
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            shm.broken.store(true, Ordering::Release);
            self.push(Inbound::Fault(why));
            return true;
        }
    }

    /// The plugin nudged the socket (a reply waits in the ring): takes the replies now, or,
    /// if someone holds the ring, soon (a task that retries until it can).
    pub fn drain_ring_soon(self: &Arc<Self>) {
        let Some(shm) = self.shm.as_ref() else { return };
        if self.drain_ring(shm) {
            return;
        }
        let conn = self.clone();
        tokio::spawn(async move {
            if let Some(shm) = conn.shm.as_ref() {
                conn.drain_ring_eventually(shm).await;
            }
        });
    }

    // ----- the engine-thread path -----

    /// One call on the calling thread: writes the Call, waits for its Reply on the socket.
    /// `now` is the caller's recent clock reading (spares a read on the hot path).
    pub fn call_blocking(
        &self,
        method: &str,
        payload: Payload,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Result<Result<Payload, CallError>, NotSent> {
        // A new instance of a hot update takes calls only once the old one handed over.
        // Waited for before taking the read side, which the actor needs meanwhile.
        if self.gate.load(Ordering::Acquire) == gate_code(Gate::Held) {
            self.wait_released_blocking(deadline)?;
        }
        // A closing connection is left alone: taking the read side would only make the
        // actor, which needs it to drain, skip a readiness.
        if self.gate.load(Ordering::SeqCst) == gate_code(Gate::Closing) {
            return Err(NotSent::Closing(payload));
        }
        let payload = match self.shm.as_ref().filter(|s| s.active.load(Ordering::Acquire)) {
            Some(shm) => match self.call_over_shm(shm, method, payload, deadline, now) {
                Ok(answer) => return Ok(answer),
                // No room in the ring (or a frame too big for it): by the socket.
                Err(p) => p?,
            },
            None => payload,
        };
        let mut read = self.read.lock();
        let outcome = self.call_holding_read(&mut read, method, payload, deadline, now);
        // Frames read together with our reply are still undecoded in the buffer.
        let leftover = !read.rbuf.is_empty();
        drop(read);
        // Those, and bytes that arrived while we held the socket, were not seen by the actor
        // (it clears its readiness then); a stopping actor waits for us. So it must look now
        // — on every way out, a call refused by a gate that closed meanwhile too. In engine
        // mode the actor reads on its tick once calls pause, so no peek is needed.
        if leftover
            || self.gate.load(Ordering::SeqCst) == gate_code(Gate::Closing)
            || (!self.engine.load(Ordering::Relaxed) && self.unread_bytes())
        {
            self.wake.notify_one();
        }
        outcome
    }

    /// [`Conn::call_blocking`] once it holds the read side.
    fn call_holding_read(
        &self,
        read: &mut MutexGuard<'_, ReadSide>,
        method: &str,
        payload: Payload,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Result<Result<Payload, CallError>, NotSent> {
        let id = {
            let mut t = self.table.lock();
            let deadline_us = self.deadline_us(deadline, now)?;
            self.begin(&mut t, Waiter::Blocking, method, payload, None, deadline_us, false, None)?.0
        };
        self.engine_calls.fetch_add(1, Ordering::Relaxed);
        Ok(match self.send_now() {
            Ok(()) => self.await_reply(read, id, deadline, now),
            Err(why) => {
                self.forget(id);
                Err(self.gone(&why))
            }
        })
    }

    /// An engine-thread call through the shared-memory rings: the Call into the calls
    /// ring, the Reply from the replies ring, waiting per the plugin's strategy. Err with
    /// the payload back when the frame does not fit the ring now (the caller then uses the
    /// socket), or when the call cannot start.
    fn call_over_shm(
        &self,
        shm: &ShmSide,
        method: &str,
        payload: Payload,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Result<Result<Payload, CallError>, Result<Payload, NotSent>> {
        if shm.broken.load(Ordering::Acquire) {
            return Ok(Err(self.gone("it broke its shared memory")));
        }
        let mut replies = shm.replies.lock();
        let (replies, body) = &mut *replies;
        let id = {
            let mut t = self.table.lock();
            let deadline_us = self.deadline_us(deadline, now).map_err(Err)?;
            let Ok(id) = t.begin_as(Waiter::Blocking, false) else {
                return Err(Err(NotSent::Closing(payload)));
            };
            // Written borrowed: the owned Call would cost a copy of the method's name.
            let call = CallRef { id, method, deadline_us, payload: payload.as_ref() };
            let mut calls = shm.calls.lock();
            let (ring, frame) = &mut *calls;
            frame.clear();
            if let Err(e) = encode_call_frame(&call, frame) {
                t.abandon(id);
                return Err(Err(NotSent::Failed(CallError::new(
                    ErrorCode::Internal,
                    format!("plugin {}: cannot encode the call to {method}: {e}", self.name),
                ))));
            }
            match ring.push(frame) {
                Ok(true) => id,
                Ok(false) => {
                    t.abandon(id);
                    return Err(Ok(payload));
                }
                Err(e) => {
                    t.abandon(id);
                    drop((t, calls));
                    shm.broken.store(true, Ordering::Release);
                    self.push(Inbound::Fault(e.to_string()));
                    return Ok(Err(self.gone("it broke its shared memory")));
                }
            }
        };
        self.engine_calls.fetch_add(1, Ordering::Relaxed);
        self.ring_calls.fetch_add(1, Ordering::Relaxed);
        let max = self.max_frame as usize;
        let broken = |why: String| {
            shm.broken.store(true, Ordering::Release);
            self.broken(id, why)
        };
        let mut waited_out = false;
        loop {
            match replies.pop_into(max, body) {
                Ok(true) => match plugin_proto::frame::decode_body(body) {
                    Ok(Message::Reply(r)) if r.id == id => {
                        let mut t = self.table.lock();
                        t.complete(id);
                        self.settled(&t);
                        return Ok(r.result);
                    }
                    Ok(Message::Reply(r)) => {
                        if let Err(e) = self.deliver(r) {
                            return Ok(Err(broken(e)));
                        }
                    }
                    Ok(Message::Chunk { .. }) => {}
                    // The plugin calls the host while it works on ours: served right here.
                    // A plugin that keeps calling must not hold this thread past the call's
                    // deadline, or past the end of its connection.
                    Ok(Message::Call(c)) if self.proto() >= PROTO_RING_HOST_CALLS => {
                        self.serve_host_call_inline(c, true);
                        if deadline.is_some_and(|d| Instant::now() >= d) {
                            self.expire(id, false);
                            return Ok(Err(self.late()));
                        }
                        if self.closed.load(Ordering::Acquire) {
                            self.forget(id);
                            return Ok(Err(self.gone("its connection closed")));
                        }
                        continue;
                    }
                    Ok(other) => {
                        let why = format!("a {} on the replies ring", other.kind());
                        return Ok(Err(broken(why)));
                    }
                    Err(e) => return Ok(Err(broken(e.to_string()))),
                },
                Ok(false) => {}
                Err(e) => return Ok(Err(broken(e.to_string()))),
            }
            if self.closed.load(Ordering::Acquire) {
                self.forget(id);
                return Ok(Err(self.gone("its connection closed")));
            }
            // The clock is read only after a wait that ended without a frame: the wait
            // returns at the deadline, and a read is a good part of a spin round trip.
            if waited_out && deadline.is_some_and(|d| Instant::now() >= d) {
                self.expire(id, false);
                return Ok(Err(self.late()));
            }
            match replies.wait(shm.wait, deadline, SHM_SLICE) {
                Ok(shm::Woken::Socket) => {
                    replies.socket_news();
                    match self.read_socket_now(id) {
                        Ok(Some(answer)) => return Ok(answer),
                        Ok(None) => {}
                        Err(e) => return Ok(Err(e)),
                    }
                    waited_out = true;
                }
                Ok(w) => waited_out = w != shm::Woken::Ring,
                Err(e) => return Ok(Err(broken(e.to_string()))),
            }
        }
    }

    fn wait_released_blocking(&self, deadline: Option<Instant>) -> Result<(), NotSent> {
        let mut t = self.table.lock();
        while t.gate() == Gate::Held {
            match deadline {
                Some(d) => {
                    if Instant::now() >= d {
                        return Err(self.deadline_passed());
                    }
                    self.released.wait_until(&mut t, d);
                }
                None => {
                    self.released.wait_for(&mut t, LONG_WAIT);
                }
            }
        }
        Ok(())
    }

    /// True if bytes wait in the socket (a peek; nothing is consumed).
    fn unread_bytes(&self) -> bool {
        let mut one = [0u8; 1];
        matches!(
            nix::sys::socket::recv(
                self.sock.as_raw_fd(),
                &mut one,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
            ),
            Ok(n) if n > 0
        )
    }

    /// Reads the socket until call `id`'s reply; delivers other replies, leaves other
    /// frames for the actor. Every way out leaves `id` out of the table.
    fn await_reply(
        &self,
        read: &mut MutexGuard<'_, ReadSide>,
        id: u64,
        deadline: Option<Instant>,
        sent: Instant,
    ) -> Result<Payload, CallError> {
        let mut sent = Some(sent);
        loop {
            // Whole frames already read first (the actor may have left some).
            if let Some(answer) = self.take_frames(read, id)? {
                return answer;
            }
            let wait = match deadline {
                Some(d) => {
                    // The first wait counts from when the call was sent; later ones from now.
                    let now = sent.take().unwrap_or_else(Instant::now);
                    let left = d.saturating_duration_since(now);
                    if left.is_zero() {
                        self.expire(id, false);
                        return Err(self.late());
                    }
                    left
                }
                None => LONG_WAIT,
            };
            // One blocking recv is the whole wait: no poll before it.
            if let Err(e) = read.arm(&self.sock, wait) {
                self.forget(id);
                return Err(self.gone(&format!("cannot set the receive timeout: {e}")));
            }
            let records = read.records;
            match recv_into(&self.sock, &mut read.rbuf, MsgFlags::empty(), records) {
                Ok(Filled::Drained | Filled::More) => {}
                Ok(Filled::Eof) => return Err(self.lost_read(id, None)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The receive timeout ran out (the deadline check above answers next) —
                    // or the socket is not in blocking mode after all. Waiting in poll for
                    // what is left of the wait makes sure this loop never spins either way.
                    if let Err(e) = self.poll_readable(deadline) {
                        self.forget(id);
                        return Err(self.gone(&e.to_string()));
                    }
                }
                Err(e) => return Err(self.lost_read(id, Some(e))),
            }
        }
    }

    /// Takes the whole frames in the read buffer during an engine thread's call `id`:
    /// its Reply is returned (and the call settled), other replies and pieces go to their
    /// callers, the plugin's calls to the host are served here, on the engine thread, and
    /// anything else is left for the actor. Err: the plugin broke the protocol.
    fn take_frames(
        &self,
        read: &mut ReadSide,
        id: u64,
    ) -> Result<Option<Result<Payload, CallError>>, CallError> {
        loop {
            let ReadSide { rbuf, decoder, .. } = read;
            match decoder.next(rbuf) {
                Ok(Some(Message::Reply(r))) if r.id == id => {
                    let mut t = self.table.lock();
                    t.complete(id);
                    self.settled(&t);
                    return Ok(Some(r.result));
                }
                Ok(Some(Message::Reply(r))) => {
                    if let Err(e) = self.deliver(r) {
                        return Err(self.broken(id, e));
                    }
                }
                // The plugin calls the host while it works on ours: served right here, and
                // then the wait goes on.
                Ok(Some(Message::Call(c))) if self.proto() >= PROTO_HOST_CALLS => {
                    self.serve_host_call_inline(c, false)
                }
                // An engine thread has no one to stream pieces to.
                Ok(Some(Message::Chunk { id: cid, .. })) if cid == id => {}
                Ok(Some(Message::Chunk { id: cid, payload })) => self.deliver_chunk(cid, payload),
                Ok(Some(other)) => self.push(Inbound::Frame(other)),
                Ok(None) => return Ok(None),
                Err(e) => return Err(self.broken(id, e.to_string())),
            }
        }
    }

    /// An engine thread waiting on the replies ring for call `id` heard the doorbell: the
    /// plugin wrote to the socket (most often a call to the host from the handler serving
    /// ours, which waits for its answer). Reads what is there now and takes it as
    /// [`Conn::take_frames`] does; in engine mode the actor would see it only on its next
    /// tick, milliseconds later. At most 16 reads: a plugin that floods its socket leaves
    /// the rest to the actor rather than hold this thread.
    fn read_socket_now(&self, id: u64) -> Result<Option<Result<Payload, CallError>>, CallError> {
        let mut read = self.read.lock();
        for _ in 0..16 {
            let records = read.records;
            match crate::wire::read_available(&self.sock, &mut read.rbuf, records) {
                Ok(Filled::Drained) => break,
                Ok(Filled::More) => {}
                Ok(Filled::Eof) => return Err(self.lost_read(id, None)),
                Err(e) => return Err(self.lost_read(id, Some(e))),
            }
        }
        let taken = self.take_frames(&mut read, id);
        // A part of a frame, or frames past the 16 reads: the actor's to finish.
        let leftover = !read.rbuf.is_empty();
        drop(read);
        if leftover {
            self.wake.notify_one();
        }
        taken
    }

    /// Reading the socket failed (None: the plugin closed it) during an engine thread's
    /// call `id`: a record too long is the plugin breaking the protocol; anything else ends
    /// the connection, which the actor hears of as the end of the stream.
    fn lost_read(&self, id: u64, e: Option<io::Error>) -> CallError {
        match e {
            Some(e) if e.kind() == io::ErrorKind::InvalidData => self.broken(id, e.to_string()),
            e => {
                self.forget(id);
                self.push(Inbound::Eof);
                self.gone(&e.map_or_else(|| "closed its socket".to_string(), |e| e.to_string()))
            }
        }
    }

    /// The plugin broke the protocol during an engine thread's call.
    fn broken(&self, id: u64, why: String) -> CallError {
        self.forget(id);
        let err = self.gone(&format!("protocol violation: {why}"));
        self.push(Inbound::Fault(why));
        err
    }

    /// Waits in poll until the socket is readable or `deadline` (at most [`LONG_WAIT`]).
    fn poll_readable(&self, deadline: Option<Instant>) -> Result<(), Errno> {
        let left = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => LONG_WAIT,
        };
        if left.is_zero() {
            return Ok(());
        }
        let ms = left.as_micros().div_ceil(1000);
        let timeout = nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX);
        let mut fds = [nix::poll::PollFd::new(self.sock.as_fd(), nix::poll::PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Async host calls one plugin may have in flight; more are answered `Unavailable` at once.
pub(crate) const HOST_CALLS_MAX: u32 = 64;

/// How long a caller that met a closing connection waits for the next route at most.
pub(crate) const ROUTE_WAIT: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    //! A model check of the read-side hand-off between an engine thread and the actor: the
    //! actor clears its readiness when it finds the read side taken, so whoever took it
    //! must wake the actor on the way out if bytes may be left unseen. Every order of the
    //! steps below is run; a socket left holding bytes nobody will look at is a failure.

    /// Model state: records in the socket, tokio's readiness, the wake permit, the lock.
    #[derive(Debug, Clone, PartialEq, Eq, Hash)]
    struct World {
        socket: u8,
        to_send: u8,
        ready: bool,
        wake: bool,
        engine_holds: bool,
        closing: bool,
        closed_yet: bool,
        engine_pc: u8,
    }

    /// `wake_on_refusal`: the engine thread runs the wake check also when the gate it meets
    /// after taking the read side is closed (the fixed code; false is the old bug).
    fn steps(w: &World, wake_on_refusal: bool) -> Vec<World> {
        let mut out = Vec::new();
        // The plugin sends a record: bytes arrive, and an edge marks the socket readable.
        if w.to_send > 0 {
            let mut n = w.clone();
            n.to_send -= 1;
            n.socket += 1;
            n.ready = true;
            out.push(n);
        }
        // The instance closes the gate (a hot update retires it), at any moment.
        if !w.closed_yet {
            let mut n = w.clone();
            n.closing = true;
            n.closed_yet = true;
            out.push(n);
        }
        // The engine thread: take the read side, meet the gate, read its reply, let go.
        match w.engine_pc {
            0 if !w.engine_holds => {
                let mut n = w.clone();
                n.engine_holds = true;
                n.engine_pc = 1;
                out.push(n);
            }
            1 if w.closing => {
                let mut n = w.clone();
                n.engine_holds = false;
                if wake_on_refusal && (n.socket > 0 || n.closing) {
                    n.wake = true;
                }
                n.engine_pc = 9;
                out.push(n);
            }
            1 if w.socket > 0 => {
                let mut n = w.clone();
                n.socket -= 1; // its own reply (or one it delivers)
                n.engine_pc = 2;
                out.push(n);
            }
            2 => {
                let mut n = w.clone();
                n.engine_holds = false;
                if n.socket > 0 || n.closing {
                    n.wake = true;
                }
                n.engine_pc = 9;
                out.push(n);
            }
            _ => {}
        }
        // The actor on readiness: reads all if the read side is free, else clears it.
        if w.ready {
            let mut n = w.clone();
            if !n.engine_holds {
                n.socket = 0;
            }
            n.ready = false;
            out.push(n);
        }
        // The actor woken by the engine thread: reads all if it can.
        if w.wake {
            let mut n = w.clone();
            n.wake = false;
            if !n.engine_holds {
                n.socket = 0;
            }
            out.push(n);
        }
        out
    }

    /// The first end state with bytes nobody will read, if any.
    fn stuck(wake_on_refusal: bool) -> Option<World> {
        let start = World {
            socket: 0,
            to_send: 3,
            ready: false,
            wake: false,
            engine_holds: false,
            closing: false,
            closed_yet: false,
            engine_pc: 0,
        };
        let mut seen = std::collections::HashSet::new();
        let mut stack = vec![start];
        while let Some(w) = stack.pop() {
            if !seen.insert(w.clone()) {
                continue;
            }
            let next = steps(&w, wake_on_refusal);
            // An end state: nothing can run. An engine thread still waiting (pc 1, gate
            // open, no bytes) with nothing left to send is the plugin's silence, not ours.
            if next.is_empty() && w.socket > 0 {
                return Some(w);
            }
            stack.extend(next);
        }
        None
    }

    #[test]
    fn an_engine_thread_never_leaves_bytes_the_actor_will_not_see() {
        assert_eq!(stuck(true), None);
        // The model finds the bug this code once had: refused by a gate that closed while
        // it took the read side, the engine thread left without waking the actor.
        assert!(stuck(false).is_some(), "the model no longer tells the two apart");
    }
}

#[cfg(test)]
mod socket_tests {
    //! The core against a socketpair standing in for the plugin: what a caller does to
    //! the frames the plugin sees, with no instance actor at all.

    use super::*;
    use plugin_proto::frame::FrameDecoder;
    use std::io::{Read, Write};
    use std::sync::Arc;

    fn pair(missed_limit: u32) -> (Arc<Conn>, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        theirs.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let conn = Conn::new(
            ours,
            1 << 20,
            false,
            Default::default(),
            "fake",
            missed_limit,
            Default::default(),
            None,
        );
        (Arc::new(conn), theirs)
    }

    /// The next `n` frames the plugin side receives.
    fn frames(theirs: &mut UnixStream, n: usize) -> Vec<Message> {
        let decoder = FrameDecoder::new(1 << 20);
        let (mut buf, mut out, mut chunk) = (Vec::new(), Vec::new(), [0u8; 4096]);
        while out.len() < n {
            while let Some(m) = decoder.next(&mut buf).unwrap() {
                out.push(m);
            }
            if out.len() < n {
                let got = theirs.read(&mut chunk).expect("the plugin side got its frames");
                buf.extend_from_slice(&chunk[..got]);
            }
        }
        out
    }

    fn send(theirs: &mut UnixStream, msg: &Message) {
        let mut buf = Vec::new();
        encode_frame(msg, &mut buf).unwrap();
        theirs.write_all(&buf).unwrap();
    }

    fn call_id(m: &Message) -> u64 {
        match m {
            Message::Call(c) => c.id,
            other => panic!("expected a Call, got {}", other.kind()),
        }
    }

    #[tokio::test]
    async fn a_plugin_cannot_start_more_async_host_calls_than_the_cap() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        theirs.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let host = Arc::new(HostMethods::default());
        // A method that never answers: every call to it stays in flight.
        host.add_async("wait", Arc::new(|_| Box::pin(std::future::pending())));
        let conn =
            Arc::new(Conn::new(ours, 1 << 20, false, Default::default(), "greedy", 3, host, None));
        for id in 1..=u64::from(HOST_CALLS_MAX) + 1 {
            let call =
                Call { id, method: "wait".into(), deadline_us: 0, payload: Payload::empty() };
            Conn::serve_host_call(&conn, call, false);
        }
        // Only the one over the cap is answered, at once, with the reason.
        let got = frames(&mut theirs, 1);
        match &got[0] {
            Message::Reply(Reply { id, result: Err(e) }) => {
                assert_eq!(*id, u64::from(HOST_CALLS_MAX) + 1);
                assert_eq!(e.code, ErrorCode::Unavailable);
                assert!(e.message.contains("in flight already"), "{e}");
            }
            other => panic!("expected the refusal, got {}", other.kind()),
        }
        assert_eq!(conn.host_in_flight.load(Ordering::SeqCst), HOST_CALLS_MAX);
    }

    #[tokio::test]
    async fn a_caller_that_leaves_cancels_its_call_and_its_late_reply_is_dropped() {
        let (conn, mut theirs) = pair(3);
        let call = conn.call("work", Payload::empty(), None, None);
        let gave_up = tokio::time::timeout(Duration::from_millis(50), call).await;
        assert!(gave_up.is_err(), "no reply came, so the call was still waiting");
        let got = frames(&mut theirs, 2);
        let id = call_id(&got[0]);
        assert!(matches!(got[1], Message::Cancel { id: c } if c == id), "{:?}", got[1].kind());
        assert_eq!(conn.in_flight(), 0);
        // A reply to it is late and legal; one to a call never made is a violation.
        let ok = |id| Reply { id, result: Ok(Payload::empty()) };
        assert_eq!(conn.deliver(ok(id)), Ok(()));
        assert!(conn.deliver(ok(id + 5)).unwrap_err().contains("never made"));
    }

    #[tokio::test]
    async fn calls_past_their_deadline_are_cancelled_and_enough_in_a_row_mean_hung() {
        let (conn, mut theirs) = pair(2);
        for _ in 0..2 {
            let deadline = Some(Instant::now() + Duration::from_millis(20));
            let answer = conn.call("work", Payload::empty(), deadline, None).await;
            let err = answer.ok().expect("the call was sent").unwrap_err();
            assert_eq!(err.code, ErrorCode::DeadlineExceeded, "{err}");
            assert!(err.message.contains("plugin fake did not reply in time"), "{err}");
        }
        let got = frames(&mut theirs, 4);
        assert!(matches!(got[1], Message::Cancel { id } if id == call_id(&got[0])));
        assert!(matches!(got[3], Message::Cancel { id } if id == call_id(&got[2])));
        let inbox = conn.take_inbox();
        assert!(
            inbox
                .iter()
                .any(|i| matches!(i, Inbound::Hung(why) if why.contains("2 calls in a row"))),
            "{inbox:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_engine_thread_hands_an_async_callers_reply_to_it_on_the_way() {
        let (conn, mut theirs) = pair(3);
        // An async call waits; no actor runs, so only the engine thread reads the socket.
        let waiting = {
            let conn = conn.clone();
            tokio::spawn(async move {
                let p = Payload::raw(plugin_proto::PayloadCodec::Json, b"1".to_vec());
                conn.call("async", p, None, None).await.ok().expect("sent")
            })
        };
        let async_id = call_id(&frames(&mut theirs, 1)[0]);
        let engine = {
            let conn = conn.clone();
            std::thread::spawn(move || {
                let deadline = Some(Instant::now() + Duration::from_secs(10));
                conn.call_blocking("engine", Payload::empty(), deadline, Instant::now())
                    .ok()
                    .expect("sent")
            })
        };
        let engine_id = call_id(&frames(&mut theirs, 1)[0]);
        // The plugin answers the async call first, then the engine thread's.
        let answer = |id, body: &[u8]| {
            Message::Reply(Reply {
                id,
                result: Ok(Payload::raw(plugin_proto::PayloadCodec::Json, body.to_vec())),
            })
        };
        send(&mut theirs, &answer(async_id, b"\"async\""));
        send(&mut theirs, &answer(engine_id, b"\"engine\""));
        let mine = engine.join().unwrap().expect("the engine thread's reply");
        assert_eq!(mine.data, b"\"engine\"");
        let theirs_too = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the async caller was answered without an actor")
            .unwrap()
            .expect("its reply");
        assert_eq!(theirs_too.data, b"\"async\"");
        assert_eq!(conn.in_flight(), 0);
    }
}
