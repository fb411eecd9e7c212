//! Reading and writing a plugin socket without waiting (and, for an engine
//! thread's reply, with one blocking `recv`): the primitives under
//! [`crate::conn::Conn`].

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::MsgFlags;

use plugin_proto::frame::FrameDecoder;

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
pub(crate) fn recv_into(
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
pub(crate) const LONG_WAIT: Duration = Duration::from_secs(60);

/// How much later than its deadline a blocking call may notice it, to spare a syscall.
const DEADLINE_SLACK: Duration = Duration::from_millis(1);

impl ReadSide {
    /// An empty read side for frames up to `max_frame` bytes; `records` for `SOCK_SEQPACKET`.
    pub fn new(max_frame: u32, records: bool) -> ReadSide {
        ReadSide {
            rbuf: Vec::with_capacity(READ_CHUNK),
            decoder: FrameDecoder::new(max_frame),
            armed: None,
            records,
            fault: None,
        }
    }

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
    pub fn arm(&mut self, sock: &UnixStream, wait: Duration) -> io::Result<()> {
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
