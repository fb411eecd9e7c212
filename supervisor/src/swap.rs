//! A hot update as a pure machine: `(phase, report) → (phase, actions)`.
//!
//! A hot update starts a new instance beside the running one, switches calls to it once
//! it is Ready (it holds them), lets the old one drain and hand over its state, then
//! releases the new one. What each instance's report means depends on where the update
//! is; this module says it, and the slot task performs the actions. No I/O, no clock: the
//! tests below walk every path.

use crate::exit::ExitReason;

/// Where a hot update is. `new` and `old` are instance generations.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Phase {
    /// The new instance starts; the running one keeps serving.
    Starting { new: u64 },
    /// The new instance is routed and holds calls; the old one drains and hands over.
    HandingOver { new: u64, old: Option<u64> },
    /// The new instance died after taking the route: the old one drains, and then the
    /// restart policy starts the old version again, as if it had ended with `reason`.
    Failed { old: u64, reason: ExitReason },
}

/// What an instance reported.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Report {
    /// Handshake done.
    Ready,
    /// In-flight calls done, Shutdown sent.
    Drained,
    /// The process is gone.
    Exited(ExitReason),
}

/// What the slot does.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Act {
    /// Route calls to the new instance (held), make it current, and stop the old one.
    SwitchToNew,
    /// Hand the old instance's state to the new one and let calls through.
    ReleaseNew,
    /// The update is done: the new spec is the plugin's; answer Ok.
    Succeed,
    /// The update failed before the switch; the old instance keeps serving. Answer this.
    FailKeepOld(String),
    /// The new instance died after the switch: unroute and answer this; the old one
    /// drains (its in-flight calls finish) before anything restarts.
    FailAfterSwitch(String),
    /// The old instance of a failed update is gone (or there was none): restart through
    /// the lifecycle machine, as if the running instance had ended with this reason.
    RestartOld(ExitReason),
}

/// Instance `generation` reported `report`; `running` is the instance serving now (the
/// one a switch retires). `None`: the report is not about this update (the lifecycle
/// machine takes it). Otherwise the next phase (`None`: the update is over) and what to do.
pub(crate) fn step(
    phase: &Phase,
    generation: u64,
    report: &Report,
    running: Option<u64>,
) -> Option<(Option<Phase>, Vec<Act>)> {
    use Act::*;
    match (phase, report) {
        (Phase::Starting { new }, Report::Ready) if generation == *new => {
            Some((Some(Phase::HandingOver { new: *new, old: running }), vec![SwitchToNew]))
        }
        (Phase::Starting { new, .. }, Report::Exited(reason)) if generation == *new => {
            Some((None, vec![FailKeepOld(format!("the new instance did not start: {reason}"))]))
        }
        (Phase::HandingOver { old: Some(old), .. }, Report::Exited(_)) if generation == *old => {
            Some((None, vec![ReleaseNew, Succeed]))
        }
        (Phase::HandingOver { new, old }, Report::Exited(reason)) if generation == *new => {
            let why = format!("the new instance ended before the hand-over: {reason}");
            match old {
                Some(old) => Some((
                    Some(Phase::Failed { old: *old, reason: reason.clone() }),
                    vec![FailAfterSwitch(why)],
                )),
                // Nothing to drain: the policy restarts the plugin now.
                None => Some((None, vec![FailAfterSwitch(why), RestartOld(reason.clone())])),
            }
        }
        // The old instance's Drained on its way out: its exit comes next.
        (Phase::HandingOver { old: Some(old), .. }, _) if generation == *old => {
            Some((Some(phase.clone()), Vec::new()))
        }
        (Phase::Failed { old, reason }, Report::Exited(_)) if generation == *old => {
            Some((None, vec![RestartOld(reason.clone())]))
        }
        (Phase::Failed { old, .. }, _) if generation == *old => {
            Some((Some(phase.clone()), Vec::new()))
        }
        _ => None,
    }
}

impl Phase {
    /// The published state while the update runs, when it differs from the lifecycle
    /// machine's (which still says Ready): after a failed switch nothing serves until the
    /// old instance has drained and restarted.
    pub fn overrides_state(&self) -> Option<crate::lifecycle::State> {
        matches!(self, Phase::Failed { .. }).then_some(crate::lifecycle::State::Draining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crashed() -> ExitReason {
        ExitReason::Exited { code: 1 }
    }

    #[test]
    fn a_good_update_switches_then_releases_once_the_old_one_is_gone() {
        let p = Phase::Starting { new: 2 };
        let (p, a) = step(&p, 2, &Report::Ready, Some(1)).unwrap();
        assert_eq!(a, vec![Act::SwitchToNew]);
        let p = p.unwrap();
        assert_eq!(p, Phase::HandingOver { new: 2, old: Some(1) });
        // The old one drains, then exits: only then is the new one released.
        let (same, a) = step(&p, 1, &Report::Drained, Some(1)).unwrap();
        assert_eq!((same.as_ref(), a), (Some(&p), vec![]));
        let (done, a) =
            step(&p, 1, &Report::Exited(ExitReason::Stopped { forced: false }), Some(1)).unwrap();
        assert_eq!((done, a), (None, vec![Act::ReleaseNew, Act::Succeed]));
    }

    #[test]
    fn the_switch_retires_whichever_instance_serves_at_that_moment() {
        // The old instance crashed and restarted (generation 3) while the new one started.
        let (p, _) = step(&Phase::Starting { new: 2 }, 2, &Report::Ready, Some(3)).unwrap();
        assert_eq!(p, Some(Phase::HandingOver { new: 2, old: Some(3) }));
        let (p, _) = step(&Phase::Starting { new: 2 }, 2, &Report::Ready, None).unwrap();
        assert_eq!(p, Some(Phase::HandingOver { new: 2, old: None }));
    }

    #[test]
    fn a_new_instance_that_never_starts_leaves_the_old_one_serving() {
        let p = Phase::Starting { new: 2 };
        let (next, a) = step(&p, 2, &Report::Exited(crashed()), Some(1)).unwrap();
        assert_eq!(next, None);
        assert!(matches!(&a[..], [Act::FailKeepOld(why)] if why.contains("did not start")));
        // Reports of the running instance are the lifecycle machine's business.
        assert_eq!(step(&p, 1, &Report::Exited(crashed()), Some(1)), None);
    }

    #[test]
    fn a_new_instance_that_dies_after_the_switch_restarts_the_old_version_once_drained() {
        let p = Phase::HandingOver { new: 2, old: Some(1) };
        let (next, a) = step(&p, 2, &Report::Exited(crashed()), Some(1)).unwrap();
        assert!(
            matches!(&a[..], [Act::FailAfterSwitch(why)] if why.contains("before the hand-over"))
        );
        let p = next.unwrap();
        assert_eq!(p, Phase::Failed { old: 1, reason: crashed() });
        assert_eq!(p.overrides_state(), Some(crate::lifecycle::State::Draining));
        assert_eq!(step(&p, 1, &Report::Drained, Some(1)), Some((Some(p.clone()), vec![])));
        let (done, a) =
            step(&p, 1, &Report::Exited(ExitReason::Stopped { forced: false }), Some(1)).unwrap();
        assert_eq!((done, a), (None, vec![Act::RestartOld(crashed())]));
    }

    #[test]
    fn without_an_old_instance_a_failed_switch_restarts_at_once() {
        // The running instance had already crashed when the new one became Ready.
        let p = Phase::HandingOver { new: 2, old: None };
        let (next, a) = step(&p, 2, &Report::Exited(crashed()), Some(1)).unwrap();
        assert_eq!(next, None);
        assert!(matches!(&a[..], [Act::FailAfterSwitch(_), Act::RestartOld(r)] if *r == crashed()));
    }

    #[test]
    fn reports_from_instances_the_update_does_not_know_are_not_its_business() {
        for p in [
            Phase::Starting { new: 2 },
            Phase::HandingOver { new: 2, old: Some(1) },
            Phase::Failed { old: 1, reason: crashed() },
        ] {
            assert_eq!(step(&p, 7, &Report::Ready, Some(1)), None);
            assert_eq!(step(&p, 7, &Report::Exited(crashed()), Some(1)), None);
        }
        assert_eq!(Phase::Starting { new: 2 }.overrides_state(), None);
    }
}
