//! One plugin process: the actor that owns its socket.
//!
//! The actor runs the handshake, then reads the socket (delivering replies to
//! the calls they answer through the connection core, [`crate::conn`], where
//! callers write their own Call frames), sends heartbeats, watches memory and
//! the sandbox, and on a stop closes the connection, waits for in-flight calls
//! before sending Shutdown, and escalates to SIGTERM and SIGKILL of the
//! process group. It
//! reports `Ready`, `Drained` and `Exited(reason)` to its plugin's slot task;
//! it never decides about restarts (that is `lifecycle`).
//!
//! Nothing the plugin sends can panic this task: every frame is checked, and
//! a bad one ends the instance with "protocol violation".

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use plugin_proto::{
    ErrorCode, LogLevel, Message, Payload, Side, Welcome, PLUGD_LOG, PROTO_HOST_CALLS,
};
use std::os::unix::net::UnixStream;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Instant};

use crate::conn::{Conn, Inbound};
use crate::exit::ExitReason;
use crate::handshake::{self, Outcome, LOCKDOWN_NOTIFY};
use crate::logs::{capture, LogRing, LogSource, Markers};
use crate::manifest::{Limits, Timeouts};
use crate::sandbox::seccomp::syscall_name;
use crate::spawn::{Process, RawChild, WaitStatus};
use crate::stop;
use crate::wire::{Filled, ReadSide};

fn name_of(nr: i64) -> String {
    syscall_name(nr).map(str::to_string).unwrap_or_else(|| format!("syscall {nr}"))
}

/// How often an instance in engine mode reads its socket while the engine thread is idle.
const ENGINE_TICK: Duration = Duration::from_millis(2);

/// The longest gap between engine-mode reads while the engine thread keeps calling (it
/// reads everything itself then; frames that arrive as it stops wait at most this long).
const ENGINE_TICK_BUSY: Duration = Duration::from_millis(16);

/// Orders from the slot to its instance.
#[derive(Debug)]
pub(crate) enum Control {
    /// Drain, Shutdown, then escalate.
    Stop,
    /// Terminate now (a stop while still starting, or the supervisor is going away).
    Kill,
    /// Finish in-flight calls, then hand the live process over (in-place upgrade).
    Freeze(oneshot::Sender<Result<Frozen, String>>),
    /// Start serving calls (an instance started for a hot update holds them until the
    /// old instance has handed over its state, which is delivered first).
    Release(Option<Vec<u8>>),
}

/// The Notify method that carries handed-over state to a running instance.
pub(crate) const STATE_NOTIFY: &str = "plugd.state";

/// Reports from an instance to its slot.
#[derive(Debug)]
pub(crate) enum InstanceEvent {
    /// Handshake and `on_load` done; `lockdown` lists layers the plugin applied to itself.
    /// `methods`: what the plugin described (`plugd.describe`), if it did.
    Ready {
        pid: u32,
        sdk: String,
        lockdown: Vec<String>,
        methods: Vec<crate::describe::MethodInfo>,
    },
    /// In-flight calls are done; Shutdown was sent.
    Drained,
    /// The process is gone.
    Exited { reason: ExitReason, state: Option<Vec<u8>> },
    /// Its `[health]` check changed (see [`crate::health`]).
    Health(crate::health::HealthView),
}

/// What an instance needs besides its process.
pub(crate) struct InstanceConfig {
    pub name: String,
    pub generation: u64,
    pub timeouts: Timeouts,
    pub config_json: String,
    pub state: Option<Vec<u8>>,
    pub max_frame: u32,
    pub ring: LogRing,
    pub limits: Limits,
    /// `[health]` and where its check connects: Ready waits for the first pass.
    pub health: Option<(crate::serving::HealthConfig, crate::health::Target)>,
}

/// Why the serving loop ended early with a kill.
enum Fault {
    Protocol(String),
    Hung(String),
    Memory,
    Violation,
    Unhealthy(String),
}

struct Instance {
    cfg: InstanceConfig,
    proc: Process,
    /// The socket registered with the runtime for reading; None in engine mode.
    sock: Option<AsyncFd<UnixStream>>,
    /// The connection core, shared with callers.
    conn: Arc<Conn>,
    state_blob: Option<Vec<u8>>,
    eof: bool,
    missed_pings: u32,
    ping_outstanding: bool,
    ping_seq: u64,
    kill_reason: Option<ExitReason>,
    /// Where it is in its stop sequence (see [`crate::stop`]).
    stop: stop::Phase,
    lockdown: Vec<String>,
    markers: std::sync::Arc<Markers>,
    stdout: Option<(oneshot::Sender<()>, tokio::task::JoinHandle<Option<OwnedFd>>)>,
    stderr: Option<(oneshot::Sender<()>, tokio::task::JoinHandle<Option<OwnedFd>>)>,
    sdk: String,
    freeze: Option<oneshot::Sender<Result<Frozen, String>>>,
    /// Watches the socket for room to write, only while frames wait to be written (see
    /// `watch_writes`).
    write_watch: Option<AsyncFd<OwnedFd>>,
    /// The health watch's request to kill the plugin (see [`crate::health`]).
    unhealthy: Option<oneshot::Receiver<String>>,
    /// The abstract name of its private health probe socket (handed over with it).
    probe: Option<Vec<u8>>,
    /// What it described of its methods before Ready.
    methods: Vec<crate::describe::MethodInfo>,
}

/// A Ready instance taken apart for a successor process (plugd's in-place upgrade):
/// everything needed to carry on talking to the same plugin process.
#[derive(Debug)]
pub struct Frozen {
    /// The tracked process (the jail's init, or the plugin).
    pub pid: i32,
    /// The plugin's own process.
    pub plugin_pid: i32,
    /// The jail's status pipe (see `spawn`).
    pub status: Option<OwnedFd>,
    /// Its pidfd.
    pub pidfd: OwnedFd,
    /// The supervisor's end of its socket.
    pub socket: OwnedFd,
    /// Its stdout pipe, if the capture handed it back.
    pub stdout: Option<OwnedFd>,
    /// Its stderr pipe, if the capture handed it back.
    pub stderr: Option<OwnedFd>,
    /// Bytes read from the socket but not yet decoded (part of a frame).
    pub unread: Vec<u8>,
    /// The SDK it reported.
    pub sdk: String,
    /// Layers it applied to itself.
    pub lockdown: Vec<String>,
    /// The protocol version its handshake settled on.
    pub proto: u16,
    /// The abstract name of its private health probe socket, if it has one.
    pub probe: Option<Vec<u8>>,
    /// The methods it described.
    pub methods: Vec<crate::describe::MethodInfo>,
    /// Its shared mapping (`transport = "shm"`, taken by its SDK) and wait strategy.
    pub shm: Option<(OwnedFd, plugin_proto::shm::WaitStrategy)>,
}

/// The channels an instance talks through.
pub(crate) struct Wiring {
    pub conn: Arc<Conn>,
    pub control: mpsc::Receiver<Control>,
    pub events: mpsc::UnboundedSender<(u64, InstanceEvent)>,
}

fn start_capture(
    fd: Option<OwnedFd>,
    cfg: &InstanceConfig,
    source: LogSource,
    markers: &std::sync::Arc<Markers>,
) -> Option<(oneshot::Sender<()>, tokio::task::JoinHandle<Option<OwnedFd>>)> {
    let fd = fd?;
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(capture(
        fd,
        cfg.name.clone(),
        source,
        cfg.ring.clone(),
        markers.clone(),
        stopped,
    ));
    Some((stop, task))
}

impl Instance {
    /// Wraps a live process, its socket and output pipes into an actor.
    fn build(
        (pid, plugin_pid, status): (i32, i32, Option<OwnedFd>),
        pidfd: OwnedFd,
        socket: std::os::unix::net::UnixStream,
        pipes: (Option<OwnedFd>, Option<OwnedFd>),
        conn: Arc<Conn>,
        cfg: InstanceConfig,
    ) -> Result<Instance, ExitReason> {
        let proc = Process::attach(pid, plugin_pid, pidfd, status).map_err(|e| {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            ExitReason::SpawnFailed { detail: format!("cannot watch process: {e}") }
        })?;
        let cannot = |e: &dyn std::fmt::Display| ExitReason::SpawnFailed {
            detail: format!("cannot use plugin socket: {e}"),
        };
        // Blocking mode on purpose: the actor's reads and writes all pass MSG_DONTWAIT (see
        // `wire`), and a blocking caller then waits for its reply in one recv, with no poll.
        socket.set_nonblocking(false).map_err(|e| cannot(&e))?;
        let sock =
            // SAFETY: the socket moves into the AsyncFd and is closed only when the AsyncFd
            // drops it (or hands it back with into_inner): the descriptor stays valid while
            // registered.
            unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE) }
                .map_err(|e| cannot(&e))?;
        let markers = std::sync::Arc::new(Markers::default());
        let probe = match &cfg.health {
            Some((_, crate::health::Target::Probe(name))) => Some(name.clone()),
            _ => None,
        };
        let stdout = start_capture(pipes.0, &cfg, LogSource::Stdout, &markers);
        let stderr = start_capture(pipes.1, &cfg, LogSource::Stderr, &markers);
        Ok(Instance {
            cfg,
            proc,
            sock: Some(sock),
            conn,
            state_blob: None,
            eof: false,
            missed_pings: 0,
            ping_outstanding: false,
            ping_seq: 0,
            kill_reason: None,
            stop: stop::Phase::Running,
            lockdown: Vec::new(),
            markers,
            stdout,
            stderr,
            sdk: String::new(),
            freeze: None,
            write_watch: None,
            unhealthy: None,
            probe,
            methods: Vec::new(),
        })
    }

    /// Starts the `[health]` watch, if the plugin has one, handing it `ready` to report on
    /// the first pass; gives `ready` back when there is no watch. An adopted instance (no
    /// `ready`) was healthy when handed over; its private probe socket's name is not
    /// handed over, so an HTTP/TCP check through it is not watched until its next start.
    fn watch_health(
        &mut self,
        events: &mpsc::UnboundedSender<(u64, InstanceEvent)>,
        ready: Option<InstanceEvent>,
    ) -> Option<InstanceEvent> {
        let Some((config, target)) = self.cfg.health.take() else { return ready };
        let (kill, unhealthy) = oneshot::channel();
        self.unhealthy = Some(unhealthy);
        tokio::spawn(crate::health::watch(crate::health::Watch {
            config,
            target,
            conn: self.conn.clone(),
            generation: self.cfg.generation,
            events: events.clone(),
            ready,
            kill,
        }));
        None
    }

    /// Takes the actor apart for a successor process.
    async fn into_frozen(mut self) -> std::io::Result<Frozen> {
        let mut pipes = [None, None];
        for (slot, capture) in pipes.iter_mut().zip([self.stdout.take(), self.stderr.take()]) {
            if let Some((stop, task)) = capture {
                let _ = stop.send(());
                if let Ok(Ok(fd)) = tokio::time::timeout(Duration::from_secs(1), task).await {
                    *slot = fd;
                }
            }
        }
        let [stdout, stderr] = pipes;
        let socket = match self.sock.take() {
            Some(s) => OwnedFd::from(s.into_inner()),
            None => OwnedFd::from(self.conn.sock().try_clone()?),
        };
        let released = self.proc.release()?;
        Ok(Frozen {
            pid: released.pid,
            plugin_pid: released.plugin_pid,
            status: released.status,
            pidfd: released.pidfd,
            socket,
            stdout,
            stderr,
            unread: std::mem::take(&mut self.conn.read.lock().rbuf),
            sdk: self.sdk,
            lockdown: self.lockdown,
            proto: self.conn.proto(),
            probe: self.probe,
            methods: self.methods,
            shm: self.conn.shm_handover(),
        })
    }
}

/// Runs one freshly spawned instance: handshake, serve, and report `Exited` (or hand it over).
pub(crate) async fn run(raw: RawChild, cfg: InstanceConfig, wiring: Wiring) {
    let Wiring { conn, mut control, events } = wiring;
    let generation = cfg.generation;
    let pipes = (Some(raw.stdout), Some(raw.stderr));
    let mut inst = match Instance::build(
        (raw.pid, raw.plugin_pid, raw.status),
        raw.pidfd,
        raw.socket,
        pipes,
        conn,
        cfg,
    ) {
        Ok(i) => i,
        Err(reason) => {
            let _ = events.send((generation, InstanceEvent::Exited { reason, state: None }));
            return;
        }
    };
    let end = match inst.handshake(&mut control).await {
        Ok(sdk) => {
            inst.sdk = sdk.clone();
            let pid = inst.proc.pid();
            let lockdown = inst.lockdown.clone();
            let methods = inst.methods.clone();
            let ready = InstanceEvent::Ready { pid, sdk, lockdown, methods };
            // With a health check, the watch reports Ready on the first pass.
            if let Some(ready) = inst.watch_health(&events, Some(ready)) {
                let _ = events.send((generation, ready));
            }
            inst.serve(&mut control, &events).await
        }
        Err(reason) => Some(reason),
    };
    finish(inst, end, &events).await;
}

/// Carries on with a Ready instance handed over by a predecessor process.
pub(crate) async fn run_adopted(frozen: Frozen, cfg: InstanceConfig, wiring: Wiring) {
    let Wiring { conn, mut control, events } = wiring;
    let generation = cfg.generation;
    let socket = std::os::unix::net::UnixStream::from(frozen.socket);
    let mut inst = match Instance::build(
        (frozen.pid, frozen.plugin_pid, frozen.status),
        frozen.pidfd,
        socket,
        (frozen.stdout, frozen.stderr),
        conn,
        cfg,
    ) {
        Ok(i) => i,
        Err(reason) => {
            let _ = events.send((generation, InstanceEvent::Exited { reason, state: None }));
            return;
        }
    };
    inst.conn.read.lock().rbuf = frozen.unread;
    inst.conn.set_proto(frozen.proto);
    inst.sdk = frozen.sdk.clone();
    inst.lockdown = frozen.lockdown.clone();
    let pid = inst.proc.pid();
    let _ = events.send((
        generation,
        InstanceEvent::Ready {
            pid,
            sdk: frozen.sdk,
            lockdown: frozen.lockdown,
            methods: frozen.methods,
        },
    ));
    inst.watch_health(&events, None);
    let end = inst.serve(&mut control, &events).await;
    finish(inst, end, &events).await;
}

async fn finish(
    mut inst: Instance,
    end: Option<ExitReason>,
    events: &mpsc::UnboundedSender<(u64, InstanceEvent)>,
) {
    let generation = inst.cfg.generation;
    match end {
        Some(reason) => {
            // No call starts on an instance that is gone (serve failed what was in flight).
            inst.conn.close();
            let reason = inst.classify(reason).await;
            let state = inst.state_blob.take();
            let _ = events.send((generation, InstanceEvent::Exited { reason, state }));
        }
        None => {
            let Some(reply) = inst.freeze.take() else { return };
            match inst.into_frozen().await {
                Ok(frozen) => {
                    let _ = reply.send(Ok(frozen));
                }
                Err(e) => {
                    let _ = reply.send(Err(e.to_string()));
                }
            }
        }
    }
}

/// What woke the actor while it waited for a frame during the handshake.
enum Wake {
    Frame(Message),
    Exited(WaitStatus),
    Timeout,
    Killed,
}

impl Instance {
    /// A sandbox violation, naming the syscall the SDK reported (if any).
    fn violation(&self) -> ExitReason {
        let nr = *self.markers.syscall.lock();
        ExitReason::SandboxViolation { syscall: nr.map(name_of) }
    }

    /// Turns a bare exit status into a limit or sandbox reason where the evidence says so.
    async fn classify(&mut self, reason: ExitReason) -> ExitReason {
        if !matches!(reason, ExitReason::Exited { .. } | ExitReason::Signaled { .. }) {
            return reason;
        }
        // The stderr pipe closes when the process group is gone; its last lines carry the evidence.
        if let Some((_keep_running, done)) = self.stderr.take() {
            let _ = tokio::time::timeout(Duration::from_millis(500), done).await;
        }
        let limits = &self.cfg.limits;
        let signal = match reason {
            ExitReason::Signaled { signal, .. } => Some(signal),
            _ => None,
        };
        if signal == Some(libc::SIGSYS) {
            return self.violation();
        }
        if let Some(cpu) = limits.cpu_time {
            let used_up = self.proc.cpu_secs().is_some_and(|used| used + 0.5 >= cpu.as_secs_f64());
            if signal == Some(libc::SIGXCPU) || (signal == Some(libc::SIGKILL) && used_up) {
                return ExitReason::CpuTimeLimit { limit_secs: cpu.as_secs() };
            }
        }
        if let (Some(bytes), Some(libc::SIGXFSZ)) = (limits.file_size, signal) {
            return ExitReason::FileSizeLimit { limit_bytes: bytes };
        }
        // A memory limit is only ever what the supervisor measured (the RSS watch, which
        // ends the plugin itself as `Fault::Memory`): a plugin that prints "out of memory"
        // and dies is reported as what the kernel says it did, never by its own words.
        reason
    }

    fn log(&self, level: LogLevel, text: String) {
        self.cfg.ring.push(&self.cfg.name, LogSource::Supervisor, level, text);
    }

    /// Encodes a frame into the write buffer and writes what the socket takes now.
    fn queue(&mut self, msg: &Message) -> io::Result<()> {
        self.conn.queue(msg)
    }

    /// Registers for "room to write" while frames wait to be written, and not otherwise.
    /// The socket itself is registered for reading only: a standing write registration
    /// would wake the runtime each time the plugin reads a frame — on another CPU, for every
    /// blocking call, which costs the engine thread an inter-processor interrupt per call.
    fn watch_writes(&mut self) {
        let waiting = self.unwritten() && !self.eof;
        if waiting && self.write_watch.is_none() {
            let watch = self.conn.sock().try_clone().map(OwnedFd::from).and_then(|fd| {
                // SAFETY: the duplicate moves into the AsyncFd, which closes it when dropped;
                // nothing else uses or closes it.
                unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::WRITABLE) }
                    .map_err(io::Error::from)
            });
            match watch {
                Ok(w) => self.write_watch = Some(w),
                Err(e) => {
                    tracing::debug!(plugin = %self.cfg.name, "cannot watch the socket for writing: {e}");
                    self.eof = true;
                }
            }
        } else if !waiting {
            self.write_watch = None;
        }
    }

    /// Takes the socket off the runtime's epoll in engine mode, and puts it back after.
    fn follow_engine_mode(&mut self) {
        let engine = self.conn.engine.load(std::sync::atomic::Ordering::Relaxed);
        if engine && self.sock.is_some() {
            // Dropping the registration closes only this descriptor; the wire keeps the socket.
            self.sock = None;
        } else if !engine && self.sock.is_none() && !self.eof {
            let again = self.conn.sock().try_clone().and_then(|s| {
                // SAFETY: the duplicate moves into the AsyncFd, which closes it when dropped;
                // nothing else uses or closes it.
                unsafe { AsyncFd::register_with_interest(s, tokio::io::Interest::READABLE) }
                    .map_err(io::Error::from)
            });
            match again {
                Ok(s) => self.sock = Some(s),
                Err(e) => {
                    tracing::warn!(plugin = %self.cfg.name, "cannot watch the socket again, reading on a tick: {e}")
                }
            }
        }
    }

    /// True if frames wait to be written.
    fn unwritten(&self) -> bool {
        self.conn.unwritten()
    }

    /// Reads what is available now, without waiting; Ok(false) on end of stream. A blocking
    /// caller that owns the socket reads for us meanwhile.
    fn fill(&mut self) -> io::Result<bool> {
        let Some(mut read) = self.conn.read.try_lock() else {
            return Ok(true);
        };
        // Until the socket is empty: nothing may be left behind unseen (readiness may already
        // be cleared). A plugin that writes faster than this reads gets a turn later.
        for _ in 0..16 {
            match read.fill(self.conn.sock())? {
                Filled::Drained => return Ok(true),
                Filled::Eof => return Ok(false),
                Filled::More => {}
            }
        }
        self.conn.wake.notify_one();
        Ok(true)
    }

    /// The whole frames in the read buffer, and the error that stopped decoding, if any
    /// (nothing while a blocking caller owns the socket: it decodes then).
    fn decode_all(&self) -> (Vec<Message>, Option<String>) {
        let mut out = Vec::new();
        if let Some(mut read) = self.conn.read.try_lock() {
            let ReadSide { rbuf, decoder, fault, .. } = &mut *read;
            loop {
                match decoder.next(rbuf) {
                    Ok(Some(msg)) => out.push(msg),
                    Ok(None) => break,
                    Err(e) => return (out, Some(e.to_string())),
                }
            }
            if let Some(why) = fault.take() {
                return (out, Some(why));
            }
        }
        (out, None)
    }

    /// Kills the process group for `reason` and waits for it to be gone.
    async fn kill(&mut self, reason: ExitReason) -> ExitReason {
        if self.kill_reason.is_none() {
            self.log(LogLevel::Error, format!("killing plugin: {reason}"));
            self.kill_reason = Some(reason);
        }
        self.proc.signal_group(Signal::SIGKILL);
        let status = self.proc.wait().await;
        self.exit_reason(status)
    }

    fn exit_reason(&self, status: WaitStatus) -> ExitReason {
        if let Some(r) = &self.kill_reason {
            return r.clone();
        }
        if self.stop.stopping() {
            return match status {
                WaitStatus::Exited(0) => ExitReason::Stopped { forced: self.stop.escalated() },
                _ if self.stop.escalated() => ExitReason::Stopped { forced: true },
                other => other.as_reason(),
            };
        }
        status.as_reason()
    }

    /// Waits for one frame (handshake phase only), the process exit, a timeout or a kill order.
    async fn wait_frame(
        &mut self,
        until: Instant,
        control: &mut mpsc::Receiver<Control>,
    ) -> Result<Wake, String> {
        loop {
            let next = {
                let mut read = self.conn.read.lock();
                let ReadSide { rbuf, decoder, .. } = &mut *read;
                decoder.next(rbuf)
            };
            match next {
                Ok(Some(msg)) => return Ok(Wake::Frame(msg)),
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            if self.unwritten() {
                let _ = self.conn.flush();
            }
            tokio::select! {
                status = self.proc.wait() => return Ok(Wake::Exited(status)),
                open = read_ready(&self.sock, &self.conn), if !self.eof && self.sock.is_some() => {
                    self.eof = !open;
                }
                _ = sleep_until(until) => return Ok(Wake::Timeout),
                // A stop order, or the slot is gone: either way this start is over.
                _ = control.recv() => return Ok(Wake::Killed),
            }
        }
    }

    /// Hello → Welcome → Ready, by the rules of [`crate::handshake`]. Returns the plugin's
    /// SDK string, or why it ended.
    async fn handshake(
        &mut self,
        control: &mut mpsc::Receiver<Control>,
    ) -> Result<String, ExitReason> {
        let until = Instant::now() + self.cfg.timeouts.start;
        let mut phase = handshake::Phase::AwaitHello;
        loop {
            let outcome = match self.wait_frame(until, control).await {
                Ok(Wake::Frame(msg)) => {
                    let (next, outcome) = handshake::step(&phase, msg, &self.cfg.name);
                    phase = next;
                    outcome
                }
                Err(detail) => handshake::bad_frame(&phase, detail),
                Ok(Wake::Exited(WaitStatus::Exited(0)))
                    if phase == handshake::Phase::AwaitHello && self.kill_reason.is_none() =>
                {
                    // It ran and ended well, without a word of the protocol: say what is missing.
                    let detail = "the plugin exited with status 0 before its Hello: it ran but never spoke plugd's protocol; a Python script must end with serve(MyPlugin()) (or name a class as its entrypoint, \"module:Class\"), a Rust plugin must call plugin_runner::serve".to_string();
                    return Err(ExitReason::ProtocolViolation { detail });
                }
                Ok(Wake::Exited(status)) => return Err(self.exit_reason(status)),
                Ok(Wake::Timeout) => {
                    let reason = ExitReason::startup_timeout(self.cfg.timeouts.start);
                    return Err(self.kill(reason).await);
                }
                Ok(Wake::Killed) => {
                    self.stop = stop::Phase::Killed;
                    return Err(self.kill(ExitReason::Stopped { forced: true }).await);
                }
            };
            match outcome {
                Outcome::Keep(msg) => self.keep(msg),
                Outcome::Welcome { proto, warning } => {
                    if let Some(w) = warning {
                        self.log(LogLevel::Warn, w);
                    }
                    self.conn.set_proto(proto);
                    let welcome = Message::Welcome(Welcome {
                        proto,
                        config_json: self.cfg.config_json.clone(),
                        heartbeat_ms: self.cfg.timeouts.heartbeat.as_millis() as u64,
                        max_frame: self.cfg.max_frame,
                        // Protocol 2 has one way for state: the Notify after Ready (below).
                        state: if proto >= PROTO_HOST_CALLS { None } else { self.cfg.state.take() },
                    });
                    // A failed write means the plugin is exiting; its exit status will say why.
                    let _ = self.queue(&welcome);
                }
                Outcome::Ready(sdk) => {
                    if self.conn.has_shm() && self.conn.shm_wait().is_none() {
                        self.log(
                            LogLevel::Warn,
                            format!("transport = \"shm\", but its SDK ({sdk}) does not read shared memory: calls go by the socket"),
                        );
                    }
                    // The previous instance's state, before any call can be routed here
                    // (PROTOCOL.md 5.7): a restart hands it over as a hot update does.
                    if let Some(blob) = self.cfg.state.take() {
                        let payload = Payload::raw(plugin_proto::PayloadCodec::Bincode, blob);
                        let _ =
                            self.queue(&Message::Notify { method: STATE_NOTIFY.into(), payload });
                    }
                    return Ok(sdk);
                }
                Outcome::LoadFailed(reason) => return Err(self.load_failed(&reason).await),
                Outcome::Reject(reason) => return Err(self.reject(reason).await),
                Outcome::Kill(reason) => return Err(self.kill(reason).await),
            }
        }
    }

    /// Keeps what a frame that needs no answer carries: a log line, a log record with
    /// fields, the layers the SDK applied to itself.
    fn keep(&mut self, msg: Message) {
        match msg {
            Message::Log { level, message } => {
                self.cfg.ring.push(&self.cfg.name, LogSource::Sdk, level, message)
            }
            Message::Notify { method, payload } if method == LOCKDOWN_NOTIFY => {
                self.lockdown = payload.decode().unwrap_or_default();
            }
            Message::Notify { method, payload } if method == PLUGD_LOG => self.log_record(&payload),
            Message::Notify { method, .. } if method == crate::handshake::SHM_NOTIFY => {
                if self.conn.activate_shm() {
                    let wait = self.conn.shm_wait().map(|w| w.word()).unwrap_or_default();
                    self.log(
                        LogLevel::Info,
                        format!("engine-thread calls go through shared memory (wait: {wait})"),
                    );
                } else {
                    self.log(
                        LogLevel::Warn,
                        "it offered to read shared memory, but it has no mapping (transport is not \"shm\"); calls go by the socket".to_string(),
                    );
                }
            }
            Message::Notify { method, payload } if method == crate::describe::DESCRIBE_NOTIFY => {
                match crate::describe::parse(&payload.data) {
                    Some(methods) => self.methods = methods,
                    None => self.log(
                        LogLevel::Warn,
                        format!(
                            "its method descriptions are not a JSON list of methods (or over {} KiB); shown without them",
                            crate::describe::DESCRIBE_MAX >> 10
                        ),
                    ),
                }
            }
            _ => {}
        }
    }

    /// The plugin's on_load failed (it sent Reject): gives it a moment to exit on its own,
    /// then kills it; the exit reason is its own words either way.
    async fn load_failed(&mut self, reason: &str) -> ExitReason {
        let reason = ExitReason::load_failed(reason);
        self.log(LogLevel::Error, format!("plugin could not start: {reason}"));
        self.kill_reason = Some(reason);
        self.exit_or_kill().await
    }

    /// Waits a moment (the kill timeout, at most 1 s) for a plugin told to go to exit, then
    /// kills it; the reason is `kill_reason` either way.
    async fn exit_or_kill(&mut self) -> ExitReason {
        let grace = self.cfg.timeouts.kill.min(Duration::from_secs(1));
        if let Ok(status) = tokio::time::timeout(grace, self.proc.wait()).await {
            return self.exit_reason(status);
        }
        let r = self.kill_reason.clone().unwrap_or(ExitReason::Stopped { forced: true });
        self.kill(r).await
    }

    /// A line with fields sent one-way (`Notify "plugd.log"`): kept in the plugin's log; one
    /// that cannot be kept is said in the log instead, since there is no one to answer.
    fn log_record(&self, payload: &Payload) {
        let kept = payload
            .decode::<plugin_proto::LogRecord>()
            .map_err(|e| e.to_string())
            .and_then(|rec| self.cfg.ring.push_record(&self.cfg.name, rec));
        if let Err(why) = kept {
            // Counted as the plugin's own output: rate-limited like it, so bad notifies
            // cannot flood plugd's log.
            let text = format!("a {PLUGD_LOG} notify was dropped: {why}");
            self.cfg.ring.push(&self.cfg.name, LogSource::Sdk, LogLevel::Warn, text);
        }
    }

    /// Sends Reject, gives the plugin a moment to exit on its own, then kills it.
    async fn reject(&mut self, reason: ExitReason) -> ExitReason {
        self.log(LogLevel::Error, format!("rejecting plugin: {reason}"));
        let text = reason.to_string();
        self.kill_reason = Some(reason);
        let _ = self.queue(&Message::Reject { reason: text });
        self.exit_or_kill().await
    }

    /// Handles every whole frame in the read buffer.
    fn on_frames(&mut self) -> Result<(), Fault> {
        let (msgs, bad) = self.decode_all();
        for msg in msgs {
            self.on_message(msg)?;
        }
        match bad {
            Some(e) => Err(Fault::Protocol(e)),
            None => Ok(()),
        }
    }

    /// Handles what blocking callers left: frames that were not theirs, and events.
    fn on_inbox(&mut self) -> Result<(), Fault> {
        for item in self.conn.take_inbox() {
            match item {
                Inbound::Frame(msg) => self.on_message(msg)?,
                Inbound::RingHostCall(call) => Conn::serve_host_call(&self.conn, call, true),
                Inbound::Eof => self.eof = true,
                Inbound::Fault(e) => return Err(Fault::Protocol(e)),
                Inbound::Hung(detail) => return Err(Fault::Hung(detail)),
            }
        }
        Ok(())
    }

    fn on_message(&mut self, msg: Message) -> Result<(), Fault> {
        {
            self.missed_pings = 0;
            let proto = self.conn.proto();
            if !msg.may_be_sent_by(Side::Plugin, proto) {
                let why = if matches!(msg, Message::Call(_)) {
                    format!(
                        "plugin sent Call on a protocol {proto} connection; calls to the host need protocol {PROTO_HOST_CALLS} (rebuild the plugin with a newer SDK)"
                    )
                } else {
                    format!("plugin sent {}, which only the supervisor may send", msg.kind())
                };
                return Err(Fault::Protocol(why));
            }
            match msg {
                Message::Reply(reply) => self.conn.deliver(reply).map_err(Fault::Protocol)?,
                // A call to the host (protocol 2), served on this task.
                Message::Call(call) => Conn::serve_host_call(&self.conn, call, false),
                // The plugin gave up on a host call: host methods run to the end inline, so
                // its answer is already on the way (the plugin drops it).
                Message::Cancel { .. } => {}
                Message::Pong { .. } => self.ping_outstanding = false,
                Message::Log { level, message } => {
                    self.cfg.ring.push(&self.cfg.name, LogSource::Sdk, level, message)
                }
                Message::Notify { method, payload } if method == PLUGD_LOG => {
                    self.log_record(&payload)
                }
                Message::State { blob } => self.state_blob = Some(blob),
                Message::Goodbye => {}
                Message::Notify { method, payload } if method == LOCKDOWN_NOTIFY => {
                    self.lockdown = payload.decode().unwrap_or_default();
                }
                Message::Chunk { id, payload } => self.conn.deliver_chunk(id, payload),
                // A reply waits in the shared-memory ring for an async caller.
                Message::Notify { method, .. } if method == plugin_proto::shm::NUDGE_NOTIFY => {
                    self.conn.drain_ring_soon()
                }
                // Plugin-initiated notifications have no consumer on this host API yet.
                Message::Notify { .. } => {}
                other => {
                    return Err(Fault::Protocol(format!(
                        "unexpected {} after the handshake",
                        other.kind()
                    )))
                }
            }
        }
        Ok(())
    }

    fn heartbeat(&mut self) -> Result<(), Fault> {
        if self.ping_outstanding {
            self.missed_pings += 1;
            let limit = self.cfg.timeouts.missed_heartbeats;
            if self.missed_pings >= limit {
                return Err(Fault::Hung(format!(
                    "no answer to {limit} heartbeats (every {} ms)",
                    self.cfg.timeouts.heartbeat.as_millis()
                )));
            }
            return Ok(());
        }
        self.ping_seq += 1;
        self.ping_outstanding = true;
        let _ = self.conn.encode(&Message::Ping { seq: self.ping_seq });
        Ok(())
    }

    /// The Ready phase until the process is gone.
    async fn serve(
        &mut self,
        control: &mut mpsc::Receiver<Control>,
        events: &mpsc::UnboundedSender<(u64, InstanceEvent)>,
    ) -> Option<ExitReason> {
        let t = self.cfg.timeouts.clone();
        let far = Instant::now() + Duration::from_secs(86400 * 365);
        let period = t.heartbeat.max(Duration::from_millis(1));
        let mut heartbeat = tokio::time::interval_at(first_beat(Instant::now(), period), period);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut eof_until: Option<Instant> = None;
        // The last line of the memory limit: RLIMIT_AS stops most, this catches what it misses.
        let mut rss_watch = tokio::time::interval(Duration::from_millis(250));
        rss_watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let rss_limit = self.cfg.limits.memory;
        // Created once: a fresh Notified per loop turn would register and deregister a waiter.
        let markers = self.markers.clone();
        let violated = markers.violation.notified();
        tokio::pin!(violated);
        // Callers and engine threads wake the actor through the connection (see `conn`).
        let conn = self.conn.clone();
        let woken = conn.wake.notified();
        tokio::pin!(woken);
        // Frames that came in with the handshake (or from a predecessor) are already read:
        // the socket will not report them again.
        let mut leftover = self.on_frames();
        // In engine mode (see `conn`) the socket is read on this tick instead of on readiness.
        // While the engine thread keeps calling it reads everything itself, so the tick backs
        // off (each one wakes the runtime, which on a shared CPU delays a call); once calls
        // pause it is short again.
        let mut engine_every = ENGINE_TICK;
        let engine_tick = tokio::time::sleep(engine_every);
        tokio::pin!(engine_tick);
        let mut engine_seen = u64::MAX;

        let reason = loop {
            self.follow_engine_mode();
            if let Err(fault) = std::mem::replace(&mut leftover, Ok(())) {
                break self.fault(fault).await;
            }
            if let Err(e) = self.conn.flush() {
                tracing::debug!(plugin = %self.cfg.name, "socket write failed: {e}");
                self.conn.discard_unwritten();
                self.eof = true;
            }
            self.watch_writes();
            // Drained: closed, nothing in flight (async or engine thread) → Shutdown.
            if self.stop.draining() && self.conn.idle() {
                self.advance(stop::Event::Drained, events);
            }
            // Frozen: closed, nothing in flight, nothing unwritten → hand over.
            if self.freeze.is_some() && self.conn.idle() && !self.unwritten() {
                return None;
            }
            if self.eof && eof_until.is_none() && !self.stop.stopping() {
                eof_until = Some(Instant::now() + t.kill.max(Duration::from_millis(100)));
            }
            tokio::select! {
                biased;
                status = self.proc.wait() => {
                    // What it wrote before exiting (State, Goodbye, replies) is still in the socket.
                    if !self.eof && self.fill().is_ok() {
                        let _ = self.on_frames();
                    }
                    break self.exit_reason(status);
                }
                open = read_ready(&self.sock, &self.conn), if !self.eof && self.sock.is_some() => {
                    self.eof = !open;
                    if let Err(fault) = self.on_frames() {
                        break self.fault(fault).await;
                    }
                }
                r = room_to_write(&self.write_watch), if self.write_watch.is_some() && !self.eof => {
                    if r.is_err() { self.eof = true; }
                }
                c = control.recv() => match c {
                    Some(Control::Stop) => self.advance(stop::Event::Asked, events),
                    Some(Control::Release(state)) => {
                        if let Some(blob) = state {
                            let payload = Payload::raw(plugin_proto::PayloadCodec::Bincode, blob);
                            let _ = self.queue(&Message::Notify { method: STATE_NOTIFY.into(), payload });
                        }
                        self.conn.release();
                    }
                    Some(Control::Freeze(reply)) => {
                        if self.stop.stopping() || self.freeze.is_some() {
                            let _ = reply.send(Err("the plugin is stopping".into()));
                        } else {
                            self.freeze = Some(reply);
                            self.conn.close();
                        }
                    }
                    // Kill, or the slot is gone (the supervisor was dropped): nothing may outlive it.
                    Some(Control::Kill) | None => {
                        self.stop = stop::Phase::Killed;
                        break self.kill(ExitReason::Stopped { forced: true }).await;
                    }
                },
                _ = heartbeat.tick(), if !t.heartbeat.is_zero() && !self.stop.stopping() && self.freeze.is_none() => {
                    if let Err(fault) = self.heartbeat() {
                        break self.fault(fault).await;
                    }
                }
                // Any process of the plugin's group that trips the seccomp profile (the plugin or
                // a child it forked) ends the plugin: a forbidden syscall is not a recoverable error.
                _ = &mut violated => {
                    break self.fault(Fault::Violation).await;
                }
                _ = &mut engine_tick, if self.sock.is_none() && !self.eof => {
                    // While the engine thread is calling, it reads everything (and leaves the
                    // rest in the inbox): stay off the read lock so it never waits for us.
                    let answered = self.conn.engine_calls.load(std::sync::atomic::Ordering::Relaxed);
                    if answered == engine_seen {
                        engine_every = ENGINE_TICK;
                        match self.fill() {
                            Ok(true) => {}
                            Ok(false) | Err(_) => self.eof = true,
                        }
                    } else {
                        engine_every = (engine_every * 2).min(ENGINE_TICK_BUSY);
                    }
                    engine_seen = answered;
                    engine_tick.as_mut().reset(tokio::time::Instant::now() + engine_every);
                    let done = self.on_inbox().and_then(|_| self.on_frames());
                    if let Err(fault) = done {
                        break self.fault(fault).await;
                    }
                }
                why = async { self.unhealthy.as_mut().expect("guarded").await }, if self.unhealthy.is_some() && !self.stop.stopping() && self.freeze.is_none() => {
                    match why {
                        Ok(detail) => break self.fault(Fault::Unhealthy(detail)).await,
                        Err(_) => self.unhealthy = None,
                    }
                }
                _ = rss_watch.tick(), if rss_limit.is_some() => {
                    if let (Some(limit), Some(rss)) = (rss_limit, self.proc.rss_bytes()) {
                        if rss > limit {
                            break self.fault(Fault::Memory).await;
                        }
                    }
                }
                // The stop sequence's timer: drain timeout, then Shutdown's grace, then SIGTERM's.
                _ = sleep_until(self.stop.timer().unwrap_or(far)), if self.stop.timer().is_some() => {
                    self.advance(stop::Event::TimerDue, events);
                }
                _ = sleep_until(eof_until.unwrap_or(far)), if eof_until.is_some() => {
                    break self.fault(Fault::Protocol("closed its socket but did not exit".into())).await;
                }
                // A blocking caller left frames or events, bytes it did not read, or unwritten
                // bytes; or it finished while we wait to stop. Last: callers that keep
                // waking the actor must not starve its timers (the stop sequence, the memory
                // watch, the health check).
                _ = &mut woken => {
                    woken.set(conn.wake.notified());
                    if !self.eof {
                        match self.fill() {
                            Ok(true) => {}
                            Ok(false) | Err(_) => self.eof = true,
                        }
                    }
                    let done = self.on_inbox().and_then(|_| self.on_frames());
                    if let Err(fault) = done {
                        break self.fault(fault).await;
                    }
                }
            }
        };
        // Callers waiting on this instance learn the classified reason ("memory limit"), not
        // just the signal.
        let reason = self.classify(reason).await;
        self.conn
            .fail_in_flight(ErrorCode::PluginExited, &format!("ended before it replied: {reason}"));
        if let Some(reply) = self.freeze.take() {
            let _ = reply.send(Err(format!("the plugin ended while freezing: {reason}")));
        }
        Some(reason)
    }

    /// Feeds `event` to the stop machine and performs what it returns.
    fn advance(
        &mut self,
        event: stop::Event,
        events: &mpsc::UnboundedSender<(u64, InstanceEvent)>,
    ) {
        let t = &self.cfg.timeouts;
        let timeouts = stop::Timeouts { drain: t.drain, shutdown: t.shutdown, kill: t.kill };
        let (shutdown, kill) = (t.shutdown, t.kill);
        let (next, actions) = stop::step(self.stop, event, Instant::now(), timeouts);
        self.stop = next;
        for action in actions {
            match action {
                stop::Action::CloseCalls => self.conn.close(),
                stop::Action::FailInFlight => {
                    let n = self.conn.in_flight();
                    self.log(LogLevel::Warn, format!("drain timeout: {n} calls still in flight"));
                    self.conn.fail_in_flight(
                        ErrorCode::Unavailable,
                        "stopped before it replied (drain timeout)",
                    );
                }
                stop::Action::SendShutdown => {
                    let grace_ms = shutdown.as_millis() as u64;
                    let _ = self.queue(&Message::Shutdown { grace_ms });
                    let _ = events.send((self.cfg.generation, InstanceEvent::Drained));
                }
                stop::Action::SignalTerm => {
                    let ms = shutdown.as_millis();
                    self.log(
                        LogLevel::Warn,
                        format!("no exit {ms} ms after Shutdown; sending SIGTERM"),
                    );
                    self.proc.signal_group(Signal::SIGTERM);
                }
                stop::Action::SignalKill => {
                    let ms = kill.as_millis();
                    self.log(
                        LogLevel::Warn,
                        format!("no exit {ms} ms after SIGTERM; sending SIGKILL"),
                    );
                    self.proc.signal_group(Signal::SIGKILL);
                }
            }
        }
    }

    async fn fault(&mut self, fault: Fault) -> ExitReason {
        let reason = match fault {
            Fault::Protocol(detail) => ExitReason::ProtocolViolation { detail },
            Fault::Hung(detail) => ExitReason::Hung { detail },
            Fault::Memory => {
                ExitReason::MemoryLimit { limit_bytes: self.cfg.limits.memory.unwrap_or(0) }
            }
            Fault::Violation => self.violation(),
            Fault::Unhealthy(detail) => ExitReason::Unhealthy { detail },
        };
        self.kill(reason).await
    }
}

/// The first heartbeat of an instance: at least one `period` from `now`, on a shared grid
/// of that period. Instances with the same period then beat together, so an idle supervisor
/// with hundreds of plugins wakes once per period for all their pings, not once per plugin.
fn first_beat(now: Instant, period: Duration) -> Instant {
    static GRID: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *GRID.get_or_init(|| now);
    let period_ns = period.as_nanos().max(1);
    let phase = (now.saturating_duration_since(origin).as_nanos() % period_ns) as u64;
    now + period + Duration::from_nanos((period_ns as u64).saturating_sub(phase) % period_ns as u64)
}

/// Waits for room to write (the watch exists only while frames wait; see `watch_writes`).
async fn room_to_write(watch: &Option<AsyncFd<OwnedFd>>) -> io::Result<()> {
    match watch {
        Some(w) => {
            // Cleared before the next write attempt at the top of the loop: if that one
            // blocks again, only a new edge wakes this branch.
            w.writable().await?.clear_ready();
            Ok(())
        }
        None => std::future::pending().await,
    }
}

/// Waits until the socket is readable and reads what is there; false at end of stream.
/// The readiness is cleared as soon as a read comes back short — the socket is empty then —
/// which saves the extra read that would otherwise only return EAGAIN. (tokio clears it only
/// if no newer readiness event arrived meanwhile, so no wake-up is lost.) While a blocking
/// caller owns the socket the readiness is cleared too: that caller reads, and wakes the
/// actor afterwards if bytes are left.
async fn read_ready(sock: &Option<AsyncFd<UnixStream>>, conn: &Conn) -> bool {
    let Some(sock) = sock else {
        return std::future::pending().await;
    };
    let Ok(mut guard) = sock.readable().await else {
        return false;
    };
    let Some(mut read) = conn.read.try_lock() else {
        guard.clear_ready();
        return true;
    };
    match read.fill(guard.get_inner()) {
        Ok(Filled::Drained) => {
            guard.clear_ready();
            true
        }
        Ok(Filled::More) => true,
        Ok(Filled::Eof) | Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_of_instances_started_apart_fall_on_one_grid() {
        let period = Duration::from_millis(1000);
        let t0 = Instant::now();
        let a = first_beat(t0, period);
        let b = first_beat(t0 + Duration::from_millis(370), period);
        let c = first_beat(t0 + Duration::from_millis(2999), period);
        for (start, beat) in [(t0, a), (t0 + Duration::from_millis(370), b)] {
            assert!(beat >= start + period, "never sooner than one period after the start");
            assert!(beat < start + 2 * period, "and within two");
        }
        let on_grid = |x: Instant| (x - a).as_nanos() % period.as_nanos() == 0;
        assert!(on_grid(b) && on_grid(c), "{:?} {:?}", b - a, c - a);
    }
}
