//! What plugins print: captured line by line, re-emitted as tracing events
//! tagged with the plugin, and kept in a bounded ring per plugin for `logs`.
//!
//! Every line a plugin originates (stdout, stderr, the SDK's `Log` frames) is treated as
//! hostile: cut at [`MAX_LINE`] bytes whatever its source, its control characters
//! escaped (a `\n` cannot forge a plugd line in the text log), kept in a ring bounded
//! in lines and in bytes, and re-emitted to plugd's own log at most [`RATE_BURST`]
//! lines per second per plugin; what is over is counted, reported once a second in
//! plugd's log, and exported (`log_lines_dropped`, `plugd_plugin_log_lines_dropped_total`).

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::SystemTime;

use plugin_proto::{LogLevel, LogRecord};
use serde::Serialize;
use tokio::io::AsyncReadExt;

/// Lines kept per plugin.
pub const RING_LINES: usize = 1000;

/// Bytes of text kept per plugin (the ring drops its oldest lines beyond it).
pub const RING_BYTES: usize = 1 << 20;

/// Lines per second per plugin re-emitted to plugd's own log (journald); the rest is
/// kept in the ring and counted.
pub const RATE_BURST: u32 = 500;

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
    /// Its number in the plugin's log, from 1, one more for every line: a follower asks for
    /// the lines after the last number it saw, and sees a gap when the ring dropped some.
    pub seq: u64,
    /// Wall-clock time it was captured, in milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// Where it came from.
    pub source: LogSource,
    /// Severity (stdout is info, stderr is warn).
    pub level: &'static str,
    /// The text.
    pub text: String,
    /// Named values a plugin logged with the line (`plugd.log`), sanitized like the text.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, String>,
}

/// Most fields on one logged line.
pub const MAX_FIELDS: usize = 32;

/// Checks a plugin's [`LogRecord`] fields: at most [`MAX_FIELDS`], keys of 1-64 letters,
/// digits, `_`, `.` or `-` (so a key cannot forge `plugin=` in a text log); values are
/// sanitized as lines are. The error says which key and what is allowed.
pub fn check_fields(fields: BTreeMap<String, String>) -> Result<BTreeMap<String, String>, String> {
    if fields.len() > MAX_FIELDS {
        return Err(format!("{} fields on one line; at most {MAX_FIELDS}", fields.len()));
    }
    let key_ok = |k: &str| {
        !k.is_empty()
            && k.len() <= 64
            && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    };
    let mut out = BTreeMap::new();
    for (k, v) in fields {
        if !key_ok(&k) {
            let shown: String = k.chars().take(70).collect();
            return Err(format!(
                "field key {shown:?} is not allowed; use 1-64 letters, digits, '_', '.' or '-'"
            ));
        }
        out.insert(k, sanitize(&v));
    }
    Ok(out)
}

/// What a line counts for in the ring's byte bound.
fn line_size(text: &str, fields: &BTreeMap<String, String>) -> usize {
    text.len() + fields.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
}

/// `text` followed by the fields as `key="value"` pairs, for plugd's own (text) log.
fn with_fields(text: &str, fields: &BTreeMap<String, String>) -> String {
    let mut out = text.to_string();
    for (k, v) in fields {
        out.push_str(&format!(" {k}={v:?}"));
    }
    out
}

/// A bounded ring of a plugin's recent log lines, shared by its instances.
#[derive(Debug, Clone)]
pub struct LogRing {
    inner: Arc<Mutex<Ring>>,
    /// New lines for followers (`subscribe`); a follower that falls behind is told how
    /// many it missed.
    live: tokio::sync::broadcast::Sender<LogLine>,
}

impl Default for LogRing {
    fn default() -> Self {
        LogRing { inner: Default::default(), live: tokio::sync::broadcast::channel(1024).0 }
    }
}

#[derive(Debug, Default)]
struct Ring {
    lines: VecDeque<LogLine>,
    bytes: usize,
    /// The second the rate window started (ms since the epoch / 1000) and lines emitted in it.
    window: u64,
    emitted: u32,
    /// Lines not re-emitted in this window, and ever.
    dropped_now: u64,
    dropped: u64,
    /// The number of the last line pushed.
    seq: u64,
}

/// `text` as one safe line: at most [`MAX_LINE`] bytes (cut on a character boundary, with
/// the number of bytes cut said), control characters but tab written as `\n`, `\r`,
/// `\u{1b}`, so nothing a plugin prints can end a log line or drive a terminal.
pub fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_LINE) + 16);
    for (i, ch) in text.char_indices() {
        if out.len() >= MAX_LINE {
            out.push_str(&format!("… ({} bytes cut)", text.len() - i));
            return out;
        }
        match ch {
            '\t' => out.push(ch),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&c.escape_unicode().to_string()),
            c => out.push(c),
        }
    }
    out
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
    /// Records a line (made safe by [`sanitize`]) and re-emits it as a tracing event
    /// tagged with the plugin, within the rate limit.
    pub fn push(&self, plugin: &str, source: LogSource, level: LogLevel, text: String) {
        self.push_line(plugin, source, level, sanitize(&text), BTreeMap::new());
    }

    /// Keeps a line a plugin logged with fields (`plugd.log`); refuses bad fields, saying why.
    pub fn push_record(&self, plugin: &str, record: LogRecord) -> Result<(), String> {
        let fields = check_fields(record.fields)?;
        self.push_line(plugin, LogSource::Sdk, record.level, sanitize(&record.message), fields);
        Ok(())
    }

    fn push_line(
        &self,
        plugin: &str,
        source: LogSource,
        level: LogLevel,
        text: String,
        fields: BTreeMap<String, String>,
    ) {
        let ts_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let (emit, report, first_drop) = {
            let mut r = self.inner.lock();
            let second = ts_ms / 1000;
            let mut report = None;
            if second != r.window {
                if r.dropped_now > 0 {
                    report = Some(r.dropped_now);
                }
                r.window = second;
                r.emitted = 0;
                r.dropped_now = 0;
            }
            // The supervisor's own lines about the plugin are never held back.
            let emit = source == LogSource::Supervisor || r.emitted < RATE_BURST;
            let mut first_drop = false;
            if emit {
                r.emitted += 1;
            } else {
                first_drop = r.dropped_now == 0;
                r.dropped_now += 1;
                r.dropped += 1;
            }
            r.bytes += line_size(&text, &fields);
            r.seq += 1;
            let seq = r.seq;
            let line = LogLine {
                seq,
                ts_ms,
                source,
                level: level_name(level),
                text: text.clone(),
                fields: fields.clone(),
            };
            if self.live.receiver_count() > 0 {
                let _ = self.live.send(line.clone());
            }
            r.lines.push_back(line);
            while r.lines.len() > RING_LINES || (r.bytes > RING_BYTES && r.lines.len() > 1) {
                if let Some(old) = r.lines.pop_front() {
                    r.bytes -= line_size(&old.text, &old.fields);
                }
            }
            (emit, report, first_drop)
        };
        if first_drop {
            tracing::warn!(plugin, "this plugin logs over {RATE_BURST} lines/s: the rest of this second is kept for `plugctl logs` but not written here");
        }
        if let Some(n) = report {
            tracing::warn!(plugin, "{n} log lines of this plugin were not written here in the last second (over {RATE_BURST}/s); `plugctl logs` has them");
        }
        if emit {
            let text = with_fields(&text, &fields);
            match level {
                LogLevel::Error => tracing::error!(plugin, source = ?source, "{text}"),
                LogLevel::Warn => tracing::warn!(plugin, source = ?source, "{text}"),
                LogLevel::Info => tracing::info!(plugin, source = ?source, "{text}"),
                LogLevel::Debug => tracing::debug!(plugin, source = ?source, "{text}"),
                LogLevel::Trace => tracing::trace!(plugin, source = ?source, "{text}"),
            }
        }
    }

    /// The last `n` lines, oldest first.
    pub fn tail(&self, n: usize) -> Vec<LogLine> {
        let r = self.inner.lock();
        r.lines.iter().skip(r.lines.len().saturating_sub(n)).cloned().collect()
    }

    /// Every line after number `seq`, oldest first. When the ring no longer holds some of
    /// them, a supervisor line saying how many are gone comes first (numbered just before
    /// the oldest line returned), so a follower never loses lines silently.
    pub fn after(&self, seq: u64) -> Vec<LogLine> {
        let r = self.inner.lock();
        // Numbers start again in a new plugd (after SIGUSR2): a follower ahead of them gets
        // the whole ring, not nothing.
        let seq = if seq > r.seq { 0 } else { seq };
        let mut out: Vec<LogLine> = r.lines.iter().filter(|l| l.seq > seq).cloned().collect();
        if let Some(first) = out.first() {
            let gone = first.seq - seq - 1;
            if gone > 0 {
                let text = format!(
                    "{gone} lines are gone: the ring keeps the last {RING_LINES} lines and {} KiB",
                    RING_BYTES >> 10
                );
                let (seq, ts_ms) = (first.seq - 1, first.ts_ms);
                out.insert(
                    0,
                    LogLine {
                        seq,
                        ts_ms,
                        source: LogSource::Supervisor,
                        level: "warn",
                        text,
                        fields: BTreeMap::new(),
                    },
                );
            }
        }
        out
    }

    /// Every line pushed from now on, as it comes (subscribe before reading the tail, and
    /// skip lines numbered at or below the last one read).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<LogLine> {
        self.live.subscribe()
    }

    /// Lines that were over the rate limit and not written to plugd's own log.
    pub fn dropped(&self) -> u64 {
        self.inner.lock().dropped
    }

    /// Bytes of text held.
    pub fn bytes(&self) -> usize {
        self.inner.lock().bytes
    }
}

/// What the supervisor learns from a plugin's output about why it died.
#[derive(Debug, Default)]
pub struct Markers {
    /// The syscall number the SDK reported just before a seccomp SIGSYS killed it.
    pub syscall: Mutex<Option<i64>>,
    /// Woken when a violation is reported, even by a forked child of the plugin.
    pub violation: tokio::sync::Notify,
}

/// The line the SDK prints on SIGSYS; a plugin in another language may print it too.
pub const VIOLATION_MARKER: &str = "plugd: sandbox violation: syscall ";

impl Markers {
    fn scan(&self, text: &str) {
        if let Some(nr) = text.strip_prefix(VIOLATION_MARKER) {
            if let Ok(nr) = nr.trim().parse() {
                *self.syscall.lock() = Some(nr);
                self.violation.notify_one();
            }
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

    #[test]
    fn lines_are_cut_escaped_and_bounded_in_bytes() {
        let forged = "ok\n2026-12-02T00:00:00Z  INFO supervisor::daemon: plugd stopped\r\x1b[2J";
        let s = sanitize(forged);
        assert!(!s.contains('\n') && !s.contains('\r') && !s.contains('\x1b'), "{s}");
        assert!(s.contains("\\n2026") && s.contains("\\u{1b}"), "{s}");
        let long = "é".repeat(MAX_LINE);
        let cut = sanitize(&long);
        assert!(cut.len() < MAX_LINE + 32 && cut.ends_with("bytes cut)"), "{}", cut.len());
        let ring = LogRing::default();
        for _ in 0..100 {
            ring.push("p", LogSource::Sdk, LogLevel::Info, "x".repeat(1 << 20));
        }
        assert!(ring.bytes() <= RING_BYTES, "{}", ring.bytes());
    }

    #[test]
    fn a_flood_is_counted_past_the_rate_limit() {
        let ring = LogRing::default();
        for i in 0..(RATE_BURST as usize * 3) {
            ring.push("p", LogSource::Stdout, LogLevel::Info, format!("line {i}"));
        }
        // All in the ring (up to its bound); at least the excess of one second counted.
        assert!(ring.dropped() >= RATE_BURST as u64, "{}", ring.dropped());
        assert_eq!(ring.tail(1)[0].text, format!("line {}", RATE_BURST as usize * 3 - 1));
    }

    #[test]
    fn a_follower_gets_every_line_after_its_last_and_is_told_of_a_gap() {
        let ring = LogRing::default();
        for i in 0..10 {
            ring.push("p", LogSource::Stdout, LogLevel::Info, format!("line {i}"));
        }
        let after = ring.after(7);
        assert_eq!(after.iter().map(|l| l.seq).collect::<Vec<_>>(), [8, 9, 10]);
        // Lines of the same millisecond are all there: numbers, not times.
        assert_eq!(ring.after(0).len(), 10);
        for i in 0..RING_LINES {
            ring.push("p", LogSource::Stdout, LogLevel::Info, format!("more {i}"));
        }
        // Lines 1..=10 were pushed out: a follower at 5 is told 5 are gone.
        let after = ring.after(5);
        assert!(after[0].text.starts_with("5 lines are gone"), "{}", after[0].text);
        assert_eq!(after.len(), RING_LINES + 1);
        // A follower from an earlier plugd (numbers ahead of this ring's): everything.
        assert_eq!(ring.after(1 << 40).len(), RING_LINES + 1);
    }
}
