//! [`Supervisor`]: load, call, stop and unload plugins.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use parking_lot::Mutex;

use arc_swap::ArcSwapOption;
use plugin_proto::DEFAULT_MAX_FRAME;
use tokio::sync::{mpsc, oneshot};

use crate::exit::ExitReason;
use crate::lifecycle::State;
use crate::logs::{LogRing, LogSource};
use crate::manifest::{ManifestError, PluginSpec};
use crate::router::{LiveStatus, PluginHandle, PluginStatus, Shared};
use crate::sandbox::HostFacts;
use crate::slot::{FrozenPlugin, Slot, SlotCommand};
use crate::spawn::Spawner;

/// Settings of a supervisor (per host, not per plugin).
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Where bare entrypoint names are looked up after the plugin folder.
    /// Default: the directory of the running executable (where cargo puts sibling binaries).
    pub bin_dirs: Vec<PathBuf>,
    /// Largest frame either side may send (at most 16 MiB).
    pub max_frame: u32,
    /// Where each plugin gets its private writable folder (`<state_dir>/<name>`).
    pub state_dir: PathBuf,
    /// Builds a Python plugin's virtualenv before it starts (`plugd_install::python::Venvs`
    /// runs pip in the build jail). Without one, a Python plugin runs only if its venv was
    /// already built (by `plugctl install` or a plugd sharing this state folder).
    pub prepare: Option<Arc<dyn PrepareRuntime>>,
}

/// Gets a plugin's runtime ready before each start, on a blocking thread (it may take
/// minutes): for a Python plugin, its virtualenv. What it returns is logged as the
/// plugin's own lines; an error fails the start with that text.
pub trait PrepareRuntime: Send + Sync + std::fmt::Debug {
    /// Builds or checks the runtime of `spec`; `state_root` is the supervisor's state folder.
    fn prepare(
        &self,
        spec: &PluginSpec,
        state_root: &std::path::Path,
        host: &HostFacts,
    ) -> Result<Vec<String>, String>;
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        let bin_dirs = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.to_path_buf()))
            .into_iter()
            .collect();
        let state_dir =
            std::env::var_os("PLUGD_STATE_DIR").map(PathBuf::from).unwrap_or_else(|| {
                std::env::temp_dir().join(format!("plugd-{}", nix::unistd::geteuid())).join("state")
            });
        Self { bin_dirs, max_frame: DEFAULT_MAX_FRAME, state_dir, prepare: None }
    }
}

/// What can go wrong when managing plugins.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The manifest is invalid.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A plugin of that name is already loaded.
    #[error("plugin {name} is already loaded; unload it first or use another name")]
    AlreadyLoaded {
        /// The name.
        name: String,
    },
    /// No plugin of that name is loaded.
    #[error("no plugin named {name} is loaded (loaded: {loaded})")]
    UnknownPlugin {
        /// The name asked for.
        name: String,
        /// The names that are loaded, comma-separated.
        loaded: String,
    },
    /// The first start of the plugin failed.
    #[error("plugin {name} ({manifest}) failed to start: {reason}{}", tail_text(.log_tail))]
    StartFailed {
        /// The plugin.
        name: String,
        /// Its manifest file.
        manifest: PathBuf,
        /// Why.
        reason: ExitReason,
        /// Its last lines of output, which usually say why.
        log_tail: Vec<String>,
    },
    /// A hot update did not happen; the old instance is still serving.
    #[error("update of plugin {name} failed, the running version keeps serving: {reason}")]
    UpdateFailed {
        /// The plugin.
        name: String,
        /// Why.
        reason: String,
    },
    /// The supervisor could not start its spawner thread.
    #[error("cannot start the spawner thread: {0}")]
    Spawner(std::io::Error),
    /// The plugin's task is gone (the runtime is shutting down).
    #[error("plugin {name} is no longer supervised (is the runtime shutting down?)")]
    Gone {
        /// The plugin.
        name: String,
    },
}

fn tail_text(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!("\n  last output:\n    {}", lines.join("\n    "))
    }
}

struct Loaded {
    handle: PluginHandle,
    commands: mpsc::UnboundedSender<SlotCommand>,
    manifest: PathBuf,
}

/// Runs plugins as supervised child processes. Dropping it kills every plugin it started.
pub struct Supervisor {
    config: SupervisorConfig,
    spawner: Arc<Spawner>,
    host: Arc<HostFacts>,
    /// Loaded plugins in load order (shutdown goes in reverse); shared (weakly) with the
    /// `plugd.call` host method, which finds the plugin a plugin calls here.
    plugins: Arc<Mutex<Vec<Loaded>>>,
    /// Methods plugins may call (protocol version 2 host calls).
    host_methods: Arc<crate::host::HostMethods>,
}

impl Supervisor {
    /// A supervisor with no plugins. Starts the spawner thread.
    pub fn new(config: SupervisorConfig) -> Result<Supervisor, SupervisorError> {
        let spawner = Spawner::start().map_err(SupervisorError::Spawner)?;
        Ok(Supervisor::with_spawner(config, spawner))
    }

    /// A supervisor whose plugins are forked by `spawner` (e.g. one running on the main
    /// thread, as plugd does so that in-place upgrades keep every plugin's parent).
    pub fn with_spawner(config: SupervisorConfig, spawner: Spawner) -> Supervisor {
        let spawner = Arc::new(spawner);
        let host = Arc::new(HostFacts::detect());
        if let Err(why) = &host.cgroup {
            tracing::info!("cgroup layer unavailable: {why}");
        }
        let plugins: Arc<Mutex<Vec<Loaded>>> = Default::default();
        let host_methods = Arc::new(crate::host::HostMethods::default());
        let directory = Arc::downgrade(&plugins);
        let dir = directory.clone();
        host_methods.add_async(
            plugin_proto::PLUGIN_CALL,
            Arc::new(move |req| Box::pin(plugin_call(dir.clone(), req))),
        );
        let dir = directory.clone();
        host_methods.add(
            plugin_proto::PLUGD_STATUS,
            crate::host::typed(plugin_proto::PLUGD_STATUS, move |call, (): ()| {
                find_plugin(&dir, call.plugin).map(|h| own_status(h.status()))
            }),
        );
        host_methods.add(
            plugin_proto::PLUGD_LOG,
            crate::host::typed(
                plugin_proto::PLUGD_LOG,
                move |call, rec: plugin_proto::LogRecord| {
                    let h = find_plugin(&directory, call.plugin)?;
                    h.shared.ring.push_record(call.plugin, rec).map_err(|e| {
                        format!("{}: plugin {}: {e}", plugin_proto::PLUGD_LOG, call.plugin)
                    })
                },
            ),
        );
        Supervisor { config, spawner, host, plugins, host_methods }
    }

    /// [`Supervisor::host_method`] for a handler that awaits (another plugin, a database):
    /// it runs as a task of its own, so the plugin's socket is not held meanwhile. On an
    /// engine thread waiting in `call_blocking` it still runs before the wait goes on.
    pub fn host_method_async<F, Fut>(&self, method: &str, handler: F)
    where
        F: Fn(crate::host::HostRequest) -> Fut + Send + Sync + 'static,
        Fut:
            std::future::Future<Output = Result<crate::Payload, crate::CallError>> + Send + 'static,
    {
        self.host_methods.add_async(method, Arc::new(move |req| Box::pin(handler(req))));
    }

    /// Offers `method` to every plugin of this supervisor (protocol version 2): a plugin's
    /// `ctx.call("send_order", &order)` runs `handler` with the argument decoded from
    /// bincode or JSON, whichever it sent, and answers in the same codec. An error becomes
    /// a `Failed` reply, a panic a `Panicked` one. The handler runs on the thread that reads
    /// that plugin's socket — inline on an engine thread waiting in `call_blocking` — so it
    /// must be quick. Registering a name again replaces its handler, for plugins already
    /// running too.
    pub fn host_method<A, R, E, F>(&self, method: &str, handler: F)
    where
        A: serde::de::DeserializeOwned,
        R: serde::Serialize,
        E: std::fmt::Display,
        F: Fn(&crate::HostCall<'_>, A) -> Result<R, E> + Send + Sync + 'static,
    {
        self.host_methods.add(method, crate::host::typed(method, handler));
    }

    /// [`Supervisor::host_method`] with the payload as sent, answering a payload of its own.
    pub fn host_method_raw<F>(&self, method: &str, handler: F)
    where
        F: Fn(&crate::HostCall<'_>, &crate::Payload) -> Result<crate::Payload, crate::CallError>
            + Send
            + Sync
            + 'static,
    {
        self.host_methods.add(method, Arc::new(handler));
    }

    fn plugins(&self) -> parking_lot::MutexGuard<'_, Vec<Loaded>> {
        self.plugins.lock()
    }

    fn unknown(&self, name: &str) -> SupervisorError {
        let loaded = self.plugins().iter().map(|l| l.handle.name().to_string()).collect::<Vec<_>>();
        SupervisorError::UnknownPlugin { name: name.into(), loaded: loaded.join(", ") }
    }

    fn commands(&self, name: &str) -> Result<mpsc::UnboundedSender<SlotCommand>, SupervisorError> {
        let found =
            self.plugins().iter().find(|l| l.handle.name() == name).map(|l| l.commands.clone());
        // The lock is released above: `unknown` takes it again.
        found.ok_or_else(|| self.unknown(name))
    }

    /// What this machine offers the sandbox (root, cgroup delegation, the uid range).
    pub fn host(&self) -> &Arc<HostFacts> {
        &self.host
    }

    /// Where each plugin gets its state folder, and Python plugins their venvs (`.venv/`).
    pub fn state_root(&self) -> &std::path::Path {
        &self.config.state_dir
    }

    /// Starts a plugin and waits until it is Ready. If its first start fails, it is not kept.
    pub async fn load(&self, spec: PluginSpec) -> Result<PluginHandle, SupervisorError> {
        self.insert(spec, None, true).await
    }

    /// Loads a plugin without starting it (state `stopped`; `start` runs it), e.g. one the
    /// operator had stopped before an in-place upgrade.
    pub async fn load_stopped(&self, spec: PluginSpec) -> Result<PluginHandle, SupervisorError> {
        self.insert(spec, None, false).await
    }

    /// Takes over a plugin process handed over by a predecessor (see [`Supervisor::freeze`]):
    /// no new process, no handshake; calls are routed to it as soon as it is attached.
    pub async fn adopt(
        &self,
        spec: PluginSpec,
        frozen: FrozenPlugin,
    ) -> Result<PluginHandle, SupervisorError> {
        self.insert(spec, Some(frozen), true).await
    }

    /// Hands every Ready plugin over for an in-place upgrade: in-flight calls finish, routing
    /// stops, and each live process is returned (not stopped). Plugins that are not Ready stay
    /// here and are reported with the reason.
    pub async fn freeze(&self) -> Vec<(String, Result<FrozenPlugin, String>)> {
        let all: Vec<(String, mpsc::UnboundedSender<SlotCommand>)> = self
            .plugins()
            .iter()
            .map(|l| (l.handle.name().to_string(), l.commands.clone()))
            .collect();
        let mut out = Vec::new();
        for (name, commands) in all {
            let (reply, wait) = oneshot::channel();
            let result = match commands.send(SlotCommand::Freeze(reply)) {
                Ok(()) => wait.await.unwrap_or_else(|_| Err("the plugin's task ended".into())),
                Err(_) => Err("the plugin's task ended".into()),
            };
            if result.is_ok() {
                self.plugins().retain(|l| l.handle.name() != name);
            }
            out.push((name, result));
        }
        out
    }

    /// Replaces this process's image (in-place upgrade) from the thread that forked the
    /// plugins, so their parent-death signal does not fire. Returns only on failure.
    pub async fn exec(&self, req: crate::spawn::ExecRequest) -> std::io::Error {
        self.spawner.exec(req).await
    }

    async fn insert(
        &self,
        spec: PluginSpec,
        adopt: Option<FrozenPlugin>,
        start: bool,
    ) -> Result<PluginHandle, SupervisorError> {
        let m = &spec.manifest;
        let name = m.name.clone();
        let shared = Arc::new(Shared {
            name: name.clone(),
            kind: m.kind,
            default_deadline: m.timeouts.call,
            route: ArcSwapOption::empty(),
            route_changes: Default::default(),
            route_changed: Default::default(),
            route_moved: Default::default(),
            calls_ok: AtomicU64::new(0),
            calls_err: AtomicU64::new(0),
            latency: Default::default(),
            engine: Default::default(),
            live: Mutex::new(LiveStatus {
                state: State::Stopped,
                pid: None,
                restarts: 0,
                last_exit: None,
                ready_since: None,
                sdk: None,
                sandbox: Default::default(),
                version: m.version.to_string(),
                updating_to: None,
                exits: Default::default(),
                health: None,
                methods: Vec::new(),
            }),
            ring: LogRing::default(),
            calls: parking_lot::RwLock::new(m.calls.clone()),
        });
        let handle = PluginHandle { shared: shared.clone() };
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut plugins = self.plugins();
            if plugins.iter().any(|l| l.handle.name() == name) {
                return Err(SupervisorError::AlreadyLoaded { name });
            }
            plugins.push(Loaded {
                handle: handle.clone(),
                commands: tx.clone(),
                manifest: spec.manifest_path.clone(),
            });
        }
        let manifest = spec.manifest_path.clone();
        let slot = Slot {
            spec,
            shared,
            spawner: self.spawner.clone(),
            bin_dirs: self.config.bin_dirs.clone(),
            max_frame: self.config.max_frame,
            state_root: self.config.state_dir.clone(),
            host: self.host.clone(),
            prepare: self.config.prepare.clone(),
            host_methods: self.host_methods.clone(),
            listeners: Default::default(),
        };
        if let Some(f) = &adopt {
            handle.shared.live.lock().sandbox = f.sandbox.clone();
        }
        tokio::spawn(slot.run(rx, adopt));
        if !start {
            return Ok(handle);
        }
        let (reply, wait) = oneshot::channel();
        let _ = tx.send(SlotCommand::Start(reply));
        let outcome = wait
            .await
            .unwrap_or(Err(ExitReason::SpawnFailed { detail: "supervisor task ended".into() }));
        match outcome {
            Ok(()) => Ok(handle),
            Err(reason) => {
                let _ = self.unload(&name).await;
                let log_tail = handle
                    .logs(6)
                    .into_iter()
                    .filter(|l| l.source != LogSource::Supervisor)
                    .map(|l| l.text)
                    .collect();
                Err(SupervisorError::StartFailed { name, manifest, reason, log_tail })
            }
        }
    }

    /// The handle of a loaded plugin.
    pub fn get(&self, name: &str) -> Option<PluginHandle> {
        self.plugins().iter().find(|l| l.handle.name() == name).map(|l| l.handle.clone())
    }

    /// Status of every loaded plugin, in load order.
    pub fn status(&self) -> Vec<PluginStatus> {
        self.plugins().iter().map(|l| l.handle.status()).collect()
    }

    /// The manifest file a loaded plugin came from.
    pub fn manifest_path(&self, name: &str) -> Option<PathBuf> {
        self.plugins().iter().find(|l| l.handle.name() == name).map(|l| l.manifest.clone())
    }

    /// Gracefully stops a plugin (drain, Shutdown, TERM, KILL) but keeps it loaded.
    pub async fn stop(&self, name: &str) -> Result<PluginStatus, SupervisorError> {
        let commands = self.commands(name)?;
        let (reply, wait) = oneshot::channel();
        commands
            .send(SlotCommand::Stop(reply))
            .map_err(|_| SupervisorError::Gone { name: name.into() })?;
        wait.await.map_err(|_| SupervisorError::Gone { name: name.into() })?;
        self.get(name).map(|h| h.status()).ok_or_else(|| self.unknown(name))
    }

    /// Starts a loaded plugin that is stopped, exited or failed, and waits until it is Ready.
    pub async fn start(&self, name: &str) -> Result<PluginStatus, SupervisorError> {
        let commands = self.commands(name)?;
        let (reply, wait) = oneshot::channel();
        commands
            .send(SlotCommand::Start(reply))
            .map_err(|_| SupervisorError::Gone { name: name.into() })?;
        let outcome = wait.await.map_err(|_| SupervisorError::Gone { name: name.into() })?;
        let handle = self.get(name).ok_or_else(|| self.unknown(name))?;
        match outcome {
            Ok(()) => Ok(handle.status()),
            Err(reason) => Err(SupervisorError::StartFailed {
                name: name.into(),
                manifest: self.manifest_path(name).unwrap_or_default(),
                reason,
                log_tail: handle.logs(6).into_iter().map(|l| l.text).collect(),
            }),
        }
    }

    /// Hot update: starts `spec` beside the running instance, waits until it is Ready,
    /// switches routing to it, lets the old instance finish its in-flight calls and shut
    /// down (its `State` is handed to the new one before the new one serves a call). No call
    /// is lost or refused meanwhile. If the new instance does not get Ready, the old one
    /// keeps serving and the error says why.
    pub async fn update(&self, spec: PluginSpec) -> Result<PluginStatus, SupervisorError> {
        let name = spec.name().to_string();
        let new_manifest = spec.manifest_path.clone();
        let commands = self.commands(&name)?;
        let (reply, wait) = oneshot::channel();
        commands
            .send(SlotCommand::Update(Box::new(spec), reply))
            .map_err(|_| SupervisorError::Gone { name: name.clone() })?;
        match wait.await.map_err(|_| SupervisorError::Gone { name: name.clone() })? {
            Ok(()) => {
                if let Some(l) = self.plugins().iter_mut().find(|l| l.handle.name() == name) {
                    l.manifest = new_manifest;
                }
                self.get(&name).map(|h| h.status()).ok_or_else(|| self.unknown(&name))
            }
            Err(reason) => Err(SupervisorError::UpdateFailed { name, reason }),
        }
    }

    /// Stops and starts a plugin.
    pub async fn restart(&self, name: &str) -> Result<PluginStatus, SupervisorError> {
        self.stop(name).await?;
        self.start(name).await
    }

    /// Gracefully stops a plugin and forgets it. Returns its final status.
    pub async fn unload(&self, name: &str) -> Result<PluginStatus, SupervisorError> {
        let status = self.stop(name).await?;
        self.plugins().retain(|l| l.handle.name() != name);
        Ok(status)
    }

    /// Unloads every plugin, in reverse load order.
    pub async fn shutdown(&self) {
        let names: Vec<String> =
            self.plugins().iter().rev().map(|l| l.handle.name().to_string()).collect();
        for name in names {
            let _ = self.unload(&name).await;
        }
    }
}

/// The loaded plugin called `name`, through the directory the host methods share.
fn find_plugin(
    directory: &std::sync::Weak<Mutex<Vec<Loaded>>>,
    name: &str,
) -> Result<PluginHandle, String> {
    let plugins = directory.upgrade().ok_or("the supervisor is shutting down")?;
    let plugins = plugins.lock();
    let found = plugins.iter().find(|l| l.handle.name() == name).map(|l| l.handle.clone());
    found.ok_or_else(|| format!("plugin {name} is not loaded in this supervisor"))
}

/// `plugd.status`: what a plugin may know of itself (nothing of other plugins).
fn own_status(st: PluginStatus) -> plugin_proto::OwnStatus {
    plugin_proto::OwnStatus {
        name: st.name,
        version: st.version,
        state: st.state.to_string(),
        pid: st.pid,
        restarts: st.restarts,
        last_exit: st.last_exit.map(|e| e.to_string()),
        uptime_ms: st.uptime_ms,
        calls_ok: st.calls_ok,
        calls_err: st.calls_err,
        sandbox: st.sandbox,
        sandbox_unavailable: st.sandbox_unavailable,
    }
}

/// `plugd.call`: a plugin calls a method of another plugin, if its manifest's
/// `[calls] allow` lists it; with no more time than the caller gave the host call (so a
/// cycle of calls ends at the first deadline, never in a hang).
async fn plugin_call(
    directory: std::sync::Weak<Mutex<Vec<Loaded>>>,
    req: crate::host::HostRequest,
) -> Result<crate::Payload, crate::CallError> {
    use crate::{CallError, Deadline};
    use plugin_proto::{ErrorCode, PluginCall};
    let call: PluginCall = req.payload.decode().map_err(|e| {
        CallError::new(
            ErrorCode::BadPayload,
            format!("{} takes {{plugin, method, payload}}: {e}", plugin_proto::PLUGIN_CALL),
        )
    })?;
    let caller = find_plugin(&directory, &req.plugin).ok();
    let allowed = caller.as_ref().is_some_and(|c| {
        c.shared.calls.read().iter().any(|r| r.allows(&call.plugin, &call.method))
    });
    if !allowed {
        return Err(CallError::new(
            ErrorCode::Denied,
            format!(
                "plugin {} may not call {}.{}: add \"{}.{}\" (or \"{}.*\") to [calls] allow in its plugin.toml",
                req.plugin, call.plugin, call.method, call.plugin, call.method, call.plugin
            ),
        ));
    }
    let target = find_plugin(&directory, &call.plugin).map_err(|why| {
        CallError::new(
            ErrorCode::Unavailable,
            format!("plugin {} called {}.{}: {why}", req.plugin, call.plugin, call.method),
        )
    })?;
    let deadline = match req.deadline {
        Some(d) => Deadline::At(tokio::time::Instant::from_std(d)),
        None => Deadline::Default,
    };
    target.call_raw(&call.method, call.payload, deadline).await
}
