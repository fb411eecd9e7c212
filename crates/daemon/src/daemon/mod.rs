//! The `plugd` daemon: discovery, control socket, signals, systemd notification.
//!
//! [`Daemon`] wraps a [`Supervisor`] with what an operator needs: plugins
//! found in configured folders and started in dependency order, a persisted
//! enabled/disabled state, reload of the difference on SIGHUP, a graceful
//! stop of everything (reverse order) on SIGTERM/SIGINT, and the JSON-lines
//! control socket `plugctl` talks to. [`run`] is the whole daemon main loop.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use interprocess::local_socket::tokio::prelude::*;
use interprocess::local_socket::{GenericFilePath, ListenerOptions};
use interprocess::os::unix::local_socket::ListenerOptionsExt;
use plugin_proto::{ErrorCode, Payload, PayloadCodec};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::DaemonConfig;
use crate::control::{ApiError, LatencyView, StatusEntry};
use crate::control::{Reply, Request};
use crate::discovery::{discover, fingerprint};
use crate::manifest::PluginSpec;
use crate::notify::Notifier;
use crate::router::Deadline;
use crate::sandbox::SandboxReport;
use crate::spawn::{entrypoint_program, ExecRequest};
use supervisor::Frozen;
use supervisor::FrozenPlugin;
use supervisor::{Supervisor, SupervisorConfig};

/// The control socket listener (a Unix domain socket; its descriptor survives an upgrade).
type Listener = interprocess::os::unix::uds_local_socket::tokio::Listener;

mod book;
mod conns;
mod installs;
mod upgrade;

use book::{Book, BookFuture, Known, Ops};

use upgrade::{inherited, thaw, upgrade, Handover, HandoverPlugin, UPGRADE_ENV};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another plugd already answers on the socket.
    #[error("another plugd is already running on {0}; stop it or set a different `socket` in the config")]
    AlreadyRunning(PathBuf),
    /// The control socket could not be created.
    #[error("cannot create the control socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A signal handler (SIGTERM, SIGINT, SIGHUP, SIGUSR2) could not be installed.
    #[error("cannot handle {signal}: {source}; plugd needs it to stop, reload and upgrade")]
    Signal {
        /// The signal.
        signal: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// `--strict` and discovery found problems.
    #[error("refusing to start (--strict) because of {0} problem(s) listed above")]
    Strict(usize),
    /// The supervisor could not start.
    #[error(transparent)]
    Supervisor(#[from] supervisor::SupervisorError),
    /// The HTTP admin API could not start (address, token).
    #[error("{0}")]
    Http(String),
    /// The task that owns the plugin list could not run the start (plugd is stopping).
    #[error("cannot start the plugins: {0}")]
    Book(String),
}

/// The daemon's state beside the supervisor.
pub struct Daemon {
    sup: Supervisor,
    /// The plugin book and the one task that writes it (see [`book`]).
    ops: Ops,
    /// `<state>`: fixed at start (a reload keeps it).
    state_dir: PathBuf,
    bin_dirs: Vec<PathBuf>,
    /// How many in-place upgrades this daemon's pid has been through.
    generation: std::sync::atomic::AtomicU64,
    /// Install jobs (kept under `<state>/jobs`).
    jobs: crate::jobs::Jobs,
    /// This daemon, for spawning background jobs and book jobs (set by `run`).
    me: std::sync::OnceLock<std::sync::Weak<Daemon>>,
}

/// What a reload changed.
#[derive(Debug, Default, serde::Serialize)]
pub struct ReloadReport {
    /// Plugins started because they are new.
    pub added: Vec<String>,
    /// Plugins stopped because their folder is gone.
    pub removed: Vec<String>,
    /// Running plugins hot-updated because their manifest or binary changed.
    pub updated: Vec<String>,
    /// Plugins that were not running, started again with their changed manifest or binary.
    pub restarted: Vec<String>,
    /// Plugins left untouched.
    pub unchanged: Vec<String>,
    /// Discovery problems.
    pub problems: Vec<String>,
    /// Plugins whose virtualenvs were removed because no plugin folder has them any more.
    pub venvs_removed: Vec<String>,
}

impl Daemon {
    /// Builds the daemon (starts nothing yet); its plugins are forked by `spawner`.
    pub fn new(
        config: DaemonConfig,
        spawner: crate::spawn::Spawner,
    ) -> Result<Daemon, DaemonError> {
        let sup_config = SupervisorConfig {
            state_dir: config.state_dir.join("plugins"),
            prepare: Some(std::sync::Arc::new(crate::python::Venvs)),
            ..Default::default()
        };
        let bin_dirs = sup_config.bin_dirs.clone();
        let config_jobs_dir = config.state_dir.join("jobs");
        let disabled = std::fs::read_to_string(config.state_dir.join("disabled.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let state_dir = config.state_dir.clone();
        let book = Book { config, known: Vec::new(), disabled, start_errors: BTreeMap::new() };
        let daemon = Daemon {
            sup: Supervisor::with_spawner(sup_config, spawner),
            ops: Ops::new(book),
            state_dir,
            bin_dirs,
            generation: std::sync::atomic::AtomicU64::new(0),
            jobs: crate::jobs::Jobs::load(&config_jobs_dir),
            me: std::sync::OnceLock::new(),
        };
        daemon.tidy_uploads();
        Ok(daemon)
    }

    /// The book as the last operation left it: what readers use.
    fn book(&self) -> Arc<Book> {
        self.ops.published.get()
    }

    /// Runs `f` as an operation of the task that owns the book (see [`book`]): after
    /// the operations queued before it, never beside one, and to its end.
    async fn op<R, F>(&self, f: F) -> Result<R, ApiError>
    where
        R: Send + 'static,
        F: for<'b> FnOnce(Arc<Daemon>, &'b mut Book) -> BookFuture<'b, R> + Send + 'static,
    {
        let me =
            self.me.get().and_then(std::sync::Weak::upgrade).ok_or_else(|| {
                ApiError::conflict("plugd is not running; the operation was not run")
            })?;
        self.ops.run(move |book| f(me, book)).await
    }

    /// Configured plugin folders plus the installed plugins, and the operator defaults.
    fn dirs_and_defaults(&self, book: &Book) -> (Vec<PathBuf>, toml::Table) {
        let mut dirs = book.config.plugin_dirs.clone();
        // plugd's own folder of installed plugins: made here, so discovery never reports
        // it missing (the operator did not configure it and could not fix that).
        let installed = self.installed_root();
        let _ = std::fs::create_dir_all(&installed);
        dirs.push(installed);
        (dirs, book.config.defaults.clone())
    }

    fn installed_root(&self) -> PathBuf {
        crate::install::root(&self.state_dir)
    }

    fn persist_disabled(&self, book: &Book) -> Result<(), String> {
        let dir = &self.state_dir;
        let list: Vec<&String> = book.disabled.iter().collect();
        std::fs::create_dir_all(dir)
            .and_then(|_| {
                std::fs::write(
                    dir.join("disabled.json"),
                    serde_json::to_string(&list).unwrap_or_default(),
                )
            })
            .map_err(|e| format!("cannot save {}/disabled.json: {e}", dir.display()))
    }

    fn fingerprint_of(&self, book: &Book, spec: &PluginSpec) -> String {
        let program = entrypoint_program(spec, &self.bin_dirs).ok().map(|(p, _)| p);
        // Operator defaults are part of what the plugin runs with: a change restarts it too.
        let defaults = book.config.defaults.to_string();
        format!("{}:{}", fingerprint(spec, program.as_deref()), defaults.len() ^ fxhash(&defaults))
    }

    async fn load(&self, book: &mut Book, spec: PluginSpec) {
        let name = spec.name().to_string();
        match self.sup.load(spec).await {
            Ok(_) => {
                book.start_errors.remove(&name);
            }
            Err(e) => {
                tracing::error!(plugin = %name, "{e}");
                book.start_errors.insert(name, e.to_string());
            }
        }
    }

    /// Discovers plugins and starts the enabled ones in dependency order.
    /// Returns the discovery problems (already logged).
    pub async fn start_all(&self, strict: bool) -> Result<Vec<String>, DaemonError> {
        self.start_all_adopting(strict, Vec::new(), Vec::new()).await
    }

    /// Like [`Daemon::start_all`], but plugins handed over by a predecessor are adopted
    /// (same process, no restart) instead of started.
    async fn start_all_adopting(
        &self,
        strict: bool,
        handed: Vec<HandoverPlugin>,
        stopped: Vec<String>,
    ) -> Result<Vec<String>, DaemonError> {
        let done = self
            .op(move |d, b| {
                Box::pin(async move { d.start_all_in(b, strict, handed, stopped).await })
            })
            .await;
        done.unwrap_or_else(|e| Err(DaemonError::Book(e.message)))
    }

    async fn start_all_in(
        &self,
        book: &mut Book,
        strict: bool,
        mut handed: Vec<HandoverPlugin>,
        stopped: Vec<String>,
    ) -> Result<Vec<String>, DaemonError> {
        crate::install::recover(&self.installed_root());
        let (dirs, defaults) = self.dirs_and_defaults(book);
        let stage = self.state_dir.join("single");
        let d = discover(&dirs, &defaults, &book.config.instances, Some(&stage));
        for p in &d.problems {
            tracing::error!("{p}");
        }
        if strict && !d.problems.is_empty() {
            return Err(DaemonError::Strict(d.problems.len()));
        }
        let mut known = Vec::new();
        for spec in d.plugins {
            let fp = self.fingerprint_of(book, &spec);
            known.push((spec.name().to_string(), Known { spec, fingerprint: fp }));
        }
        book.known = known;
        self.ops.published.set(book);
        let order: Vec<(String, PluginSpec)> =
            book.known.iter().map(|(n, k)| (n.clone(), k.spec.clone())).collect();
        for (name, spec) in order {
            if let Some(i) = handed.iter().position(|h| h.name == name) {
                let h = handed.remove(i);
                match self.sup.adopt(spec, thaw(h)).await {
                    Ok(_) => tracing::info!(plugin = %name, "adopted from the previous plugd"),
                    Err(e) => tracing::error!(plugin = %name, "cannot adopt: {e}"),
                }
                continue;
            }
            if book.disabled.contains(&name) {
                tracing::info!(plugin = %name, "disabled; not starting");
                continue;
            }
            if stopped.contains(&name) {
                tracing::info!(plugin = %name, "stopped before the upgrade; stays stopped");
                if let Err(e) = self.sup.load_stopped(spec).await {
                    tracing::error!(plugin = %name, "{e}");
                }
                continue;
            }
            self.load(book, spec).await;
        }
        // Handed-over plugins whose folder vanished meanwhile: adopted from their old manifest
        // if it still parses (so nothing is orphaned), else stopped.
        for h in handed {
            let name = h.name.clone();
            match PluginSpec::from_manifest(&h.manifest) {
                Ok(spec) => {
                    let _ = self.sup.adopt(spec, thaw(h)).await;
                    let _ = self.sup.unload(&name).await;
                }
                Err(_) => {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(h.pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    drop(thaw(h));
                }
            }
        }
        Ok(d.problems)
    }

    /// Re-reads the config (if from a file) and the plugin folders; applies only the difference.
    pub async fn reload(&self) -> ReloadReport {
        self.op(|d, b| Box::pin(async move { d.reload_in(b).await })).await.unwrap_or_else(|e| {
            ReloadReport { problems: vec![e.message], ..ReloadReport::default() }
        })
    }

    /// [`Daemon::reload`], as an operation of the book's task.
    async fn reload_in(&self, book: &mut Book) -> ReloadReport {
        let mut report = ReloadReport::default();
        if let Some(path) = book.config.source.clone() {
            match DaemonConfig::load(&path) {
                Ok(mut fresh) => {
                    // The socket and state folder stay as started; the rest takes effect now.
                    fresh.socket = book.config.socket.clone();
                    fresh.state_dir = book.config.state_dir.clone();
                    book.config = fresh;
                }
                Err(e) => report.problems.push(format!("{e}; keeping the previous config")),
            }
        }
        let (dirs, defaults) = self.dirs_and_defaults(book);
        let stage = self.state_dir.join("single");
        let mut d = discover(&dirs, &defaults, &book.config.instances, Some(&stage));
        let refused = self.refuse_breaking_edits(book, &mut d, &defaults);
        report.problems.extend(d.problems);
        let old: Vec<(String, String)> =
            book.known.iter().map(|(n, k)| (n.clone(), k.fingerprint.clone())).collect();
        // Plugins whose folder is gone from disk (not merely unreadable for now): their
        // virtualenvs go too, below.
        // (A single-file plugin runs from a staged copy: it is gone when its file is.)
        let stage = std::fs::canonicalize(&stage).unwrap_or(stage);
        let is_gone = |k: &Known| !k.spec.dir.exists() || !k.spec.manifest_path.exists();
        let gone: BTreeSet<String> = book
            .known
            .iter()
            .filter(|(_, k)| is_gone(k))
            .map(|(_, k)| k.spec.venv_name().to_string())
            .collect();
        let stale_stages: Vec<PathBuf> = book
            .known
            .iter()
            .filter(|(_, k)| is_gone(k) && k.spec.dir.starts_with(&stage))
            .map(|(_, k)| k.spec.dir.clone())
            .collect();
        let venvs_in_use: BTreeSet<String> =
            d.plugins.iter().map(|s| s.venv_name().to_string()).collect();
        let new_names: BTreeSet<String> = d.plugins.iter().map(|s| s.name().to_string()).collect();
        for (name, _) in old.iter().rev() {
            if !new_names.contains(name) {
                let _ = self.sup.unload(name).await;
                book.start_errors.remove(name);
                report.removed.push(name.clone());
            }
        }
        let mut known = Vec::new();
        for spec in d.plugins {
            let name = spec.name().to_string();
            if refused.contains(&name) {
                // Keeps what it runs, and the fingerprint of that, until the edit is fixed.
                let kept = book.known.iter().find(|(n, _)| *n == name).map(|(_, k)| k.clone());
                if let Some(k) = kept {
                    report.unchanged.push(name.clone());
                    known.push((name, k));
                    continue;
                }
            }
            let fp = self.fingerprint_of(book, &spec);
            let disabled = book.disabled.contains(&name);
            match old.iter().find(|(n, _)| *n == name) {
                None => {
                    if !disabled {
                        self.load(book, spec.clone()).await;
                    }
                    report.added.push(name.clone());
                }
                Some((_, old_fp)) if *old_fp != fp => {
                    // A running plugin is hot-updated (no call lost; the old one keeps serving
                    // if the new one fails); one that is not running is simply (re)started.
                    let running = self
                        .sup
                        .get(&name)
                        .is_some_and(|h| h.status().state == supervisor::State::Ready);
                    if running {
                        match self.sup.update(spec.clone()).await {
                            Ok(_) => report.updated.push(name.clone()),
                            Err(e) => report.problems.push(e.to_string()),
                        }
                    } else {
                        let _ = self.sup.unload(&name).await;
                        if !disabled {
                            self.load(book, spec.clone()).await;
                        }
                        report.restarted.push(name.clone());
                    }
                }
                Some(_) => report.unchanged.push(name.clone()),
            }
            known.push((name, Known { spec, fingerprint: fp }));
        }
        book.known = known;
        let stray: BTreeSet<String> = gone.difference(&venvs_in_use).cloned().collect();
        report.venvs_removed = self.remove_venvs(&stray);
        for dir in stale_stages {
            // The staged copy of a single-file plugin whose file was removed.
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!("cannot remove {}: {e}", dir.display());
            }
        }
        for p in &report.problems {
            tracing::error!("{p}");
        }
        tracing::info!(
            "reload: added {:?}, removed {:?}, updated {:?}, restarted {:?}, unchanged {}",
            report.added,
            report.removed,
            report.updated,
            report.restarted,
            report.unchanged.len()
        );
        report
    }

    /// Removes the virtualenvs of `names`, plugins whose folder was removed (a venv can
    /// hold hundreds of MiB). Names what it removed; a venv it cannot remove is said in
    /// plugd's log.
    fn remove_venvs(&self, names: &BTreeSet<String>) -> Vec<String> {
        let root = self.state_dir.join("plugins");
        let mut removed = Vec::new();
        for name in names {
            let dir = supervisor::python::venvs_of(&root, name);
            if !dir.is_dir() {
                continue;
            }
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => removed.push(name.clone()),
                Err(e) => tracing::warn!(
                    "cannot remove the virtualenv of {name} at {}: {e}",
                    dir.display()
                ),
            }
        }
        if !removed.is_empty() {
            tracing::info!("removed the virtualenvs of plugins that are gone: {removed:?}");
        }
        removed
    }

    /// A reload must not take a running plugin's dependents down: an edit that moves a plugin
    /// to a version a running dependent's `requires` refuses is not applied (that plugin keeps
    /// its running spec) and the dependent, which discovery dropped for it, stays. Problems
    /// say so and name the way out.
    fn refuse_breaking_edits(
        &self,
        book: &Book,
        d: &mut crate::discovery::Discovery,
        defaults: &toml::Table,
    ) -> BTreeSet<String> {
        let known = &book.known;
        let running =
            |n: &str| self.sup.get(n).is_some_and(|h| h.status().state == supervisor::State::Ready);
        let mut refused: BTreeMap<String, String> = BTreeMap::new();
        for (dependent, k) in known.iter().filter(|(n, _)| running(n)) {
            // What the dependent asks for now: its edited manifest if it still reads.
            let now = PluginSpec::from_manifest_with_defaults(&k.spec.manifest_path, defaults)
                .map(|s| s.manifest.requires)
                .unwrap_or_else(|_| k.spec.manifest.requires.clone());
            for req in &now {
                let Some((_, old)) = known.iter().find(|(n, _)| *n == req.name) else { continue };
                let Some(new) = d.plugins.iter().find(|s| s.name() == req.name) else { continue };
                let (old_v, new_v) = (&old.spec.manifest.version, &new.manifest.version);
                if req.version.matches(old_v) && !req.version.matches(new_v) {
                    refused.entry(req.name.clone()).or_insert_with(|| format!(
                        "{}: version {new_v} would break {dependent}, which requires {} {}; keeping {old_v} running. Relax {dependent}'s `requires`, or switch with `plugctl update {} --force`",
                        new.manifest_path.display(), req.name, req.version, req.name
                    ));
                }
            }
        }
        if refused.is_empty() {
            return BTreeSet::new();
        }
        for (name, why) in &refused {
            if let (Some(slot), Some((_, old))) = (
                d.plugins.iter_mut().find(|s| s.name() == name),
                known.iter().find(|(n, _)| n == name),
            ) {
                *slot = old.spec.clone();
            }
            d.problems.push(why.clone());
        }
        // Dependents that discovery dropped because of a refused version come back.
        for (name, k) in known.iter() {
            if d.plugins.iter().any(|s| s.name() == name) {
                continue;
            }
            let Ok(spec) = PluginSpec::from_manifest_with_defaults(&k.spec.manifest_path, defaults)
            else {
                continue;
            };
            let satisfied = spec.manifest.requires.iter().all(|r| {
                d.plugins
                    .iter()
                    .any(|s| s.name() == r.name && r.version.matches(&s.manifest.version))
            });
            if satisfied {
                let path = k.spec.manifest_path.display().to_string();
                d.problems.retain(|p| !p.starts_with(&path));
                d.plugins.push(spec);
            }
        }
        refused.into_keys().collect()
    }

    /// Status of every known plugin (or one), as stable JSON objects.
    pub fn status(&self, only: Option<&str>) -> Result<serde_json::Value, ApiError> {
        self.status_in(&self.book(), only)
    }

    /// [`Daemon::status`] from `book` (an operation's own, not yet published).
    fn status_in(&self, book: &Book, only: Option<&str>) -> Result<serde_json::Value, ApiError> {
        let entries = self.entries_in(book, only)?;
        Ok(serde_json::to_value(entries).unwrap_or_default())
    }

    /// Status of every known plugin (or one): loaded ones from their handle, the others
    /// (stopped, disabled, failed to start) from what the daemon knows of them.
    pub fn entries(&self, only: Option<&str>) -> Result<Vec<StatusEntry>, ApiError> {
        self.entries_in(&self.book(), only)
    }

    fn entries_in(&self, book: &Book, only: Option<&str>) -> Result<Vec<StatusEntry>, ApiError> {
        let known: Vec<(String, PluginSpec)> = book
            .known
            .iter()
            .filter(|(n, _)| only.is_none_or(|o| o == n))
            .map(|(n, k)| (n.clone(), k.spec.clone()))
            .collect();
        let mut out = Vec::new();
        for (name, spec) in known {
            let enabled = !book.disabled.contains(&name);
            let manifest = spec.manifest_path.display().to_string();
            let display_name = spec.manifest.display_name.clone();
            let manifest_extra = spec.manifest.extra.clone();
            let mut entry = match self.sup.get(&name) {
                Some(h) => {
                    let st = h.status();
                    StatusEntry {
                        last_exit: st.last_exit.as_ref().map(|r| r.to_string()),
                        last_exit_detail: serde_json::to_value(&st.last_exit).unwrap_or_default(),
                        state: st.state.to_string(),
                        kind: st.kind.to_string(),
                        latency: LatencyView {
                            bounds_us: st.latency.bounds_us,
                            counts: st.latency.counts,
                            sum_us: st.latency.sum_us,
                        },
                        name: st.name,
                        version: st.version,
                        updating_to: st.updating_to,
                        pid: st.pid,
                        restarts: st.restarts,
                        uptime_ms: st.uptime_ms,
                        calls_ok: st.calls_ok,
                        calls_err: st.calls_err,
                        sdk: st.sdk,
                        sandbox: st.sandbox,
                        sandbox_unavailable: st.sandbox_unavailable,
                        transport: st.transport,
                        ring_calls: st.ring_calls,
                        ring_host_calls: st.ring_host_calls,
                        exits: st.exits.into_iter().map(|(k, n)| (k.to_string(), n)).collect(),
                        log_lines_dropped: st.log_lines_dropped,
                        rss_bytes: st.pid.and_then(supervisor::spawn::proc_usage).map(|u| u.0),
                        cpu_seconds: st.pid.and_then(supervisor::spawn::proc_usage).map(|u| u.1),
                        methods: if only.is_some() {
                            st.methods.iter().filter_map(|m| serde_json::to_value(m).ok()).collect()
                        } else {
                            Vec::new()
                        },
                        health: st.health.map(|h| plugd_control::HealthEntry {
                            check: h.check,
                            state: h.state.to_string(),
                            failures: h.failures,
                            last_error: h.last_error,
                        }),
                        enabled,
                        manifest,
                        ..StatusEntry::default()
                    }
                }
                None => {
                    let error = book.start_errors.get(&name).cloned();
                    let state = match (enabled, &error) {
                        (false, _) => "disabled",
                        (true, Some(_)) => "failed",
                        (true, None) => "stopped",
                    };
                    StatusEntry {
                        version: spec.manifest.version.to_string(),
                        kind: spec.manifest.kind.to_string(),
                        state: state.into(),
                        last_exit: error,
                        name,
                        enabled,
                        manifest,
                        ..StatusEntry::default()
                    }
                }
            };
            entry.display_name = display_name;
            entry.manifest_extra = manifest_extra;
            if only.is_some() && spec.manifest.entrypoint.is_python() {
                let file = spec.dir.join(&spec.manifest.python.requirements);
                let text = std::fs::read_to_string(file).unwrap_or_default();
                entry.requirements = plugd_install::python::requirements_list(&text);
            }
            out.push(entry);
        }
        match only {
            Some(o) if out.is_empty() => Err(book.unknown(o)),
            _ => Ok(out),
        }
    }

    /// The spec of a known plugin, or the error that lists the known ones.
    fn spec(&self, name: &str) -> Result<PluginSpec, ApiError> {
        self.book().spec_or_unknown(name)
    }

    /// A one-line summary for systemd's STATUS=.
    pub fn summary(&self) -> String {
        let all = self.entries(None).unwrap_or_default();
        let count = |s: &str| all.iter().filter(|p| p.state == s).count();
        format!(
            "{} plugins: {} ready, {} failed, {} disabled",
            all.len(),
            count("ready"),
            count("failed") + count("exited"),
            count("disabled")
        )
    }

    async fn start_one(&self, book: &mut Book, name: &str) -> Result<serde_json::Value, ApiError> {
        if book.disabled.contains(name) {
            return Err(ApiError::conflict(format!(
                "plugin {name} is disabled; run `plugctl enable {name}` first"
            )));
        }
        if self.sup.get(name).is_some() {
            self.sup.start(name).await.map_err(|e| e.to_string())?;
        } else {
            let spec = book.spec_or_unknown(name)?;
            if let Err(e) = self.sup.load(spec).await {
                book.start_errors.insert(name.to_string(), e.to_string());
                return Err(e.to_string().into());
            }
            book.start_errors.remove(name);
        }
        self.status_in(book, Some(name))
    }

    /// Handles one control request.
    pub async fn handle(&self, req: Request) -> Reply {
        if let Err(e) = req.check() {
            return Reply::err(e);
        }
        // A request that changes the plugin list runs as an operation of the book's task;
        // installs and jobs send only their commit there.
        let result = if req.changes_plugins() {
            self.op(move |d, b| Box::pin(async move { d.change(b, req).await }))
                .await
                .and_then(|r| r)
        } else {
            self.read(req).await
        };
        Reply::from(result)
    }

    /// The requests that change the plugin list, as an operation of the book's task.
    async fn change(&self, book: &mut Book, req: Request) -> Result<serde_json::Value, ApiError> {
        match req {
            Request::Start { name } => self.start_one(book, &name).await,
            Request::Stop { name } => match self.sup.get(&name) {
                Some(_) => match self.sup.stop(&name).await {
                    Ok(_) => self.status_in(book, Some(&name)),
                    Err(e) => Err(e.to_string().into()),
                },
                None => book.spec_or_unknown(&name).and_then(|_| self.status_in(book, Some(&name))),
            },
            Request::Restart { name } => {
                if self.sup.get(&name).is_some() {
                    let _ = self.sup.stop(&name).await;
                }
                self.start_one(book, &name).await
            }
            Request::Reload => {
                Ok(serde_json::to_value(self.reload_in(book).await).unwrap_or_default())
            }
            Request::Enable { name } => match book.spec_or_unknown(&name) {
                Err(e) => Err(e),
                Ok(_) => {
                    book.disabled.remove(&name);
                    match self.persist_disabled(book) {
                        Err(e) => Err(e.into()),
                        Ok(()) => self.start_one(book, &name).await,
                    }
                }
            },
            Request::Disable { name } => match book.spec_or_unknown(&name) {
                Err(e) => Err(e),
                Ok(_) => {
                    book.disabled.insert(name.clone());
                    if self.sup.get(&name).is_some() {
                        let _ = self.sup.unload(&name).await;
                    }
                    self.persist_disabled(book)
                        .map_err(ApiError::from)
                        .and_then(|_| self.status_in(book, Some(&name)))
                }
            },
            Request::Update { name, version: None, force, dry_run } => {
                self.update_one(book, &name, force, dry_run).await
            }
            Request::Update { name, version: Some(v), force, dry_run } => {
                self.switch_version(book, &name, &v, force, dry_run).await
            }
            Request::Rollback { name, version } => {
                let (all, current) = crate::install::versions(&self.installed_root(), &name);
                let target = match version {
                    Some(v) => Some(v),
                    None => all
                        .iter()
                        .rev()
                        .find(|v| Some(*v) < current.as_ref())
                        .map(|v| v.to_string()),
                };
                match target {
                    Some(v) => self.switch_version(book, &name, &v, false, false).await,
                    None => Err(ApiError::not_found(format!(
                        "{name} has no installed version below the current one to roll back to"
                    ))),
                }
            }
            Request::Uninstall { name, version, purge } => {
                self.uninstall(book, &name, version.as_deref(), purge).await
            }
            other => Err(ApiError::bad_request(format!(
                "{other:?} does not change plugins; it was sent to the wrong place"
            ))),
        }
    }

    /// The requests that read, call, or start a job of their own.
    async fn read(&self, req: Request) -> Result<serde_json::Value, ApiError> {
        match req {
            Request::Status { name } => self.status(name.as_deref()),
            Request::Call { name, method, json, cfg } => {
                self.call(&name, &method, json, cfg, None).await
            }
            Request::InstallPlan { source } => self.install_plan(&source).await,
            Request::Install { source, force, enable } => {
                // The same job machinery as HTTP installs, waited for here.
                let (id, cancel) = self.jobs.create(
                    crate::jobs::Work::Install(crate::jobs::InstallParams {
                        source,
                        force,
                        enable,
                    }),
                    None,
                );
                let job = self.run_job(id, cancel).await;
                match job.state {
                    crate::jobs::JobState::Succeeded => Ok(job.result.unwrap_or_default()),
                    _ => Err(ApiError::new(
                        job.error_kind.unwrap_or(plugd_control::ErrorKind::Failed),
                        job.error.unwrap_or_else(|| format!("job {id} did not finish")),
                    )),
                }
            }
            Request::InstallJob { source, force, enable } => self
                .spawn_job(
                    crate::jobs::Work::Install(crate::jobs::InstallParams {
                        source,
                        force,
                        enable,
                    }),
                    None,
                )
                .map(|id| serde_json::json!({ "job_id": id })),
            Request::UpdateJob { name, version, force } => self
                .spawn_job(crate::jobs::Work::Update { name, version, force }, None)
                .map(|id| serde_json::json!({ "job_id": id })),
            Request::UninstallJob { name, version, purge } => self
                .spawn_job(crate::jobs::Work::Uninstall { name, version, purge }, None)
                .map(|id| serde_json::json!({ "job_id": id })),
            Request::Jobs => Ok(serde_json::to_value(self.jobs.list()).unwrap_or_default()),
            Request::Job { id } => self
                .jobs
                .get(id)
                .map(|j| serde_json::to_value(j).unwrap_or_default())
                .ok_or_else(|| ApiError::not_found(format!("no job {id}"))),
            Request::CancelJob { id } => {
                self.jobs.cancel(id).map(|j| serde_json::to_value(j).unwrap_or_default()).map_err(
                    |e| match e {
                        crate::jobs::CancelError::NoJob(_) => ApiError::not_found(e.to_string()),
                        crate::jobs::CancelError::Ended(..) => ApiError::conflict(e.to_string()),
                    },
                )
            }
            Request::RetryJob { id } => match self.jobs.get(id) {
                None => Err(ApiError::not_found(format!("no job {id}"))),
                Some(j) if !j.state.is_final() => {
                    Err(ApiError::conflict(format!("job {id} has not ended yet; cancel it first")))
                }
                Some(j) => {
                    self.spawn_job(j.work, Some(id)).map(|new| serde_json::json!({ "job_id": new }))
                }
            },
            Request::Versions { name } => self.versions(&name),
            Request::Logs { name, n, since_ms, since_seq } => match self.sup.get(&name) {
                Some(h) => {
                    let lines: Vec<_> = match since_seq {
                        Some(seq) => h.logs_after(seq),
                        None => h
                            .logs(n.min(crate::logs::RING_LINES))
                            .into_iter()
                            .filter(|l| since_ms.is_none_or(|s| l.ts_ms > s))
                            .collect(),
                    };
                    Ok(serde_json::to_value(lines).unwrap_or_default())
                }
                None => self.spec(&name).map(|_| serde_json::json!([])),
            },
            Request::Shutdown => Ok(serde_json::json!("shutting down")),
            Request::Info => Ok(serde_json::json!({
                "pid": std::process::id(),
                "generation": self.generation.load(std::sync::atomic::Ordering::Relaxed),
                "version": env!("CARGO_PKG_VERSION"),
            })),
            other => Err(ApiError::bad_request(format!(
                "{other:?} changes plugins; it was sent to the wrong place"
            ))),
        }
    }

    /// Re-reads one plugin's folder and hot-swaps the running instance to it.
    async fn update_one(
        &self,
        book: &mut Book,
        name: &str,
        force: bool,
        dry_run: bool,
    ) -> Result<serde_json::Value, ApiError> {
        let path = book.spec_or_unknown(name)?.manifest_path;
        self.update_from(book, name, &path, force, dry_run).await
    }

    /// What would change, and which `requires` would break, if `name` became `new`.
    fn update_plan(
        &self,
        book: &Book,
        name: &str,
        new: &PluginSpec,
    ) -> (serde_json::Value, Vec<String>) {
        let known = &book.known;
        let old = known.iter().find(|(n, _)| n == name).map(|(_, k)| k.spec.clone());
        let version = &new.manifest.version;
        let mut problems = Vec::new();
        for (other, k) in known.iter().filter(|(n, _)| n != name) {
            for req in k.spec.manifest.requires.iter().filter(|r| r.name == name) {
                if !req.version.matches(version) {
                    problems.push(format!("updating {name} to {version} would break {other}, which requires {name} {}", req.version));
                }
            }
        }
        for req in &new.manifest.requires {
            match known.iter().find(|(n, _)| *n == req.name) {
                None => problems.push(format!(
                    "{name} {version} requires {}, which is not installed",
                    req.name
                )),
                Some((_, k)) if !req.version.matches(&k.spec.manifest.version) => {
                    problems.push(format!(
                        "{name} {version} requires {} {}, but {} is installed",
                        req.name, req.version, k.spec.manifest.version
                    ))
                }
                Some(_) => {}
            }
        }
        let mut changes = serde_json::Map::new();
        if let Some(old) = &old {
            let (o, n) = (&old.manifest, &new.manifest);
            let sections: [(&str, String, String); 7] = [
                ("entrypoint", format!("{:?}", o.entrypoint), format!("{:?}", n.entrypoint)),
                (
                    "requires",
                    format!(
                        "{:?}",
                        o.requires
                            .iter()
                            .map(|r| format!("{} {}", r.name, r.version))
                            .collect::<Vec<_>>()
                    ),
                    format!(
                        "{:?}",
                        n.requires
                            .iter()
                            .map(|r| format!("{} {}", r.name, r.version))
                            .collect::<Vec<_>>()
                    ),
                ),
                ("limits", format!("{:?}", o.limits), format!("{:?}", n.limits)),
                ("sandbox", format!("{:?}", o.sandbox), format!("{:?}", n.sandbox)),
                ("restart", format!("{:?}", o.restart), format!("{:?}", n.restart)),
                ("timeouts", format!("{:?}", o.timeouts), format!("{:?}", n.timeouts)),
                ("config", o.config.to_string(), n.config.to_string()),
            ];
            for (key, from, to) in sections {
                if from != to {
                    changes.insert(key.into(), serde_json::json!({"from": from, "to": to}));
                }
            }
        }
        let old_py =
            old.as_ref().is_some_and(|o| o.manifest.runtime == crate::manifest::Runtime::Python);
        if old_py || new.manifest.runtime == crate::manifest::Runtime::Python {
            // What the running venv was built from (a folder edited in place no longer has it).
            let before = old
                .as_ref()
                .map(|o| {
                    crate::python::built_requirements(self.sup.state_root(), o)
                        .unwrap_or_else(|| crate::python::requirements_of(o))
                })
                .unwrap_or_default();
            let diff =
                crate::python::requirements_diff(&before, &crate::python::requirements_of(new));
            changes.insert(
                "dependencies".into(),
                serde_json::json!({
                    "added": diff.added,
                    "removed": diff.removed,
                    "changed": diff.changed,
                    "note": "installed into this plugin version's own virtualenv; no other plugin shares it",
                }),
            );
        }
        let plan = serde_json::json!({
            "name": name,
            "from": old.map(|o| o.manifest.version.to_string()),
            "to": version.to_string(),
            "changes": changes,
            "problems": problems,
        });
        (plan, problems)
    }

    /// Hot-swaps `name` to the manifest at `path` (after checking `requires`, unless forced).
    async fn update_from(
        &self,
        book: &mut Book,
        name: &str,
        path: &Path,
        force: bool,
        dry_run: bool,
    ) -> Result<serde_json::Value, ApiError> {
        let spec = PluginSpec::from_manifest_with_defaults(path, &book.config.defaults)
            .map_err(|e| e.to_string())?;
        if spec.name() != name {
            return Err(ApiError::conflict(format!(
                "{} now names the plugin {:?}; use `plugctl reload` to pick up a rename",
                path.display(),
                spec.name()
            )));
        }
        let (plan, problems) = self.update_plan(book, name, &spec);
        if dry_run {
            return Ok(plan);
        }
        if !problems.is_empty() && !force {
            return Err(ApiError::conflict(format!(
                "{}; use --force to update anyway",
                problems.join("; ")
            )));
        }
        if self.sup.get(name).is_none_or(|h| h.status().state != supervisor::State::Ready) {
            return Err(ApiError::conflict(format!(
                "plugin {name} is not running; `plugctl start {name}` runs the new version"
            )));
        }
        let fp = self.fingerprint_of(book, &spec);
        self.sup.update(spec.clone()).await.map_err(|e| e.to_string())?;
        // Keep the manifest path the plugin was known by (`current/…` for installed ones).
        if let Some((_, k)) = book.known.iter_mut().find(|(n, _)| n == name) {
            let keep = k.spec.manifest_path.clone();
            let mut spec = spec;
            spec.manifest_path = keep;
            *k = Known { spec, fingerprint: fp };
        }
        self.status_in(book, Some(name))
    }

    /// Calls `method` of plugin `name` with a JSON argument (checked against the schema the
    /// method described, if any) and the caller's `cfg`; pieces the plugin streams go to
    /// `chunks`. The JSON result, or why not.
    pub async fn call(
        &self,
        name: &str,
        method: &str,
        json: String,
        cfg: Option<plugd_control::Secret>,
        chunks: Option<tokio::sync::mpsc::UnboundedSender<Payload>>,
    ) -> Result<serde_json::Value, ApiError> {
        let input = match serde_json::from_str::<serde_json::Value>(&json) {
            Ok(v) => v,
            Err(e) => {
                return Err(ApiError::bad_request(format!("the argument is not valid JSON: {e}")))
            }
        };
        // The cfg is checked for shape only; what it says is never put in an error or a log.
        if let Some(cfg) = &cfg {
            if let Err(e) = serde_json::from_str::<serde_json::Value>(cfg.expose()) {
                return Err(ApiError::bad_request(format!(
                    "the cfg of the call to {name}.{method} is not valid JSON (line {}, column {})",
                    e.line(),
                    e.column()
                )));
            }
        }
        let h = self.sup.get(name).ok_or_else(|| match self.spec(name) {
            Ok(_) => {
                ApiError::conflict(format!("plugin {name} is not running; `plugctl start {name}`"))
            }
            Err(e) => e,
        })?;
        // A method that described its input is not sent an input that does not match.
        let schema =
            h.status().methods.into_iter().find(|m| m.name == method).and_then(|m| m.input);
        if let Some(schema) = schema {
            supervisor::describe::check(&schema, &input).map_err(|e| {
                ApiError::bad_request(format!(
                    "plugin {name}: the input of {method} does not match its schema: {e} (`plugctl show {name}` lists it)"
                ))
            })?;
        }
        let payload = Payload::raw(PayloadCodec::Json, json.into_bytes());
        let reply = match cfg {
            None => h.call_streaming(method, payload, Deadline::Default, chunks).await,
            Some(cfg) => {
                let cfg = Payload::raw(PayloadCodec::Json, cfg.expose().as_bytes().to_vec());
                h.call_configured(method, payload, cfg, Deadline::Default, chunks).await
            }
        };
        let reply = reply.map_err(|e| match e.code {
            // Not running or not ready: the daemon's state, not the plugin's answer.
            ErrorCode::Unavailable => ApiError::conflict(e.to_string()),
            _ => ApiError::plugin(e.to_string()),
        })?;
        match reply.codec {
            PayloadCodec::Json => serde_json::from_slice(&reply.data).map_err(|e| {
                ApiError::plugin(format!("plugin {name} replied with invalid JSON: {e}"))
            }),
            PayloadCodec::Bincode => Err(ApiError::plugin(format!(
                "plugin {name} replied in bincode ({} bytes), which plugctl cannot show",
                reply.data.len()
            ))),
        }
    }

    /// `[mcp]` as the config says now (a reload may change it).
    pub fn mcp_config(&self) -> Option<crate::mcp::McpConfig> {
        self.book().config.mcp.clone()
    }

    /// Where archives uploaded over HTTP wait for their install job.
    pub fn uploads_dir(&self) -> PathBuf {
        self.state_dir.join("uploads")
    }

    /// The handle of a loaded plugin (for streaming calls over HTTP).
    pub fn plugin(&self, name: &str) -> Option<supervisor::PluginHandle> {
        self.sup.get(name)
    }

    /// Stops every plugin, in reverse start order.
    pub async fn shutdown(&self) {
        self.sup.shutdown().await;
    }
}

fn fxhash(s: &str) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish() as usize
}

/// Creates the control socket (mode 0600), refusing if another daemon answers on it.
fn listen(path: &std::path::Path) -> Result<Listener, DaemonError> {
    let sock_err = |source| DaemonError::Socket { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(sock_err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::AlreadyRunning(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(sock_err)?;
    }
    let name = path.to_fs_name::<GenericFilePath>().map_err(sock_err)?;
    ListenerOptions::new().name(name).mode(0o600).create_tokio_as::<Listener>().map_err(sock_err)
}

/// Why the control socket's peer `pid` is a plugin process (it is in another pid
/// namespace than plugd), or None if it is not. The kernel reports the pid as 0 when the
/// peer is in a namespace plugd cannot see.
fn plugin_peer(pid: i32) -> Option<String> {
    if pid <= 0 {
        return Some("the peer's process is not visible from plugd's pid namespace".into());
    }
    let ours = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()?;
    (ours != theirs)
        .then(|| format!("pid {pid} runs in another pid namespace ({})", theirs.display()))
}

/// Runs the daemon until SIGTERM, SIGINT or `plugctl shutdown`: start plugins,
/// serve the control socket, reload on SIGHUP, notify systemd, stop everything in reverse.
/// Plugins are forked (and SIGUSR2's exec runs) by `spawner`, whose loop must run on the
/// process's main thread (see [`crate::spawn::SpawnerLoop::run`]).
pub async fn run(
    config: DaemonConfig,
    strict: bool,
    spawner: crate::spawn::Spawner,
) -> Result<(), DaemonError> {
    let notifier = Notifier::from_env();
    let socket = config.socket.clone();
    // The binary to re-exec on SIGUSR2: the path we were started from (a new build put there
    // replaces us; /proc/self/exe would still name the old, deleted file).
    let exe = std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| if p.components().count() > 1 { std::fs::canonicalize(p).ok() } else { None })
        .or_else(|| std::env::current_exe().ok())
        .unwrap_or_default();
    let handover: Option<Handover> = std::env::var_os(UPGRADE_ENV).and_then(|path| {
        let text = std::fs::read(&path).ok();
        let _ = std::fs::remove_file(&path);
        text.and_then(|t| serde_json::from_slice(&t).ok())
    });
    let (listener, handed, stopped, handed_conns, handed_http, generation) = match handover {
        Some(h) => {
            let l = Listener::try_from(inherited(h.listener))
                .map_err(|e| DaemonError::Socket { path: socket.clone(), source: e })?;
            (l, h.plugins, h.stopped, h.connections, h.http_listener, h.generation)
        }
        None => (listen(&socket)?, Vec::new(), Vec::new(), Vec::new(), None, 0),
    };
    let http = config.http.clone();
    let daemon = Arc::new(Daemon::new(config, spawner)?);
    let _ = daemon.me.set(Arc::downgrade(&daemon));
    daemon.generation.store(generation, std::sync::atomic::Ordering::Relaxed);
    // Bound before the plugins start: a bad address or token fails the start, loudly.
    if let (None, Some(fd)) = (&http, handed_http) {
        drop(inherited(fd)); // [http] was removed from the config: close what was handed over
    }
    // Served only once the plugins are started or adopted: meanwhile requests wait in the
    // kernel's queue instead of meeting an empty plugin list.
    let mut http_server = match &http {
        Some(cfg) => Some(
            crate::http::bind(daemon.clone(), cfg, handed_http.map(inherited))
                .await
                .map_err(DaemonError::Http)?,
        ),
        None => None,
    };
    let mut term = signal(SignalKind::terminate())
        .map_err(|source| DaemonError::Signal { signal: "SIGTERM", source })?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|source| DaemonError::Signal { signal: "SIGINT", source })?;
    let mut hup = signal(SignalKind::hangup())
        .map_err(|source| DaemonError::Signal { signal: "SIGHUP", source })?;
    let mut usr2 = signal(SignalKind::user_defined2())
        .map_err(|source| DaemonError::Signal { signal: "SIGUSR2", source })?;
    daemon.start_all_adopting(strict, handed, stopped).await?;
    if let Some(server) = &mut http_server {
        server.serve().map_err(DaemonError::Http)?;
    }
    tracing::info!(
        "plugd ready on {} (generation {generation}): {}",
        socket.display(),
        daemon.summary()
    );
    notifier.ready(&daemon.summary());

    let stop = Arc::new(tokio::sync::Notify::new());
    let conns = conns::Conns::new(stop.clone());
    // Connections the previous plugd parked: served on, as if nothing happened.
    for c in handed_conns {
        conns.adopt(daemon.clone(), conns::Parked { fd: inherited(c.fd), unread: c.unread });
    }
    let watchdog = notifier.watchdog_interval();
    let mut dog = tokio::time::interval(watchdog.unwrap_or(std::time::Duration::from_secs(3600)));
    loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                // Served, or refused at once when too many are: never a wait here.
                Ok(conn) => conns.accept(daemon.clone(), conn),
                Err(e) => tracing::warn!("control socket accept failed: {e}"),
            },
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading");
                notifier.reloading();
                daemon.reload().await;
                notifier.ready(&daemon.summary());
            }
            _ = usr2.recv() => {
                tracing::info!("SIGUSR2: upgrading in place");
                notifier.reloading();
                let why = upgrade(&daemon, &listener, &conns, http_server.as_mut(), &exe).await;
                tracing::error!("{why}");
                notifier.ready(&daemon.summary());
            }
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = stop.notified() => { tracing::info!("shutdown requested over the control socket"); break; }
            _ = dog.tick(), if watchdog.is_some() => notifier.send("WATCHDOG=1"),
        }
    }
    notifier.stopping();
    daemon.shutdown().await;
    drop(listener);
    let _ = std::fs::remove_file(&socket);
    tracing::info!("plugd stopped");
    Ok(())
}
