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
//! ← {"ok":false,"error":"no plugin named nope …"}
//! ```
//!
//! The socket is created with mode 0600 and each connection's peer uid must
//! be root or the daemon's own uid. A line longer than [`MAX_LINE`], bad
//! JSON or an unknown command gets an error reply; none of it reaches a
//! plugin or disturbs the daemon.

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

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the operation succeeded.
    pub ok: bool,
    /// The result, when ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// Why not, when not ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    /// A success carrying `data`.
    pub fn ok(data: serde_json::Value) -> Reply {
        Reply { ok: true, data: Some(data), error: None }
    }

    /// A failure with a message.
    pub fn err(error: impl Into<String>) -> Reply {
        Reply { ok: false, data: None, error: Some(error.into()) }
    }
}

impl Request {
    /// Checks every plugin name and version the request carries before it reaches the file
    /// system: names by the manifest's rule, versions as semver.
    pub fn check(&self) -> Result<(), String> {
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
            plugin_proto::check_plugin_name(name)?;
        }
        if let Some(v) = version {
            semver::Version::parse(v).map_err(|e| {
                let shown: String = v.chars().take(80).collect();
                format!("{shown:?} is not a version ({e}); write e.g. 1.2.0")
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_json_lines_with_a_cmd_tag() {
        let r: Request =
            serde_json::from_str(r#"{"cmd":"call","name":"e","method":"m","json":"1"}"#).unwrap();
        assert_eq!(r, Request::Call { name: "e".into(), method: "m".into(), json: "1".into() });
        let r: Request = serde_json::from_str(r#"{"cmd":"status"}"#).unwrap();
        assert_eq!(r, Request::Status { name: None });
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format_disk"}"#).is_err());
        assert_eq!(serde_json::to_string(&Reply::err("x")).unwrap(), r#"{"ok":false,"error":"x"}"#);
    }
}
