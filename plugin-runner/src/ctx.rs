//! What a handler gets besides its argument: calls to the host (protocol version 2).

use std::collections::VecDeque;
use std::io::BufReader;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plugin_proto::{
    Call, CallError, ErrorCode, FrameError, LogLevel, LogRecord, Message, OwnStatus, Payload,
    PluginCall, PLUGD_LOG, PLUGD_STATUS, PLUGIN_CALL, PROTO_HOST_CALLS, PROTO_RING_HOST_CALLS,
};
use serde::{de::DeserializeOwned, Serialize};

use crate::run::{next_message, ring_error, socket_readable, whole_frame_buffered, ShmIo, Wire};

/// The run loop's end of the socket, lent to a handler's [`Ctx`] while it runs.
pub(crate) struct Io {
    pub reader: BufReader<UnixStream>,
    pub wire: Arc<Mutex<Wire>>,
    /// Frames read while a host call waited for its reply, for the run loop to handle next,
    /// each with whether it came by the calls ring (then it is answered there).
    pub deferred: VecDeque<(Message, bool)>,
    /// The next id of a call to the host (the plugin's own id space).
    pub next_id: u64,
    pub max_frame: u32,
    /// The protocol version the handshake settled on.
    pub proto: u16,
    /// With shared memory: this side's rings. From protocol 4 a handler serving a ring call
    /// calls the host through them; before, its calls go by the socket and the replies
    /// ring's doorbell tells a host waiting on that ring to look at the socket.
    pub shm: Option<ShmIo>,
    /// With shared memory: the socket may hold something not read yet (plugd bumps the
    /// calls ring's `sock` word after every write, so a look that found nothing holds
    /// until the next bump). Shared by the run loop and a host call's wait.
    pub socket_news: bool,
}

impl Io {
    /// An Io on a socket whose other end is gone, for tests of handlers that make no
    /// host call.
    #[cfg(test)]
    pub(crate) fn detached() -> Io {
        let (ours, _theirs) = UnixStream::pair().expect("a socketpair");
        let wire = Wire::new(ours.try_clone().expect("a second descriptor"));
        Io {
            reader: BufReader::new(ours),
            wire: Arc::new(Mutex::new(wire)),
            deferred: VecDeque::new(),
            next_id: 1,
            max_frame: plugin_proto::DEFAULT_MAX_FRAME,
            proto: PROTO_HOST_CALLS,
            shm: None,
            socket_news: true,
        }
    }

    pub(crate) fn send(&self, msg: &Message) -> Result<(), FrameError> {
        // Poisoned only if a log write panicked; the wire itself is still usable.
        self.wire.lock().unwrap_or_else(|p| p.into_inner()).send(msg)
    }
}

/// A handler's way to the host: `ctx.call("send_order", &order)`. Calls made while serving
/// a supervisor call never outlive that call's deadline.
pub struct Ctx<'a> {
    pub(crate) io: &'a mut Io,
    /// When the supervisor stops waiting for the call being served (None: no deadline).
    pub(crate) deadline: Option<Instant>,
    /// The caller's configuration for the call being served (protocol 3's `CallCfg`).
    pub(crate) cfg: Option<Payload>,
    /// The call being served came by the calls ring: plugd waits for its answer on the
    /// replies ring, so a host call may go there too (protocol 4).
    pub(crate) on_ring: bool,
}

impl Ctx<'_> {
    /// When the supervisor stops waiting for the call being served, if it set a deadline.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The caller's configuration for the call being served (an API key, say), decoded
    /// as `T`; None when the caller sent none. Keep secrets in it out of your logs.
    pub fn cfg<T: DeserializeOwned>(&self) -> Option<Result<T, CallError>> {
        self.cfg.as_ref().map(|p| {
            p.decode().map_err(|e| {
                CallError::new(
                    ErrorCode::BadPayload,
                    format!("the call's cfg does not decode: {e}"),
                )
            })
        })
    }

    /// Calls the host's `method` with a bincode-encoded argument and decodes its answer.
    /// The call may take what is left of the current call's deadline.
    pub fn call<A: Serialize + ?Sized, R: DeserializeOwned>(
        &mut self,
        method: &str,
        arg: &A,
    ) -> Result<R, CallError> {
        self.call_within(method, arg, None)
    }

    /// [`Ctx::call`], waiting at most `limit` (and never past the current call's deadline).
    pub fn call_within<A: Serialize + ?Sized, R: DeserializeOwned>(
        &mut self,
        method: &str,
        arg: &A,
        limit: Option<Duration>,
    ) -> Result<R, CallError> {
        let payload = Payload::bincode(arg).map_err(|e| {
            CallError::new(ErrorCode::BadPayload, format!("host method {method}: {e}"))
        })?;
        let answer = self.call_raw(method, payload, limit)?;
        answer.decode().map_err(|e| {
            CallError::new(
                ErrorCode::BadPayload,
                format!("host method {method}: cannot decode its answer: {e}"),
            )
        })
    }

    /// Calls `method` of another plugin through the host (`plugd.call`), with a
    /// bincode-encoded argument; the caller's manifest must list it under `[calls] allow`
    /// (else the answer is `Denied`, naming the entry that would allow it).
    pub fn call_plugin<A: Serialize + ?Sized, R: DeserializeOwned>(
        &mut self,
        plugin: &str,
        method: &str,
        arg: &A,
    ) -> Result<R, CallError> {
        let payload = Payload::bincode(arg).map_err(|e| {
            CallError::new(ErrorCode::BadPayload, format!("{plugin}.{method}: {e}"))
        })?;
        let call = PluginCall { plugin: plugin.into(), method: method.into(), payload };
        let outer = Payload::bincode(&call).map_err(|e| {
            CallError::new(ErrorCode::BadPayload, format!("{plugin}.{method}: {e}"))
        })?;
        let answer = self.call_raw(PLUGIN_CALL, outer, None)?;
        answer.decode().map_err(|e| {
            CallError::new(
                ErrorCode::BadPayload,
                format!("{plugin}.{method}: cannot decode its answer: {e}"),
            )
        })
    }

    /// This plugin's status as plugd sees it (`plugd.status`): state, restarts, uptime,
    /// sandbox layers in force. Only this plugin's own; a host that is not plugd may not
    /// offer it (`UnknownMethod`).
    pub fn status(&mut self) -> Result<OwnStatus, CallError> {
        self.call(PLUGD_STATUS, &())
    }

    /// Logs `message` with named fields (`("order_id", "42")`) into this plugin's log, one
    /// way (`Notify "plugd.log"`: nothing waits for it). On a protocol 1 connection the
    /// fields are written into the text of a plain Log line instead.
    pub fn log(
        &mut self,
        level: LogLevel,
        message: &str,
        fields: &[(&str, &dyn std::fmt::Display)],
    ) -> Result<(), FrameError> {
        let fields = fields.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        if self.io.proto < PROTO_HOST_CALLS {
            let mut text = message.to_string();
            for (k, v) in fields {
                text.push_str(&format!(" {k}={v:?}"));
            }
            return self.io.send(&Message::Log { level, message: text });
        }
        let record = LogRecord { level, message: message.into(), fields: fields.collect() };
        let payload = Payload::bincode(&record)?;
        self.io.send(&Message::Notify { method: PLUGD_LOG.into(), payload })
    }

    /// Calls the host with an already-encoded payload; the answer as the host sent it.
    pub fn call_raw(
        &mut self,
        method: &str,
        payload: Payload,
        limit: Option<Duration>,
    ) -> Result<Payload, CallError> {
        if self.io.proto < PROTO_HOST_CALLS {
            return Err(CallError::new(
                ErrorCode::Unavailable,
                format!(
                    "the host speaks protocol {}: it takes no calls from plugins (it needs {PROTO_HOST_CALLS}); update the host",
                    self.io.proto
                ),
            ));
        }
        let now = Instant::now();
        // The host call ends a little before the call being served, so its failure comes
        // back to this handler in time to answer that call (a tenth of what is left, at
        // most 10 ms): an error reply instead of a missed deadline up the chain.
        let served = self.deadline.map(|d| {
            let left = d.saturating_duration_since(now);
            d - (left / 10).min(Duration::from_millis(10))
        });
        let deadline = match (served, limit.map(|l| now + l)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let deadline_us = match deadline {
            Some(d) if d <= now => return Err(late(method, "before it was sent")),
            Some(d) => (d - now).as_micros().max(1) as u64,
            None => 0,
        };
        let id = self.io.next_id;
        self.io.next_id += 1;
        let call = Message::Call(Call { id, method: method.into(), deadline_us, payload });
        // With protocol 4 on shared memory the answer may come on either channel.
        let rings = self.io.proto >= PROTO_RING_HOST_CALLS && self.io.shm.is_some();
        let on_ring =
            self.on_ring && rings && self.put_on_ring(&call).map_err(|e| gone(method, &e))?;
        if !on_ring {
            self.io.send(&call).map_err(|e| gone(method, &e))?;
            // A host waiting on the replies ring reads the socket only when told to.
            if let Some(s) = &self.io.shm {
                s.bell.doorbell();
            }
        }
        loop {
            let next =
                if rings { self.next_of_both(deadline) } else { self.next_on_socket(deadline) };
            let Some((msg, via_ring)) = next.map_err(|e| gone(method, &e))? else {
                let _ = self.io.send(&Message::Cancel { id });
                return Err(late(method, "in time"));
            };
            match msg {
                Message::Reply(r) if r.id == id => return r.result,
                // The answer to a host call this plugin already gave up on.
                Message::Reply(_) => {}
                // Answered now: a host waiting on us must still see us alive.
                Message::Ping { seq } => {
                    self.io.send(&Message::Pong { seq }).map_err(|e| gone(method, &e))?
                }
                // Everything else (a supervisor call, a shutdown) is for after this handler.
                other => self.io.deferred.push_back((other, via_ring)),
            }
        }
    }

    /// Puts a host call on the replies ring (and the nudge on the socket, if plugd asked
    /// for one); false if it does not fit there now (it then goes by the socket).
    fn put_on_ring(&mut self, call: &Message) -> Result<bool, FrameError> {
        let Some(s) = self.io.shm.as_mut() else { return Ok(false) };
        s.frame.clear();
        plugin_proto::frame::encode_frame(call, &mut s.frame)?;
        if !s.replies.push(&s.frame).map_err(ring_error)? {
            return Ok(false);
        }
        if s.replies.reader_wants_nudge() {
            let method = plugin_proto::shm::NUDGE_NOTIFY.into();
            self.io.send(&Message::Notify { method, payload: Payload::empty() })?;
        }
        Ok(true)
    }

    /// The next frame from the socket (with whether it came by the ring: never); None if
    /// `deadline` passed first.
    fn next_on_socket(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<(Message, bool)>, FrameError> {
        if !self.wait_readable(deadline)? {
            return Ok(None);
        }
        Ok(Some((next_message(&mut self.io.reader, self.io.max_frame)?, false)))
    }

    /// The next frame from the calls ring or the socket, waiting on the ring per the
    /// plugin's strategy (plugd rings its doorbell when it writes to the socket); None if
    /// `deadline` passed first.
    fn next_of_both(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<(Message, bool)>, FrameError> {
        let max = self.io.max_frame;
        let io = &mut *self.io;
        let Some(s) = io.shm.as_mut() else { return self.next_on_socket(deadline) };
        loop {
            if s.calls.pop_into(max as usize, &mut s.body).map_err(ring_error)? {
                return Ok(Some((s.take_message()?, true)));
            }
            if whole_frame_buffered(io.reader.buffer())
                || (io.socket_news && socket_readable(io.reader.get_ref())?)
            {
                return Ok(Some((next_message(&mut io.reader, max)?, false)));
            }
            io.socket_news = false;
            let slice = Duration::from_millis(50);
            match s.calls.wait(s.wait, deadline, slice).map_err(ring_error)? {
                plugin_proto::shm::Woken::Ring => {}
                plugin_proto::shm::Woken::Socket => {
                    s.calls.socket_news();
                    io.socket_news = true;
                }
                plugin_proto::shm::Woken::Timeout => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(None);
                    }
                    io.socket_news = true;
                }
            }
        }
    }

    /// Waits until a frame is there to read; false if `deadline` passed first.
    fn wait_readable(&self, deadline: Option<Instant>) -> Result<bool, FrameError> {
        if self.look_a_while(deadline)? {
            return Ok(true);
        }
        loop {
            if !self.io.reader.buffer().is_empty() {
                return Ok(true);
            }
            let timeout = match deadline {
                None => nix::poll::PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(false);
                    }
                    let ms = left.as_micros().div_ceil(1000);
                    nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX)
                }
            };
            let fd = self.io.reader.get_ref().as_fd();
            let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, timeout) {
                Ok(0) => {} // the deadline check above answers
                Ok(_) => return Ok(true),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(FrameError::Io(e.into())),
            }
        }
    }

    /// A plugin on shared memory that spins (`spin`, `spin-then-futex`) looks at the socket
    /// without sleeping for up to [`LOOK_FOR`] (or the deadline) first; `spin-then-futex`
    /// yields the CPU between looks, which lets a host on the same CPU answer. True: a
    /// frame is there.
    fn look_a_while(&self, deadline: Option<Instant>) -> Result<bool, FrameError> {
        use plugin_proto::shm::WaitStrategy;
        let yields = match self.io.shm.as_ref().map(|s| s.wait) {
            Some(WaitStrategy::Spin) => false,
            Some(WaitStrategy::SpinThenFutex) => true,
            Some(WaitStrategy::Futex) | None => return Ok(!self.io.reader.buffer().is_empty()),
        };
        let until =
            deadline.map_or(Instant::now() + LOOK_FOR, |d| d.min(Instant::now() + LOOK_FOR));
        let fd = self.io.reader.get_ref().as_fd();
        for n in 0u32.. {
            if !self.io.reader.buffer().is_empty() {
                return Ok(true);
            }
            let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => {}
                Ok(_) => return Ok(true),
                Err(e) => return Err(FrameError::Io(e.into())),
            }
            if yields {
                std::thread::yield_now();
            }
            if n % 16 == 15 && Instant::now() >= until {
                break;
            }
        }
        Ok(false)
    }
}

/// How long a spinning plugin looks at the socket for a host call's answer before it
/// sleeps in poll.
const LOOK_FOR: Duration = Duration::from_micros(50);

fn late(method: &str, when: &str) -> CallError {
    CallError::new(
        ErrorCode::DeadlineExceeded,
        format!("host method {method} did not answer {when}"),
    )
}

fn gone(method: &str, e: &FrameError) -> CallError {
    CallError::new(
        ErrorCode::Unavailable,
        format!("host method {method}: the connection to the host failed: {e}"),
    )
}
