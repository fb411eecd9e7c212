//! `plugin.toml`: what a plugin folder declares, parsed and validated.
//!
//! Every problem is reported before anything is spawned, as
//! `<file>: <key> <what is wrong>; <what would be right>`. Unknown keys are
//! errors (a typo in a limit must never silently disable it).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Sections of plugin.toml an operator may give defaults for in plugd.toml.
pub const DEFAULTABLE: &[&str] = &["restart", "timeouts", "limits", "sandbox", "env", "python"];

use crate::units::{parse_duration, parse_size};

/// The plugin API version this supervisor implements; manifests state a semver requirement on it.
pub const PLUGIN_API_VERSION: semver::Version = semver::Version::new(1, 0, 0);

/// A manifest problem, naming the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("cannot read plugin manifest {}: {source}", file.display())]
    Read {
        /// The manifest path.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema (unknown key, wrong type, bad variant).
    #[error("{}: {message}", file.display())]
    Parse {
        /// The manifest path.
        file: PathBuf,
        /// The parser's explanation, with line and column.
        message: String,
    },
    /// A key has a value that parses but is not acceptable.
    #[error("{}: `{key}` {problem}", file.display())]
    Invalid {
        /// The manifest path.
        file: PathBuf,
        /// The offending key, dotted (`timeouts.call`).
        key: String,
        /// What is wrong and what would be right.
        problem: String,
    },
}

/// What a plugin is for; shown in status, used by hosts to pick plugins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PluginKind {
    /// Trading strategy (on_tick → decision).
    Strategy,
    /// Signal generator.
    Signal,
    /// Exchange or data adapter.
    Adapter,
    /// Execution or pricing engine.
    Engine,
    /// Anything else.
    #[default]
    Utility,
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            PluginKind::Strategy => "strategy",
            PluginKind::Signal => "signal",
            PluginKind::Adapter => "adapter",
            PluginKind::Engine => "engine",
            PluginKind::Utility => "utility",
        };
        f.write_str(s)
    }
}

/// When a plugin that exited is started again (OTP: permanent / transient / temporary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart after any exit, clean or not.
    Always,
    /// Restart only after a failure (crash, nonzero exit, hang, protocol violation, …).
    #[default]
    OnFailure,
    /// Never restart.
    Never,
}

/// How the plugin process is started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entrypoint {
    /// A path relative to the plugin folder (or absolute).
    Path(PathBuf),
    /// A bare executable name, searched in the plugin folder, then in the supervisor's `bin_dirs`.
    Name(String),
    /// A command line: program (searched in `PATH` if bare) and arguments, run in the plugin folder.
    Command(Vec<String>),
    /// A Python script relative to the plugin folder, run by the plugin's own virtualenv.
    Script(PathBuf),
    /// A Python class (`plugin:HedgeV2`, `plugin.HedgeV2`): the SDK's launcher imports
    /// `module` from the plugin folder, instantiates `class` and serves its methods.
    PyClass {
        /// The module, dotted, importable from the plugin folder.
        module: String,
        /// The class in it.
        class: String,
    },
}

impl Entrypoint {
    /// Whether the plugin's own virtualenv runs it (a script or a class).
    pub fn is_python(&self) -> bool {
        matches!(self, Entrypoint::Script(_) | Entrypoint::PyClass { .. })
    }
}

/// `plugin:HedgeV2` or `plugin.HedgeV2` (a dotted path whose last part starts with a capital)
/// as a module and a class, if it is one.
fn python_class(text: &str) -> Option<(String, String)> {
    let (module, class) = match text.split_once(':') {
        Some((m, c)) => (m, c),
        None if !text.ends_with(".py") => {
            let (m, c) = text.rsplit_once('.')?;
            if !c.starts_with(|ch: char| ch.is_ascii_uppercase()) {
                return None;
            }
            (m, c)
        }
        None => return None,
    };
    let ident = |s: &str| {
        !s.is_empty()
            && !s.starts_with(|c: char| c.is_ascii_digit())
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    // `module:*`: the one class the module defines (a single-file or console plugin).
    let class_ok = ident(class) || (class == "*" && text.contains(':'));
    (module.split('.').all(ident) && class_ok).then(|| (module.to_string(), class.to_string()))
}

/// What runs the plugin's entrypoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Runtime {
    /// An executable, run directly.
    #[default]
    Native,
    /// A Python script, run by a virtualenv plugd builds for this plugin version.
    Python,
}

/// How the plugin socket carries frames (`transport = ...`; the frames are the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// A byte stream (`SOCK_STREAM`), which every SDK reads.
    #[default]
    Stream,
    /// Records of at most 64 KiB (`SOCK_SEQPACKET`): about 1 µs less per round trip on Linux.
    /// Every read must offer 64 KiB of room; both bundled SDKs do (PROTOCOL.md, section 1).
    SeqPacket,
    /// A stream socket plus a shared mapping whose rings carry engine-thread calls and
    /// their replies (`[shm]` says how to wait); an SDK that does not take the mapping
    /// gets every call on the socket.
    Shm,
}

/// `[shm]`: the shared-memory transport's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmConfig {
    /// How each side waits for the other (`wait = "spin" | "spin-then-futex" | "futex"`).
    pub wait: plugin_proto::shm::WaitStrategy,
    /// Bytes in each ring (`ring = "256KiB"`, a power of two).
    pub ring: usize,
}

impl Default for ShmConfig {
    fn default() -> Self {
        ShmConfig { wait: Default::default(), ring: plugin_proto::shm::DEFAULT_RING }
    }
}

/// `[build]`: how an installed copy of the plugin is built, in the plugin's build jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildConfig {
    /// The command line, run in the installed copy's folder.
    pub command: Vec<String>,
    /// `network = "host"`: the build may use the network (else it runs without one).
    pub network: bool,
}

/// `[python]`: how plugd builds a Python plugin's virtualenv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PythonConfig {
    /// The base interpreter the venv is made from (name in `PATH` or a path).
    pub interpreter: String,
    /// The requirements file, relative to the plugin folder (used if it exists).
    pub requirements: PathBuf,
    /// Extra arguments for `pip install`, e.g. `["--no-index", "--find-links", "wheels"]`.
    pub pip_args: Vec<String>,
    /// `network = "host"`: pip may download packages (else it runs without a network).
    pub network: bool,
    /// `packaged = true`: the entrypoint's module is installed into the venv (a plugin
    /// that came as a wheel), not a file of the plugin folder.
    pub packaged: bool,
}

impl Default for PythonConfig {
    fn default() -> Self {
        Self {
            interpreter: "python3".into(),
            requirements: "requirements.txt".into(),
            pip_args: Vec::new(),
            network: false,
            packaged: false,
        }
    }
}

/// `requires = ["name", "name ^1.2"]`: another plugin that must be running first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// The required plugin's name.
    pub name: String,
    /// Versions of it that satisfy this plugin.
    pub version: semver::VersionReq,
}

/// `[restart]`: restart policy, backoff and restart intensity.
#[derive(Debug, Clone, PartialEq)]
pub struct RestartConfig {
    /// When to restart.
    pub policy: RestartPolicy,
    /// More than this many restarts within `within` turns the plugin Failed.
    pub max_restarts: u32,
    /// The restart-intensity window.
    pub within: Duration,
    /// First backoff delay; doubles per consecutive restart.
    pub backoff: Duration,
    /// Backoff ceiling.
    pub backoff_max: Duration,
    /// Uptime after which the plugin counts as stable and backoff starts over.
    pub reset_after: Duration,
}

impl Default for RestartConfig {
    fn default() -> Self {
        Self {
            policy: RestartPolicy::OnFailure,
            max_restarts: 5,
            within: Duration::from_secs(60),
            backoff: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            reset_after: Duration::from_secs(30),
        }
    }
}

/// `[timeouts]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeouts {
    /// Spawn → Ready.
    pub start: Duration,
    /// Default call deadline.
    pub call: Duration,
    /// How long in-flight calls may take to finish when the plugin is stopped.
    pub drain: Duration,
    /// After Shutdown, before SIGTERM.
    pub shutdown: Duration,
    /// After SIGTERM, before SIGKILL.
    pub kill: Duration,
    /// Ping interval (zero disables heartbeats).
    pub heartbeat: Duration,
    /// Unanswered pings in a row before the plugin is declared hung.
    pub missed_heartbeats: u32,
    /// Call deadlines missed in a row (no reply in between) before the plugin is declared hung.
    pub missed_deadlines: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            start: Duration::from_secs(10),
            call: Duration::from_secs(5),
            drain: Duration::from_secs(5),
            shutdown: Duration::from_secs(5),
            kill: Duration::from_secs(2),
            heartbeat: Duration::from_secs(1),
            missed_heartbeats: 3,
            missed_deadlines: 3,
        }
    }
}

/// The memory cap of a plugin whose manifest (and plugd's `[defaults]`) name none;
/// `memory = "unlimited"` lifts it.
pub const DEFAULT_MEMORY: u64 = 512 << 20;

/// `[limits]`: resource caps. Parsed and validated here; see `sandbox` for what is enforced.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Limits {
    /// Resident memory cap in bytes, over all the plugin's processes.
    pub memory: Option<u64>,
    /// Address-space cap per process (RLIMIT_AS), only when asked for.
    pub address_space: Option<u64>,
    /// Lifetime CPU time.
    pub cpu_time: Option<Duration>,
    /// Share of one CPU, in percent (cgroup `cpu.max`).
    pub cpu_quota: Option<u32>,
    /// Open file descriptors.
    pub open_files: Option<u64>,
    /// Processes (per uid; see the README's caveat).
    pub processes: Option<u64>,
    /// Largest file the plugin may write, in bytes.
    pub file_size: Option<u64>,
    /// CPUs the plugin is pinned to.
    pub cpus: Option<Vec<usize>>,
}

/// A closed set of words a manifest key takes, with the words.
macro_rules! words {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $word:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every word, in the order the manifest documents them.
            pub const WORDS: &'static [&'static str] = &[$($word),+];

            /// The manifest word.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $word),+ }
            }

            fn from_word(word: &str) -> Option<$name> {
                match word { $($word => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

words! {
    /// `network`: whether the plugin (or an install step) has the host's network.
    Network {
        /// Its own network namespace (and, for a plugin, no inet sockets).
        #[default]
        None = "none",
        /// The host's network.
        Host = "host",
    }
}

words! {
    /// `sandbox.syscalls`: the seccomp profile.
    SyscallProfile {
        /// A deny list of what no plugin needs (see `sandbox::seccomp`).
        #[default]
        Default = "default",
        /// An allow list: only what a plain computing plugin needs.
        Strict = "strict",
        /// No seccomp filter.
        Off = "off",
    }
}

words! {
    /// `sandbox.filesystem`: what of the file system the plugin sees.
    Filesystem {
        /// A minimal root (and Landlock): its folder read-only, its state folder read-write.
        #[default]
        Isolated = "isolated",
        /// The host's file system (own namespaces and /proc still).
        Host = "host",
    }
}

/// `[sandbox]`: isolation layers. Parsed and validated here; see `sandbox` for what is enforced.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SandboxConfig {
    /// Own network namespace and no inet sockets, or the host's network.
    pub network: Network,
    /// The seccomp profile.
    pub syscalls: SyscallProfile,
    /// A minimal root, or the host's file system.
    pub filesystem: Filesystem,
    /// Whether the plugin may execve after its own start.
    pub execve: bool,
    /// Run as this user (when the supervisor is root).
    pub user: Option<String>,
    /// Run as this group (when the supervisor is root).
    pub group: Option<String>,
    /// Extra paths the plugin may read.
    pub read_paths: Vec<PathBuf>,
    /// Extra paths the plugin may write.
    pub write_paths: Vec<PathBuf>,
    /// Layers whose absence must fail the start instead of warning.
    pub require: Vec<crate::sandbox::LayerKind>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            network: Network::None,
            syscalls: SyscallProfile::Default,
            filesystem: Filesystem::Isolated,
            execve: false,
            user: None,
            group: None,
            read_paths: Vec::new(),
            write_paths: Vec::new(),
            require: Vec::new(),
        }
    }
}

/// Checks a plugin name (the rule lives in `plugin-proto`, shared with the control protocol).
pub use plugin_proto::check_plugin_name as check_name;

/// A validated `plugin.toml`.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Unique plugin name: lowercase letters, digits, `-` and `_`.
    pub name: String,
    /// The plugin's own version.
    pub version: semver::Version,
    /// What the plugin is for.
    pub kind: PluginKind,
    /// Requirement on [`PLUGIN_API_VERSION`].
    pub api_version: semver::VersionReq,
    /// `entrypoint_sha256`: the entrypoint file's SHA-256 (hex), checked before every exec.
    pub entrypoint_sha256: Option<String>,
    /// How to start it.
    pub entrypoint: Entrypoint,
    /// One line for people.
    pub description: Option<String>,
    /// Plugins that must run first.
    pub requires: Vec<Requirement>,
    /// `[restart]`.
    pub restart: RestartConfig,
    /// `[timeouts]`.
    pub timeouts: Timeouts,
    /// `[limits]`.
    pub limits: Limits,
    /// `[sandbox]`.
    pub sandbox: SandboxConfig,
    /// `[env]`: extra environment for the plugin.
    pub env: BTreeMap<String, String>,
    /// `[config]`: handed to `on_load` as JSON.
    pub config: serde_json::Value,
    /// `[build]`: a command run in the plugin folder at install time (e.g. to build the entrypoint).
    pub build: Option<BuildConfig>,
    /// What runs the entrypoint (`runtime = "python"`, or an entrypoint ending in `.py`).
    pub runtime: Runtime,
    /// `[python]`: the virtualenv recipe of a Python plugin.
    pub python: PythonConfig,
    /// `transport`: the kind of socket between plugd and the plugin.
    pub transport: Transport,
    /// `[shm]`: how `transport = "shm"` waits, and its rings' size.
    pub shm: ShmConfig,
    /// `[calls] allow`: which methods of other plugins this one may call through the host
    /// (`plugd.call`); nothing by default.
    pub calls: Vec<CallRule>,
    /// The name as a plugin.yaml/plugin.json wrote it, when that is not the plugd name
    /// (`HedgeV2` for `hedgev2`): shown beside it.
    pub display_name: Option<String>,
    /// Keys of a plugin.yaml/plugin.json plugd has no use for, kept as written.
    pub extra: BTreeMap<String, serde_json::Value>,
    /// `[[instances]]`: the same plugin run several times, each its own process with its
    /// own name and config (see [`PluginSpec::instances`]).
    pub instances: Vec<Instance>,
    /// For one of those instances: the plugin it is an instance of (its venv is that one's).
    pub instance_of: Option<String>,
    /// `[listen]`: sockets plugd binds and hands to every instance (see [`crate::serving`]).
    pub listen: Vec<crate::serving::ListenAddr>,
    /// `[health]`: how plugd checks the plugin serves; None: Ready means healthy.
    pub health: Option<crate::serving::HealthConfig>,
}

/// One `[[instances]]` entry: a name and what it changes.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// Its own plugin name (a status row, restarts, logs of its own).
    pub name: String,
    /// Keys laid over the plugin's `[config]` (top-level keys replace).
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Environment added to the plugin's `[env]`.
    pub env: BTreeMap<String, String>,
}

impl Instance {
    /// An instance from what a manifest or plugd.toml wrote, checked as a plugin's own keys
    /// are (a valid name, a config table, no `PLUGD_` variables); the error is
    /// `(key under the instance, problem)`, for the caller to place in its file.
    pub fn new(
        name: String,
        config: toml::Table,
        env: BTreeMap<String, String>,
    ) -> Result<Instance, (String, String)> {
        check_name(&name).map_err(|e| ("name".to_string(), format!("= {e}")))?;
        let config = match serde_json::to_value(&config) {
            Ok(serde_json::Value::Object(m)) => m,
            Ok(_) => return Err(("config".into(), "must be a table".into())),
            Err(e) => return Err(("config".into(), format!("cannot be JSON: {e}"))),
        };
        for key in env.keys() {
            check_env_key(key).map_err(|e| (format!("env.{key}"), e.to_string()))?;
        }
        Ok(Instance { name, config, env })
    }
}

/// Why `key` cannot be an `[env]` variable of a plugin, if it cannot.
fn check_env_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() || key.contains('=') || key.contains('\0') {
        return Err("is not a valid environment variable name");
    }
    if key.starts_with("PLUGD_") {
        return Err("uses the PLUGD_ prefix, which plugd sets itself (PLUGD_FD, PLUGD_STATE_DIR, …); choose another name");
    }
    Ok(())
}

/// One entry of `[calls] allow`: `"plugin.method"`, or `"plugin.*"` for all its methods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CallRule {
    /// The plugin that may be called.
    pub plugin: String,
    /// The method (None: any).
    pub method: Option<String>,
}

impl CallRule {
    /// Whether this rule lets a call to `plugin`'s `method` through.
    pub fn allows(&self, plugin: &str, method: &str) -> bool {
        self.plugin == plugin && self.method.as_deref().is_none_or(|m| m == method)
    }

    fn parse(text: &str) -> Result<CallRule, String> {
        let Some((plugin, method)) = text.split_once('.') else {
            return Err(format!(
                "{text:?} names no method; write \"plugin.method\" or \"plugin.*\""
            ));
        };
        check_name(plugin).map_err(|e| format!("{text:?}: the plugin name {e}"))?;
        let method = match method {
            "*" => None,
            "" => {
                return Err(format!(
                    "{text:?} names no method; write \"plugin.method\" or \"plugin.*\""
                ))
            }
            m if m.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                return Err(format!("{text:?}: a method name has no spaces"))
            }
            m => Some(m.to_string()),
        };
        Ok(CallRule { plugin: plugin.to_string(), method })
    }
}

impl std::fmt::Display for CallRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.plugin, self.method.as_deref().unwrap_or("*"))
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawShm {
    wait: Option<String>,
    ring: Option<toml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCalls {
    #[serde(default)]
    allow: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPython {
    interpreter: Option<String>,
    requirements: Option<PathBuf>,
    pip_args: Option<Vec<String>>,
    network: Option<String>,
    packaged: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: String,
    version: String,
    #[serde(default)]
    kind: PluginKind,
    api_version: String,
    entrypoint: toml::Value,
    entrypoint_sha256: Option<String>,
    description: Option<String>,
    #[serde(default)]
    requires: Vec<String>,
    #[serde(default)]
    restart: RawRestart,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    sandbox: RawSandbox,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    config: toml::Table,
    #[serde(default)]
    build: Option<RawBuild>,
    runtime: Option<String>,
    #[serde(default)]
    python: RawPython,
    transport: Option<String>,
    #[serde(default)]
    shm: Option<RawShm>,
    #[serde(default)]
    calls: RawCalls,
    #[serde(default)]
    instances: Vec<RawInstance>,
    #[serde(default)]
    listen: crate::serving::RawListen,
    health: Option<crate::serving::RawHealth>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstance {
    name: String,
    #[serde(default)]
    config: toml::Table,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuild {
    command: Vec<String>,
    network: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRestart {
    policy: Option<RestartPolicy>,
    max_restarts: Option<u32>,
    within: Option<String>,
    backoff: Option<String>,
    backoff_max: Option<String>,
    reset_after: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    start: Option<String>,
    call: Option<String>,
    drain: Option<String>,
    shutdown: Option<String>,
    kill: Option<String>,
    heartbeat: Option<String>,
    missed_heartbeats: Option<u32>,
    missed_deadlines: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    memory: Option<toml::Value>,
    address_space: Option<toml::Value>,
    cpu_time: Option<String>,
    cpu_quota: Option<String>,
    open_files: Option<i64>,
    processes: Option<i64>,
    file_size: Option<toml::Value>,
    cpus: Option<Vec<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSandbox {
    network: Option<String>,
    syscalls: Option<String>,
    filesystem: Option<String>,
    execve: Option<bool>,
    user: Option<String>,
    group: Option<String>,
    read_paths: Option<Vec<PathBuf>>,
    write_paths: Option<Vec<PathBuf>>,
    require: Option<Vec<String>>,
}

/// Collects the key-level problems of one file.
struct Check<'a> {
    file: &'a Path,
}

impl Check<'_> {
    fn bad(&self, key: &str, problem: impl Into<String>) -> ManifestError {
        ManifestError::Invalid { file: self.file.into(), key: key.into(), problem: problem.into() }
    }

    fn duration(
        &self,
        key: &str,
        v: &Option<String>,
        default: Duration,
    ) -> Result<Duration, ManifestError> {
        match v {
            None => Ok(default),
            Some(t) => parse_duration(t).map_err(|e| self.bad(key, e)),
        }
    }

    fn positive_duration(
        &self,
        key: &str,
        v: &Option<String>,
        default: Duration,
    ) -> Result<Duration, ManifestError> {
        let d = self.duration(key, v, default)?;
        if d.is_zero() {
            return Err(self.bad(key, "must be greater than zero"));
        }
        Ok(d)
    }

    fn size(&self, key: &str, v: &Option<toml::Value>) -> Result<Option<u64>, ManifestError> {
        let bytes = match v {
            None => return Ok(None),
            Some(toml::Value::Integer(i)) if *i > 0 => *i as u64,
            Some(toml::Value::Integer(i)) => {
                return Err(self.bad(
                    key,
                    format!("= {i} is impossible; give a positive size such as \"256MiB\""),
                ))
            }
            Some(toml::Value::String(s)) => parse_size(s).map_err(|e| self.bad(key, e))?,
            Some(other) => {
                return Err(self.bad(
                    key,
                    format!("must be a size such as \"256MiB\", not {}", other.type_str()),
                ))
            }
        };
        if bytes == 0 {
            return Err(self.bad(key, "must be greater than zero"));
        }
        Ok(Some(bytes))
    }

    fn count(&self, key: &str, v: Option<i64>) -> Result<Option<u64>, ManifestError> {
        match v {
            None => Ok(None),
            Some(n) if n > 0 => Ok(Some(n as u64)),
            Some(n) => Err(self.bad(key, format!("= {n} is impossible; give a positive number"))),
        }
    }

    /// One of a closed set of words (absent: the type's default); anything else is an
    /// error naming the key and the words.
    fn word<T: Default>(
        &self,
        key: &str,
        v: Option<String>,
        words: &[&str],
        parse: fn(&str) -> Option<T>,
    ) -> Result<T, ManifestError> {
        match v {
            None => Ok(T::default()),
            Some(v) => {
                parse(&v).ok_or_else(|| self.bad(key, format!("= {v:?} is not one of {words:?}")))
            }
        }
    }
}

impl Manifest {
    /// Parses and validates manifest text; `file` is only used in error messages.
    pub fn parse(text: &str, file: &Path) -> Result<Manifest, ManifestError> {
        Self::parse_with_defaults(text, file, &toml::Table::new())
    }

    /// Like [`Manifest::parse`], with operator defaults (plugd.toml `[defaults]`) filled in
    /// under every section key the manifest does not set itself.
    pub fn parse_with_defaults(
        text: &str,
        file: &Path,
        defaults: &toml::Table,
    ) -> Result<Manifest, ManifestError> {
        let toml_file = file.extension().is_none_or(|e| e == "toml");
        if !toml_file {
            // plugin.yaml / plugin.json: their keys mapped onto plugin.toml's.
            let (table, foreign) = crate::foreign::translate(text, file)?;
            let raw = RawManifest::deserialize(toml::Value::Table(table.clone())).map_err(|e| {
                ManifestError::Parse {
                    file: file.into(),
                    message: e.to_string().trim_end().to_string(),
                }
            })?;
            let mut m = Self::from_raw(raw, Some(table), file, defaults)?;
            m.display_name = foreign.display_name;
            m.extra = foreign.extra;
            return Ok(m);
        }
        // Parse the file alone first, so its own mistakes are reported with line and column.
        let raw: RawManifest = toml::from_str(text).map_err(|e| ManifestError::Parse {
            file: file.into(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let table = if defaults.is_empty() {
            None
        } else {
            Some(toml::from_str(text).map_err(|e: toml::de::Error| ManifestError::Parse {
                file: file.into(),
                message: e.to_string().trim_end().to_string(),
            })?)
        };
        Self::from_raw(raw, table, file, defaults)
    }

    /// Validates a parsed manifest; `table` (the same, as a table) is needed only to apply
    /// `defaults`.
    fn from_raw(
        mut raw: RawManifest,
        table: Option<toml::Table>,
        file: &Path,
        defaults: &toml::Table,
    ) -> Result<Manifest, ManifestError> {
        if let (false, Some(mut table)) = (defaults.is_empty(), table) {
            for (section, value) in defaults {
                let (Some(ours), toml::Value::Table(theirs)) = (
                    table
                        .entry(section.clone())
                        .or_insert_with(|| toml::Value::Table(Default::default()))
                        .as_table_mut(),
                    value,
                ) else {
                    continue;
                };
                for (k, v) in theirs {
                    ours.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            raw = RawManifest::deserialize(toml::Value::Table(table)).map_err(|e| {
                ManifestError::Parse {
                    file: file.into(),
                    message: format!(
                        "with the [defaults] of plugd.toml applied: {}",
                        e.to_string().trim_end()
                    ),
                }
            })?;
        }
        let c = Check { file };

        let name = raw.name;
        if let Err(e) = check_name(&name) {
            return Err(c.bad("name", format!("= {e}")));
        }
        let version = semver::Version::parse(&raw.version).map_err(|e| {
            c.bad(
                "version",
                format!("= {:?} is not a semver version ({e}); write e.g. \"1.2.0\"", raw.version),
            )
        })?;
        let api_version = semver::VersionReq::parse(&raw.api_version).map_err(|e| {
            c.bad(
                "api_version",
                format!(
                    "= {:?} is not a semver requirement ({e}); write e.g. \"^1\"",
                    raw.api_version
                ),
            )
        })?;
        if !api_version.matches(&PLUGIN_API_VERSION) {
            return Err(c.bad(
                "api_version",
                format!(
                    "= {:?} is not satisfied by this supervisor, which speaks plugin API {PLUGIN_API_VERSION}; write \"^1\" or rebuild the plugin for API {}",
                    raw.api_version, PLUGIN_API_VERSION.major
                ),
            ));
        }
        let runtime = match raw.runtime.as_deref() {
            None => match &raw.entrypoint {
                toml::Value::String(s) if s.ends_with(".py") => Runtime::Python,
                toml::Value::String(s) if s.contains(':') && python_class(s).is_some() => {
                    Runtime::Python
                }
                _ => Runtime::Native,
            },
            Some("native") => Runtime::Native,
            Some("python") => Runtime::Python,
            Some(other) => {
                return Err(c.bad(
                    "runtime",
                    format!("= {other:?} is not a runtime; use \"native\" or \"python\""),
                ))
            }
        };
        let transport = match raw.transport.as_deref() {
            None | Some("stream") => Transport::Stream,
            Some("seqpacket") => Transport::SeqPacket,
            Some("shm") => Transport::Shm,
            Some(other) => {
                return Err(c.bad(
                    "transport",
                    format!(
                        "= {other:?} is not a transport; use \"stream\", \"seqpacket\" or \"shm\""
                    ),
                ))
            }
        };
        let shm = match raw.shm {
            None => ShmConfig::default(),
            Some(_) if transport != Transport::Shm => return Err(c.bad(
                "shm",
                "is set but `transport` is not \"shm\"; set transport = \"shm\" or remove [shm]"
                    .to_string(),
            )),
            Some(r) => {
                let wait = match r.wait.as_deref() {
                    None => Default::default(),
                    Some(w) => plugin_proto::shm::WaitStrategy::from_word(w).ok_or_else(|| {
                        c.bad("shm.wait", format!("= {w:?} is not a wait; use \"spin\", \"spin-then-futex\" or \"futex\""))
                    })?,
                };
                let ring = match &r.ring {
                    None => plugin_proto::shm::DEFAULT_RING,
                    Some(toml::Value::Integer(n)) if *n > 0 => *n as usize,
                    Some(toml::Value::String(t)) => {
                        parse_size(t).map_err(|e| c.bad("shm.ring", e))? as usize
                    }
                    Some(other) => {
                        return Err(c.bad(
                            "shm.ring",
                            format!("= {other:?} is not a size such as \"256KiB\""),
                        ))
                    }
                };
                if !ring.is_power_of_two() || !(4096..=(64 << 20)).contains(&ring) {
                    return Err(c.bad(
                        "shm.ring",
                        format!("= {ring} bytes: use a power of two from 4KiB to 64MiB"),
                    ));
                }
                ShmConfig { wait, ring }
            }
        };
        let entrypoint_sha256 = match raw.entrypoint_sha256 {
            Some(h) if h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()) => {
                return Err(c.bad(
                    "entrypoint_sha256",
                    format!("= {h:?} is not a SHA-256 (64 hex digits); write the output of `sha256sum <entrypoint>`"),
                ))
            }
            other => other.map(|h| h.to_ascii_lowercase()),
        };
        let entrypoint = match raw.entrypoint {
            toml::Value::String(s) if s.trim().is_empty() => {
                return Err(c.bad("entrypoint", "is empty; give a path such as \"bin/my-plugin\""))
            }
            toml::Value::String(s) if runtime == Runtime::Python && python_class(&s).is_some() => {
                let (module, class) = python_class(&s).unwrap_or_default();
                Entrypoint::PyClass { module, class }
            }
            toml::Value::String(s) if runtime == Runtime::Python => {
                if Path::new(&s).is_absolute() || s.split('/').any(|part| part == "..") {
                    return Err(c.bad(
                        "entrypoint",
                        format!(
                            "= {s:?} must be a script inside the plugin folder, e.g. \"main.py\""
                        ),
                    ));
                }
                Entrypoint::Script(PathBuf::from(s))
            }
            _ if runtime == Runtime::Python => {
                return Err(c.bad(
                    "entrypoint",
                    "must be the script's path for runtime = \"python\", e.g. \"main.py\"",
                ))
            }
            toml::Value::String(s) if s.contains('/') => Entrypoint::Path(PathBuf::from(s)),
            toml::Value::String(s) => Entrypoint::Name(s),
            toml::Value::Array(items) => {
                let argv: Option<Vec<String>> =
                    items.iter().map(|v| v.as_str().map(str::to_string)).collect();
                match argv {
                    Some(argv) if !argv.is_empty() && !argv[0].is_empty() => {
                        Entrypoint::Command(argv)
                    }
                    _ => {
                        return Err(c.bad(
                            "entrypoint",
                            "must be a non-empty array of strings, e.g. [\"python3\", \"main.py\"]",
                        ))
                    }
                }
            }
            other => {
                return Err(c.bad(
                    "entrypoint",
                    format!("must be a path string or a command array, not {}", other.type_str()),
                ))
            }
        };
        let mut requires = Vec::new();
        for (i, r) in raw.requires.iter().enumerate() {
            let mut parts = r.split_whitespace();
            let rname = parts.next().unwrap_or_default().to_string();
            let rest: Vec<&str> = parts.collect();
            let req = if rest.is_empty() { "*".to_string() } else { rest.join(" ") };
            let version = semver::VersionReq::parse(&req).map_err(|e| {
                c.bad(
                    &format!("requires[{i}]"),
                    format!("= {r:?}: {e}; write \"name\" or \"name ^1.2\""),
                )
            })?;
            if rname.is_empty() {
                return Err(
                    c.bad(&format!("requires[{i}]"), "is empty; write \"name\" or \"name ^1.2\"")
                );
            }
            requires.push(Requirement { name: rname, version });
        }

        let d = RestartConfig::default();
        let r = raw.restart;
        let restart = RestartConfig {
            policy: r.policy.unwrap_or(d.policy),
            max_restarts: r.max_restarts.unwrap_or(d.max_restarts),
            within: c.positive_duration("restart.within", &r.within, d.within)?,
            backoff: c.duration("restart.backoff", &r.backoff, d.backoff)?,
            backoff_max: c.duration("restart.backoff_max", &r.backoff_max, d.backoff_max)?,
            reset_after: c.duration("restart.reset_after", &r.reset_after, d.reset_after)?,
        };
        if restart.backoff > restart.backoff_max {
            return Err(c.bad("restart.backoff", "is larger than restart.backoff_max"));
        }

        let d = Timeouts::default();
        let t = raw.timeouts;
        let timeouts = Timeouts {
            start: c.positive_duration("timeouts.start", &t.start, d.start)?,
            call: c.positive_duration("timeouts.call", &t.call, d.call)?,
            drain: c.duration("timeouts.drain", &t.drain, d.drain)?,
            shutdown: c.duration("timeouts.shutdown", &t.shutdown, d.shutdown)?,
            kill: c.duration("timeouts.kill", &t.kill, d.kill)?,
            heartbeat: c.duration("timeouts.heartbeat", &t.heartbeat, d.heartbeat)?,
            missed_heartbeats: t.missed_heartbeats.unwrap_or(d.missed_heartbeats).max(1),
            missed_deadlines: t.missed_deadlines.unwrap_or(d.missed_deadlines),
        };

        let l = raw.limits;
        let cpu_time = match &l.cpu_time {
            None => None,
            Some(_) => {
                let d = c.positive_duration("limits.cpu_time", &l.cpu_time, Duration::ZERO)?;
                if d < Duration::from_secs(1) {
                    return Err(c.bad(
                        "limits.cpu_time",
                        "must be at least \"1s\" (the kernel counts whole seconds)",
                    ));
                }
                Some(d)
            }
        };
        let cpu_quota = match &l.cpu_quota {
            None => None,
            Some(q) => {
                let pct = q.trim().strip_suffix('%').and_then(|n| n.trim().parse::<u32>().ok());
                match pct {
                    Some(p) if p > 0 => Some(p),
                    _ => return Err(c.bad("limits.cpu_quota", format!("= {q:?} is not a positive percentage such as \"50%\" (200% = two CPUs)"))),
                }
            }
        };
        let cpus = match l.cpus {
            None => None,
            Some(list) => {
                let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as i64;
                if list.is_empty() || list.iter().any(|cpu| !(0..1024).contains(cpu)) {
                    return Err(c.bad(
                        "limits.cpus",
                        format!("= {list:?} must list CPU numbers (this machine has 0..{n})"),
                    ));
                }
                Some(list.into_iter().map(|cpu| cpu as usize).collect())
            }
        };
        let limits = Limits {
            memory: match &l.memory {
                Some(toml::Value::String(s)) if s == "unlimited" => None,
                None => Some(DEFAULT_MEMORY),
                v => c.size("limits.memory", v)?,
            },
            address_space: c.size("limits.address_space", &l.address_space)?,
            cpu_time,
            cpu_quota,
            open_files: c.count("limits.open_files", l.open_files)?,
            processes: c.count("limits.processes", l.processes)?,
            file_size: c.size("limits.file_size", &l.file_size)?,
            cpus,
        };

        let s = raw.sandbox;
        let mut require = Vec::new();
        for word in s.require.unwrap_or_default() {
            match crate::sandbox::LayerKind::from_word(&word)
                .filter(|k| crate::sandbox::LayerKind::REQUIRABLE.contains(k))
            {
                Some(kind) => require.push(kind),
                None => {
                    let known: Vec<&str> =
                        crate::sandbox::LayerKind::REQUIRABLE.iter().map(|k| k.word()).collect();
                    return Err(c.bad(
                        "sandbox.require",
                        format!("names unknown layer {word:?}; known layers are {known:?}"),
                    ));
                }
            }
        }
        let sandbox = SandboxConfig {
            network: c.word("sandbox.network", s.network, Network::WORDS, Network::from_word)?,
            syscalls: c.word(
                "sandbox.syscalls",
                s.syscalls,
                SyscallProfile::WORDS,
                SyscallProfile::from_word,
            )?,
            filesystem: c.word(
                "sandbox.filesystem",
                s.filesystem,
                Filesystem::WORDS,
                Filesystem::from_word,
            )?,
            execve: s.execve.unwrap_or(false),
            user: s.user,
            group: s.group,
            read_paths: s.read_paths.unwrap_or_default(),
            write_paths: s.write_paths.unwrap_or_default(),
            require,
        };

        let config = serde_json::to_value(&raw.config)
            .map_err(|e| c.bad("config", format!("cannot be handed to the plugin as JSON: {e}")))?;
        let mut instances: Vec<Instance> = Vec::new();
        for (i, inst) in raw.instances.into_iter().enumerate() {
            let inst = Instance::new(inst.name, inst.config, inst.env)
                .map_err(|(key, problem)| c.bad(&format!("instances[{i}].{key}"), problem))?;
            if inst.name == name || instances.iter().any(|o| o.name == inst.name) {
                return Err(c.bad(
                    &format!("instances[{i}].name"),
                    format!("= {:?} is taken (by the plugin or another instance); give each instance its own name", inst.name),
                ));
            }
            instances.push(inst);
        }
        for key in raw.env.keys() {
            check_env_key(key).map_err(|e| c.bad(&format!("env.{key}"), e))?;
        }

        let build = match raw.build {
            None => None,
            Some(b) if b.command.is_empty() || b.command[0].is_empty() => {
                return Err(c.bad(
                    "build.command",
                    "must be a non-empty array, e.g. [\"cargo\", \"build\", \"--release\"]",
                ))
            }
            Some(b) => Some(BuildConfig {
                network: c.word("build.network", b.network, Network::WORDS, Network::from_word)?
                    == Network::Host,
                command: b.command,
            }),
        };
        let py = raw.python;
        let python = PythonConfig {
            interpreter: match py.interpreter {
                Some(i) if i.trim().is_empty() => {
                    return Err(c.bad("python.interpreter", "is empty; write e.g. \"python3\""))
                }
                Some(i) => i,
                None => PythonConfig::default().interpreter,
            },
            requirements: match py.requirements {
                Some(r) if r.is_absolute() || r.components().any(|p| p.as_os_str() == "..") => {
                    return Err(c.bad(
                        "python.requirements",
                        "must be a file inside the plugin folder, e.g. \"requirements.txt\"",
                    ))
                }
                Some(r) => r,
                None => PythonConfig::default().requirements,
            },
            pip_args: py.pip_args.unwrap_or_default(),
            network: c.word("python.network", py.network, Network::WORDS, Network::from_word)?
                == Network::Host,
            packaged: py.packaged.unwrap_or(false),
        };
        let listen = crate::serving::parse_listen(raw.listen).map_err(|(k, p)| c.bad(&k, p))?;
        let health = match raw.health {
            None => None,
            Some(h) => {
                let host = sandbox.network == Network::Host;
                let check = crate::serving::parse_check(&h, &listen, host)
                    .map_err(|(k, p)| c.bad(&k, p))?;
                let failures = match h.failures {
                    None => 3,
                    Some(n) if (1..=1000).contains(&n) => n as u32,
                    Some(n) => {
                        return Err(c.bad("health.failures", format!("= {n} must be 1 to 1000")))
                    }
                };
                let s = Duration::from_secs;
                Some(crate::serving::HealthConfig {
                    check,
                    interval: c.positive_duration("health.interval", &h.interval, s(5))?,
                    timeout: c.positive_duration("health.timeout", &h.timeout, s(2))?,
                    start_timeout: c.positive_duration(
                        "health.start_timeout",
                        &h.start_timeout,
                        s(60),
                    )?,
                    failures,
                })
            }
        };
        let calls = raw
            .calls
            .allow
            .iter()
            .map(|rule| {
                CallRule::parse(rule).map_err(|e| c.bad("calls.allow", format!("entry {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Manifest {
            calls,
            runtime,
            transport,
            shm,
            python,
            build,
            name,
            version,
            kind: raw.kind,
            api_version,
            entrypoint,
            entrypoint_sha256,
            description: raw.description,
            requires,
            restart,
            timeouts,
            limits,
            sandbox,
            env: raw.env,
            config,
            display_name: None,
            extra: BTreeMap::new(),
            instances,
            instance_of: None,
            listen,
            health,
        })
    }
}

/// The module `module` as importable from the plugin folder `dir`: as written, or with
/// leading parts dropped where a manifest wrote it from a package root above the folder
/// (`plugins.client_manager.plugin` in `plugins/client_manager/` is `plugin`).
fn resolve_module(dir: &Path, module: &str) -> Option<String> {
    let parts: Vec<&str> = module.split('.').collect();
    (0..parts.len()).map(|k| &parts[k..]).find_map(|rest| {
        let path = dir.join(rest.join("/"));
        let found = path.with_extension("py").is_file() || path.join("__init__.py").is_file();
        found.then(|| rest.join("."))
    })
}

/// A plugin ready to be loaded: its validated manifest and where it lives.
#[derive(Debug, Clone)]
pub struct PluginSpec {
    /// The manifest.
    pub manifest: Manifest,
    /// The plugin folder (the manifest's directory); the plugin's working directory.
    pub dir: PathBuf,
    /// The manifest file, for error messages.
    pub manifest_path: PathBuf,
}

impl PluginSpec {
    /// The plugins this spec runs: itself, or one spec per `[[instances]]` entry — each
    /// with the instance's name, its config laid over the plugin's, its env added — which
    /// share the plugin's folder, code and virtualenv. plugd's discovery runs them all; a
    /// host that loads a spec itself calls this to do the same.
    pub fn instances(self) -> Vec<PluginSpec> {
        if self.manifest.instances.is_empty() {
            return vec![self];
        }
        let base = self.manifest.name.clone();
        self.manifest
            .instances
            .iter()
            .map(|inst| {
                let mut spec = self.clone();
                let m = &mut spec.manifest;
                m.name = inst.name.clone();
                m.instance_of = Some(base.clone());
                m.instances = Vec::new();
                if let serde_json::Value::Object(cfg) = &mut m.config {
                    cfg.extend(inst.config.clone());
                }
                m.env.extend(inst.env.clone());
                spec
            })
            .collect()
    }

    /// A single-file plugin: `foo_plugin.py` dropped into a plugin folder is the plugin
    /// `foo` (defaults for the rest), serving the one class the file defines. The file is
    /// copied to `stage/foo/` and run from there, so the plugin's jail holds that copy,
    /// not the folder of plugins beside it; `manifest_path` is the file itself.
    pub fn single_file(file: &Path, stage: &Path) -> Result<PluginSpec, ManifestError> {
        let bad = |problem: String| ManifestError::Invalid {
            file: file.to_path_buf(),
            key: "file name".into(),
            problem,
        };
        let stem = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| s.ends_with("_plugin") && s.len() > "_plugin".len())
            .ok_or_else(|| bad("is not NAME_plugin.py".into()))?;
        let name = stem.trim_end_matches("_plugin").to_ascii_lowercase();
        check_name(&name).map_err(|e| bad(format!("gives the plugin name {e}")))?;
        let dir = stage.join(&name);
        let copy = dir.join(format!("{stem}.py"));
        let text = std::fs::read(file)
            .map_err(|source| ManifestError::Read { file: file.to_path_buf(), source })?;
        // Written only when it changed, so a reload sees the same staged file as before.
        if std::fs::read(&copy).ok().as_deref() != Some(&text[..]) {
            std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::write(&copy, &text))
                .map_err(|source| ManifestError::Read { file: copy.clone(), source })?;
        }
        let toml = format!(
            "name = \"{name}\"\nversion = \"0.1.0\"\napi_version = \"*\"\nruntime = \"python\"\nentrypoint = \"{stem}:Plugin\"\ndescription = \"single-file plugin {}\"\n",
            file.display().to_string().replace('\\', "/").replace('"', "'")
        );
        // The manifest it would have had (parsed as plugin.toml: the .py is no manifest).
        let mut manifest = Manifest::parse(&toml, &dir.join("plugin.toml"))?;
        // "*": the one class the module defines (the launcher finds it).
        manifest.entrypoint = Entrypoint::PyClass { module: stem, class: "*".into() };
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        Ok(PluginSpec { manifest, dir, manifest_path: file.to_path_buf() })
    }

    /// The name its virtualenv is kept under: the plugin's, for an instance of it.
    pub fn venv_name(&self) -> &str {
        self.manifest.instance_of.as_deref().unwrap_or(&self.manifest.name)
    }

    /// Reads and validates a manifest file, or the one in a plugin folder (`plugin.toml`,
    /// `plugin.yaml` or `plugin.json`; two is an error naming both).
    pub fn from_manifest(path: impl AsRef<Path>) -> Result<PluginSpec, ManifestError> {
        Self::from_manifest_with_defaults(path, &toml::Table::new())
    }

    /// Like [`PluginSpec::from_manifest`], with operator defaults (plugd.toml `[defaults]`).
    pub fn from_manifest_with_defaults(
        path: impl AsRef<Path>,
        defaults: &toml::Table,
    ) -> Result<PluginSpec, ManifestError> {
        let mut path = path.as_ref().to_path_buf();
        if path.is_dir() {
            path = crate::foreign::manifest_path(&path)?;
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ManifestError::Read { file: path.clone(), source })?;
        let manifest = Manifest::parse_with_defaults(&text, &path, defaults)?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        let mut spec = PluginSpec { manifest, dir, manifest_path: path };
        let packaged = spec.manifest.python.packaged;
        if let (Entrypoint::PyClass { module, .. }, false) =
            (&mut spec.manifest.entrypoint, packaged)
        {
            match resolve_module(&spec.dir, module) {
                Some(found) => *module = found,
                None => {
                    return Err(ManifestError::Invalid {
                        file: spec.manifest_path.clone(),
                        key: "entrypoint".into(),
                        problem: format!(
                            "names module {module:?}, but {} has no {}.py (nor {}/__init__.py); fix the module path (relative to the plugin folder)",
                            spec.dir.display(),
                            module.replace('.', "/"),
                            module.replace('.', "/"),
                        ),
                    })
                }
            }
        }
        let problem = match &spec.manifest.entrypoint {
            Entrypoint::Path(p) => check_executable(&spec.dir.join(p)).err(),
            Entrypoint::Script(p) if !spec.dir.join(p).is_file() => Some(format!(
                "= {:?} is not a file in {}; fix the path (relative to the plugin folder)",
                p.display().to_string(),
                spec.dir.display()
            )),
            _ => None,
        };
        if let Some(problem) = problem {
            return Err(ManifestError::Invalid {
                file: spec.manifest_path.clone(),
                key: "entrypoint".into(),
                problem,
            });
        }
        Ok(spec)
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.manifest.name
    }
}

/// Ok if `path` is an executable regular file; otherwise says what is wrong and what to do.
pub fn check_executable(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| {
        format!("= {:?} does not exist ({e}); build the plugin or fix the path (relative to the plugin folder)", path.display().to_string())
    })?;
    if !meta.is_file() {
        return Err(format!("= {:?} is not a file", path.display().to_string()));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(format!(
            "= {:?} is not executable; run chmod +x on it",
            path.display().to_string()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
name = "tick-strategy"
version = "1.2.0"
kind = "strategy"
api_version = "^1"
entrypoint = "tick-strategy"
"#;

    fn parse(extra: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse(&format!("{MIN}{extra}"), Path::new("/p/plugin.toml"))
    }

    fn err(extra: &str) -> String {
        parse(extra).unwrap_err().to_string()
    }

    #[test]
    fn minimal_manifest_gets_defaults() {
        let m = parse("").unwrap();
        assert_eq!(m.name, "tick-strategy");
        assert_eq!(m.kind, PluginKind::Strategy);
        assert_eq!(m.entrypoint, Entrypoint::Name("tick-strategy".into()));
        assert_eq!(m.restart, RestartConfig::default());
        assert_eq!(m.timeouts, Timeouts::default());
        assert_eq!(m.sandbox.network, Network::None);
    }

    #[test]
    fn full_manifest() {
        let m = parse(
            r#"
requires = ["feed", "risk ^1.2"]
[restart]
policy = "always"
max_restarts = 3
within = "10s"
backoff = "50ms"
[timeouts]
call = "2ms"
heartbeat = "200ms"
[limits]
memory = "256MiB"
cpu_time = "30s"
file_size = 1048576
cpus = [0]
[sandbox]
network = "host"
require = ["seccomp"]
[env]
MODE = "paper"
[config]
threshold = 0.5
symbols = ["BTC"]
"#,
        )
        .unwrap();
        assert_eq!(m.restart.policy, RestartPolicy::Always);
        assert_eq!(m.timeouts.call, Duration::from_millis(2));
        assert_eq!(m.limits.memory, Some(256 << 20));
        assert_eq!(m.limits.file_size, Some(1 << 20));
        assert_eq!(m.requires[1].name, "risk");
        assert!(m.requires[1].version.matches(&semver::Version::new(1, 3, 0)));
        assert_eq!(m.config["threshold"], 0.5);
        assert_eq!(m.env["MODE"], "paper");
    }

    #[test]
    fn errors_name_file_key_and_fix() {
        let e = err("colour = \"red\"\n");
        assert!(e.contains("/p/plugin.toml") && e.contains("unknown field `colour`"), "{e}");
        let e = err("[timeouts]\ncall = \"5\"\n");
        assert!(e.contains("`timeouts.call`") && e.contains("no unit"), "{e}");
        let e = err("[limits]\nmemory = -1\n");
        assert!(e.contains("`limits.memory`") && e.contains("impossible"), "{e}");
        let e = err("[limits]\nmemory = \"12 potatoes\"\n");
        assert!(e.contains("`limits.memory`") && e.contains("unknown unit"), "{e}");
        let e = err("[limits]\ncpu_time = \"0s\"\n");
        assert!(e.contains("`limits.cpu_time`"), "{e}");
        let e = err("[restart]\npolicy = \"sometimes\"\n");
        assert!(e.contains("unknown variant `sometimes`") && e.contains("on-failure"), "{e}");
        let e = err("[sandbox]\nrequire = [\"magic\"]\n");
        assert!(e.contains("`sandbox.require`") && e.contains("magic"), "{e}");
        let e = err("[env]\nPLUGD_FD = \"9\"\n");
        assert!(e.contains("`env.PLUGD_FD`") && e.contains("prefix"), "{e}");
        let e = err("[sandbox]\nnetwork = \"some\"\n");
        assert!(e.contains("`sandbox.network`"), "{e}");
    }

    #[test]
    fn operator_defaults_fill_what_the_manifest_leaves_out() {
        let defaults: toml::Table = toml::from_str(
            "[limits]\nmemory = \"64MiB\"\nfile_size = \"1MiB\"\n[timeouts]\ncall = \"1s\"\n",
        )
        .unwrap();
        let text = format!("{MIN}[limits]\nmemory = \"32MiB\"\n");
        let m = Manifest::parse_with_defaults(&text, Path::new("p.toml"), &defaults).unwrap();
        assert_eq!(m.limits.memory, Some(32 << 20), "the manifest wins");
        assert_eq!(m.limits.file_size, Some(1 << 20), "the default fills the gap");
        assert_eq!(m.timeouts.call, Duration::from_secs(1));
        let bad: toml::Table = toml::from_str("[limits]\nmemroy = 1\n").unwrap();
        let e =
            Manifest::parse_with_defaults(MIN, Path::new("p.toml"), &bad).unwrap_err().to_string();
        assert!(e.contains("[defaults]") && e.contains("memroy"), "{e}");
    }

    #[test]
    fn transport_is_a_stream_unless_the_manifest_asks_for_records() {
        let parse = |extra: &str, entry: &str| {
            let text = format!(
                "name = \"t\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = {entry}\n{extra}"
            );
            Manifest::parse(&text, Path::new("/p/plugin.toml"))
        };
        assert_eq!(parse("", "\"bin/t\"").unwrap().transport, Transport::Stream);
        let m =
            parse("[calls]\nallow = [\"paper-exchange.send_order\", \"feed.*\"]\n", "\"bin/t\"")
                .unwrap();
        assert!(m.calls[0].allows("paper-exchange", "send_order"));
        assert!(!m.calls[0].allows("paper-exchange", "cancel_all"));
        assert!(m.calls[1].allows("feed", "anything"));
        assert!(parse("", "\"bin/t\"").unwrap().calls.is_empty(), "deny by default");
        for bad in ["\"paper-exchange\"", "\"Bad Name.x\"", "\"p.\""] {
            let e =
                parse(&format!("[calls]\nallow = [{bad}]\n"), "\"bin/t\"").unwrap_err().to_string();
            assert!(e.contains("calls.allow"), "{e}");
        }
        assert_eq!(
            parse("transport = \"seqpacket\"\n", "\"bin/t\"").unwrap().transport,
            Transport::SeqPacket
        );
        let py = parse("transport = \"seqpacket\"\n", "\"main.py\"").unwrap();
        assert_eq!((py.runtime, py.transport), (Runtime::Python, Transport::SeqPacket));
        let e = parse("transport = \"udp\"\n", "\"bin/t\"").unwrap_err().to_string();
        assert!(e.contains("`transport`") && e.contains("plugin.toml"), "{e}");
        assert!(e.contains("\"stream\", \"seqpacket\" or \"shm\""), "{e}");
    }

    #[test]
    fn shm_takes_a_wait_and_a_ring_and_nothing_else() {
        use plugin_proto::shm::WaitStrategy;
        let m = parse("transport = \"shm\"\n").unwrap();
        assert_eq!((m.transport, m.shm), (Transport::Shm, ShmConfig::default()));
        let m = parse("transport = \"shm\"\n[shm]\nwait = \"spin\"\nring = \"64KiB\"\n").unwrap();
        assert_eq!(m.shm, ShmConfig { wait: WaitStrategy::Spin, ring: 64 << 10 });
        let e = parse("[shm]\nwait = \"spin\"\n").unwrap_err().to_string();
        assert!(e.contains("`shm`") && e.contains("transport = \"shm\""), "{e}");
        let e = parse("transport = \"shm\"\n[shm]\nwait = \"nap\"\n").unwrap_err().to_string();
        assert!(e.contains("`shm.wait`") && e.contains("spin-then-futex"), "{e}");
        let e = parse("transport = \"shm\"\n[shm]\nring = \"100KiB\"\n").unwrap_err().to_string();
        assert!(e.contains("`shm.ring`") && e.contains("power of two"), "{e}");
    }

    #[test]
    fn python_runtime_from_the_key_or_the_script_name() {
        let py = |entry: &str, extra: &str| {
            Manifest::parse(
                &format!("name = \"p\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = {entry}\n{extra}"),
                Path::new("/x/plugin.toml"),
            )
        };
        let m = py("\"main.py\"", "").unwrap();
        assert_eq!(
            (m.runtime, m.entrypoint),
            (Runtime::Python, Entrypoint::Script("main.py".into()))
        );
        assert_eq!(m.python, PythonConfig::default());
        let m =
            py("\"run\"", "runtime = \"python\"\n[python]\npip_args = [\"--no-index\"]\n").unwrap();
        assert_eq!(
            (m.runtime, m.python.pip_args),
            (Runtime::Python, vec!["--no-index".to_string()])
        );
        assert_eq!(py("\"bin/tool\"", "").unwrap().runtime, Runtime::Native);
        let e = py("\"main.py\"", "runtime = \"ruby\"\n").unwrap_err().to_string();
        assert!(e.contains("`runtime`") && e.contains("\"native\" or \"python\""), "{e}");
        let e = py("[\"python3\", \"main.py\"]", "runtime = \"python\"\n").unwrap_err().to_string();
        assert!(e.contains("script's path"), "{e}");
        let e = py("\"../main.py\"", "").unwrap_err().to_string();
        assert!(e.contains("inside the plugin folder"), "{e}");
        let e = py("\"main.py\"", "[python]\nrequirements = \"/etc/passwd\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`python.requirements`"), "{e}");
    }

    #[test]
    fn bad_versions_and_entrypoints() {
        let bad = |text: &str| Manifest::parse(text, Path::new("m.toml")).unwrap_err().to_string();
        let e = bad("name=\"a\"\nversion=\"1.x\"\napi_version=\"^1\"\nentrypoint=\"a\"");
        assert!(e.contains("`version`") && e.contains("semver"), "{e}");
        let e = bad("name=\"a\"\nversion=\"1.0.0\"\napi_version=\"^2\"\nentrypoint=\"a\"");
        assert!(e.contains("`api_version`") && e.contains("plugin API 1.0.0"), "{e}");
        let e = bad("name=\"a\"\nversion=\"1.0.0\"\napi_version=\"^1\"\nentrypoint=[]");
        assert!(e.contains("`entrypoint`"), "{e}");
        let e = bad("name=\"A B\"\nversion=\"1.0.0\"\napi_version=\"^1\"\nentrypoint=\"a\"");
        assert!(e.contains("`name`"), "{e}");
        let e = bad("name=\"a\"\nversion=\"1.0.0\"\napi_version=\"^1\"");
        assert!(e.contains("missing field `entrypoint`"), "{e}");
    }

    #[test]
    fn missing_or_non_executable_entrypoint_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let write = |entry: &str| {
            std::fs::write(
                dir.path().join("plugin.toml"),
                format!(
                    "name=\"a\"\nversion=\"1.0.0\"\napi_version=\"^1\"\nentrypoint=\"{entry}\""
                ),
            )
            .unwrap();
        };
        write("bin/a");
        let e = PluginSpec::from_manifest(dir.path()).unwrap_err().to_string();
        assert!(e.contains("`entrypoint`") && e.contains("does not exist"), "{e}");
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        std::fs::write(dir.path().join("bin/a"), "#!/bin/sh\n").unwrap();
        let e = PluginSpec::from_manifest(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not executable") && e.contains("chmod"), "{e}");
        std::fs::set_permissions(dir.path().join("bin/a"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        assert!(PluginSpec::from_manifest(dir.path()).is_ok());
        let e = PluginSpec::from_manifest(dir.path().join("nope.toml")).unwrap_err().to_string();
        assert!(e.contains("cannot read plugin manifest"), "{e}");
    }

    #[test]
    fn instances_run_one_plugin_under_several_names_with_their_own_config() {
        let m = parse(
            "[config]\nsymbol = \"BTC\"\nratio = 0.5\n[[instances]]\nname = \"hedge-btc\"\n[[instances]]\nname = \"hedge-eth\"\nconfig = { symbol = \"ETH\" }\nenv = { DESK = \"eu\" }\n",
        )
        .unwrap();
        assert_eq!(m.instances.len(), 2);
        let spec =
            PluginSpec { manifest: m, dir: "/p".into(), manifest_path: "/p/plugin.toml".into() };
        let all = spec.instances();
        let names: Vec<&str> = all.iter().map(|s| s.name()).collect();
        assert_eq!(names, ["hedge-btc", "hedge-eth"]);
        assert_eq!(all[1].manifest.config, serde_json::json!({"symbol": "ETH", "ratio": 0.5}));
        assert_eq!(all[0].manifest.config["symbol"], "BTC");
        assert_eq!(all[1].manifest.env.get("DESK").map(String::as_str), Some("eu"));
        assert_eq!(all[1].venv_name(), "tick-strategy", "instances share the plugin's venv");
        assert!(all.iter().all(|s| s.manifest.instances.is_empty()));

        let e = parse("[[instances]]\nname = \"a\"\n[[instances]]\nname = \"a\"\n").unwrap_err();
        assert!(
            e.to_string().contains("instances[1].name") && e.to_string().contains("taken"),
            "{e}"
        );
        let e = parse("[[instances]]\nname = \"Bad Name\"\n").unwrap_err();
        assert!(e.to_string().contains("instances[0].name"), "{e}");
        // An instance's env obeys the plugin's rule: plugd's own variables are not its.
        let e = parse("[[instances]]\nname = \"a\"\nenv = { PLUGD_FD = \"9\" }\n").unwrap_err();
        assert!(
            e.to_string().contains("instances[0].env.PLUGD_FD")
                && e.to_string().contains("PLUGD_ prefix"),
            "{e}"
        );
        // plugd.toml's instances go through the same check.
        let e = Instance::new(
            "b".into(),
            toml::Table::new(),
            [("PLUGD_STATE_DIR".to_string(), "/".to_string())].into(),
        )
        .unwrap_err();
        assert_eq!(e.0, "env.PLUGD_STATE_DIR");
    }

    #[test]
    fn listen_and_health_are_checked_key_by_key() {
        use crate::serving::{HealthCheck, ListenAddr};
        let m = parse(
            "[listen]\ntcp = [\"127.0.0.1:8080\"]\nunix = [\"/run/x.sock\"]\n[health]\nhttp = \"/health\"\ninterval = \"2s\"\n",
        )
        .unwrap();
        assert_eq!(m.listen[0], ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(m.listen[1], ListenAddr::Unix("/run/x.sock".into()));
        let h = m.health.unwrap();
        assert_eq!(h.check, HealthCheck::Http { addr: None, path: "/health".into() });
        assert_eq!((h.interval.as_secs(), h.timeout.as_secs(), h.failures), (2, 2, 3));
        // A method check needs no socket; an address check needs a way to the plugin.
        let m = parse("[health]\nmethod = \"ping\"\n").unwrap();
        assert_eq!(m.health.unwrap().check, HealthCheck::Method("ping".into()));
        let e = err("[health]\ntcp = \"127.0.0.1:80\"\n");
        assert!(e.contains("`health.tcp`") && e.contains("add [listen]"), "{e}");
        let m =
            parse("[sandbox]\nnetwork = \"host\"\n[health]\nhttp = \"http://127.0.0.1:80/up\"\n")
                .unwrap();
        let addr = Some("127.0.0.1:80".parse().unwrap());
        assert_eq!(m.health.unwrap().check, HealthCheck::Http { addr, path: "/up".into() });
        for (bad, key) in [
            ("[listen]\ntcp = [\"localhost\"]\n", "listen.tcp[0]"),
            ("[listen]\ntcp = [\"127.0.0.1:0\"]\n", "listen.tcp[0]"),
            ("[listen]\nunix = [\"rel.sock\"]\n", "listen.unix[0]"),
            ("[listen]\ntcp = [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n", "listen"),
            ("[health]\ninterval = \"1s\"\n", "health"),
            ("[health]\nmethod = \"a\"\nhttp = \"/x\"\n", "health"),
            ("[health]\nmethod = \"a\"\nfailures = 0\n", "health.failures"),
            ("[health]\nmethod = \"a\"\ntimeout = \"0s\"\n", "health.timeout"),
            ("[listen]\ntcp = [\"127.0.0.1:1\"]\n[health]\nhttp = \"ftp://x\"\n", "health.http"),
            ("[health]\nmethod = \"a\"\nport = 1\n", "unknown field `port`"),
        ] {
            let e = err(bad);
            assert!(e.contains(&format!("`{key}`")) || e.contains(key), "{bad}: {e}");
        }
    }
}
