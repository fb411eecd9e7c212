//! One task per loaded plugin: drives the lifecycle machine and performs its actions.
//!
//! The slot owns the plugin's current instance (its control queue and call
//! queue), the restart timer and the handed-over state blob. It feeds every
//! event — orders from the supervisor, reports from the instance, timers —
//! through `lifecycle::transition` and then does what the returned actions
//! say. When the slot's command queue closes (the supervisor was dropped), it
//! kills its instance.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant as StdInstant;

use plugin_proto::LogLevel;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Instant};

use crate::conn::Conn;
use crate::exit::ExitReason;
use crate::health::Target;
use crate::instance::{self, Control, InstanceConfig, InstanceEvent};
use crate::lifecycle::{transition, Action, Event, Machine, State};
use crate::logs::LogSource;
use crate::manifest::PluginSpec;
use crate::router::Shared;
use crate::sandbox::{HostFacts, SandboxReport};
use crate::serving::{HealthCheck, ListenAddr};
use crate::spawn::{SpawnPlan, Spawner};
use crate::swap::{self, Act, Report};
use std::os::fd::OwnedFd;

/// Listening sockets handed to an instance, with their `LISTEN_FDNAMES` names.
type HandedSockets = Vec<(&'static str, OwnedFd)>;

/// Orders from the supervisor to a slot.
pub(crate) enum SlotCommand {
    /// Start; the reply comes when the instance is Ready or the start failed.
    Start(oneshot::Sender<Result<(), ExitReason>>),
    /// Graceful stop; the reply comes when no instance runs.
    Stop(oneshot::Sender<()>),
    /// Hand the Ready instance's live process over (in-place upgrade); the slot then ends.
    Freeze(oneshot::Sender<Result<FrozenPlugin, String>>),
    /// Hot update to this spec; the reply comes once the new instance serves (or failed).
    Update(Box<PluginSpec>, oneshot::Sender<Result<(), String>>),
}

/// A hot update in progress: where it is (see [`crate::swap`]) and what it holds.
struct Update {
    phase: swap::Phase,
    /// The version being installed (taken when it succeeds).
    spec: Option<PluginSpec>,
    /// Who asked (answered once, when it succeeds or fails).
    reply: Option<oneshot::Sender<Result<(), String>>>,
    /// The new instance (starting, then serving once released).
    new: Current,
    /// Once switched: the old instance, draining (its control queue must stay open, or it
    /// would take the closed queue as an order to die).
    retiring: Option<Current>,
}

impl Update {
    fn answer(&mut self, result: Result<(), String>) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(result);
        }
    }
}

/// A plugin handed over to a successor process: its live instance plus its bookkeeping.
#[derive(Debug)]
pub struct FrozenPlugin {
    /// The live instance's parts.
    pub instance: instance::Frozen,
    /// Restarts so far.
    pub restarts: u32,
    /// The sandbox layers it runs under.
    pub sandbox: SandboxReport,
    /// Its `[listen]` sockets (the successor hands them to later instances).
    pub listeners: Vec<(ListenAddr, OwnedFd)>,
}

struct Current {
    generation: u64,
    control: mpsc::Sender<Control>,
    /// Its connection, while calls may be routed to it.
    calls: Option<Arc<Conn>>,
}

/// What one slot's loop holds between turns.
struct Run {
    machine: Machine,
    /// The instance calls go to (or will, once Ready).
    current: Option<Current>,
    /// Numbers instances, so a report from one already let go of is known as such.
    generation: u64,
    pid: Option<u32>,
    /// The SDK a Ready report named this turn, for the status.
    sdk: Option<String>,
    restart_at: Option<Instant>,
    /// State the last instance left for the next one.
    handover: Option<Vec<u8>>,
    start_waiters: Vec<oneshot::Sender<Result<(), ExitReason>>>,
    stop_waiters: Vec<oneshot::Sender<()>>,
    update: Option<Update>,
    /// Who asked for the hand-over the machine is performing (Action::Freeze).
    freeze_reply: Option<oneshot::Sender<Result<FrozenPlugin, String>>>,
    /// Where instances report to this slot.
    events: mpsc::UnboundedSender<(u64, InstanceEvent)>,
}

impl Run {
    /// Answers those waiting for a start or a stop, once the machine says how it went.
    fn answer_waiters(&mut self) {
        match self.machine.state {
            State::Ready => {
                for w in self.start_waiters.drain(..) {
                    let _ = w.send(Ok(()));
                }
            }
            State::Starting | State::Draining | State::Stopping => {}
            _ => {
                let why =
                    self.machine.last_exit.clone().unwrap_or(ExitReason::Stopped { forced: false });
                for w in self.start_waiters.drain(..) {
                    let _ = w.send(Err(why.clone()));
                }
            }
        }
        if self.current.is_none() && !matches!(self.machine.state, State::Starting | State::Ready) {
            for w in self.stop_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }
}

/// How a turn of the slot's loop ended.
#[derive(Debug, PartialEq, Eq)]
enum Turn {
    /// Go on.
    Continue,
    /// The instance now belongs to a successor process: the slot's work is done.
    HandedOver,
}

pub(crate) struct Slot {
    pub spec: PluginSpec,
    pub shared: Arc<Shared>,
    pub spawner: Arc<Spawner>,
    pub bin_dirs: Vec<PathBuf>,
    pub max_frame: u32,
    pub state_root: PathBuf,
    pub host: Arc<HostFacts>,
    pub prepare: Option<Arc<dyn crate::PrepareRuntime>>,
    /// What the host offers its plugins' calls.
    pub host_methods: Arc<crate::host::HostMethods>,
    /// Its `[listen]` sockets, bound at the first start and handed to every instance.
    pub listeners: parking_lot::Mutex<Vec<(ListenAddr, Arc<OwnedFd>)>>,
}

impl Slot {
    fn note(&self, level: LogLevel, text: String) {
        self.shared.ring.push(&self.shared.name, LogSource::Supervisor, level, text);
    }

    /// Adds the layers an instance applied to itself (reported in its Hello), labelled
    /// as voluntary, to the sandbox the status shows.
    fn record_lockdown(&self, lockdown: &[String]) {
        let mut live = self.shared.live.lock();
        for layer in lockdown.iter().map(|l| crate::sandbox::Layer::Voluntary(l.clone())) {
            if !live.sandbox.in_force.contains(&layer) {
                live.sandbox.in_force.push(layer);
            }
        }
    }

    /// Publishes the lifecycle machine's view (and an update's, where it differs) — the
    /// one place the status's state is written while the slot runs.
    fn publish(&self, m: &Machine, pid: Option<u32>, sdk: Option<String>, update: Option<&Update>) {
        let mut live = self.shared.live.lock();
        live.state = update.and_then(|u| u.phase.overrides_state()).unwrap_or(m.shown_state());
        live.restarts = m.restarts;
        live.last_exit = m.last_exit.clone();
        live.ready_since = if live.state == State::Ready {
            live.ready_since.or_else(|| Some(Instant::now()))
        } else {
            None
        };
        live.pid = pid;
        if sdk.is_some() {
            live.sdk = sdk;
        }
    }

    /// Runs until the command queue closes (or the plugin is handed over). With `adopt`,
    /// starts from a live instance a predecessor process handed over instead of spawning.
    /// Each turn: wait for one thing (a command, an instance's report, the restart timer),
    /// turn it into a lifecycle event, run the machine and perform its actions, publish.
    pub async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<SlotCommand>,
        adopt: Option<FrozenPlugin>,
    ) {
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<(u64, InstanceEvent)>();
        let mut r = Run {
            machine: Machine::new(self.spec.manifest.restart.clone()),
            current: None,
            generation: 0,
            pid: None,
            sdk: None,
            restart_at: None,
            handover: None,
            start_waiters: Vec::new(),
            stop_waiters: Vec::new(),
            update: None,
            freeze_reply: None,
            events: ev_tx,
        };
        if let Some(frozen) = adopt {
            self.adopt(&mut r, frozen);
        }
        let far = Instant::now() + std::time::Duration::from_secs(86400 * 365);
        loop {
            r.sdk = None;
            let event = tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.on_command(&mut r, cmd).await,
                    None => break,
                },
                Some((gen, ev)) = ev_rx.recv() => self.on_report(&mut r, gen, ev).await,
                _ = sleep_until(r.restart_at.unwrap_or(far)), if r.restart_at.is_some() => {
                    r.restart_at = None;
                    Some(Event::BackoffElapsed)
                }
            };
            let Some(event) = event else { continue };
            if self.perform(&mut r, event).await == Turn::HandedOver {
                return; // the process now belongs to the successor
            }
            self.publish(&r.machine, r.pid, r.sdk.take(), r.update.as_ref());
            r.answer_waiters();
        }
        // The supervisor is gone: dropping the control queue makes the instance kill its group.
        self.shared.set_route(None);
        drop(r);
    }

    /// Takes on a live instance a predecessor process handed over (SIGUSR2).
    fn adopt(&mut self, r: &mut Run, mut frozen: FrozenPlugin) {
        r.generation = 1;
        // Starting: the instance reports Ready at once, and the machine routes to it.
        let adopt = Event::Adopt { restarts: frozen.restarts };
        r.machine = transition(&r.machine, adopt, StdInstant::now(), 0.0).0;
        let (control_tx, control_rx) = mpsc::channel(4);
        *self.listeners.lock() =
            frozen.listeners.into_iter().map(|(a, fd)| (a, Arc::new(fd))).collect();
        let probe = frozen.instance.probe.clone();
        let target = self.spec.manifest.health.as_ref().and_then(|h| match &h.check {
            HealthCheck::Method(_) => Some(Target::Method),
            HealthCheck::Http { .. } | HealthCheck::Tcp { .. } if probe.is_some() => {
                probe.clone().map(Target::Probe)
            }
            HealthCheck::Http { addr: Some(a), .. } | HealthCheck::Tcp { addr: Some(a) }
                if self.spec.manifest.listen.is_empty() =>
            {
                Some(Target::Inet(*a))
            }
            _ => None,
        });
        let cfg = self.instance_config(&self.spec, r.generation, None, target);
        match frozen.instance.socket.try_clone().map(std::os::unix::net::UnixStream::from) {
            Ok(sock) => {
                // Its mapping, handed over with the socket, is mapped again here: the rings
                // go on from the positions they hold (no call was in flight at the freeze).
                // One that cannot be mapped leaves the calls on the socket (its SDK reads
                // both).
                let shm = frozen.instance.shm.take().and_then(|(fd, wait)| {
                    let mapped = if plugin_proto::shm::Mapping::size_sealed(&fd) {
                        plugin_proto::shm::Mapping::open(&fd)
                    } else {
                        Err(plugin_proto::shm::ShmError::Layout("its size is not sealed".into()))
                    };
                    match mapped {
                        Ok(map) => Some(crate::conn::ShmSide::new(Arc::new(map), wait, fd)),
                        Err(e) => {
                            self.note(
                                LogLevel::Warn,
                                format!("cannot map its handed-over shared memory ({e}); calls go by the socket"),
                            );
                            None
                        }
                    }
                });
                let conn = self.connect(sock, &self.spec, false, shm);
                conn.activate_shm();
                let wiring = instance::Wiring {
                    conn: conn.clone(),
                    control: control_rx,
                    events: r.events.clone(),
                };
                tokio::spawn(instance::run_adopted(frozen.instance, cfg, wiring));
                r.current = Some(Current {
                    generation: r.generation,
                    control: control_tx,
                    calls: Some(conn),
                });
            }
            Err(e) => {
                // Without a second descriptor the instance cannot be shared; let it go.
                self.note(LogLevel::Error, format!("cannot adopt the handed-over plugin: {e}"));
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(frozen.instance.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// A command from the supervisor: the lifecycle event it makes, if any (a command
    /// answered at once, or an update, which runs beside the machine, makes none).
    async fn on_command(&mut self, r: &mut Run, cmd: SlotCommand) -> Option<Event> {
        match cmd {
            SlotCommand::Start(reply) => {
                if r.machine.state == State::Ready {
                    let _ = reply.send(Ok(()));
                    return None;
                }
                r.start_waiters.push(reply);
                Some(Event::Start)
            }
            SlotCommand::Update(spec, reply) => {
                self.begin_update(r, *spec, reply).await;
                None
            }
            SlotCommand::Freeze(reply) => {
                if r.machine.state != State::Ready || r.machine.freezing || r.current.is_none() {
                    let _ = reply.send(Err(format!("not ready ({})", r.machine.shown_state())));
                    return None;
                }
                r.freeze_reply = Some(reply);
                Some(Event::Freeze)
            }
            SlotCommand::Stop(reply) => {
                r.stop_waiters.push(reply);
                Some(Event::Stop)
            }
        }
    }

    /// Starts a hot update's new instance beside the running one (see [`crate::swap`]).
    async fn begin_update(
        &mut self,
        r: &mut Run,
        spec: PluginSpec,
        reply: oneshot::Sender<Result<(), String>>,
    ) {
        if r.machine.state != State::Ready || r.update.is_some() {
            let why = if r.update.is_some() {
                "another update is in progress".to_string()
            } else {
                format!("it is not ready ({})", r.machine.state)
            };
            let _ = reply.send(Err(why));
            return;
        }
        r.generation += 1;
        match self.spawn(&spec, r.generation, None, true, r.events.clone()).await {
            Ok(new) => {
                self.note(
                    LogLevel::Info,
                    format!("updating to {} beside the running instance", spec.manifest.version),
                );
                self.shared.live.lock().updating_to = Some(spec.manifest.version.to_string());
                let phase = swap::Phase::Starting { new: r.generation };
                r.update = Some(Update {
                    phase,
                    spec: Some(spec),
                    reply: Some(reply),
                    new,
                    retiring: None,
                });
            }
            Err(reason) => {
                let _ = reply.send(Err(reason.to_string()));
            }
        }
    }

    /// A report from an instance: the update's machine takes it first when it is about the
    /// update's instances; otherwise it is a lifecycle event if it is about the current one.
    async fn on_report(&mut self, r: &mut Run, gen: u64, ev: InstanceEvent) -> Option<Event> {
        if let InstanceEvent::Health(view) = ev {
            self.on_health(r, gen, view);
            return None;
        }
        let report = match &ev {
            InstanceEvent::Health(_) => return None,
            InstanceEvent::Ready { .. } => Report::Ready,
            InstanceEvent::Drained => Report::Drained,
            InstanceEvent::Exited { reason, .. } => Report::Exited(reason.clone()),
        };
        let running = r.current.as_ref().map(|c| c.generation);
        let stepped = r.update.as_ref().and_then(|u| swap::step(&u.phase, gen, &report, running));
        if let Some((next, acts)) = stepped {
            return self.perform_swap(r, next, acts, &ev, &report).await;
        }
        if running != Some(gen) {
            return None; // a report from an instance we already let go of
        }
        match ev {
            InstanceEvent::Ready { pid, sdk, lockdown, methods } => {
                r.pid = Some(pid);
                r.sdk = Some(sdk);
                self.record_lockdown(&lockdown);
                self.shared.live.lock().methods = methods;
                self.note(LogLevel::Info, format!("ready (pid {pid})"));
                Some(Event::Ready)
            }
            InstanceEvent::Drained => Some(Event::Drained),
            InstanceEvent::Health(_) => None,
            InstanceEvent::Exited { reason, state } => {
                if state.is_some() {
                    r.handover = state;
                }
                r.current = None;
                r.pid = None;
                self.shared.set_route(None);
                self.shared.live.lock().health = None;
                let level = if reason.is_failure() { LogLevel::Error } else { LogLevel::Info };
                self.note(level, format!("instance ended: {reason}"));
                *self.shared.live.lock().exits.entry(reason.kind()).or_default() += 1;
                Some(Event::ProcessExited(reason))
            }
        }
    }

    /// A health report: noted in the log (failures, recoveries), and in the status when it
    /// is about the instance calls go to.
    fn on_health(&self, r: &Run, gen: u64, view: crate::health::HealthView) {
        use crate::health::HealthState;
        let current = r.current.as_ref().is_some_and(|c| c.generation == gen);
        let new = r.update.as_ref().is_some_and(|u| u.new.generation == gen);
        if !current && !new {
            return;
        }
        let who = if new { "the new version's " } else { "" };
        let threshold = self.spec.manifest.health.as_ref().map_or(0, |h| h.failures);
        let err = view.last_error.clone().unwrap_or_default();
        match view.state {
            HealthState::Starting if view.last_error.is_some() => {
                self.note(LogLevel::Info, format!("waiting for {who}health check: {err}"))
            }
            HealthState::Starting => {}
            HealthState::Healthy => self.note(LogLevel::Info, format!("{who}health check passes")),
            HealthState::Failing => self.note(
                LogLevel::Warn,
                format!("{who}health check failed ({}/{threshold}): {err}", view.failures),
            ),
        }
        if current {
            self.shared.live.lock().health = Some(view);
        }
    }

    /// Performs what the update's machine decided on a report; a lifecycle event when the
    /// running version must restart (as if it had ended so), else publishes and says none.
    async fn perform_swap(
        &mut self,
        r: &mut Run,
        next: Option<swap::Phase>,
        acts: Vec<Act>,
        ev: &InstanceEvent,
        report: &Report,
    ) -> Option<Event> {
        let mut u = r.update.take()?;
        let mut restart = None;
        for act in acts {
            match act {
                Act::SwitchToNew => {
                    let InstanceEvent::Ready { pid, sdk, lockdown, methods } = ev else { continue };
                    self.record_lockdown(lockdown);
                    if let Some(calls) = u.new.calls.clone() {
                        self.shared.set_route(Some(calls));
                    }
                    let new = Current {
                        generation: u.new.generation,
                        control: u.new.control.clone(),
                        calls: u.new.calls.take(),
                    };
                    if let Some(mut old) = r.current.replace(new) {
                        old.calls = None;
                        let _ = old.control.send(Control::Stop).await;
                        u.retiring = Some(old);
                    }
                    r.pid = Some(*pid);
                    let mut live = self.shared.live.lock();
                    live.pid = r.pid;
                    live.sdk = Some(sdk.clone());
                    live.methods = methods.clone();
                    if let Some(spec) = &u.spec {
                        live.version = spec.manifest.version.to_string();
                    }
                    live.ready_since = Some(Instant::now());
                }
                Act::ReleaseNew => {
                    let state = match ev {
                        InstanceEvent::Exited { state, .. } => state.clone(),
                        _ => None,
                    };
                    let _ = u.new.control.send(Control::Release(state)).await;
                }
                Act::Succeed => {
                    if let (Some(spec), Report::Exited(reason)) = (u.spec.take(), report) {
                        self.note(
                            LogLevel::Info,
                            format!(
                                "updated to {} (old instance: {reason})",
                                spec.manifest.version
                            ),
                        );
                        *self.shared.calls.write() = spec.manifest.calls.clone();
                        // An address the new version no longer lists closes once no
                        // instance holds it (kept until now: a failed update runs the old one).
                        self.listeners.lock().retain(|(a, _)| spec.manifest.listen.contains(a));
                        self.spec = spec;
                    }
                    self.shared.live.lock().updating_to = None;
                    u.answer(Ok(()));
                }
                Act::FailKeepOld(why) => {
                    self.note(
                        LogLevel::Error,
                        format!("update failed, still serving the running version: {why}"),
                    );
                    self.shared.live.lock().updating_to = None;
                    u.answer(Err(why));
                }
                Act::FailAfterSwitch(why) => {
                    self.note(
                        LogLevel::Error,
                        format!("update failed: {why}; the running version restarts once it has drained"),
                    );
                    if let Report::Exited(reason) = report {
                        *self.shared.live.lock().exits.entry(reason.kind()).or_default() += 1;
                    }
                    r.current = None;
                    r.pid = None;
                    self.shared.set_route(None);
                    {
                        let mut live = self.shared.live.lock();
                        live.updating_to = None;
                        live.version = self.spec.manifest.version.to_string();
                    }
                    u.answer(Err(why));
                }
                Act::RestartOld(reason) => {
                    if let InstanceEvent::Exited { state: Some(state), .. } = ev {
                        r.handover = Some(state.clone());
                    }
                    restart = Some(reason);
                }
            }
        }
        if let Some(phase) = next {
            u.phase = phase;
            r.update = Some(u);
        }
        match restart {
            // As if the running instance had ended this way: the policy restarts it.
            Some(reason) => Some(Event::ProcessExited(reason)),
            None => {
                self.publish(&r.machine, r.pid, None, r.update.as_ref());
                None
            }
        }
    }

    /// Runs `event` (and any it leads to) through the lifecycle machine and performs the
    /// actions; says whether the plugin was handed over to a successor.
    async fn perform(&mut self, r: &mut Run, event: Event) -> Turn {
        let mut queue = vec![event];
        while let Some(event) = queue.pop() {
            let (next, actions) = transition(&r.machine, event, StdInstant::now(), fastrand::f64());
            r.machine = next;
            for action in actions {
                match action {
                    Action::Spawn => {
                        r.generation += 1;
                        let state = r.handover.take();
                        match self
                            .spawn(&self.spec, r.generation, state, false, r.events.clone())
                            .await
                        {
                            Ok(c) => r.current = Some(c),
                            Err(reason) => {
                                self.note(LogLevel::Error, format!("start failed: {reason}"));
                                queue.push(Event::ProcessExited(reason));
                            }
                        }
                    }
                    Action::Route => {
                        if let Some(calls) = r.current.as_ref().and_then(|c| c.calls.clone()) {
                            self.shared.set_route(Some(calls));
                        }
                    }
                    Action::Unroute => {
                        self.shared.set_route(None);
                        if let Some(c) = r.current.as_mut() {
                            c.calls = None;
                        }
                    }
                    Action::GracefulStop => {
                        if let Some(c) = &r.current {
                            let _ = c.control.send(Control::Stop).await;
                        }
                    }
                    Action::Kill => {
                        if let Some(c) = &r.current {
                            let _ = c.control.send(Control::Kill).await;
                        }
                    }
                    Action::ScheduleRestart(d) => {
                        self.note(LogLevel::Warn, format!("restarting in {} ms", d.as_millis()));
                        r.restart_at = Some(Instant::now() + d);
                    }
                    Action::CancelRestart => r.restart_at = None,
                    Action::ReportFailed => {
                        let rc = &self.spec.manifest.restart;
                        self.note(
                            LogLevel::Error,
                            format!(
                                "failed: more than {} restarts within {} s; not restarting until started by hand",
                                rc.max_restarts,
                                rc.within.as_secs_f64()
                            ),
                        );
                    }
                    Action::Freeze => {
                        if let Some(failed) = self.freeze(r).await {
                            queue.push(failed);
                        } else {
                            return Turn::HandedOver;
                        }
                    }
                }
            }
        }
        Turn::Continue
    }

    /// Hands the current instance over to a successor: None once it belongs to it, else the
    /// `FreezeFailed` event (the instance is let go of).
    async fn freeze(&mut self, r: &mut Run) -> Option<Event> {
        let reply = r.freeze_reply.take()?;
        let Some(c) = r.current.as_ref() else {
            let _ = reply.send(Err("no instance runs".into()));
            let detail = "handover failed: no instance runs".to_string();
            return Some(Event::FreezeFailed(ExitReason::SpawnFailed { detail }));
        };
        // Calls refused from now on say why: in-flight calls are finishing.
        self.publish(&r.machine, r.pid, None, r.update.as_ref());
        let (tx, rx) = oneshot::channel();
        let _ = c.control.send(Control::Freeze(tx)).await;
        let why = match rx.await {
            Ok(Ok(instance)) => {
                let sandbox = self.shared.live.lock().sandbox.clone();
                let restarts = r.machine.restarts;
                let listeners = self
                    .listeners
                    .lock()
                    .iter()
                    .filter_map(|(a, fd)| Some((a.clone(), fd.try_clone().ok()?)))
                    .collect();
                let _ = reply.send(Ok(FrozenPlugin { instance, restarts, sandbox, listeners }));
                return None;
            }
            Ok(Err(e)) => e,
            Err(_) => "the instance ended".into(),
        };
        let _ = reply.send(Err(why.clone()));
        r.current = None;
        r.pid = None;
        let detail = format!("handover failed: {why}");
        Some(Event::FreezeFailed(ExitReason::SpawnFailed { detail }))
    }

    fn instance_config(
        &self,
        spec: &PluginSpec,
        generation: u64,
        state: Option<Vec<u8>>,
        target: Option<Target>,
    ) -> InstanceConfig {
        let m = &spec.manifest;
        InstanceConfig {
            health: m.health.clone().zip(target),
            name: m.name.clone(),
            generation,
            timeouts: m.timeouts.clone(),
            config_json: m.config.to_string(),
            state,
            max_frame: self.max_frame,
            ring: self.shared.ring.clone(),
            limits: m.limits.clone(),
        }
    }

    async fn spawn(
        &self,
        spec: &PluginSpec,
        generation: u64,
        state: Option<Vec<u8>>,
        hold: bool,
        events: mpsc::UnboundedSender<(u64, InstanceEvent)>,
    ) -> Result<Current, ExitReason> {
        if let (true, Some(prepare)) = (spec.manifest.entrypoint.is_python(), &self.prepare) {
            // pip can take minutes: never on a runtime thread. A reused venv costs one read.
            let (s, root, host, prepare) =
                (spec.clone(), self.state_root.clone(), self.host.clone(), prepare.clone());
            let log = tokio::task::spawn_blocking(move || prepare.prepare(&s, &root, &host))
                .await
                .map_err(|e| ExitReason::SpawnFailed { detail: format!("venv task: {e}") })?
                .map_err(|detail| ExitReason::SpawnFailed { detail })?;
            for line in log {
                self.note(LogLevel::Info, line);
            }
        }
        let plan = SpawnPlan::for_spec(spec, &self.bin_dirs, &self.state_root, &self.host)
            .map_err(|detail| ExitReason::SpawnFailed { detail })?;
        let (sockets, target) =
            self.sockets_for(spec).map_err(|detail| ExitReason::SpawnFailed { detail })?;
        let plan = plan.with_listeners(sockets);
        // transport = "shm": a fresh mapping for every instance (a restart or an update's
        // new instance never sees what the last one left in the rings).
        let (plan, shm) =
            if spec.manifest.transport == crate::manifest::Transport::Shm {
                let (map, memfd) = plugin_proto::shm::Mapping::create(spec.manifest.shm.ring)
                    .map_err(|e| ExitReason::SpawnFailed {
                        detail: format!(
                            "plugin {}: cannot create its shared memory: {e}",
                            spec.name()
                        ),
                    })?;
                let wait = spec.manifest.shm.wait;
                let kept = memfd.try_clone().map_err(|e| ExitReason::SpawnFailed {
                    detail: format!("plugin {}: cannot keep its shared memory: {e}", spec.name()),
                })?;
                let side = crate::conn::ShmSide::new(Arc::new(map), wait, kept);
                (plan.with_shm(memfd, wait), Some(side))
            } else {
                (plan, None)
            };
        let report: SandboxReport = plan.sandbox.report.clone();
        for missing in &report.unavailable {
            self.note(
                LogLevel::Warn,
                format!("sandbox layer unavailable, running without it: {missing}"),
            );
        }
        self.shared.live.lock().sandbox = report;
        let raw = self
            .spawner
            .spawn(plan)
            .await
            .map_err(|e| ExitReason::SpawnFailed { detail: e.to_string() })?;
        self.note(LogLevel::Info, format!("started pid {}", raw.pid));
        let (control_tx, control_rx) = mpsc::channel(4);
        let cfg = self.instance_config(spec, generation, state, target);
        let sock = raw.socket.try_clone().map_err(|e| {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(raw.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            ExitReason::SpawnFailed { detail: format!("cannot share the plugin socket: {e}") }
        })?;
        let conn = self.connect(sock, spec, hold, shm);
        let wiring = instance::Wiring { conn: conn.clone(), control: control_rx, events };
        tokio::spawn(instance::run(raw, cfg, wiring));
        Ok(Current { generation, control: control_tx, calls: Some(conn) })
    }

    /// The sockets an instance of `spec` is handed (its `[listen]` ones, bound at first
    /// use and kept for every later instance, plus a private probe socket when its health
    /// check connects), and where its check connects.
    fn sockets_for(&self, spec: &PluginSpec) -> Result<(HandedSockets, Option<Target>), String> {
        let m = &spec.manifest;
        let mut out = Vec::new();
        {
            let mut bound = self.listeners.lock();
            for addr in &m.listen {
                let fd = match bound.iter().find(|(a, _)| a == addr) {
                    Some((_, fd)) => fd.clone(),
                    None => {
                        let fd = crate::serving::bind(addr)
                            .map_err(|e| format!("plugin {}: {e}", m.name))?;
                        let fd = Arc::new(fd);
                        bound.push((addr.clone(), fd.clone()));
                        fd
                    }
                };
                let dup = fd.try_clone().map_err(|e| format!("cannot share {addr}: {e}"))?;
                out.push((addr.fd_name(), dup));
            }
        }
        let target = match m.health.as_ref().map(|h| &h.check) {
            None => None,
            Some(HealthCheck::Method(_)) => Some(Target::Method),
            Some(HealthCheck::Http { .. } | HealthCheck::Tcp { .. }) if !m.listen.is_empty() => {
                let (fd, name) = crate::serving::probe_socket(&m.name).map_err(|e| {
                    format!("plugin {}: cannot make its health probe socket: {e}", m.name)
                })?;
                out.push(("plugd-health", fd));
                Some(Target::Probe(name))
            }
            Some(HealthCheck::Http { addr, .. } | HealthCheck::Tcp { addr }) => {
                Some(Target::Inet(addr.ok_or("a health check without [listen] needs an address")?))
            }
        };
        Ok((out, target))
    }

    /// The connection core for an instance's socket (`hold`: a hot update's new instance).
    fn connect(
        &self,
        sock: std::os::unix::net::UnixStream,
        spec: &PluginSpec,
        hold: bool,
        shm: Option<crate::conn::ShmSide>,
    ) -> Arc<Conn> {
        Arc::new(Conn::new(
            sock,
            self.max_frame,
            hold,
            self.shared.engine.clone(),
            spec.name(),
            spec.manifest.timeouts.missed_deadlines,
            self.host_methods.clone(),
            shm,
        ))
    }
}
