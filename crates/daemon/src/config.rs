//! `plugd.toml`: the daemon's configuration.
//!
//! ```toml
//! socket = "/run/plugd/plugd.sock"    # control socket (mode 0600)
//! plugin_dirs = ["/etc/plugd/plugins", "~/.plugd/plugins"]
//! state_dir = "/var/lib/plugd"        # enable/disable state and each plugin's state folder
//! log_format = "text"                 # or "json"
//!
//! [defaults]                           # applied to every plugin.toml, which may override them
//! limits = { memory = "512MiB" }
//! sandbox = { syscalls = "default" }
//! ```
//!
//! Relative paths are relative to the config file's folder. Without a file,
//! the built-in default serves the bundled examples (so `plugd` runs on a
//! fresh clone).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// `log_format`: how plugd writes its own log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event (no colours unless a terminal).
    #[default]
    Text,
    /// One JSON object per event, for log shippers.
    Json,
}

impl LogFormat {
    /// The config word ("text" or "json") as the format, if it is one.
    pub fn from_word(word: &str) -> Option<LogFormat> {
        match word {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

/// The daemon's settings, resolved to absolute paths.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    /// Control socket path.
    pub socket: PathBuf,
    /// Folders scanned for plugin folders.
    pub plugin_dirs: Vec<PathBuf>,
    /// Persistent state (disabled plugins, per-plugin state folders).
    pub state_dir: PathBuf,
    /// How plugd writes its log.
    pub log_format: LogFormat,
    /// `[defaults]`: sections applied to every plugin.toml under the keys it does not set.
    pub defaults: toml::Table,
    /// Where the config came from (None: built-in default).
    pub source: Option<PathBuf>,
    /// `[http]`: the admin API, if enabled.
    pub http: Option<crate::http::HttpConfig>,
    /// `[mcp]`: plugin methods served as Model Context Protocol tools on the HTTP API.
    pub mcp: Option<crate::mcp::McpConfig>,
    /// `[install]`: the keys trusted to sign plugins, and whether installs must be signed.
    pub trust: crate::signing::Trust,
    /// `[[instances]]`: plugins run under other names with their own config (the plugin
    /// named then runs only as its instances), as (plugin, instance).
    pub instances: Vec<(String, supervisor::manifest::Instance)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    socket: Option<PathBuf>,
    plugin_dirs: Option<Vec<PathBuf>>,
    state_dir: Option<PathBuf>,
    log_format: Option<String>,
    #[serde(default)]
    defaults: toml::Table,
    http: Option<RawHttp>,
    mcp: Option<RawMcp>,
    #[serde(default)]
    install: RawInstall,
    #[serde(default)]
    instances: Vec<RawInstance>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstance {
    name: String,
    plugin: String,
    #[serde(default)]
    config: toml::Table,
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawInstall {
    #[serde(default)]
    trusted_keys: Vec<String>,
    #[serde(default)]
    require_signatures: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMcp {
    expose: Vec<String>,
    #[serde(default)]
    allowed_hosts: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: String,
    token_file: Option<PathBuf>,
    max_body: Option<toml::Value>,
    max_upload: Option<toml::Value>,
    #[serde(default)]
    public_reads: bool,
}

/// A config problem, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", file.display())]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// The control socket used when neither the config nor `PLUGD_SOCKET` names one.
pub fn default_socket() -> PathBuf {
    if let Some(p) = std::env::var_os("PLUGD_SOCKET") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("plugd-{}", nix::unistd::geteuid())));
    base.join("plugd.sock")
}

fn default_state_dir() -> PathBuf {
    std::env::temp_dir().join(format!("plugd-{}", nix::unistd::geteuid())).join("state")
}

/// `examples/plugins` from the current folder, or found from `target/<profile>/plugd`.
fn bundled_examples() -> PathBuf {
    let here = PathBuf::from("examples/plugins");
    if here.is_dir() {
        return std::fs::canonicalize(&here).unwrap_or(here);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(|root| root.join("examples/plugins")))
        .unwrap_or(here)
}

fn expand(base: &Path, p: &Path) -> PathBuf {
    if let Ok(rest) = p.strip_prefix("~") {
        if let Some(home) = std::env::var_os("HOME") {
            return PathBuf::from(home).join(rest);
        }
    }
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

impl DaemonConfig {
    /// The built-in default: serve the bundled examples.
    pub fn builtin() -> DaemonConfig {
        DaemonConfig {
            socket: default_socket(),
            plugin_dirs: vec![bundled_examples()],
            state_dir: default_state_dir(),
            log_format: LogFormat::Text,
            // The bundled examples are ours: their pip may download (client-manager needs
            // FastAPI and uvicorn). The plugins themselves still run without a network.
            defaults: toml::toml! { [python] network = "host" },
            source: None,
            http: None,
            mcp: None,
            trust: crate::signing::Trust::default(),
            instances: Vec::new(),
        }
    }

    /// Reads a config file.
    pub fn load(path: &Path) -> Result<DaemonConfig, ConfigError> {
        let err = |message: String| ConfigError { file: path.to_path_buf(), message };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        Self::parse(&text, path).map_err(err)
    }

    /// Parses config text; relative paths are relative to `path`'s folder.
    pub fn parse(text: &str, path: &Path) -> Result<DaemonConfig, String> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
        // `plugd --config plugd.toml` has an empty parent: the current folder, made absolute
        // (relative plugin and state folders break once a plugin runs in its own folder).
        let base = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let base = std::fs::canonicalize(&base).unwrap_or(base);
        let log_format = match raw.log_format.as_deref() {
            None => LogFormat::Text,
            Some(word) => LogFormat::from_word(word)
                .ok_or_else(|| format!("`log_format` = {word:?} is not \"text\" or \"json\""))?,
        };
        let plugin_dirs = raw.plugin_dirs.unwrap_or_default();
        if plugin_dirs.is_empty() {
            return Err(
                "`plugin_dirs` is missing or empty; list at least one folder of plugins".into()
            );
        }
        for (key, value) in &raw.defaults {
            if !crate::manifest::DEFAULTABLE.contains(&key.as_str()) || !value.is_table() {
                return Err(format!(
                    "`defaults.{key}` is not a plugin.toml section that takes defaults; use one of {:?}",
                    crate::manifest::DEFAULTABLE
                ));
            }
        }
        let http = match raw.http {
            None => None,
            Some(h) => Some(crate::http::HttpConfig {
                listen: h.listen.parse().map_err(|e| {
                    format!(
                        "`http.listen` = {:?} is not an address and port ({e}); write e.g. \"127.0.0.1:7070\"",
                        h.listen
                    )
                })?,
                token_file: h.token_file.map(|p| expand(&base, &p)),
                public_reads: h.public_reads,
                max_body: size("http.max_body", &h.max_body, crate::http::DEFAULT_MAX_BODY)?,
                max_upload: size(
                    "http.max_upload",
                    &h.max_upload,
                    crate::http::DEFAULT_MAX_UPLOAD,
                )?,
            }),
        };
        let mcp = match raw.mcp {
            None => None,
            Some(_) if http.is_none() => {
                return Err(
                    "[mcp] is served on the HTTP API: add [http] listen = \"127.0.0.1:7070\" (and a token_file), or remove [mcp]".into(),
                )
            }
            Some(m) => Some(crate::mcp::McpConfig::new(m.expose, m.allowed_hosts)?),
        };
        let mut instances = Vec::new();
        for (i, inst) in raw.instances.into_iter().enumerate() {
            plugin_proto::check_plugin_name(&inst.plugin)
                .map_err(|e| format!("`instances[{i}].plugin`: {e}"))?;
            let instance = supervisor::manifest::Instance::new(inst.name, inst.config, inst.env)
                .map_err(|(key, problem)| format!("`instances[{i}].{key}` {problem}"))?;
            if instances
                .iter()
                .any(|(_, o): &(String, supervisor::manifest::Instance)| o.name == instance.name)
            {
                return Err(format!(
                    "`instances[{i}].name` = {:?} is given twice; each instance needs its own name",
                    instance.name
                ));
            }
            instances.push((inst.plugin, instance));
        }
        let trust = crate::signing::Trust::from_config(
            &raw.install.trusted_keys,
            raw.install.require_signatures,
            &base,
        )?;
        Ok(DaemonConfig {
            http,
            mcp,
            trust,
            defaults: raw.defaults,
            socket: raw.socket.map(|p| expand(&base, &p)).unwrap_or_else(default_socket),
            plugin_dirs: plugin_dirs.iter().map(|p| expand(&base, p)).collect(),
            state_dir: raw.state_dir.map(|p| expand(&base, &p)).unwrap_or_else(default_state_dir),
            log_format,
            source: Some(path.to_path_buf()),
            instances,
        })
    }
}

/// A size key of plugd.toml (`"1MiB"` or a number of bytes), or `default` when absent.
fn size(key: &str, value: &Option<toml::Value>, default: usize) -> Result<usize, String> {
    match value {
        None => Ok(default),
        Some(toml::Value::Integer(n)) if *n > 0 => Ok(*n as usize),
        Some(toml::Value::String(s)) => supervisor::units::parse_size(s)
            .map(|n| n as usize)
            .map_err(|e| format!("`{key}` = {s:?}: {e}")),
        Some(other) => Err(format!("`{key}` = {other} is not a size such as \"1MiB\"")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_named_without_a_folder_is_relative_to_the_current_one() {
        let c = DaemonConfig::parse(
            "plugin_dirs = [\"plugins\"]\nstate_dir = \"state\"\n",
            Path::new("plugd.toml"),
        )
        .unwrap();
        let here = std::fs::canonicalize(".").unwrap();
        assert_eq!(c.plugin_dirs, vec![here.join("plugins")]);
        assert_eq!(c.state_dir, here.join("state"));
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let c = DaemonConfig::parse(
            "socket = \"run/p.sock\"\nplugin_dirs = [\"plugins\", \"/abs\"]\nstate_dir = \"state\"\n",
            Path::new("/etc/plugd/plugd.toml"),
        )
        .unwrap();
        assert_eq!(c.socket, Path::new("/etc/plugd/run/p.sock"));
        assert_eq!(c.plugin_dirs, vec![PathBuf::from("/etc/plugd/plugins"), PathBuf::from("/abs")]);
        assert_eq!(c.state_dir, Path::new("/etc/plugd/state"));
    }

    #[test]
    fn mcp_needs_http_and_patterns() {
        let dirs = "plugin_dirs = [\"x\"]\n";
        let alone = format!("{dirs}[mcp]\nexpose = [\"calc.*\"]\n");
        let e = DaemonConfig::parse(&alone, Path::new("p.toml")).unwrap_err();
        assert!(e.contains("[mcp] is served on the HTTP API"), "{e}");
        let http = "plugin_dirs = [\"x\"]\n[http]\nlisten = \"127.0.0.1:7070\"\n";
        let e = DaemonConfig::parse(
            &format!("{http}[mcp]\nexpose = [\"calc\"]\n"),
            Path::new("p.toml"),
        )
        .unwrap_err();
        assert!(e.contains("`mcp.expose[0]`"), "{e}");
        let c = DaemonConfig::parse(
            &format!("{http}[mcp]\nexpose = [\"calc.*\"]\n"),
            Path::new("p.toml"),
        )
        .unwrap();
        assert!(c.mcp.unwrap().exposes("calc", "add"));
    }

    #[test]
    fn mistakes_are_named() {
        let e = DaemonConfig::parse("plugin_dir = [\"x\"]\n", Path::new("p.toml")).unwrap_err();
        assert!(e.contains("unknown field `plugin_dir`"), "{e}");
        let e = DaemonConfig::parse("plugin_dirs = []\n", Path::new("p.toml")).unwrap_err();
        assert!(e.contains("`plugin_dirs`"), "{e}");
        let e = DaemonConfig::parse(
            "plugin_dirs = [\"x\"]\nlog_format = \"xml\"\n",
            Path::new("p.toml"),
        )
        .unwrap_err();
        assert!(e.contains("`log_format`"), "{e}");
    }
}
