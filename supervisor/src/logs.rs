//! What plugins print: captured line by line, re-emitted as tracing events
//! tagged with the plugin, and kept in a bounded ring per plugin for `logs`.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use plugin_proto::LogLevel;
use serde::Serialize;
use tokio::io::AsyncReadExt;

/// Lines kept per plugin.
pub const RING_LINES: usize = 1000;

/// Longest line kept; longer output is split (a plugin that never prints a newline cannot grow memory).
pub const MAX_LINE: usize = 8 * 1024;

/// Where a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogSource {
    /// The plugin's stdout.
    Stdout,
    /// The plugin's stderr.
    Stderr,
    /// A `Log` frame sent through the SDK.
    Sdk,
    /// The supervisor, about this plugin (starts, exits, restarts).
    Supervisor,
}

/// One captured line.
#[derive(Debug, Clone, Serialize)]
pub struct LogLine {
    /// Wall-clock time it was captured, in milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// Where it came from.
    pub source: LogSource,
    /// Severity (stdout is info, stderr is warn).
    pub level: &'static str,
    /// The text.
    pub text: String,
}

/// A bounded ring of a plugin's recent log lines, shared by its instances.
#[derive(Debug, Clone, Default)]
pub struct LogRing {
    lines: Arc<Mutex<VecDeque<LogLine>>>,
}

fn level_name(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
        LogLevel::Trace => "trace",
    }
}

impl LogRing {
    /// Records a line and re-emits it as a tracing event tagged with the plugin.
    pub fn push(&self, plugin: &str, source: LogSource, level: LogLevel, text: String) {
        match level {
            LogLevel::Error => tracing::error!(plugin, source = ?source, "{text}"),
            LogLevel::Warn => tracing::warn!(plugin, source = ?source, "{text}"),
            LogLevel::Info => tracing::info!(plugin, source = ?source, "{text}"),
            LogLevel::Debug => tracing::debug!(plugin, source = ?source, "{text}"),
            LogLevel::Trace => tracing::trace!(plugin, source = ?source, "{text}"),
        }
        let ts_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let line = LogLine { ts_ms, source, level: level_name(level), text };
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        if lines.len() == RING_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// The last `n` lines, oldest first.
    pub fn tail(&self, n: usize) -> Vec<LogLine> {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines.iter().skip(lines.len().saturating_sub(n)).cloned().collect()
    }
}

/// What the supervisor learns from a plugin's output about why it died.
#[derive(Debug, Default)]
pub struct Markers {
    /// The syscall number the SDK reported just before a seccomp SIGSYS killed it.
    pub syscall: Mutex<Option<i64>>,
    /// An allocation failure was printed (Rust, Python and C++ runtimes' wording).
    pub out_of_memory: std::sync::atomic::AtomicBool,
    /// Woken when a violation is reported, even by a forked child of the plugin.
    pub violation: tokio::sync::Notify,
}

/// The line the SDK prints on SIGSYS; a plugin in another language may print it too.
pub const VIOLATION_MARKER: &str = "plugd: sandbox violation: syscall ";

impl Markers {
    fn scan(&self, text: &str) {
        if let Some(nr) = text.strip_prefix(VIOLATION_MARKER) {
            if let Ok(nr) = nr.trim().parse() {
                *self.syscall.lock().unwrap_or_else(|p| p.into_inner()) = Some(nr);
                self.violation.notify_one();
            }
        }
        const OOM: &[&str] = &[
            "memory allocation of",
            "MemoryError",
            "std::bad_alloc",
            "out of memory",
            "Cannot allocate memory",
        ];
        if OOM.iter().any(|m| text.contains(m)) {
            self.out_of_memory.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Reads a plugin's stdout or stderr pipe until it closes, recording each line.
/// When `stop` fires, returns the pipe (for a successor process) instead.
pub async fn capture(
    fd: OwnedFd,
    plugin: String,
    source: LogSource,
    ring: LogRing,
    markers: Arc<Markers>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Option<OwnedFd> {
    let level = if source == LogSource::Stderr { LogLevel::Warn } else { LogLevel::Info };
    let Ok(mut pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return None;
    };
    let mut stop_open = true;
    let mut buf = vec![0u8; 4096];
    let mut line: Vec<u8> = Vec::new();
    loop {
        let n = tokio::select! {
            r = pipe.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            r = &mut stop, if stop_open => {
                if r.is_ok() {
                    return pipe.into_nonblocking_fd().ok();
                }
                stop_open = false; // nobody will ask for the pipe back
                continue;
            }
        };
        for &b in &buf[..n] {
            if b == b'\n' || line.len() >= MAX_LINE {
                let text = String::from_utf8_lossy(&line).trim_end_matches('\r').to_string();
                markers.scan(&text);
                ring.push(&plugin, source, level, text);
                line.clear();
                if b == b'\n' {
                    continue;
                }
            }
            line.push(b);
        }
    }
    if !line.is_empty() {
        let text = String::from_utf8_lossy(&line).into_owned();
        markers.scan(&text);
        ring.push(&plugin, source, level, text);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_last_lines() {
        let ring = LogRing::default();
        for i in 0..RING_LINES + 5 {
            ring.push("p", LogSource::Stdout, LogLevel::Info, format!("line {i}"));
        }
        let tail = ring.tail(2);
        assert_eq!(tail.len(), 2);
        assert_eq!(tail[1].text, format!("line {}", RING_LINES + 4));
        assert_eq!(ring.tail(usize::MAX).len(), RING_LINES);
    }
}
