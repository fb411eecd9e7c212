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
use crate::instance::{self, Control, InstanceConfig, InstanceEvent};
use crate::lifecycle::{transition, Action, Event, Machine, State};
use crate::logs::LogSource;
use crate::manifest::PluginSpec;
use crate::router::Shared;
use crate::sandbox::{HostFacts, SandboxReport};
use crate::spawn::{SpawnPlan, Spawner};
use crate::swap::{self, Act, Report};

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
}

struct Current {
    generation: u64,
    control: mpsc::Sender<Control>,
    /// Its connection, while calls may be routed to it.
    calls: Option<Arc<Conn>>,
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
    pub async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<SlotCommand>,
        adopt: Option<FrozenPlugin>,
    ) {
        let mut machine = Machine::new(self.spec.manifest.restart.clone());
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<(u64, InstanceEvent)>();
        let mut current: Option<Current> = None;
        let mut generation = 0u64;
        if let Some(frozen) = adopt {
            generation = 1;
            // Starting: the instance reports Ready at once, and the machine routes to it.
            let adopt = Event::Adopt { restarts: frozen.restarts };
            machine = transition(&machine, adopt, StdInstant::now(), 0.0).0;
            let (control_tx, control_rx) = mpsc::channel(4);
            let cfg = self.instance_config(&self.spec, generation, None);
            let shared_sock =
                frozen.instance.socket.try_clone().map(std::os::unix::net::UnixStream::from);
            match shared_sock {
                Ok(sock) => {
                    let conn = self.connect(sock, &self.spec, false);
                    let wiring = instance::Wiring {
                        conn: conn.clone(),
                        control: control_rx,
                        events: ev_tx.clone(),
                    };
                    tokio::spawn(instance::run_adopted(frozen.instance, cfg, wiring));
                    current = Some(Current { generation, control: control_tx, calls: Some(conn) });
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
        let mut pid: Option<u32> = None;
        let mut restart_at: Option<Instant> = None;
        let mut handover: Option<Vec<u8>> = None;
        let mut start_waiters: Vec<oneshot::Sender<Result<(), ExitReason>>> = Vec::new();
        let mut stop_waiters: Vec<oneshot::Sender<()>> = Vec::new();
        let mut update: Option<Update> = None;
        // Who asked for the hand-over the machine is performing (Action::Freeze).
        let mut freeze_reply: Option<oneshot::Sender<Result<FrozenPlugin, String>>> = None;
        let far = Instant::now() + std::time::Duration::from_secs(86400 * 365);

        loop {
            let mut sdk = None;
            let event = tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(SlotCommand::Start(reply)) => {
                        if machine.state == State::Ready {
                            let _ = reply.send(Ok(()));
                            continue;
                        }
                        start_waiters.push(reply);
                        Event::Start
                    }
                    Some(SlotCommand::Update(spec, reply)) => {
                        if machine.state != State::Ready || update.is_some() {
                            let why = if update.is_some() { "another update is in progress".to_string() } else { format!("it is not ready ({})", machine.state) };
                            let _ = reply.send(Err(why));
                            continue;
                        }
                        generation += 1;
                        match self.spawn(&spec, generation, None, true, ev_tx.clone()).await {
                            Ok(new) => {
                                self.note(LogLevel::Info, format!("updating to {} beside the running instance", spec.manifest.version));
                                self.shared.live.lock().updating_to = Some(spec.manifest.version.to_string());
                                let phase = swap::Phase::Starting { new: generation };
                                update = Some(Update { phase, spec: Some(*spec), reply: Some(reply), new, retiring: None });
                            }
                            Err(reason) => {
                                let _ = reply.send(Err(reason.to_string()));
                            }
                        }
                        continue;
                    }
                    Some(SlotCommand::Freeze(reply)) => {
                        if machine.state != State::Ready || machine.freezing || current.is_none() {
                            let _ = reply.send(Err(format!("not ready ({})", machine.shown_state())));
                            continue;
                        }
                        freeze_reply = Some(reply);
                        Event::Freeze
                    }
                    Some(SlotCommand::Stop(reply)) => {
                        stop_waiters.push(reply);
                        Event::Stop
                    }
                    None => break,
                },
                Some((gen, ev)) = ev_rx.recv() => {
                    // A report about the update's instances goes to its machine first.
                    let report = match &ev {
                        InstanceEvent::Ready { .. } => Report::Ready,
                        InstanceEvent::Drained => Report::Drained,
                        InstanceEvent::Exited { reason, .. } => Report::Exited(reason.clone()),
                    };
                    let running = current.as_ref().map(|c| c.generation);
                    let stepped = update.as_ref().and_then(|u| swap::step(&u.phase, gen, &report, running));
                    if let Some((next, acts)) = stepped {
                        let Some(mut u) = update.take() else { continue };
                        let mut restart = None;
                        for act in acts {
                            match act {
                                Act::SwitchToNew => {
                                    let InstanceEvent::Ready { pid: p, sdk: s, lockdown } = &ev else { continue };
                                    self.record_lockdown(lockdown);
                                    if let Some(calls) = u.new.calls.clone() {
                                        self.shared.set_route(Some(calls));
                                    }
                                    let old = current.replace(Current { generation: u.new.generation, control: u.new.control.clone(), calls: u.new.calls.take() });
                                    if let Some(mut old) = old {
                                        old.calls = None;
                                        let _ = old.control.send(Control::Stop).await;
                                        u.retiring = Some(old);
                                    }
                                    pid = Some(*p);
                                    let mut live = self.shared.live.lock();
                                    live.pid = pid;
                                    live.sdk = Some(s.clone());
                                    if let Some(spec) = &u.spec {
                                        live.version = spec.manifest.version.to_string();
                                    }
                                    live.ready_since = Some(Instant::now());
                                }
                                Act::ReleaseNew => {
                                    let state = match &ev { InstanceEvent::Exited { state, .. } => state.clone(), _ => None };
                                    let _ = u.new.control.send(Control::Release(state)).await;
                                }
                                Act::Succeed => {
                                    if let (Some(spec), Report::Exited(reason)) = (u.spec.take(), &report) {
                                        self.note(LogLevel::Info, format!("updated to {} (old instance: {reason})", spec.manifest.version));
                                        *self.shared.calls.write() = spec.manifest.calls.clone();
                                        self.spec = spec;
                                    }
                                    self.shared.live.lock().updating_to = None;
                                    u.answer(Ok(()));
                                }
                                Act::FailKeepOld(why) => {
                                    self.note(LogLevel::Error, format!("update failed, still serving the running version: {why}"));
                                    self.shared.live.lock().updating_to = None;
                                    u.answer(Err(why));
                                }
                                Act::FailAfterSwitch(why) => {
                                    self.note(LogLevel::Error, format!("update failed: {why}; the running version restarts once it has drained"));
                                    if let Report::Exited(reason) = &report {
                                        *self.shared.live.lock().exits.entry(reason.kind()).or_default() += 1;
                                    }
                                    current = None;
                                    pid = None;
                                    self.shared.set_route(None);
                                    {
                                        let mut live = self.shared.live.lock();
                                        live.updating_to = None;
                                        live.version = self.spec.manifest.version.to_string();
                                    }
                                    u.answer(Err(why));
                                }
                                Act::RestartOld(reason) => {
                                    if let InstanceEvent::Exited { state: Some(state), .. } = &ev {
                                        handover = Some(state.clone());
                                    }
                                    restart = Some(reason);
                                }
                            }
                        }
                        if let Some(phase) = next {
                            u.phase = phase;
                            update = Some(u);
                        }
                        match restart {
                            // As if the running instance had ended this way: the policy restarts it.
                            Some(reason) => Event::ProcessExited(reason),
                            None => {
                                self.publish(&machine, pid, None, update.as_ref());
                                continue;
                            }
                        }
                    } else {
                    if current.as_ref().map(|c| c.generation) != Some(gen) {
                        continue; // a report from an instance we already let go of
                    }
                    match ev {
                        InstanceEvent::Ready { pid: p, sdk: s, lockdown } => {
                            pid = Some(p);
                            sdk = Some(s);
                            self.record_lockdown(&lockdown);
                            self.note(LogLevel::Info, format!("ready (pid {p})"));
                            Event::Ready
                        }
                        InstanceEvent::Drained => Event::Drained,
                        InstanceEvent::Exited { reason, state } => {
                            if state.is_some() {
                                handover = state;
                            }
                            current = None;
                            pid = None;
                            self.shared.set_route(None);
                            let level = if reason.is_failure() { LogLevel::Error } else { LogLevel::Info };
                            self.note(level, format!("instance ended: {reason}"));
                            *self.shared.live.lock().exits.entry(reason.kind()).or_default() += 1;
                            Event::ProcessExited(reason)
                        }
                    }
                    }
                },
                _ = sleep_until(restart_at.unwrap_or(far)), if restart_at.is_some() => {
                    restart_at = None;
                    Event::BackoffElapsed
                }
            };

            let mut queue = vec![event];
            while let Some(event) = queue.pop() {
                let (next, actions) =
                    transition(&machine, event, StdInstant::now(), fastrand::f64());
                machine = next;
                for action in actions {
                    match action {
                        Action::Spawn => {
                            generation += 1;
                            match self
                                .spawn(
                                    &self.spec,
                                    generation,
                                    handover.take(),
                                    false,
                                    ev_tx.clone(),
                                )
                                .await
                            {
                                Ok(c) => current = Some(c),
                                Err(reason) => {
                                    self.note(LogLevel::Error, format!("start failed: {reason}"));
                                    queue.push(Event::ProcessExited(reason));
                                }
                            }
                        }
                        Action::Route => {
                            if let Some(calls) = current.as_ref().and_then(|c| c.calls.clone()) {
                                self.shared.set_route(Some(calls));
                            }
                        }
                        Action::Unroute => {
                            self.shared.set_route(None);
                            if let Some(c) = current.as_mut() {
                                c.calls = None;
                            }
                        }
                        Action::GracefulStop => {
                            if let Some(c) = &current {
                                let _ = c.control.send(Control::Stop).await;
                            }
                        }
                        Action::Kill => {
                            if let Some(c) = &current {
                                let _ = c.control.send(Control::Kill).await;
                            }
                        }
                        Action::ScheduleRestart(d) => {
                            self.note(
                                LogLevel::Warn,
                                format!("restarting in {} ms", d.as_millis()),
                            );
                            restart_at = Some(Instant::now() + d);
                        }
                        Action::CancelRestart => restart_at = None,
                        Action::Freeze => {
                            let (Some(reply), Some(c)) = (freeze_reply.take(), current.as_ref())
                            else {
                                continue;
                            };
                            // Calls refused from now on say why: in-flight calls are finishing.
                            self.publish(&machine, pid, None, update.as_ref());
                            let (tx, rx) = oneshot::channel();
                            let _ = c.control.send(Control::Freeze(tx)).await;
                            match rx.await {
                                Ok(Ok(instance)) => {
                                    let sandbox = self.shared.live.lock().sandbox.clone();
                                    let restarts = machine.restarts;
                                    let _ = reply.send(Ok(FrozenPlugin {
                                        instance,
                                        restarts,
                                        sandbox,
                                    }));
                                    return; // the process now belongs to the successor
                                }
                                other => {
                                    let why = match other {
                                        Ok(Err(e)) => e,
                                        _ => "the instance ended".into(),
                                    };
                                    let _ = reply.send(Err(why.clone()));
                                    current = None;
                                    pid = None;
                                    let detail = format!("handover failed: {why}");
                                    queue.push(Event::FreezeFailed(ExitReason::SpawnFailed {
                                        detail,
                                    }));
                                }
                            }
                        }
                        Action::ReportFailed => {
                            let r = &self.spec.manifest.restart;
                            self.note(
                                LogLevel::Error,
                                format!(
                                    "failed: more than {} restarts within {} s; not restarting until started by hand",
                                    r.max_restarts,
                                    r.within.as_secs_f64()
                                ),
                            );
                        }
                    }
                }
            }
            self.publish(&machine, pid, sdk, update.as_ref());

            match machine.state {
                State::Ready => {
                    for w in start_waiters.drain(..) {
                        let _ = w.send(Ok(()));
                    }
                }
                State::Starting | State::Draining | State::Stopping => {}
                _ => {
                    let why =
                        machine.last_exit.clone().unwrap_or(ExitReason::Stopped { forced: false });
                    for w in start_waiters.drain(..) {
                        let _ = w.send(Err(why.clone()));
                    }
                }
            }
            if current.is_none() && !matches!(machine.state, State::Starting | State::Ready) {
                for w in stop_waiters.drain(..) {
                    let _ = w.send(());
                }
            }
        }
        // The supervisor is gone: dropping the control queue makes the instance kill its group.
        self.shared.set_route(None);
        drop(current);
    }

    fn instance_config(
        &self,
        spec: &PluginSpec,
        generation: u64,
        state: Option<Vec<u8>>,
    ) -> InstanceConfig {
        let m = &spec.manifest;
        InstanceConfig {
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
        if let (crate::manifest::Entrypoint::Script(_), Some(prepare)) =
            (&spec.manifest.entrypoint, &self.prepare)
        {
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
        let cfg = self.instance_config(spec, generation, state);
        let sock = raw.socket.try_clone().map_err(|e| {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(raw.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            ExitReason::SpawnFailed { detail: format!("cannot share the plugin socket: {e}") }
        })?;
        let conn = self.connect(sock, spec, hold);
        let wiring = instance::Wiring { conn: conn.clone(), control: control_rx, events };
        tokio::spawn(instance::run(raw, cfg, wiring));
        Ok(Current { generation, control: control_tx, calls: Some(conn) })
    }

    /// The connection core for an instance's socket (`hold`: a hot update's new instance).
    fn connect(
        &self,
        sock: std::os::unix::net::UnixStream,
        spec: &PluginSpec,
        hold: bool,
    ) -> Arc<Conn> {
        Arc::new(Conn::new(
            sock,
            self.max_frame,
            hold,
            self.shared.engine.clone(),
            spec.name(),
            spec.manifest.timeouts.missed_deadlines,
            self.host_methods.clone(),
        ))
    }
}
