//! The stop sequence of one instance, as a pure machine: asked to stop, it takes no new
//! calls and lets the calls in flight finish (until the drain timeout), then sends
//! Shutdown, then SIGTERM after the shutdown grace, then SIGKILL after the kill grace.
//!
//! `step` is a function of (phase, event, now, timeouts) only; the instance actor feeds it
//! what happened and performs the actions it returns, so every path of a stop is tested
//! here without a process.

use std::time::Duration;

use tokio::time::Instant;

/// Where an instance is in its stop sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Serving; not asked to stop.
    Running,
    /// Asked to stop: no new calls; those in flight may finish until `until` (None once
    /// the drain timed out and they were failed).
    Draining { until: Option<Instant> },
    /// Shutdown sent; SIGTERM at `term_at` if it has not exited.
    ShutdownSent { term_at: Instant },
    /// SIGTERM sent; SIGKILL at `kill_at`.
    TermSent { kill_at: Instant },
    /// SIGKILL sent, or killed outright (the actor's `kill`, when the supervisor is gone
    /// or a start is abandoned, signals and reaps by itself): only its exit is awaited.
    Killed,
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// Stop was asked.
    Asked,
    /// Nothing is queued or in flight any more.
    Drained,
    /// The phase's timer fired (drain timeout, shutdown grace or kill grace).
    TimerDue,
}

/// What the actor must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Take no new calls (close the call queue and the blocking callers' path).
    CloseCalls,
    /// Fail the calls still in flight: the drain timed out.
    FailInFlight,
    /// Send Shutdown and tell the slot the instance drained.
    SendShutdown,
    /// SIGTERM the plugin's process group.
    SignalTerm,
    /// SIGKILL the plugin's process group.
    SignalKill,
}

/// The timeouts of a stop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// How long calls in flight may take to finish.
    pub drain: Duration,
    /// How long after Shutdown before SIGTERM.
    pub shutdown: Duration,
    /// How long after SIGTERM before SIGKILL.
    pub kill: Duration,
}

impl Phase {
    /// True once stop was asked (or the instance was killed).
    pub fn stopping(self) -> bool {
        self != Phase::Running
    }

    /// True once a signal had to be sent: the stop was forced.
    pub fn escalated(self) -> bool {
        matches!(self, Phase::TermSent { .. } | Phase::Killed)
    }

    /// When this phase's timer fires, if it has one.
    pub fn timer(self) -> Option<Instant> {
        match self {
            Phase::Draining { until } => until,
            Phase::ShutdownSent { term_at } => Some(term_at),
            Phase::TermSent { kill_at } => Some(kill_at),
            Phase::Running | Phase::Killed => None,
        }
    }

    /// True while draining: Shutdown goes out once nothing is in flight.
    pub fn draining(self) -> bool {
        matches!(self, Phase::Draining { .. })
    }
}

/// The next phase and what to do, for `event` in `phase` at `now`.
pub(crate) fn step(phase: Phase, event: Event, now: Instant, t: Timeouts) -> (Phase, Vec<Action>) {
    use Action::*;
    match (phase, event) {
        (Phase::Running, Event::Asked) => {
            (Phase::Draining { until: Some(now + t.drain) }, vec![CloseCalls])
        }
        (Phase::Draining { .. }, Event::Drained) => {
            (Phase::ShutdownSent { term_at: now + t.shutdown }, vec![SendShutdown])
        }
        // The drain timed out: fail what is left; Shutdown follows once nothing is in
        // flight (a blocking caller may still hold the socket for a moment).
        (Phase::Draining { until: Some(_) }, Event::TimerDue) => {
            (Phase::Draining { until: None }, vec![FailInFlight])
        }
        (Phase::ShutdownSent { .. }, Event::TimerDue) => {
            (Phase::TermSent { kill_at: now + t.kill }, vec![SignalTerm])
        }
        (Phase::TermSent { .. }, Event::TimerDue) => (Phase::Killed, vec![SignalKill]),
        // Anything else changes nothing: a second stop, a late timer, a drain after Shutdown.
        (phase, _) => (phase, Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        drain: Duration::from_secs(5),
        shutdown: Duration::from_secs(2),
        kill: Duration::from_secs(1),
    };

    #[test]
    fn a_stop_drains_then_shuts_down_then_terms_then_kills() {
        let t0 = Instant::now();
        let (p, a) = step(Phase::Running, Event::Asked, t0, T);
        assert_eq!(
            (p, a),
            (Phase::Draining { until: Some(t0 + T.drain) }, vec![Action::CloseCalls])
        );
        assert!(p.stopping() && !p.escalated());
        let t1 = t0 + Duration::from_millis(10);
        let (p, a) = step(p, Event::Drained, t1, T);
        assert_eq!(
            (p, a),
            (Phase::ShutdownSent { term_at: t1 + T.shutdown }, vec![Action::SendShutdown])
        );
        let (p, a) = step(p, Event::TimerDue, t1 + T.shutdown, T);
        assert_eq!(a, vec![Action::SignalTerm]);
        assert!(p.escalated());
        let (p, a) = step(p, Event::TimerDue, t1 + T.shutdown + T.kill, T);
        assert_eq!((p, a), (Phase::Killed, vec![Action::SignalKill]));
        assert_eq!(p.timer(), None);
    }

    #[test]
    fn a_drain_timeout_fails_what_is_left_once_and_waits_for_the_socket() {
        let t0 = Instant::now();
        let (p, _) = step(Phase::Running, Event::Asked, t0, T);
        let (p, a) = step(p, Event::TimerDue, t0 + T.drain, T);
        assert_eq!((p, a), (Phase::Draining { until: None }, vec![Action::FailInFlight]));
        // No timer left: the actor cannot spin on an expired drain deadline.
        assert_eq!(p.timer(), None);
        let (p, a) = step(p, Event::TimerDue, t0 + T.drain, T);
        assert!(a.is_empty() && p.draining());
        let (p, a) = step(p, Event::Drained, t0 + T.drain, T);
        assert_eq!(a, vec![Action::SendShutdown]);
        assert!(matches!(p, Phase::ShutdownSent { .. }));
    }

    #[test]
    fn repeated_or_late_events_change_nothing() {
        let t0 = Instant::now();
        let (p, _) = step(Phase::Running, Event::Asked, t0, T);
        assert_eq!(step(p, Event::Asked, t0, T), (p, vec![]));
        assert_eq!(step(Phase::Running, Event::Drained, t0, T), (Phase::Running, vec![]));
        assert_eq!(step(Phase::Running, Event::TimerDue, t0, T), (Phase::Running, vec![]));
        let k = Phase::Killed;
        assert_eq!(step(k, Event::TimerDue, t0, T), (Phase::Killed, vec![]));
        assert_eq!(step(k, Event::Asked, t0, T), (Phase::Killed, vec![]));
        assert!(k.escalated() && k.stopping());
    }
}
