//! Routing calls to a plugin: [`PluginHandle`] and [`Deadline`].
//!
//! A handle holds an atomically swappable pointer to the current instance's
//! connection ([`crate::conn::Conn`]). The slot task stores it when the
//! instance becomes Ready and clears it when routing stops; a call reads it
//! without a lock. A call that finds no route fails fast with `Unavailable` (a
//! stale tick is worthless). A call that meets a closing connection (a hot
//! update retiring it) waits for the next route — woken by the route change,
//! never past its deadline — and retries there, so a switch of instances loses
//! no call. Both call paths, async and [`PluginHandle::call_blocking`] (a
//! host's own engine thread), go through the same connection core and this
//! same retry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use plugin_proto::{CallError, ErrorCode, Payload};
use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::conn::{Conn, NotSent, ROUTE_WAIT};
use crate::exit::ExitReason;
use crate::lifecycle::State;
use crate::logs::{LogLine, LogRing};
use crate::manifest::PluginKind;

/// When a call gives up waiting for its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Deadline {
    /// The manifest's `timeouts.call`.
    #[default]
    Default,
    /// This long after the call is made.
    After(Duration),
    /// At this instant.
    At(Instant),
    /// Never (the plugin's hang detection still applies).
    None,
}

impl Deadline {
    /// A deadline `d` from now.
    pub fn after(d: Duration) -> Self {
        Deadline::After(d)
    }

    fn resolve(self, default: Duration) -> Option<Instant> {
        self.resolve_from(default, Instant::now())
    }

    /// The deadline as a point in time, counting from `now`.
    fn resolve_from(self, default: Duration, now: Instant) -> Option<Instant> {
        match self {
            Deadline::Default => Some(now + default),
            Deadline::After(d) => Some(now + d),
            Deadline::At(t) => Some(t),
            Deadline::None => None,
        }
    }
}

/// A point-in-time view of one plugin, for status displays and scripts.
#[derive(Debug, Clone, Serialize)]
pub struct PluginStatus {
    /// Plugin name.
    pub name: String,
    /// Running (or configured) version.
    pub version: String,
    /// During a hot update: the version being started beside the running one.
    pub updating_to: Option<String>,
    /// What it is for.
    pub kind: PluginKind,
    /// Lifecycle state.
    pub state: State,
    /// Process id of the current instance.
    pub pid: Option<u32>,
    /// Restarts since it was loaded.
    pub restarts: u32,
    /// Why the last instance ended.
    pub last_exit: Option<ExitReason>,
    /// Time since the current instance became Ready, in milliseconds.
    pub uptime_ms: Option<u64>,
    /// Calls answered with a result.
    pub calls_ok: u64,
    /// Calls that failed (any error code).
    pub calls_err: u64,
    /// The SDK the plugin reported in its Hello.
    pub sdk: Option<String>,
    /// Sandbox layers actually in force for this plugin's current instance.
    pub sandbox: Vec<String>,
    /// Layers the manifest asked for that this machine cannot provide, with the reason.
    pub sandbox_unavailable: Vec<String>,
    /// How long calls took (every call since the plugin was loaded, answered or not).
    pub latency: CallLatency,
    /// How its instances ended, counted by kind of reason ("crashed", "memory limit", …).
    pub exits: std::collections::BTreeMap<crate::exit::ExitKind, u64>,
    /// Log lines over the rate limit, kept for `logs` but not written to plugd's own log.
    pub log_lines_dropped: u64,
    /// Its `[health]` check's standing (None: it has no check).
    pub health: Option<crate::health::HealthView>,
    /// Its methods as it described them (name, description, input and output schemas).
    pub methods: Vec<crate::describe::MethodInfo>,
    /// How calls reach the current instance (`stream`, `seqpacket`, `shm (spin)`, …; with
    /// a note when shared memory was asked for and the SDK serves the socket instead).
    pub transport: Option<String>,
    /// Calls the current instance was sent through the shared-memory rings.
    pub ring_calls: u64,
    /// Calls the current instance made to the host through the rings, and had answered
    /// there (protocol 4: the SDK puts them on the replies ring while it serves a ring call).
    pub ring_host_calls: u64,
}

/// Upper bounds of the call-latency buckets, in microseconds (a last bucket takes the rest).
pub const LATENCY_BOUNDS_US: &[u64] = &[
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    1_000_000, 5_000_000,
];

/// A snapshot of a plugin's call-latency histogram.
#[derive(Debug, Clone, Serialize)]
pub struct CallLatency {
    /// Bucket upper bounds in microseconds ([`LATENCY_BOUNDS_US`]).
    pub bounds_us: Vec<u64>,
    /// Calls per bucket (not cumulative); one more entry than `bounds_us`, for the rest.
    pub counts: Vec<u64>,
    /// Sum of all call times, in microseconds.
    pub sum_us: u64,
}

/// Lock-free call-latency buckets.
pub(crate) struct Latency {
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            counts: (0..=LATENCY_BOUNDS_US.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Latency {
    fn record(&self, took: Duration) {
        let us = took.as_micros().min(u64::MAX as u128) as u64;
        let i = LATENCY_BOUNDS_US.partition_point(|&b| b < us);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn snapshot(&self) -> CallLatency {
        CallLatency {
            bounds_us: LATENCY_BOUNDS_US.to_vec(),
            counts: self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

/// The parts of a status the slot task updates.
#[derive(Debug, Clone)]
pub(crate) struct LiveStatus {
    pub state: State,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub last_exit: Option<ExitReason>,
    pub ready_since: Option<Instant>,
    pub sdk: Option<String>,
    pub sandbox: crate::sandbox::SandboxReport,
    pub version: String,
    pub updating_to: Option<String>,
    /// Instance ends by kind of reason.
    pub exits: std::collections::BTreeMap<crate::exit::ExitKind, u64>,
    /// The current instance's `[health]`, when the plugin has a check.
    pub health: Option<crate::health::HealthView>,
    /// What the current instance described of its methods.
    pub methods: Vec<crate::describe::MethodInfo>,
}

pub(crate) struct Shared {
    pub name: String,
    pub kind: PluginKind,
    pub default_deadline: Duration,
    /// Where calls go now; changed only through [`Shared::set_route`].
    pub route: ArcSwapOption<Conn>,
    /// Bumped at every route change, so a caller that met a closing instance waits for
    /// the next route instead of polling (engine threads on the condvar, tasks on the
    /// notify).
    pub route_changes: Mutex<u64>,
    pub route_changed: parking_lot::Condvar,
    pub route_moved: tokio::sync::Notify,
    pub calls_ok: AtomicU64,
    pub calls_err: AtomicU64,
    pub latency: Latency,
    /// Engine mode wanted (kept across instances; each connection reads this same flag).
    pub engine: Arc<std::sync::atomic::AtomicBool>,
    pub live: Mutex<LiveStatus>,
    pub ring: LogRing,
    /// Its manifest's `[calls] allow`: which other plugins' methods it may call.
    pub calls: parking_lot::RwLock<Vec<crate::manifest::CallRule>>,
}

impl Shared {
    /// Publishes where calls go (None: nowhere) and wakes blocking callers waiting for it.
    pub fn set_route(&self, route: Option<Arc<Conn>>) {
        self.route.store(route);
        *self.route_changes.lock() += 1;
        self.route_changed.notify_all();
        self.route_moved.notify_waiters();
    }

    /// True if calls no longer go to `old`.
    fn moved_from(&self, old: &Arc<Conn>) -> bool {
        self.route.load().as_ref().is_none_or(|now| !Arc::ptr_eq(now, old))
    }

    /// Waits (at most `limit`) until the route is no longer `old`.
    async fn route_change(&self, old: &Arc<Conn>, limit: Duration) {
        let moved = self.route_moved.notified();
        tokio::pin!(moved);
        moved.as_mut().enable();
        if !self.moved_from(old) {
            let _ = tokio::time::timeout(limit, moved).await;
        }
    }

    /// [`Shared::route_change`] for an engine thread.
    fn route_change_blocking(&self, old: &Arc<Conn>, limit: Duration) {
        let mut changes = self.route_changes.lock();
        if !self.moved_from(old) {
            let seen = *changes;
            let until = std::time::Instant::now() + limit;
            while *changes == seen {
                if self.route_changed.wait_until(&mut changes, until).timed_out() {
                    break;
                }
            }
        }
    }
}

/// A cheap, cloneable handle for calling one plugin by name.
#[derive(Clone)]
pub struct PluginHandle {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for PluginHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHandle").field("name", &self.shared.name).finish()
    }
}

impl PluginHandle {
    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Calls `method` with a bincode-encoded argument and decodes the reply; the manifest's default deadline.
    pub async fn call<A: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        method: &str,
        arg: &A,
    ) -> Result<R, CallError> {
        self.call_with(method, arg, Deadline::Default).await
    }

    /// Like [`PluginHandle::call`] with an explicit deadline.
    pub async fn call_with<A: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        method: &str,
        arg: &A,
        deadline: Deadline,
    ) -> Result<R, CallError> {
        let reply = self.call_raw(method, encode_arg(arg)?, deadline).await?;
        self.decode_reply(method, reply)
    }

    fn decode_reply<R: DeserializeOwned>(
        &self,
        method: &str,
        reply: Payload,
    ) -> Result<R, CallError> {
        reply.decode().map_err(|e| {
            CallError::new(
                ErrorCode::BadPayload,
                format!("plugin {} method {method}: cannot decode reply: {e}", self.shared.name),
            )
        })
    }

    /// Calls `method` with an already-encoded payload (bincode or JSON) and returns the reply as sent.
    pub async fn call_raw(
        &self,
        method: &str,
        payload: Payload,
        deadline: Deadline,
    ) -> Result<Payload, CallError> {
        self.call_streaming(method, payload, deadline, None).await
    }

    /// Like [`PluginHandle::call_raw`], and every piece the plugin streams before its reply
    /// (Chunk frames, e.g. a Python handler that yields) is sent to `chunks` as it arrives.
    pub async fn call_streaming(
        &self,
        method: &str,
        payload: Payload,
        deadline: Deadline,
        chunks: Option<mpsc::UnboundedSender<Payload>>,
    ) -> Result<Payload, CallError> {
        let t0 = Instant::now();
        let result = self.route(method, payload, None, deadline, chunks).await;
        self.account(t0.elapsed(), &result);
        result
    }

    /// [`PluginHandle::call_streaming`] with the caller's configuration for this one call
    /// (`cfg`: an API key, say; JSON by convention), which the plugin's handler receives
    /// beside its argument. plugd never logs it. A plugin built with an SDK older than
    /// protocol 3 cannot take it: the call fails with `BadPayload`, saying so.
    pub async fn call_configured(
        &self,
        method: &str,
        payload: Payload,
        cfg: Payload,
        deadline: Deadline,
        chunks: Option<mpsc::UnboundedSender<Payload>>,
    ) -> Result<Payload, CallError> {
        let t0 = Instant::now();
        let result = self.route(method, payload, Some(&cfg), deadline, chunks).await;
        self.account(t0.elapsed(), &result);
        result
    }

    /// Counts a finished call (answered or not) and its time.
    fn account(&self, took: Duration, result: &Result<Payload, CallError>) {
        self.shared.latency.record(took);
        let counter = if result.is_ok() { &self.shared.calls_ok } else { &self.shared.calls_err };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    async fn route(
        &self,
        method: &str,
        payload: Payload,
        cfg: Option<&Payload>,
        deadline: Deadline,
        chunks: Option<mpsc::UnboundedSender<Payload>>,
    ) -> Result<Payload, CallError> {
        let deadline = deadline.resolve(self.shared.default_deadline).map(Instant::into_std);
        let mut payload = payload;
        // An instance that is stopping (a hot update retiring it) sends us to the new route.
        for _ in 0..4 {
            let Some(conn) = self.shared.route.load_full() else {
                break;
            };
            let sent = match cfg {
                None => conn.call(method, payload, deadline, chunks.clone()).await,
                Some(cfg) => conn.call_cfg(method, payload, cfg, deadline, chunks.clone()).await,
            };
            match sent {
                Ok(answer) => return answer,
                Err(NotSent::Failed(e)) => return Err(e),
                Err(NotSent::Closing(p)) => {
                    payload = p;
                    self.shared.route_change(&conn, self.route_wait(deadline)).await;
                }
            }
        }
        Err(self.unavailable())
    }

    /// How long a caller that met a closing instance waits for the next route.
    fn route_wait(&self, deadline: Option<std::time::Instant>) -> Duration {
        deadline
            .map(|d| d.saturating_duration_since(std::time::Instant::now()))
            .unwrap_or(ROUTE_WAIT)
            .min(ROUTE_WAIT)
    }

    /// Calls `method` on the calling thread, blocking until the reply: the thread writes the
    /// Call frame and reads the Reply itself, so no async task or other thread is woken on
    /// the way. For hosts that run their own engine thread; do not call it on an async
    /// runtime's worker thread (it blocks that thread for the whole call).
    pub fn call_blocking<A: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        method: &str,
        arg: &A,
        deadline: Deadline,
    ) -> Result<R, CallError> {
        let reply = self.call_raw_blocking(method, encode_arg(arg)?, deadline)?;
        self.decode_reply(method, reply)
    }

    /// [`PluginHandle::call_blocking`] with an already-encoded payload.
    pub fn call_raw_blocking(
        &self,
        method: &str,
        payload: Payload,
        deadline: Deadline,
    ) -> Result<Payload, CallError> {
        // One clock read serves the deadline, the Call's deadline_us and the latency figure.
        let t0 = std::time::Instant::now();
        let deadline = deadline
            .resolve_from(self.shared.default_deadline, Instant::from_std(t0))
            .map(Instant::into_std);
        let mut payload = Some(payload);
        let mut now = t0;
        let mut result = None;
        // An instance that is stopping (a hot update retiring it) sends us to the new route.
        for _ in 0..4 {
            let Some(conn) = self.shared.route.load_full() else {
                break;
            };
            let p = payload.take().unwrap_or_else(Payload::empty);
            match conn.call_blocking(method, p, deadline, now) {
                Ok(r) => {
                    result = Some(r);
                    break;
                }
                Err(NotSent::Failed(e)) => {
                    result = Some(Err(e));
                    break;
                }
                Err(NotSent::Closing(p)) => {
                    payload = Some(p);
                    // The slot publishes the next route as it retires this one: wait for
                    // that (woken by it), never past the call's deadline.
                    self.shared.route_change_blocking(&conn, self.route_wait(deadline));
                    now = std::time::Instant::now();
                }
            }
        }
        // Built only when needed: it reads the live status and formats a message.
        let result = result.unwrap_or_else(|| Err(self.unavailable()));
        self.account(t0.elapsed(), &result);
        result
    }

    /// Engine mode, for a plugin an engine thread calls with [`PluginHandle::call_blocking`]:
    /// the supervisor's runtime stops watching the plugin's socket (it reads it on a tick
    /// instead: every 2 ms while the engine thread is idle, backing off to 16 ms while it
    /// calls, when it reads everything itself), so a reply wakes only the engine thread.
    /// Async calls still work; their replies come with the engine thread's next call or at
    /// most a tick later. Kept across restarts and updates until turned off.
    pub fn set_engine_mode(&self, on: bool) {
        self.shared.engine.store(on, Ordering::Relaxed);
        // The actor re-reads the flag when woken (on or off its epoll).
        if let Some(conn) = self.shared.route.load_full() {
            conn.wake.notify_one();
        }
    }

    fn unavailable(&self) -> CallError {
        let live = self.shared.live.lock().clone();
        let mut msg = format!("plugin {} is not ready (state: {}", self.shared.name, live.state);
        if let Some(r) = &live.last_exit {
            msg.push_str(&format!(", last exit: {r}"));
        }
        msg.push(')');
        CallError::new(ErrorCode::Unavailable, msg)
    }

    /// A snapshot of the plugin's status.
    pub fn status(&self) -> PluginStatus {
        let s = &self.shared;
        let live = s.live.lock().clone();
        let route = s.route.load();
        PluginStatus {
            name: s.name.clone(),
            version: live.version.clone(),
            updating_to: live.updating_to.clone(),
            kind: s.kind,
            state: live.state,
            pid: live.pid,
            restarts: live.restarts,
            last_exit: live.last_exit,
            uptime_ms: live.ready_since.map(|t| t.elapsed().as_millis() as u64),
            calls_ok: s.calls_ok.load(Ordering::Relaxed),
            calls_err: s.calls_err.load(Ordering::Relaxed),
            sdk: live.sdk,
            sandbox: live.sandbox.in_force_text(),
            sandbox_unavailable: live.sandbox.unavailable_text(),
            latency: s.latency.snapshot(),
            exits: live.exits,
            log_lines_dropped: s.ring.dropped(),
            health: live.health,
            methods: live.methods,
            transport: route.as_ref().map(|c| c.transport()),
            ring_calls: route.as_ref().map_or(0, |c| c.ring_calls.load(Ordering::Relaxed)),
            ring_host_calls: route
                .as_ref()
                .map_or(0, |c| c.ring_host_calls.load(Ordering::Relaxed)),
        }
    }

    /// The plugin's last `n` log lines (stdout, stderr, SDK logs and supervisor notes), oldest first.
    pub fn logs(&self, n: usize) -> Vec<LogLine> {
        self.shared.ring.tail(n)
    }

    /// New log lines as they come (see [`LogRing::subscribe`]).
    pub fn subscribe_logs(&self) -> tokio::sync::broadcast::Receiver<LogLine> {
        self.shared.ring.subscribe()
    }

    /// Every log line after number `seq` (see [`LogLine::seq`]), a gap said first.
    pub fn logs_after(&self, seq: u64) -> Vec<LogLine> {
        self.shared.ring.after(seq)
    }
}

/// A typed argument as a bincode payload.
fn encode_arg<A: Serialize + ?Sized>(arg: &A) -> Result<Payload, CallError> {
    Payload::bincode(arg)
        .map_err(|e| CallError::new(ErrorCode::BadPayload, format!("cannot encode argument: {e}")))
}
