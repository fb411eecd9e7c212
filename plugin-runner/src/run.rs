//! The blocking run loop: handshake, dispatch, heartbeats, shutdown.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use plugin_proto::frame::{body_len, decode_body, encode_frame, read_frame, RECORD_MAX};
use plugin_proto::{
    Call, CallError, CallRef, FrameError, Hello, Message, Payload, Reply, DEFAULT_MAX_FRAME, MAGIC,
    PROTO_HOST_CALLS, PROTO_MAX, PROTO_MIN,
};
use serde::de::DeserializeOwned;
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tracing_subscriber::layer::SubscriberExt;

use crate::ctx::{Ctx, Io};
use crate::logging::LogForwarder;
use crate::{Methods, Plugin};

/// Why [`serve_with`] stopped other than by a graceful shutdown.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The process was not started by plugd (no `PLUGD_FD`, or it is not a socket).
    #[error("not started by a plugd supervisor: {0}. Run this plugin through plugd or a host that links the supervisor crate")]
    NotSupervised(String),
    /// The supervisor refused the handshake.
    #[error("the supervisor rejected this plugin: {0}")]
    Rejected(String),
    /// `on_load` failed.
    #[error("on_load failed: {0}")]
    Load(String),
    /// The socket failed or carried something that is not the protocol.
    #[error("protocol error: {0}")]
    Protocol(#[from] FrameError),
    /// The supervisor sent a message only a plugin may send.
    #[error("protocol error: the supervisor sent {0}, which only a plugin may send")]
    WrongWay(String),
}

/// Knobs for [`serve_with`].
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Name sent in Hello; defaults to `PLUGD_PLUGIN_NAME`, else the executable's name.
    pub name: Option<String>,
    /// Version sent in Hello; defaults to `PLUGD_PLUGIN_VERSION`, else "0.0.0".
    pub version: Option<String>,
    /// Turn a panicking handler into an error reply (true, the default) or let it kill the plugin.
    pub catch_panics: bool,
    /// Forward `tracing` events as Log frames (installs a global subscriber if none is set).
    pub forward_logs: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self { name: None, version: None, catch_panics: true, forward_logs: true }
    }
}

/// What `on_load` receives: the manifest's `[config]` and any handed-over state.
#[derive(Debug, Clone)]
pub struct LoadContext {
    config_json: String,
    state: Option<Vec<u8>>,
}

impl LoadContext {
    /// The `[config]` table decoded into `T`.
    pub fn config<T: DeserializeOwned>(&self) -> Result<T, String> {
        plugin_proto::codec::json_decode(self.config_json.as_bytes())
            .map_err(|e| format!("bad [config] in plugin.toml: {e}"))
    }

    /// The `[config]` table as JSON text.
    pub fn config_json(&self) -> &str {
        &self.config_json
    }

    /// State the previous instance returned from `on_shutdown`, if the supervisor speaks
    /// protocol 1; from version 2 the state always reaches [`crate::Plugin::restore_state`]
    /// instead (after `on_load`, before the first call), so handle it there.
    pub fn state(&self) -> Option<&[u8]> {
        self.state.as_deref()
    }
}

/// The writing half of the plugin socket, shared with the log forwarder.
pub(crate) struct Wire {
    stream: UnixStream,
    /// Encoded frames not yet written (replies held back while more calls are already read).
    buf: Vec<u8>,
}

/// Replies held back at most this many bytes before they are written anyway.
const HOLD_BACK: usize = 64 * 1024;

impl Wire {
    /// A writer on `stream` with nothing held back.
    pub(crate) fn new(stream: UnixStream) -> Wire {
        Wire { stream, buf: Vec::with_capacity(256) }
    }

    /// Encodes one frame and writes it, with anything held back before it, in one write.
    pub(crate) fn send(&mut self, msg: &Message) -> Result<(), FrameError> {
        encode_frame(msg, &mut self.buf)?;
        self.flush()
    }

    /// Encodes one frame to be written by a later `send` or `flush` (or now, if much is held).
    fn hold(&mut self, msg: &Message) -> Result<(), FrameError> {
        encode_frame(msg, &mut self.buf)?;
        if self.buf.len() >= HOLD_BACK {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), FrameError> {
        if !self.buf.is_empty() {
            // In records of at most RECORD_MAX bytes (what a seqpacket socket needs; a stream
            // does not mind).
            let written =
                self.buf.chunks(RECORD_MAX).try_for_each(|record| self.stream.write_all(record));
            self.buf.clear();
            written?;
        }
        Ok(())
    }
}

/// The next message: decoded straight from the read buffer when the whole frame is
/// there (the usual case: one recv brings one or more whole frames), else read in pieces.
pub(crate) fn next_message(
    reader: &mut BufReader<UnixStream>,
    max_frame: u32,
) -> Result<Message, FrameError> {
    loop {
        match reader.fill_buf() {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let buffered = reader.buffer();
    if buffered.is_empty() {
        return Err(FrameError::Closed);
    }
    if whole_frame_buffered(buffered) {
        let header = [buffered[0], buffered[1], buffered[2], buffered[3]];
        let len = body_len(header, max_frame)?;
        let msg = decode_body(&buffered[4..4 + len]);
        reader.consume(4 + len);
        return msg;
    }
    read_frame(reader, max_frame)
}

/// The plugin's side of the shared mapping (`transport = "shm"`).
pub(crate) struct ShmIo {
    pub calls: plugin_proto::shm::Consumer,
    pub replies: plugin_proto::shm::Producer,
    /// The replies ring again, for its doorbell: it tells a host waiting there (an engine
    /// thread, for the call being served) that the socket has something for it.
    pub bell: plugin_proto::shm::Ring,
    /// How this side waits on the calls ring (and for a host call's answer).
    pub wait: plugin_proto::shm::WaitStrategy,
    /// The last call's body, copied out of the ring (the buffer is reused).
    pub body: Vec<u8>,
    /// A served ring call's method name and argument, kept for the next call's (their
    /// buffers are reused: a call like the last ones allocates nothing to be read).
    method: String,
    arg: Payload,
    /// The last reply's (or host call's) frame (the buffer is reused).
    pub frame: Vec<u8>,
    /// The memfd, kept open (a handler may map it again; the number stays taken).
    _fd: std::os::fd::OwnedFd,
}

impl ShmIo {
    /// The message just popped into `body`: a Call read in place into the kept method and
    /// argument buffers, any other message decoded whole.
    pub fn take_message(&mut self) -> Result<Message, FrameError> {
        let Some(c) = CallRef::read(&self.body)? else {
            return decode_body(&self.body);
        };
        let mut method = std::mem::take(&mut self.method);
        method.clear();
        method.push_str(c.method);
        let mut payload = std::mem::replace(&mut self.arg, Payload::empty());
        c.payload.copy_into(&mut payload);
        Ok(Message::Call(Call { id: c.id, method, deadline_us: c.deadline_us, payload }))
    }

    /// Keeps a served call's buffers for the next call.
    fn give_back(&mut self, call: Call) {
        self.method = call.method;
        self.arg = call.payload;
    }

    /// Puts a reply on the replies ring, waiting for room while plugd reads (it reads one
    /// engine call at a time, so a reply that fits half the ring finds room). A reply
    /// larger than that becomes an error that says how to make room.
    fn reply(&mut self, reply: Message) -> Result<(), ServeError> {
        let frame = &mut self.frame;
        frame.clear();
        encode_frame(&reply, frame).map_err(FrameError::from)?;
        if frame.len() > self.replies.max_frame() {
            let Message::Reply(r) = reply else { return Ok(()) };
            let err = CallError::new(
                plugin_proto::ErrorCode::Internal,
                format!(
                    "the reply is {} bytes, more than half the shared-memory ring ({}); raise [shm] ring in plugin.toml",
                    frame.len(),
                    self.replies.max_frame() * 2
                ),
            );
            frame.clear();
            encode_frame(&Message::Reply(Reply { id: r.id, result: Err(err) }), frame)
                .map_err(FrameError::from)?;
        }
        // The clock is read only when there is no room (a read is a good part of a spin
        // round trip).
        let mut give_up = None;
        while !self.replies.push(frame).map_err(shm_broken)? {
            let now = Instant::now();
            if now > *give_up.get_or_insert(now + Duration::from_secs(10)) {
                return Err(shm_broken(plugin_proto::shm::ShmError::Violation(
                    "plugd has not read the replies ring for 10 s".into(),
                )));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(())
    }
}

/// The shared mapping plugd handed over (`PLUGD_SHM_FD`), if any.
fn shm_from_env() -> Option<Result<ShmIo, String>> {
    let fd: RawFd = std::env::var("PLUGD_SHM_FD").ok()?.parse().ok()?;
    // Only a descriptor that is open is taken (fstat fails on any other).
    nix::sys::stat::fstat(fd).ok()?;
    let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
    // SAFETY: an open descriptor (checked above) plugd passed to this process for the SDK
    // alone; this is its only owner, taken once per process.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let wait = std::env::var("PLUGD_SHM_WAIT")
        .ok()
        .and_then(|w| plugin_proto::shm::WaitStrategy::from_word(&w))
        .unwrap_or_default();
    Some(plugin_proto::shm::Mapping::open(&owned).map_err(|e| e.to_string()).map(|m| {
        let m = Arc::new(m);
        ShmIo {
            calls: m.calls().consumer(),
            replies: m.replies().producer(),
            bell: m.replies(),
            wait,
            body: Vec::with_capacity(256),
            method: String::new(),
            arg: Payload::empty(),
            frame: Vec::with_capacity(256),
            _fd: owned,
        }
    }))
}

fn shm_broken(e: plugin_proto::shm::ShmError) -> ServeError {
    ServeError::Protocol(ring_error(e))
}

/// A ring's error as the socket's kind of error.
pub(crate) fn ring_error(e: plugin_proto::shm::ShmError) -> FrameError {
    FrameError::Io(std::io::Error::other(e.to_string()))
}

/// Whether the socket has bytes to read now (a poll that does not wait).
pub(crate) fn socket_readable(sock: &UnixStream) -> Result<bool, FrameError> {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd on the stack, a zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(true);
        }
        return Err(FrameError::Io(e));
    }
    Ok(n > 0)
}

/// True if `buffered` starts with a whole frame: more work is already here.
pub(crate) fn whole_frame_buffered(buffered: &[u8]) -> bool {
    buffered.len() >= 4
        && buffered.len() - 4
            >= u32::from_le_bytes([buffered[0], buffered[1], buffered[2], buffered[3]]) as usize
}

/// Serves `plugin` until the supervisor shuts it down, then exits the process with
/// [`ServeError::exit_status`]: 0 after a graceful shutdown or when the supervisor went
/// away, 2 when not started by plugd or rejected, 1 when `on_load` (or the lockdown
/// plugd asked for) failed, 3 on a protocol error — the same as the Python SDK.
pub fn serve<P: Plugin>(plugin: P) -> ! {
    match serve_with(plugin, ServeOptions::default()) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("plugin error: {e}");
            std::process::exit(e.exit_status())
        }
    }
}

impl ServeError {
    /// The process exit status [`serve`] uses for this error (shared with the Python SDK).
    pub fn exit_status(&self) -> i32 {
        match self {
            ServeError::NotSupervised(_) | ServeError::Rejected(_) => 2,
            ServeError::Load(_) => 1,
            ServeError::Protocol(_) | ServeError::WrongWay(_) => 3,
        }
    }
}

fn supervisor_socket() -> Result<UnixStream, ServeError> {
    let fd: RawFd = std::env::var("PLUGD_FD")
        .map_err(|_| ServeError::NotSupervised("PLUGD_FD is not set".into()))?
        .parse()
        .map_err(|_| ServeError::NotSupervised("PLUGD_FD is not a number".into()))?;
    let is_socket = nix::sys::stat::fstat(fd)
        .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFSOCK)
        .unwrap_or(false);
    if !is_socket {
        return Err(ServeError::NotSupervised(format!("fd {fd} is not a socket")));
    }
    // Keep the fd out of anything the plugin itself spawns.
    let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
    // SAFETY: fd is an open socket (checked above) that the supervisor passed to this
    // process for the SDK alone; this is its only owner, taken once per process.
    Ok(unsafe { UnixStream::from_raw_fd(fd) })
}

/// Serves `plugin` with explicit options; returns after a graceful shutdown.
pub fn serve_with<P: Plugin>(mut plugin: P, options: ServeOptions) -> Result<(), ServeError> {
    let stream = supervisor_socket()?;
    crate::lockdown::report_sigsys();
    let mut methods = Methods::default();
    P::methods(&mut methods);

    let wire = Arc::new(Mutex::new(Wire::new(stream.try_clone().map_err(FrameError::Io)?)));
    if options.forward_logs {
        let subscriber = tracing_subscriber::registry().with(LogForwarder::new(wire.clone()));
        let _ = tracing::subscriber::set_global_default(subscriber);
    }
    let send = |msg: &Message| -> Result<(), FrameError> {
        // The lock is only poisoned if a log write panicked; the wire itself is still usable.
        let mut w = wire.lock().unwrap_or_else(|p| p.into_inner());
        w.send(msg)
    };
    // Replies and pongs are held back while more frames are already read, and written
    // together before the loop next waits for input: one write (and one wake-up of the
    // supervisor) per burst of pipelined calls instead of one per call.
    let answer = |msg: &Message| -> Result<(), FrameError> {
        wire.lock().unwrap_or_else(|p| p.into_inner()).hold(msg)
    };
    let flush =
        || -> Result<(), FrameError> { wire.lock().unwrap_or_else(|p| p.into_inner()).flush() };

    let name = options
        .name
        .clone()
        .or_else(|| std::env::var("PLUGD_PLUGIN_NAME").ok())
        .or_else(|| {
            std::env::current_exe().ok()?.file_name().map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    let version = options
        .version
        .clone()
        .or_else(|| std::env::var("PLUGD_PLUGIN_VERSION").ok())
        .unwrap_or_else(|| "0.0.0".into());
    send(&Message::Hello(Hello {
        magic: MAGIC,
        proto_min: PROTO_MIN,
        proto_max: PROTO_MAX,
        name,
        version,
        methods: methods.names(),
        sdk: concat!("plugin-runner/", env!("CARGO_PKG_VERSION")).into(),
    }))?;

    // Every refill offers the whole buffer, at least one record's room (see RECORD_MAX).
    let mut reader = BufReader::with_capacity(RECORD_MAX, stream);
    let mut max_frame = DEFAULT_MAX_FRAME;
    let welcome = match read_frame(&mut reader, max_frame)? {
        Message::Welcome(w) => w,
        Message::Reject { reason } => return Err(ServeError::Rejected(reason)),
        other => {
            return Err(ServeError::NotSupervised(format!(
                "expected Welcome, got {}",
                other.kind()
            )))
        }
    };
    max_frame = welcome.max_frame.min(DEFAULT_MAX_FRAME);
    let ctx = LoadContext { config_json: welcome.config_json, state: welcome.state };
    // From protocol 2 a failed start is said to the supervisor (Reject, PROTOCOL.md 5.2), so
    // the plugin's status shows the reason; the error still ends the process with status 1.
    let refuse = |why: String| {
        if welcome.proto >= PROTO_HOST_CALLS {
            let _ = send(&Message::Reject { reason: why.clone() }).and_then(|()| flush());
        }
        ServeError::Load(why)
    };
    plugin.on_load(&ctx).map_err(refuse)?;
    // The handed-over state always reaches restore_state too (as in the Python SDK).
    if let Some(blob) = &ctx.state {
        plugin.restore_state(blob);
    }
    // Lock down after on_load (which may legitimately start helpers) and before Ready.
    let layers = crate::lockdown::apply_requested().map_err(refuse)?;
    if !layers.is_empty() {
        let payload = Payload::json(&layers).map_err(FrameError::from)?;
        send(&Message::Notify { method: "plugd.lockdown".into(), payload })?;
    }
    // transport = "shm": take the mapping plugd handed over and say so; calls may then
    // come on its calls ring as well as on the socket. A mapping that cannot be used is
    // said on stderr, and every call comes by the socket.
    let mut shm = None;
    if welcome.proto >= plugin_proto::PROTO_CALL_CFG {
        match shm_from_env() {
            Some(Ok(s)) => {
                send(&Message::Notify { method: "plugd.shm".into(), payload: Payload::empty() })?;
                shm = Some(s);
            }
            Some(Err(e)) => eprintln!("plugin-runner: not using the shared memory: {e}"),
            None => {}
        }
    }
    // What the methods take and give, to a supervisor that knows `plugd.describe` (one
    // that speaks protocol 3; an older one refuses unknown Notifies before Ready).
    let described = methods.descriptions();
    if !described.is_empty() && welcome.proto >= plugin_proto::PROTO_CALL_CFG {
        let payload = Payload::json(&described).map_err(FrameError::from)?;
        send(&Message::Notify { method: "plugd.describe".into(), payload })?;
    }
    send(&Message::Ready)?;

    let mut io = Io {
        reader,
        wire: wire.clone(),
        deferred: VecDeque::new(),
        next_id: 1,
        max_frame,
        proto: welcome.proto,
        shm,
        socket_news: true,
    };
    loop {
        // Frames a host call read while it waited come first, in the order they came.
        let (msg, via_ring) = match io.deferred.pop_front() {
            Some(m) => m,
            None => match io.shm.as_mut() {
                None => {
                    if !whole_frame_buffered(io.reader.buffer()) {
                        flush()?;
                    }
                    match next_message(&mut io.reader, max_frame) {
                        Ok(m) => (m, false),
                        // The supervisor closed the socket: it is gone or dropped us; nothing
                        // to answer.
                        Err(FrameError::Closed) => return Ok(()),
                        Err(e) => return Err(e.into()),
                    }
                }
                Some(s) => loop {
                    if s.calls.pop_into(max_frame as usize, &mut s.body).map_err(shm_broken)? {
                        break (s.take_message()?, true);
                    }
                    let buffered = whole_frame_buffered(io.reader.buffer());
                    if buffered || (io.socket_news && socket_readable(io.reader.get_ref())?) {
                        match next_message(&mut io.reader, max_frame) {
                            Ok(m) => break (m, false),
                            Err(FrameError::Closed) => return Ok(()),
                            Err(e) => return Err(e.into()),
                        }
                    }
                    io.socket_news = false;
                    flush()?;
                    let slice = Duration::from_millis(50);
                    match s.calls.wait(s.wait, None, slice).map_err(shm_broken)? {
                        plugin_proto::shm::Woken::Ring => {}
                        plugin_proto::shm::Woken::Socket | plugin_proto::shm::Woken::Timeout => {
                            s.calls.socket_news();
                            io.socket_news = true;
                        }
                    }
                },
            },
        };
        if !via_ring {
            io.socket_news = true;
        }
        match msg {
            Message::Call(_) | Message::CallCfg { .. } => {
                let (call, cfg) = match msg {
                    Message::CallCfg { call, cfg } => (call, Some(cfg)),
                    Message::Call(call) => (call, None),
                    _ => continue,
                };
                let deadline = (call.deadline_us > 0)
                    .then(|| Instant::now() + Duration::from_micros(call.deadline_us));
                let mut ctx = Ctx { io: &mut io, deadline, cfg, on_ring: via_ring };
                let result = run_handler(
                    &mut methods,
                    &mut plugin,
                    &mut ctx,
                    &call.method,
                    &call.payload,
                    &options,
                );
                let reply = Message::Reply(Reply { id: call.id, result });
                match io.shm.as_mut().filter(|_| via_ring) {
                    // A call that came on the ring is answered on the ring (and said on the
                    // socket too while plugd waits there rather than on the ring).
                    Some(s) => {
                        s.reply(reply)?;
                        s.give_back(call);
                        if s.replies.reader_wants_nudge() {
                            let method = plugin_proto::shm::NUDGE_NOTIFY.into();
                            answer(&Message::Notify { method, payload: Payload::empty() })?;
                        }
                    }
                    None => answer(&reply)?,
                }
            }
            Message::Notify { method, payload } if method == "plugd.state" => {
                plugin.restore_state(&payload.data);
            }
            Message::Notify { method, payload } if methods.has(&method) => {
                let mut ctx = Ctx { io: &mut io, deadline: None, cfg: None, on_ring: false };
                let _ =
                    run_handler(&mut methods, &mut plugin, &mut ctx, &method, &payload, &options);
            }
            Message::Notify { method, payload } => plugin.on_notify(&method, &payload),
            Message::Ping { seq } => answer(&Message::Pong { seq })?,
            // Calls are served in arrival order, so a cancelled call is either done or
            // still unread; the supervisor drops a late reply, which is all cancel needs.
            Message::Cancel { .. } => {}
            // The answer to a host call its handler gave up on (protocol 2): dropped.
            Message::Reply(_) if io.proto >= PROTO_HOST_CALLS => {}
            Message::Shutdown { .. } => {
                if let Some(blob) = plugin.on_shutdown() {
                    send(&Message::State { blob })?;
                }
                send(&Message::Goodbye)?;
                return Ok(());
            }
            other => return Err(ServeError::WrongWay(other.kind().to_string())),
        }
    }
}

fn run_handler<P>(
    methods: &mut Methods<P>,
    plugin: &mut P,
    ctx: &mut Ctx<'_>,
    method: &str,
    payload: &Payload,
    options: &ServeOptions,
) -> Result<Payload, CallError> {
    if !options.catch_panics {
        return methods.dispatch(plugin, ctx, method, payload);
    }
    match catch_unwind(AssertUnwindSafe(|| methods.dispatch(plugin, ctx, method, payload))) {
        Ok(result) => result,
        Err(panic) => Err(CallError::panicked(&format!("method {method}"), &*panic)),
    }
}

#[cfg(test)]
mod tests {
    use super::{next_message, whole_frame_buffered};
    use plugin_proto::frame::encode_frame;
    use plugin_proto::{FrameError, Message};
    use std::io::{BufReader, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn messages_are_read_whole_from_the_buffer_and_in_pieces_across_reads() {
        let (mut tx, rx) = UnixStream::pair().unwrap();
        let mut reader = BufReader::with_capacity(64, rx);
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for seq in 0..3 {
            encode_frame(&Message::Ping { seq }, &mut bytes).unwrap();
            ends.push(bytes.len());
        }
        let big = Message::Notify {
            method: "x".repeat(200), // longer than the reader's buffer
            payload: plugin_proto::Payload::empty(),
        };
        encode_frame(&big, &mut bytes).unwrap();
        // Two whole frames and the first 3 bytes of the third (not even its header) arrive
        // first; the rest, including a frame larger than the buffer, later.
        let split = ends[1] + 3;
        tx.write_all(&bytes[..split]).unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            tx.write_all(&bytes[split..]).unwrap();
            // tx drops here: end of stream after the last frame.
        });
        let mut seen = Vec::new();
        loop {
            match next_message(&mut reader, 1 << 20) {
                Ok(m) => seen.push(m),
                Err(FrameError::Closed) => break,
                Err(e) => panic!("{e}"),
            }
        }
        writer.join().unwrap();
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert!(matches!(seen[2], Message::Ping { seq: 2 }));
        assert!(matches!(&seen[3], Message::Notify { method, .. } if method.len() == 200));
    }

    #[test]
    fn a_whole_frame_is_recognised_only_when_all_of_it_is_there() {
        assert!(!whole_frame_buffered(&[]));
        assert!(!whole_frame_buffered(&[3, 0, 0]));
        assert!(!whole_frame_buffered(&[3, 0, 0, 0, 1, 2]));
        assert!(whole_frame_buffered(&[3, 0, 0, 0, 1, 2, 3]));
        assert!(whole_frame_buffered(&[1, 0, 0, 0, 9, 5, 0]), "more after it is fine");
    }
}
