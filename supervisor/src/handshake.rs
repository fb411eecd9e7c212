//! The start of one instance, as a pure machine: Hello → Welcome → Ready, or why not.
//!
//! `step(phase, frame, expected_name)` decides what a frame means at each point of the
//! handshake (PROTOCOL.md sections 4 and 5.1–5.2); the instance actor feeds it what it
//! read and performs the outcome (send Welcome or Reject, kill, record a log line). The
//! timeout, the process exit and a stop order are the actor's own: they end any phase.

use plugin_proto::{negotiate, Message, MAGIC, PROTO_HOST_CALLS, PROTO_MAX, PROTO_MIN};

use crate::exit::ExitReason;

/// Where the handshake is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Nothing valid read yet: the first frame must be a Hello.
    AwaitHello,
    /// Welcome sent for protocol `proto`; `on_load` runs in the plugin until Ready.
    AwaitReady {
        /// The version both sides speak.
        proto: u16,
        /// The SDK the Hello named.
        sdk: String,
    },
}

/// What a frame (or a frame that could not be read) means.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// Keep waiting in the same phase; the actor keeps what the frame carried (a log
    /// line, a log record, the layers the SDK applied to itself).
    Keep(Message),
    /// Answer Welcome for `proto` and wait for Ready; `warning` goes to the plugin's log.
    Welcome {
        /// The version both sides will speak.
        proto: u16,
        /// Said in the plugin's log (a Hello naming another plugin).
        warning: Option<String>,
    },
    /// The plugin is Ready: the handshake is over (the SDK string for the status).
    Ready(String),
    /// Refuse with Reject (the plugin should exit, and is killed if it does not).
    Reject(ExitReason),
    /// The plugin's `on_load` failed and it said why (Reject from the plugin, protocol 2).
    LoadFailed(String),
    /// It broke the protocol: kill it.
    Kill(ExitReason),
}

/// The Notify method of an SDK's report of the layers it applied to itself.
pub(crate) const LOCKDOWN_NOTIFY: &str = "plugd.lockdown";

/// Sent by an SDK before Ready when it took the shared mapping (`transport = "shm"`):
/// from then on it reads calls from the calls ring as well as from the socket.
pub(crate) const SHM_NOTIFY: &str = "plugd.shm";

/// The next phase and what `msg` means in `phase`, for a plugin whose manifest says `name`.
pub(crate) fn step(phase: &Phase, msg: Message, name: &str) -> (Phase, Outcome) {
    let same = phase.clone();
    match (phase, msg) {
        (Phase::AwaitHello, Message::Hello(h)) => {
            if h.magic != MAGIC {
                let detail = format!(
                    "bad magic {:#010x} in Hello (expected {MAGIC:#010x}); this is not a plugd plugin",
                    h.magic
                );
                return (same, Outcome::Reject(ExitReason::VersionMismatch { detail }));
            }
            let Some(proto) = negotiate((PROTO_MIN, PROTO_MAX), (h.proto_min, h.proto_max)) else {
                let detail = format!(
                    "plugin speaks protocol {}..={}, this supervisor speaks {PROTO_MIN}..={PROTO_MAX}; rebuild the plugin with a matching plugin-runner",
                    h.proto_min, h.proto_max
                );
                return (same, Outcome::Reject(ExitReason::VersionMismatch { detail }));
            };
            let warning = (h.name != name).then(|| {
                format!("plugin calls itself {:?} in Hello; its manifest says {name:?}", h.name)
            });
            (Phase::AwaitReady { proto, sdk: h.sdk }, Outcome::Welcome { proto, warning })
        }
        (Phase::AwaitReady { sdk, .. }, Message::Ready) => {
            (same.clone(), Outcome::Ready(sdk.clone()))
        }
        (Phase::AwaitReady { proto, .. }, Message::Reject { reason })
            if *proto >= PROTO_HOST_CALLS =>
        {
            (same, Outcome::LoadFailed(reason))
        }
        (_, msg @ Message::Log { .. }) => (same, Outcome::Keep(msg)),
        (_, msg @ Message::Notify { .. })
            if matches!(&msg, Message::Notify { method, .. }
                if method == LOCKDOWN_NOTIFY || method == plugin_proto::PLUGD_LOG
                    || method == crate::describe::DESCRIBE_NOTIFY || method == SHM_NOTIFY) =>
        {
            (same, Outcome::Keep(msg))
        }
        (_, other) => {
            let detail = format!("unexpected {} during the handshake", other.kind());
            (same, Outcome::Kill(ExitReason::ProtocolViolation { detail }))
        }
    }
}

/// What a frame that could not be decoded means: before the Hello it gets a Reject saying
/// how a Hello looks (a plugin written from the spec learns why); after it, the kill.
pub(crate) fn bad_frame(phase: &Phase, detail: String) -> Outcome {
    match phase {
        Phase::AwaitHello => {
            let detail = format!(
                "the first frame is not a valid Hello ({detail}); its magic is the u32 varint fc 50 4c 47 44, see PROTOCOL.md section 4"
            );
            Outcome::Reject(ExitReason::ProtocolViolation { detail })
        }
        Phase::AwaitReady { .. } => Outcome::Kill(ExitReason::ProtocolViolation { detail }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_proto::{Hello, LogLevel, Payload};

    fn hello(magic: u32, min: u16, max: u16, name: &str) -> Message {
        Message::Hello(Hello {
            magic,
            proto_min: min,
            proto_max: max,
            name: name.into(),
            version: "1.0.0".into(),
            methods: vec![],
            sdk: "test-sdk/1".into(),
        })
    }

    fn ready(proto: u16) -> Phase {
        Phase::AwaitReady { proto, sdk: "test-sdk/1".into() }
    }

    #[test]
    fn hello_welcome_ready_at_the_highest_common_version() {
        let (p, out) = step(&Phase::AwaitHello, hello(MAGIC, 1, 9, "strat"), "strat");
        assert_eq!(out, Outcome::Welcome { proto: PROTO_MAX, warning: None });
        assert_eq!(p, ready(PROTO_MAX));
        let (_, out) = step(&p, Message::Ready, "strat");
        assert_eq!(out, Outcome::Ready("test-sdk/1".into()));
        // A version-1 plugin is spoken to in version 1.
        let (p, out) = step(&Phase::AwaitHello, hello(MAGIC, 1, 1, "strat"), "strat");
        assert_eq!((p, out), (ready(1), Outcome::Welcome { proto: 1, warning: None }));
    }

    #[test]
    fn wrong_magic_or_no_common_version_is_rejected_and_a_wrong_name_only_warned() {
        let (p, out) = step(&Phase::AwaitHello, hello(0x1234, 1, 2, "strat"), "strat");
        assert_eq!(p, Phase::AwaitHello);
        assert!(
            matches!(out, Outcome::Reject(ExitReason::VersionMismatch { ref detail }) if detail.contains("bad magic"))
        );
        let (_, out) = step(&Phase::AwaitHello, hello(MAGIC, 7, 9, "strat"), "strat");
        assert!(
            matches!(out, Outcome::Reject(ExitReason::VersionMismatch { ref detail }) if detail.contains("7..=9"))
        );
        let (_, out) = step(&Phase::AwaitHello, hello(MAGIC, 1, 2, "other"), "strat");
        let Outcome::Welcome { warning: Some(w), .. } = out else { panic!("{out:?}") };
        assert!(w.contains("\"other\"") && w.contains("\"strat\""), "{w}");
    }

    #[test]
    fn a_failed_on_load_is_said_with_reject_from_version_2_only() {
        let reject = || Message::Reject { reason: "no api_key".into() };
        assert_eq!(step(&ready(2), reject(), "s").1, Outcome::LoadFailed("no api_key".into()));
        assert!(matches!(step(&ready(1), reject(), "s").1, Outcome::Kill(_)));
        assert!(matches!(step(&Phase::AwaitHello, reject(), "s").1, Outcome::Kill(_)));
    }

    #[test]
    fn logs_and_notices_are_kept_anything_else_out_of_order_kills() {
        let log = Message::Log { level: LogLevel::Info, message: "loading".into() };
        for phase in [Phase::AwaitHello, ready(2)] {
            assert_eq!(step(&phase, log.clone(), "s"), (phase.clone(), Outcome::Keep(log.clone())));
            let notice =
                Message::Notify { method: LOCKDOWN_NOTIFY.into(), payload: Payload::empty() };
            assert_eq!(step(&phase, notice.clone(), "s").1, Outcome::Keep(notice));
            let described = Message::Notify {
                method: crate::describe::DESCRIBE_NOTIFY.into(),
                payload: Payload::empty(),
            };
            assert_eq!(step(&phase, described.clone(), "s").1, Outcome::Keep(described));
            let other = Message::Notify { method: "hi".into(), payload: Payload::empty() };
            assert!(matches!(step(&phase, other, "s").1, Outcome::Kill(_)));
        }
        let (_, out) = step(&Phase::AwaitHello, Message::Ready, "s");
        assert!(
            matches!(out, Outcome::Kill(ExitReason::ProtocolViolation { ref detail }) if detail.contains("unexpected Ready"))
        );
        let (_, out) = step(&ready(2), hello(MAGIC, 1, 2, "s"), "s");
        assert!(matches!(out, Outcome::Kill(_)), "a second Hello");
    }

    #[test]
    fn an_unreadable_first_frame_is_told_how_a_hello_looks() {
        let out = bad_frame(&Phase::AwaitHello, "bad varint".into());
        assert!(
            matches!(out, Outcome::Reject(ExitReason::ProtocolViolation { ref detail }) if detail.contains("fc 50 4c 47 44"))
        );
        assert!(matches!(bad_frame(&ready(2), "x".into()), Outcome::Kill(_)));
    }
}
