//! The control protocol between `plugctl` and `plugd`: JSON lines over a local socket.
//!
//! One request per line, one reply per line:
//!
//! ```text
//! → {"cmd":"status"}
//! ← {"ok":true,"data":[{"name":"echo","state":"ready",…}]}
//! → {"cmd":"call","name":"echo","method":"echo","json":"\"hi\""}
//! ← {"ok":true,"data":"hi"}
//! → {"cmd":"stop","name":"nope"}
//! ← {"ok":false,"error":{"kind":"not_found","message":"no plugin named nope …"}}
//! ```
//!
//! The socket is created with mode 0600 and each connection's peer uid must
//! be root or the daemon's own uid. A line longer than [`MAX_LINE`], bad
//! JSON or an unknown command gets an error reply; none of it reaches a
//! plugin or disturbs the daemon.

#![warn(missing_docs)]

use serde::{Deserialize, Serialize};

/// Longest request line accepted.
pub const MAX_LINE: usize = 1 << 20;

/// What `plugctl` can ask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Status of all plugins, or one.
    Status {
        /// Only this plugin.
        #[serde(default)]
        name: Option<String>,
    },
    /// Start a stopped, exited or failed plugin.
    Start {
        /// The plugin.
        name: String,
    },
    /// Stop a plugin gracefully (it stays known).
    Stop {
        /// The plugin.
        name: String,
    },
    /// Stop and start a plugin.
    Restart {
        /// The plugin.
        name: String,
    },
    /// Re-read the config and plugin folders and apply the difference (as SIGHUP).
    Reload,
    /// Hot-swap the running instance to what its folder holds now, or to another
    /// installed version.
    Update {
        /// The plugin.
        name: String,
        /// An installed version to switch to.
        #[serde(default)]
        version: Option<String>,
        /// Update even if it breaks another plugin's `requires`.
        #[serde(default)]
        force: bool,
        /// Only show what would change.
        #[serde(default)]
        dry_run: bool,
    },
    /// Install a plugin from a local folder under the state folder.
    Install {
        /// The plugin folder to copy.
        source: String,
        /// Replace an installed name@version.
        #[serde(default)]
        force: bool,
        /// Clear a persisted disable.
        #[serde(default)]
        enable: bool,
    },
    /// What installing a local plugin folder would do, without doing it (nothing is fetched,
    /// built or pip-installed): the plan, as `update --dry-run` answers it — `name`, `from`
    /// (the running version, if any), `to`, `changes` with the dependency diff, `problems`.
    InstallPlan {
        /// The plugin folder.
        source: String,
    },
    /// Start an install in the background; the answer is `{"job_id": N}`.
    InstallJob {
        /// A folder, an archive, an http(s) archive URL or `git+URL#ref`.
        source: String,
        /// Replace an installed name@version.
        #[serde(default)]
        force: bool,
        /// Clear a persisted disable.
        #[serde(default)]
        enable: bool,
    },
    /// Start an update in the background (as `Update`); the answer is `{"job_id": N}`.
    UpdateJob {
        /// The plugin.
        name: String,
        /// An installed version to switch to.
        #[serde(default)]
        version: Option<String>,
        /// Update even if it breaks another plugin's `requires`.
        #[serde(default)]
        force: bool,
    },
    /// Start an uninstall in the background (as `Uninstall`); the answer is `{"job_id": N}`.
    UninstallJob {
        /// The plugin.
        name: String,
        /// Only this version.
        #[serde(default)]
        version: Option<String>,
        /// Also remove its state.
        #[serde(default)]
        purge: bool,
    },
    /// Every job, oldest first.
    Jobs,
    /// One install job.
    Job {
        /// Its number.
        id: u64,
    },
    /// Cancel a queued or running install job (its build or pip is killed, nothing is left).
    CancelJob {
        /// Its number.
        id: u64,
    },
    /// Run an ended install job again, as a new job.
    RetryJob {
        /// The job to repeat.
        id: u64,
    },
    /// Installed versions of a plugin.
    Versions {
        /// The plugin.
        name: String,
    },
    /// Hot-swap back to an installed version (default: the newest below the current one).
    Rollback {
        /// The plugin.
        name: String,
        /// The version to go back to.
        #[serde(default)]
        version: Option<String>,
    },
    /// Remove an installed plugin (or one of its versions).
    Uninstall {
        /// The plugin.
        name: String,
        /// Only this version (it must not be the current one).
        #[serde(default)]
        version: Option<String>,
        /// Also remove the plugin's state folder.
        #[serde(default)]
        purge: bool,
    },
    /// Allow a plugin to run (persisted) and start it.
    Enable {
        /// The plugin.
        name: String,
    },
    /// Stop a plugin and keep it stopped across daemon restarts (persisted).
    Disable {
        /// The plugin.
        name: String,
    },
    /// Call a method with a JSON argument; the reply is the JSON result.
    Call {
        /// The plugin.
        name: String,
        /// The method.
        method: String,
        /// The argument, as JSON text.
        json: String,
        /// The caller's configuration for this one call (JSON text: an API key, say),
        /// handed to the handler beside the argument and never logged.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cfg: Option<Secret>,
    },
    /// A plugin's recent log lines.
    Logs {
        /// The plugin.
        name: String,
        /// How many lines at most.
        n: usize,
        /// Only lines after this time (ms since the epoch).
        #[serde(default)]
        since_ms: Option<u64>,
        /// Every line after this number (for following: lines of the same millisecond
        /// and bursts larger than `n` are not lost; a gap is said).
        #[serde(default)]
        since_seq: Option<u64>,
    },
    /// Stop every plugin and exit.
    Shutdown,
    /// The daemon's own pid, exec generation (bumped by each SIGUSR2 upgrade) and version.
    Info,
}

/// What kind of failure an [`ApiError`] is: decided where the error is made, mapped once
/// to an HTTP status ([`ErrorKind::http_status`]) and sent as is in the control protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// No such plugin, version or job.
    NotFound,
    /// The request itself is wrong: a bad name, version or JSON argument.
    BadRequest,
    /// The request is valid but the daemon's state refuses it now (a plugin not running,
    /// disabled, a job not ended, an update that would break a dependent).
    Conflict,
    /// The plugin answered a call with an error, or died while answering it.
    Plugin,
    /// The operation was tried and failed (an install, a venv build, a file write).
    Failed,
    /// The daemon is at its limit of connections; try again.
    Busy,
    /// The client sent nothing complete in time.
    Timeout,
    /// The caller has not proven who it is (a missing or wrong HTTP token).
    Unauthorized,
    /// The caller is known and may not do this (a plugin process, another uid).
    Forbidden,
    /// The request is larger than the daemon takes.
    TooLarge,
}

impl ErrorKind {
    /// The HTTP status this kind of failure is answered with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::NotFound => 404,
            ErrorKind::BadRequest => 400,
            ErrorKind::Conflict | ErrorKind::Failed => 409,
            ErrorKind::Plugin => 502,
            ErrorKind::Busy => 503,
            ErrorKind::Timeout => 408,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::TooLarge => 413,
        }
    }
}

/// A failed request: its kind and a message that names the plugin, file and fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// What happened and what to do next.
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError { kind, message: message.into() }
    }

    /// No such plugin, version or job.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::NotFound, message)
    }

    /// The request is malformed.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::BadRequest, message)
    }

    /// The state refuses the request now.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::Conflict, message)
    }

    /// The plugin failed the call.
    pub fn plugin(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::Plugin, message)
    }
}

/// An operation's own failure text (an install step, a file write) is a [`ErrorKind::Failed`].
impl From<String> for ApiError {
    fn from(message: String) -> ApiError {
        ApiError::new(ErrorKind::Failed, message)
    }
}

/// The daemon's answer: `{"ok":true,"data":…}` or `{"ok":false,"error":{"kind","message"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the operation succeeded.
    pub ok: bool,
    /// The result, when ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// Why not, when not ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

impl Reply {
    /// A success carrying `data`.
    pub fn ok(data: serde_json::Value) -> Reply {
        Reply { ok: true, data: Some(data), error: None }
    }

    /// A failure.
    pub fn err(error: ApiError) -> Reply {
        Reply { ok: false, data: None, error: Some(error) }
    }

    /// The failure's message ("" for a success).
    pub fn message(&self) -> &str {
        self.error.as_ref().map(|e| e.message.as_str()).unwrap_or("")
    }
}

impl From<Result<serde_json::Value, ApiError>> for Reply {
    fn from(result: Result<serde_json::Value, ApiError>) -> Reply {
        match result {
            Ok(v) => Reply::ok(v),
            Err(e) => Reply::err(e),
        }
    }
}

/// One plugin in `status`: what the daemon, the HTTP API and plugctl all read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusEntry {
    /// Plugin name.
    pub name: String,
    /// Running (or configured) version.
    pub version: String,
    /// During a hot update: the version being started beside the running one.
    #[serde(default)]
    pub updating_to: Option<String>,
    /// What it is for (`strategy`, `signal`, …).
    pub kind: String,
    /// Lifecycle state (`ready`, `failed`, …), or `disabled` / `stopped` when not loaded.
    pub state: String,
    /// Process id of the current instance.
    pub pid: Option<u32>,
    /// Restarts since it was loaded.
    pub restarts: u32,
    /// Why the last instance ended (or why it could not start), in words.
    pub last_exit: Option<String>,
    /// The same reason as data (`{"kind": "crashed", …}`), for programs.
    #[serde(default)]
    pub last_exit_detail: serde_json::Value,
    /// Time since the current instance became ready, in milliseconds.
    pub uptime_ms: Option<u64>,
    /// Calls answered with a result.
    pub calls_ok: u64,
    /// Calls that failed.
    pub calls_err: u64,
    /// The SDK the plugin reported in its Hello.
    #[serde(default)]
    pub sdk: Option<String>,
    /// Sandbox layers in force.
    pub sandbox: Vec<String>,
    /// Layers asked for that this machine cannot provide, with the reason.
    pub sandbox_unavailable: Vec<String>,
    /// The call-latency histogram.
    #[serde(default)]
    pub latency: LatencyView,
    /// How its instances ended, counted by kind of reason.
    #[serde(default)]
    pub exits: std::collections::BTreeMap<String, u64>,
    /// Log lines over the rate limit.
    pub log_lines_dropped: u64,
    /// False once disabled (it stays off across restarts of plugd).
    pub enabled: bool,
    /// Its manifest file.
    pub manifest: String,
    /// The name as its plugin.yaml/plugin.json wrote it, where that differs (`HedgeV2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Keys of its plugin.yaml/plugin.json plugd keeps but has no use for.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub manifest_extra: std::collections::BTreeMap<String, serde_json::Value>,
    /// Resident memory of its processes, in bytes (while it runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// CPU time its processes used, in seconds (while it runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    /// Its methods as it described them (name, description, input and output JSON
    /// Schemas); filled in when one plugin's status is asked for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<serde_json::Value>,
    /// A Python plugin's requirements (its requirements file, as pip reads it); filled in
    /// when one plugin's status is asked for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requirements: Vec<String>,
    /// Its `[health]` check's standing, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthEntry>,
    /// How calls reach the running instance (`stream`, `seqpacket`, `shm (spin)`, …, with a
    /// note when shared memory was asked for and its SDK serves the socket instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// Calls the running instance was sent through the shared-memory rings.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ring_calls: u64,
    /// Calls the running instance made to the host through the rings, answered there.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ring_host_calls: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A plugin's `[health]` check as `status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthEntry {
    /// The check, in words (`http GET /health every 5 s`).
    pub check: String,
    /// `starting` (not passed yet), `healthy` or `failing`.
    pub state: String,
    /// Failed checks in a row.
    pub failures: u32,
    /// What the last failed check got.
    #[serde(default)]
    pub last_error: Option<String>,
}

/// A call-latency histogram as `status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyView {
    /// Bucket upper bounds in microseconds.
    pub bounds_us: Vec<u64>,
    /// Calls per bucket (not cumulative); one more entry than `bounds_us`, for the rest.
    pub counts: Vec<u64>,
    /// Sum of all call times, in microseconds.
    pub sum_us: u64,
}

impl LatencyView {
    /// The upper bound of the bucket holding quantile `q` (0..=1), in microseconds; None if
    /// there were no calls, `u64::MAX` if it falls past the last bound.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let total: u64 = self.counts.iter().sum();
        if total == 0 {
            return None;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Some(self.bounds_us.get(i).copied().unwrap_or(u64::MAX));
            }
        }
        Some(u64::MAX)
    }
}

/// Text that must not be shown: a call's `cfg` (API keys). Its `Debug` hides it; the
/// serialized form is the plain string (the control socket and HTTP carry it as sent).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps `text`.
    pub fn new(text: impl Into<String>) -> Secret {
        Secret(text.into())
    }

    /// The text itself, for the one place that hands it on.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(<{} bytes, not shown>)", self.0.len())
    }
}

impl Request {
    /// True for requests that change which plugins run or how: the daemon runs them one
    /// at a time. Installs are not listed: they fetch and build unlocked, then commit locked.
    pub fn changes_plugins(&self) -> bool {
        use Request::*;
        matches!(
            self,
            Start { .. }
                | Stop { .. }
                | Restart { .. }
                | Reload
                | Update { .. }
                | Enable { .. }
                | Disable { .. }
                | Rollback { .. }
                | Uninstall { .. }
        )
    }

    /// Checks every plugin name and version the request carries before it reaches the file
    /// system: names by the manifest's rule, versions as semver.
    pub fn check(&self) -> Result<(), ApiError> {
        use Request::*;
        let (name, version) = match self {
            Status { name } => (name.as_deref(), None),
            Start { name } | Stop { name } | Restart { name } | Versions { name } => {
                (Some(name.as_str()), None)
            }
            Enable { name } | Disable { name } | Call { name, .. } | Logs { name, .. } => {
                (Some(name.as_str()), None)
            }
            Update { name, version, .. }
            | UpdateJob { name, version, .. }
            | UninstallJob { name, version, .. }
            | Rollback { name, version }
            | Uninstall { name, version, .. } => (Some(name.as_str()), version.as_deref()),
            _ => (None, None),
        };
        if let Some(name) = name {
            plugin_proto::check_plugin_name(name).map_err(ApiError::bad_request)?;
        }
        if let Some(v) = version {
            semver::Version::parse(v).map_err(|e| {
                let shown: String = v.chars().take(80).collect();
                ApiError::bad_request(format!("{shown:?} is not a version ({e}); write e.g. 1.2.0"))
            })?;
        }
        Ok(())
    }
}

/// A text cell of a JSON value: strings as they are, null as `-`.
fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An update plan (what `update --dry-run` answers) as lines for people: the version
/// change, each changed manifest section, the dependency diff, the problems. `plugctl`
/// prints them; an update job records them in its output before it applies the update.
pub fn plan_lines(plan: &serde_json::Value) -> Vec<String> {
    let mut out = vec![format!(
        "{} {} -> {}",
        text(&plan["name"]),
        plan["from"].as_str().unwrap_or("(not running)"),
        text(&plan["to"])
    )];
    let changes = plan["changes"].as_object().cloned().unwrap_or_default();
    for (key, change) in &changes {
        if key != "dependencies" {
            out.push(format!("  {key}: {} -> {}", text(&change["from"]), text(&change["to"])));
        }
    }
    if let Some(deps) = changes.get("dependencies") {
        let list = |k: &str| deps[k].as_array().cloned().unwrap_or_default();
        let (added, removed, changed) = (list("added"), list("removed"), list("changed"));
        if added.is_empty() && removed.is_empty() && changed.is_empty() {
            out.push("  dependencies: unchanged".into());
        } else {
            out.push(format!("  dependencies ({}):", text(&deps["note"])));
            for (mark, items) in [("+", added), ("-", removed), ("~", changed)] {
                for item in items {
                    out.push(format!("    {mark} {}", text(&item)));
                }
            }
        }
    }
    if changes.is_empty() {
        out.push("  no change besides the version".into());
    }
    for p in plan["problems"].as_array().cloned().unwrap_or_default() {
        out.push(format!("  problem: {}", text(&p)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_json_lines_with_a_cmd_tag() {
        let r: Request =
            serde_json::from_str(r#"{"cmd":"call","name":"e","method":"m","json":"1"}"#).unwrap();
        assert_eq!(
            r,
            Request::Call { name: "e".into(), method: "m".into(), json: "1".into(), cfg: None }
        );
        let r: Request = serde_json::from_str(
            r#"{"cmd":"call","name":"e","method":"m","json":"1","cfg":"{\"key\":\"s3cret\"}"}"#,
        )
        .unwrap();
        let Request::Call { cfg: Some(cfg), .. } = &r else { panic!("{r:?}") };
        assert_eq!(cfg.expose(), r#"{"key":"s3cret"}"#);
        assert!(!format!("{r:?}").contains("s3cret"), "a secret in Debug output: {r:?}");
        let r: Request = serde_json::from_str(r#"{"cmd":"status"}"#).unwrap();
        assert_eq!(r, Request::Status { name: None });
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format_disk"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&Reply::err(ApiError::not_found("x"))).unwrap(),
            r#"{"ok":false,"error":{"kind":"not_found","message":"x"}}"#
        );
    }

    #[test]
    fn latency_quantiles_name_the_bucket_bound() {
        let l = LatencyView { bounds_us: vec![10, 100], counts: vec![98, 1, 1], sum_us: 0 };
        assert_eq!(l.quantile_us(0.5), Some(10));
        assert_eq!(l.quantile_us(0.99), Some(100));
        assert_eq!(l.quantile_us(1.0), Some(u64::MAX));
        assert_eq!(LatencyView::default().quantile_us(0.99), None);
    }

    #[test]
    fn a_bad_name_or_version_is_a_bad_request() {
        let bad = Request::Start { name: "../etc".into() }.check().unwrap_err();
        assert_eq!((bad.kind, bad.kind.http_status()), (ErrorKind::BadRequest, 400));
        let bad = Request::Rollback { name: "a".into(), version: Some("x".into()) }.check();
        assert_eq!(bad.unwrap_err().kind, ErrorKind::BadRequest);
    }
}
