//! The plugin lifecycle: one state machine, as a pure function.
//!
//! `transition(machine, event, now, jitter) -> (machine, actions)` decides
//! everything about restarts, backoff and restart intensity; the slot task in
//! `supervisor` performs the actions (spawn, route, drain, kill, timers).
//! Nothing here does I/O or reads a clock, so the rules are tested without
//! processes.
//!
//! ```text
//! Stopped → Starting → Ready → Draining → Stopping → Stopped
//!               ↘ (exit) → Backoff → Starting …   → Failed (intensity exceeded)
//!               ↘ (exit, no restart by policy) → Exited
//! Disabled (not run until enabled)
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::exit::ExitReason;
use crate::manifest::{RestartConfig, RestartPolicy};

/// Where a plugin is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Not running, not scheduled.
    Stopped,
    /// Process spawned, handshake or `on_load` in progress.
    Starting,
    /// Serving calls.
    Ready,
    /// Routing stopped; in-flight calls finishing.
    Draining,
    /// Shutdown sent; waiting for the process to exit (escalating to TERM/KILL).
    Stopping,
    /// Ended and not restarted by policy (see the last exit reason).
    Exited,
    /// Waiting before a restart.
    Backoff,
    /// Restart intensity exceeded; stays down until started by hand.
    Failed,
    /// Kept on disk, not run.
    Disabled,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            State::Stopped => "stopped",
            State::Starting => "starting",
            State::Ready => "ready",
            State::Draining => "draining",
            State::Stopping => "stopping",
            State::Exited => "exited",
            State::Backoff => "backoff",
            State::Failed => "failed",
            State::Disabled => "disabled",
        };
        f.write_str(s)
    }
}

/// Something that happened to a plugin.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Start requested (load, `start`, manual restart of a failed plugin).
    Start,
    /// The instance completed the handshake and `on_load`.
    Ready,
    /// Stop requested (unload, `stop`, supervisor shutdown).
    Stop,
    /// Disable requested: stop if running, then stay down.
    Disable,
    /// Enable requested.
    Enable,
    /// In-flight calls finished (or the drain timeout passed); Shutdown is being sent.
    Drained,
    /// The process is gone, for this reason.
    ProcessExited(ExitReason),
    /// The backoff delay passed.
    BackoffElapsed,
    /// A live instance handed over by a predecessor plugd (SIGUSR2) is taken on: it is
    /// starting (it reports Ready at once), with the restarts it already had.
    Adopt {
        /// Restarts the predecessor counted.
        restarts: u32,
    },
    /// Hand the ready instance's live process to a successor plugd (SIGUSR2).
    Freeze,
    /// The hand-over did not happen, for this reason: the instance is gone, as if it had
    /// exited so (the restart policy decides).
    FreezeFailed(ExitReason),
}

/// What the caller must do after a transition.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Spawn a new instance.
    Spawn,
    /// Route calls to the ready instance.
    Route,
    /// Stop routing calls to the instance.
    Unroute,
    /// Ask the instance to drain its in-flight calls and shut down gracefully.
    GracefulStop,
    /// Terminate an instance that is still starting.
    Kill,
    /// Start a timer; deliver `BackoffElapsed` when it fires.
    ScheduleRestart(Duration),
    /// Drop a pending restart timer.
    CancelRestart,
    /// Report that the plugin gave up (restart intensity exceeded).
    ReportFailed,
    /// Ask the instance to give up its process, socket and state for a successor; deliver
    /// `FreezeFailed` if it cannot (on success the slot's work is done).
    Freeze,
}

/// The lifecycle of one plugin: its state plus the restart bookkeeping.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Current state.
    pub state: State,
    /// Restart rules from the manifest.
    pub config: RestartConfig,
    /// Times of recent restarts, within the intensity window.
    pub history: VecDeque<Instant>,
    /// Consecutive restarts since the plugin was last stable (drives backoff).
    pub attempt: u32,
    /// Total restarts since load.
    pub restarts: u32,
    /// When the current instance became Ready.
    pub ready_since: Option<Instant>,
    /// Why the last instance ended.
    pub last_exit: Option<ExitReason>,
    /// State to settle in once a requested stop completes (Stopped or Disabled).
    pub stop_target: State,
    /// A hand-over to a successor plugd is under way: calls are no longer routed (the
    /// status shows Draining), the instance still runs.
    pub freezing: bool,
}

impl Machine {
    /// The state the status shows: a Ready instance being handed over shows Draining.
    pub fn shown_state(&self) -> State {
        if self.freezing {
            State::Draining
        } else {
            self.state
        }
    }
}

impl Machine {
    /// A stopped plugin with these restart rules.
    pub fn new(config: RestartConfig) -> Self {
        Self {
            state: State::Stopped,
            config,
            history: VecDeque::new(),
            attempt: 0,
            restarts: 0,
            ready_since: None,
            last_exit: None,
            stop_target: State::Stopped,
            freezing: false,
        }
    }
}

/// The backoff before restart number `attempt` (0-based): exponential, capped,
/// with "equal jitter" (half fixed, half scaled by `jitter` in `[0, 1)`).
pub fn backoff_delay(config: &RestartConfig, attempt: u32, jitter: f64) -> Duration {
    let factor = 2u32.saturating_pow(attempt.min(20));
    let full = config.backoff.saturating_mul(factor).min(config.backoff_max);
    let half = full / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

/// The lifecycle rules: given a machine and an event, the next machine and the actions to take.
pub fn transition(m: &Machine, event: Event, now: Instant, jitter: f64) -> (Machine, Vec<Action>) {
    let mut next = m.clone();
    let actions = step(&mut next, event, now, jitter);
    (next, actions)
}

fn step(m: &mut Machine, event: Event, now: Instant, jitter: f64) -> Vec<Action> {
    use State::*;
    match (m.state, event) {
        (Stopped | Exited | Failed, Event::Start) => {
            if m.state == Failed {
                m.history.clear();
                m.attempt = 0;
            }
            m.state = Starting;
            m.stop_target = Stopped;
            vec![Action::Spawn]
        }
        (Stopped, Event::Adopt { restarts }) => {
            m.state = Starting;
            m.restarts = restarts;
            vec![]
        }
        (Ready, Event::Freeze) if !m.freezing => {
            m.freezing = true;
            vec![Action::Unroute, Action::Freeze]
        }
        (Ready, Event::FreezeFailed(reason)) if m.freezing => {
            m.freezing = false;
            on_unplanned_exit(m, reason, now, jitter)
        }
        // While the hand-over runs nothing else happens to the instance.
        (Ready, _) if m.freezing => vec![],
        (Starting, Event::Ready) => {
            m.state = Ready;
            m.ready_since = Some(now);
            vec![Action::Route]
        }
        (Ready | Starting, ev @ (Event::Stop | Event::Disable)) => {
            m.stop_target = if ev == Event::Disable { Disabled } else { Stopped };
            let was_ready = m.state == Ready;
            if was_ready {
                m.state = Draining;
                vec![Action::Unroute, Action::GracefulStop]
            } else {
                m.state = Stopping;
                vec![Action::Kill]
            }
        }
        (Draining | Stopping, Event::Disable) => {
            m.stop_target = Disabled;
            vec![]
        }
        (Draining, Event::Drained) => {
            m.state = Stopping;
            vec![]
        }
        (Draining | Stopping, Event::ProcessExited(reason)) => {
            m.last_exit = Some(reason);
            m.ready_since = None;
            m.state = m.stop_target;
            vec![]
        }
        (Starting | Ready, Event::ProcessExited(reason)) => {
            on_unplanned_exit(m, reason, now, jitter)
        }
        (Backoff, Event::BackoffElapsed) => {
            m.state = Starting;
            vec![Action::Spawn]
        }
        (Backoff, Event::Stop) => {
            m.state = Stopped;
            vec![Action::CancelRestart]
        }
        (Backoff, Event::Disable) => {
            m.state = Disabled;
            vec![Action::CancelRestart]
        }
        (Stopped | Exited | Failed, Event::Stop) => {
            m.state = Stopped;
            vec![]
        }
        (Stopped | Exited | Failed, Event::Disable) => {
            m.state = Disabled;
            vec![]
        }
        (Disabled, Event::Enable) => {
            m.state = Stopped;
            vec![]
        }
        // Everything else (Start while running, Ready after a stop was requested,
        // a second Stop, …) changes nothing.
        _ => vec![],
    }
}

fn on_unplanned_exit(
    m: &mut Machine,
    reason: ExitReason,
    now: Instant,
    jitter: f64,
) -> Vec<Action> {
    if let Some(since) = m.ready_since.take() {
        if now.saturating_duration_since(since) >= m.config.reset_after {
            m.attempt = 0;
        }
    }
    let restart = match m.config.policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => reason.is_failure(),
        RestartPolicy::Never => false,
    };
    m.last_exit = Some(reason);
    if !restart {
        m.state = State::Exited;
        return vec![];
    }
    while let Some(&t) = m.history.front() {
        if now.saturating_duration_since(t) > m.config.within {
            m.history.pop_front();
        } else {
            break;
        }
    }
    if m.history.len() >= m.config.max_restarts as usize {
        m.state = State::Failed;
        return vec![Action::ReportFailed];
    }
    m.history.push_back(now);
    m.restarts += 1;
    let delay = backoff_delay(&m.config, m.attempt, jitter);
    m.attempt += 1;
    m.state = State::Backoff;
    vec![Action::ScheduleRestart(delay)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(policy: RestartPolicy, max: u32) -> RestartConfig {
        RestartConfig {
            policy,
            max_restarts: max,
            within: Duration::from_secs(10),
            backoff: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            reset_after: Duration::from_secs(5),
        }
    }

    fn run(m: &Machine, ev: Event, now: Instant) -> (Machine, Vec<Action>) {
        transition(m, ev, now, 0.0)
    }

    fn crash() -> Event {
        Event::ProcessExited(ExitReason::Signaled { signal: 11, core_dumped: false })
    }

    fn ready(policy: RestartPolicy, max: u32, t: Instant) -> Machine {
        let m = Machine::new(cfg(policy, max));
        let (m, a) = run(&m, Event::Start, t);
        assert_eq!((m.state, a), (State::Starting, vec![Action::Spawn]));
        let (m, a) = run(&m, Event::Ready, t);
        assert_eq!((m.state, a), (State::Ready, vec![Action::Route]));
        m
    }

    #[test]
    fn graceful_stop_drains_then_stops() {
        let t = Instant::now();
        let m = ready(RestartPolicy::Always, 3, t);
        let (m, a) = run(&m, Event::Stop, t);
        assert_eq!((m.state, a), (State::Draining, vec![Action::Unroute, Action::GracefulStop]));
        let (m, _) = run(&m, Event::Drained, t);
        assert_eq!(m.state, State::Stopping);
        let (m, a) = run(&m, Event::ProcessExited(ExitReason::Stopped { forced: false }), t);
        assert_eq!((m.state, a), (State::Stopped, vec![]));
        assert_eq!(m.restarts, 0, "a requested stop is never restarted, even with policy always");
    }

    #[test]
    fn crash_restarts_with_growing_backoff() {
        let t = Instant::now();
        let mut m = ready(RestartPolicy::OnFailure, 10, t);
        let mut delays = vec![];
        for i in 0..5 {
            let (n, a) = run(&m, crash(), t + Duration::from_millis(i));
            assert_eq!(n.state, State::Backoff);
            match a.as_slice() {
                [Action::ScheduleRestart(d)] => delays.push(*d),
                other => panic!("unexpected {other:?}"),
            }
            let (n, a) = run(&n, Event::BackoffElapsed, t);
            assert_eq!((n.state, a), (State::Starting, vec![Action::Spawn]));
            let (n, _) = run(&n, Event::Ready, t);
            m = n;
        }
        let ms: Vec<u128> = delays.iter().map(|d| d.as_millis()).collect();
        // jitter 0 gives half of 100, 200, 400, 800, then the 1 s cap.
        assert_eq!(ms, vec![50, 100, 200, 400, 500]);
        assert_eq!(m.restarts, 5);
    }

    #[test]
    fn jitter_stays_within_half_and_full_delay() {
        let c = cfg(RestartPolicy::Always, 1);
        for j in [0.0, 0.3, 0.999] {
            let d = backoff_delay(&c, 2, j);
            assert!(d >= Duration::from_millis(200) && d < Duration::from_millis(400), "{d:?}");
        }
        assert_eq!(backoff_delay(&c, 40, 1.0), Duration::from_secs(1));
    }

    #[test]
    fn restart_intensity_exceeded_turns_failed() {
        let t = Instant::now();
        let mut m = ready(RestartPolicy::Always, 2, t);
        for _ in 0..2 {
            let (n, _) = run(&m, crash(), t);
            assert_eq!(n.state, State::Backoff);
            let (n, _) = run(&n, Event::BackoffElapsed, t);
            m = n;
        }
        let (m, a) = run(&m, crash(), t);
        assert_eq!((m.state, a), (State::Failed, vec![Action::ReportFailed]));
        // A manual start clears the intensity history.
        let (m, a) = run(&m, Event::Start, t);
        assert_eq!((m.state, a), (State::Starting, vec![Action::Spawn]));
        assert!(m.history.is_empty());
    }

    #[test]
    fn restarts_outside_the_window_do_not_count() {
        let t = Instant::now();
        let mut m = ready(RestartPolicy::Always, 1, t);
        for i in 0..4u64 {
            let now = t + Duration::from_secs(11 * i);
            let (n, _) = run(&m, crash(), now);
            assert_eq!(n.state, State::Backoff, "crash {i} is alone in its 10 s window");
            let (n, _) = run(&n, Event::BackoffElapsed, now);
            m = n;
        }
    }

    #[test]
    fn stable_uptime_resets_backoff() {
        let t = Instant::now();
        let m = ready(RestartPolicy::Always, 10, t);
        let (m, _) = run(&m, crash(), t);
        let (m, _) = run(&m, Event::BackoffElapsed, t);
        let (m, _) = run(&m, Event::Ready, t);
        assert_eq!(m.attempt, 1);
        let later = t + Duration::from_secs(6);
        let (m, a) = run(&m, crash(), later);
        assert_eq!(a, vec![Action::ScheduleRestart(Duration::from_millis(50))]);
        assert_eq!(m.attempt, 1);
    }

    #[test]
    fn policies_decide_what_restarts() {
        let t = Instant::now();
        let clean = Event::ProcessExited(ExitReason::Exited { code: 0 });
        let (m, _) = run(&ready(RestartPolicy::OnFailure, 5, t), clean.clone(), t);
        assert_eq!(m.state, State::Exited);
        let (m, _) = run(&ready(RestartPolicy::Always, 5, t), clean, t);
        assert_eq!(m.state, State::Backoff);
        let (m, _) = run(&ready(RestartPolicy::Never, 5, t), crash(), t);
        assert_eq!(m.state, State::Exited);
        assert!(matches!(m.last_exit, Some(ExitReason::Signaled { signal: 11, .. })));
        let (m, _) = run(&ready(RestartPolicy::OnFailure, 5, t), crash(), t);
        assert_eq!(m.state, State::Backoff);
    }

    #[test]
    fn stop_during_start_or_backoff() {
        let t = Instant::now();
        let m = Machine::new(cfg(RestartPolicy::Always, 5));
        let (m, _) = run(&m, Event::Start, t);
        let (m, a) = run(&m, Event::Stop, t);
        assert_eq!((m.state, a), (State::Stopping, vec![Action::Kill]));
        let (m, a) = run(&m, Event::Ready, t);
        assert_eq!((m.state, a), (State::Stopping, vec![]), "late Ready after a stop is ignored");
        let m = ready(RestartPolicy::Always, 5, t);
        let (m, _) = run(&m, crash(), t);
        let (m, a) = run(&m, Event::Stop, t);
        assert_eq!((m.state, a), (State::Stopped, vec![Action::CancelRestart]));
    }

    #[test]
    fn disable_persists_until_enable() {
        let t = Instant::now();
        let m = ready(RestartPolicy::Always, 5, t);
        let (m, a) = run(&m, Event::Disable, t);
        assert_eq!(a, vec![Action::Unroute, Action::GracefulStop]);
        let (m, _) = run(&m, Event::ProcessExited(ExitReason::Stopped { forced: false }), t);
        assert_eq!(m.state, State::Disabled);
        let (m, a) = run(&m, Event::Start, t);
        assert_eq!((m.state, a), (State::Disabled, vec![]), "a disabled plugin does not start");
        let (m, _) = run(&m, Event::Enable, t);
        assert_eq!(m.state, State::Stopped);
    }

    #[test]
    fn a_handover_unroutes_and_a_failed_one_counts_as_an_exit() {
        let t = Instant::now();
        let m = ready(RestartPolicy::OnFailure, 5, t);
        let (m, a) = run(&m, Event::Freeze, t);
        assert_eq!(a, vec![Action::Unroute, Action::Freeze]);
        assert_eq!((m.state, m.shown_state()), (State::Ready, State::Draining));
        // Nothing else happens to the instance meanwhile; a second Freeze does nothing.
        for ev in [Event::Freeze, Event::Stop, Event::Start, crash()] {
            let (n, a) = run(&m, ev, t);
            assert_eq!((n.state, n.freezing, a), (State::Ready, true, vec![]));
        }
        let failed = ExitReason::SpawnFailed { detail: "handover failed: gone".into() };
        let (m, a) = run(&m, Event::FreezeFailed(failed.clone()), t);
        assert!(matches!(a[..], [Action::ScheduleRestart(_)]), "{a:?}");
        assert_eq!(
            (m.state, m.shown_state(), m.last_exit),
            (State::Backoff, State::Backoff, Some(failed))
        );
        // Only a Ready plugin is handed over.
        let (n, a) = run(&Machine::new(cfg(RestartPolicy::Always, 5)), Event::Freeze, t);
        assert_eq!((n.state, n.freezing, a), (State::Stopped, false, vec![]));
    }

    #[test]
    fn an_adopted_instance_starts_with_its_restarts_and_is_not_spawned() {
        let t = Instant::now();
        let (m, a) =
            run(&Machine::new(cfg(RestartPolicy::Always, 5)), Event::Adopt { restarts: 7 }, t);
        assert_eq!((m.state, m.restarts, a), (State::Starting, 7, vec![]));
        let (m, a) = run(&m, Event::Ready, t);
        assert_eq!((m.state, a), (State::Ready, vec![Action::Route]));
    }
}
