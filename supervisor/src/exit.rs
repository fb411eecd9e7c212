//! Why a plugin process ended, in words a user can act on.

use std::time::Duration;

use serde::Serialize;

/// The classified end of one plugin process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ExitReason {
    /// The process exited on its own with this status.
    Exited {
        /// Exit status.
        code: i32,
    },
    /// The process was killed by a signal nobody in plugd sent.
    Signaled {
        /// Signal number.
        signal: i32,
        /// Whether it dumped core.
        core_dumped: bool,
    },
    /// A requested stop; `forced` when it had to be killed after the grace period.
    Stopped {
        /// True if SIGTERM/SIGKILL were needed.
        forced: bool,
    },
    /// The process could not be started at all.
    SpawnFailed {
        /// What the OS said.
        detail: String,
    },
    /// No Ready within the start timeout.
    StartupTimeout {
        /// The timeout in milliseconds.
        after_ms: u64,
    },
    /// The plugin sent something that is not the protocol (garbage, an oversized frame, a wrong-way message).
    ProtocolViolation {
        /// What it sent.
        detail: String,
    },
    /// Missed heartbeats or call deadlines.
    Hung {
        /// Which.
        detail: String,
    },
    /// No common protocol version, or wrong magic.
    VersionMismatch {
        /// The ranges.
        detail: String,
    },
    /// The plugin's `on_load` failed and it said why (a Reject in place of Ready, protocol 2).
    LoadFailed {
        /// The plugin's own words, cut to [`LOAD_FAILED_MAX`] bytes, control characters replaced.
        detail: String,
    },
    /// Ran out of its memory limit (allocation failed under RLIMIT_AS, or RSS over the limit).
    MemoryLimit {
        /// The limit in bytes.
        limit_bytes: u64,
    },
    /// Used up its lifetime CPU time (SIGXCPU, then SIGKILL).
    CpuTimeLimit {
        /// The limit in seconds.
        limit_secs: u64,
    },
    /// Wrote past its file size limit (SIGXFSZ).
    FileSizeLimit {
        /// The limit in bytes.
        limit_bytes: u64,
    },
    /// Made a syscall its seccomp profile forbids (SIGSYS).
    SandboxViolation {
        /// The syscall's name, when the plugin's SDK reported it.
        syscall: Option<String>,
    },
    /// Its `[health]` check failed past the threshold (or never passed within its start
    /// timeout): plugd killed it.
    Unhealthy {
        /// The check and what it got.
        detail: String,
    },
}

/// The kind of an [`ExitReason`], without its details: what status counts exits by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExitKind {
    /// Exited with a status.
    Exited,
    /// Killed by a signal plugd did not send.
    Crashed,
    /// Stopped by plugd.
    Stopped,
    /// Could not be started.
    SpawnFailed,
    /// Never became ready.
    StartupTimeout,
    /// Broke the protocol.
    ProtocolViolation,
    /// Stopped answering heartbeats.
    Hung,
    /// Speaks no protocol version plugd speaks.
    VersionMismatch,
    /// Its `on_load` failed, in its own words.
    LoadFailed,
    /// Over its memory limit.
    MemoryLimit,
    /// Over its CPU time limit.
    CpuTimeLimit,
    /// Over its file size limit.
    FileSizeLimit,
    /// Killed by its seccomp filter.
    SandboxViolation,
    /// Failed its health check.
    Unhealthy,
}

impl ExitKind {
    /// The words status and `/metrics` use ("crashed", "memory limit", …).
    pub fn as_str(self) -> &'static str {
        match self {
            ExitKind::Exited => "exited",
            ExitKind::Crashed => "crashed",
            ExitKind::Stopped => "stopped",
            ExitKind::SpawnFailed => "spawn failed",
            ExitKind::StartupTimeout => "startup timeout",
            ExitKind::ProtocolViolation => "protocol violation",
            ExitKind::Hung => "hung",
            ExitKind::VersionMismatch => "version mismatch",
            ExitKind::LoadFailed => "load failed",
            ExitKind::MemoryLimit => "memory limit",
            ExitKind::CpuTimeLimit => "cpu time limit",
            ExitKind::FileSizeLimit => "file size limit",
            ExitKind::SandboxViolation => "sandbox violation",
            ExitKind::Unhealthy => "unhealthy",
        }
    }
}

impl std::fmt::Display for ExitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for ExitKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl ExitReason {
    /// The kind of reason without its details, for counting ("crashed", "memory limit", …).
    pub fn kind(&self) -> ExitKind {
        match self {
            ExitReason::Exited { .. } => ExitKind::Exited,
            ExitReason::Signaled { .. } => ExitKind::Crashed,
            ExitReason::Stopped { .. } => ExitKind::Stopped,
            ExitReason::SpawnFailed { .. } => ExitKind::SpawnFailed,
            ExitReason::StartupTimeout { .. } => ExitKind::StartupTimeout,
            ExitReason::ProtocolViolation { .. } => ExitKind::ProtocolViolation,
            ExitReason::Hung { .. } => ExitKind::Hung,
            ExitReason::VersionMismatch { .. } => ExitKind::VersionMismatch,
            ExitReason::LoadFailed { .. } => ExitKind::LoadFailed,
            ExitReason::MemoryLimit { .. } => ExitKind::MemoryLimit,
            ExitReason::CpuTimeLimit { .. } => ExitKind::CpuTimeLimit,
            ExitReason::FileSizeLimit { .. } => ExitKind::FileSizeLimit,
            ExitReason::SandboxViolation { .. } => ExitKind::SandboxViolation,
            ExitReason::Unhealthy { .. } => ExitKind::Unhealthy,
        }
    }

    /// Whether this exit counts as a failure for the `on-failure` restart policy.
    pub fn is_failure(&self) -> bool {
        !matches!(self, ExitReason::Exited { code: 0 } | ExitReason::Stopped { .. })
    }

    /// A failed `on_load` in the plugin's words: at most [`LOAD_FAILED_MAX`] bytes of them,
    /// control characters (a terminal escape, a forged newline) replaced by U+FFFD.
    pub fn load_failed(reason: &str) -> Self {
        let mut text = String::with_capacity(reason.len().min(LOAD_FAILED_MAX));
        for c in reason.chars() {
            if text.len() + c.len_utf8() > LOAD_FAILED_MAX {
                text.push('…');
                break;
            }
            text.push(if c.is_control() { char::REPLACEMENT_CHARACTER } else { c });
        }
        ExitReason::LoadFailed { detail: text }
    }

    /// A startup timeout of `after`.
    pub fn startup_timeout(after: Duration) -> Self {
        ExitReason::StartupTimeout { after_ms: after.as_millis() as u64 }
    }
}

/// The most of a plugin's own "on_load failed" reason that is kept, in bytes.
pub const LOAD_FAILED_MAX: usize = 1024;

/// The conventional name of a signal number ("SIGSEGV"), or "signal N".
pub fn signal_name(signal: i32) -> String {
    nix::sys::signal::Signal::try_from(signal)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {signal}"))
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Exited { code } => write!(f, "exited({code})"),
            ExitReason::Signaled { signal, core_dumped } => {
                write!(f, "crashed({})", signal_name(*signal))?;
                if *core_dumped {
                    f.write_str(", core dumped")?;
                }
                Ok(())
            }
            ExitReason::Stopped { forced: false } => f.write_str("stopped"),
            ExitReason::Stopped { forced: true } => {
                f.write_str("stopped (killed after the shutdown grace period)")
            }
            ExitReason::SpawnFailed { detail } => write!(f, "spawn failed: {detail}"),
            ExitReason::StartupTimeout { after_ms } => {
                write!(f, "startup timeout (not ready after {after_ms} ms)")
            }
            ExitReason::ProtocolViolation { detail } => write!(f, "protocol violation: {detail}"),
            ExitReason::Hung { detail } => write!(f, "hung: {detail}"),
            ExitReason::VersionMismatch { detail } => write!(f, "version mismatch: {detail}"),
            ExitReason::LoadFailed { detail } => write!(f, "load failed: {detail}"),
            ExitReason::MemoryLimit { limit_bytes } => {
                write!(f, "memory limit ({} MiB)", limit_bytes / (1 << 20))
            }
            ExitReason::CpuTimeLimit { limit_secs } => write!(f, "CPU-time limit ({limit_secs} s)"),
            ExitReason::FileSizeLimit { limit_bytes } => {
                write!(f, "file size limit ({limit_bytes} bytes)")
            }
            ExitReason::SandboxViolation { syscall: Some(name) } => {
                write!(f, "sandbox violation: {name}")
            }
            ExitReason::SandboxViolation { syscall: None } => {
                f.write_str("sandbox violation (SIGSYS; the plugin did not report which syscall)")
            }
            ExitReason::Unhealthy { detail } => write!(f, "unhealthy: {detail}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_signals_and_failure_class() {
        let r = ExitReason::Signaled { signal: 11, core_dumped: false };
        assert_eq!(r.to_string(), "crashed(SIGSEGV)");
        assert!(r.is_failure());
        assert!(!ExitReason::Exited { code: 0 }.is_failure());
        assert!(ExitReason::Exited { code: 3 }.is_failure());
        assert!(!ExitReason::Stopped { forced: true }.is_failure());
        assert_eq!(signal_name(99), "signal 99");
    }

    #[test]
    fn a_plugins_load_failure_is_kept_short_and_on_one_line() {
        let r = ExitReason::load_failed("no api_key\n\x1b[2Jin [config]");
        assert_eq!(r.to_string(), "load failed: no api_key\u{fffd}\u{fffd}[2Jin [config]");
        assert_eq!(r.kind().as_str(), "load failed");
        assert!(r.is_failure());
        let ExitReason::LoadFailed { detail: reason } = ExitReason::load_failed(&"é".repeat(4000))
        else {
            unreachable!()
        };
        assert!(reason.len() <= LOAD_FAILED_MAX + '…'.len_utf8() && reason.ends_with('…'));
    }
}
