//! Starting a plugin process and owning it until it is reaped.
//!
//! The order is fixed and every failing step is named: resolve the entrypoint →
//! socketpair, pipes → clone (into the jail's namespaces, with a pidfd) → parent-death
//! signal → descriptors 0-3 in place, every other one closed → the sandbox sequence (see
//! `sandbox`) → exec. Everything the child runs between clone and exec is prepared
//! before the clone and is async-signal-safe; a failed step comes back through a
//! close-on-exec pipe as (step, op, errno), and EOF on that pipe means the exec happened.
//!
//! In a jail the tracked process is the plugin's init (pid 1 inside); the plugin is its
//! child, and its wait status comes back through a pipe the init writes before exiting.
//! When the init ends, the kernel ends every process of the plugin.
//!
//! Processes are tracked by pidfd: we wait for exit by polling the pidfd and
//! reap through it. Signals go to the whole process group with `killpg`, and
//! only while the leader is not yet reaped — a live or zombie leader keeps its
//! pid and group id reserved, so a recycled PID can never be hit.
//!
//! Every syscall the child makes between clone and exec, in order (no allocation, no
//! lock, no other call; anything added here must be async-signal-safe and listed):
//!
//! - all children: `prctl(PR_SET_PDEATHSIG)`, `poll` (the supervisor's pidfd),
//!   `setpgid`, `fcntl(F_DUPFD_CLOEXEC / F_SETFD)`, `dup2`, `close`, `close_range`,
//!   `sched_setaffinity`, `open`/`write`/`close` (`cgroup.procs`);
//! - a jail's init: `open`/`write`/`close` (`/proc/self/setgroups`, `uid_map`, `gid_map` in
//!   a user namespace), `mount`, `mkdir`, `open`/`close` (mount points), `symlink`,
//!   `open`/`write`/`close` (generated `/etc` files), `chdir`, `pivot_root`, `umount2`,
//!   `sethostname`, `prctl(PR_CAPBSET_DROP)`, `setgroups`, `setresgid`, `setresuid`,
//!   `capset`, `prctl(PR_CAP_AMBIENT)`, `clone` (the plugin), then in its loop
//!   `sigprocmask`, `sigwaitinfo`, `waitpid`, `kill`, `write` (the status pipe), `_exit`
//!   (and `close_range`, so it holds no `[listen]` socket);
//! - the plugin: `sigaction`, `sigprocmask`, `close`, `prctl(PR_SET_PDEATHSIG)`, with
//!   `[listen]` `fcntl`/`dup2`/`close`/`getpid` (see `hand_listeners`),
//!   `setrlimit`, (without a jail: the id and capability calls above), `chdir`,
//!   `prctl(PR_SET_NO_NEW_PRIVS)`, `landlock_create_ruleset`/`landlock_add_rule`/
//!   `landlock_restrict_self`, `seccomp`/`prctl(PR_SET_SECCOMP)`, `execve`;
//! - on any failure: `write` (step, op, errno to the report pipe) and `_exit`.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits,
//! not the process. All forks therefore happen on one dedicated spawner
//! thread that lives as long as the [`Spawner`]; tokio's blocking-pool
//! threads, which come and go, would kill plugins at random.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;

use crate::exit::ExitReason;
use crate::manifest::{check_executable, Entrypoint, PluginSpec, Transport};
use crate::sandbox::{step, HostFacts, SandboxPlan};

/// The file descriptor number the plugin finds its socket on.
pub const PLUGIN_FD: RawFd = 3;

/// Everything needed to exec one plugin, resolved before the fork.
#[derive(Debug)]
pub struct SpawnPlan {
    /// Executable to run.
    pub program: PathBuf,
    /// Arguments after the program.
    pub args: Vec<String>,
    /// Working directory (the plugin folder).
    pub dir: PathBuf,
    /// The complete environment.
    pub env: Vec<(String, String)>,
    /// The sandbox the child applies to itself before exec (and the jail it is cloned into).
    pub sandbox: Arc<SandboxPlan>,
    /// The kind of socket the plugin talks on.
    pub transport: Transport,
    /// Listening sockets handed over from descriptor 3 on (`[listen]`, see
    /// [`crate::serving`]), with their `LISTEN_FDNAMES` names; the protocol socket follows.
    pub listen: Vec<(&'static str, OwnedFd)>,
    /// The shared mapping's memfd (`transport = "shm"`), handed after the listeners.
    pub shm: Option<OwnedFd>,
}

/// Host variables a plugin inherits; everything else is cleared.
const INHERITED_ENV: &[&str] = &["PATH", "LANG", "LC_ALL", "TZ", "RUST_BACKTRACE", "RUST_LOG"];

impl SpawnPlan {
    /// Resolves the manifest's entrypoint, prepares the plugin's state folder
    /// (`<state_root>/<name>`), plans its sandbox and builds the environment.
    /// A bare name is looked up in the plugin folder, then in `bin_dirs`.
    pub fn for_spec(
        spec: &PluginSpec,
        bin_dirs: &[PathBuf],
        state_root: &Path,
        host: &HostFacts,
    ) -> Result<SpawnPlan, String> {
        let m = &spec.manifest;
        let (mut program, mut args) = entrypoint_program(spec, bin_dirs)?;
        if let Some(want) = &m.entrypoint_sha256 {
            // Before every exec: a changed file is refused, not run.
            let file = which(&program).unwrap_or_else(|| program.clone());
            let got = sha256_of(&file).map_err(|e| {
                format!(
                    "plugin {}: cannot read {} to check its SHA-256: {e}",
                    m.name,
                    file.display()
                )
            })?;
            if &got != want {
                return Err(format!(
                    "plugin {}: {} has SHA-256 {got}, but {} pins entrypoint_sha256 = {want}; the file changed since it was pinned: rebuild or reinstall it, or update the pin",
                    m.name,
                    file.display(),
                    spec.manifest_path.display()
                ));
            }
        }
        let mut extra_read = Vec::new();
        if m.entrypoint.is_python() {
            // Built beforehand by `python::prepare` (the slot does it on a blocking thread).
            let env = crate::python::current(spec, state_root)?;
            args = match &m.entrypoint {
                // The SDK's launcher imports the class from the plugin folder (the working
                // directory, first on `sys.path` with `-m`) and serves it.
                Entrypoint::PyClass { module, class } => {
                    vec!["-m".into(), "plugd_plugin.launch".into(), format!("{module}:{class}")]
                }
                // Through the launcher too, which turns an import that fails before the
                // script's serve() into a load failure that says why.
                _ => vec![
                    "-m".into(),
                    "plugd_plugin.launch".into(),
                    "--script".into(),
                    program.display().to_string(),
                ],
            };
            program = env.python;
            extra_read = env.read_paths;
        }
        let state_dir = state_root.join(&m.name);
        std::fs::create_dir_all(&state_dir)
            .and_then(|_| {
                std::fs::set_permissions(
                    &state_dir,
                    std::os::unix::fs::PermissionsExt::from_mode(0o700),
                )
            })
            .map_err(|e| format!("cannot create the state folder {}: {e}", state_dir.display()))?;
        // The jail mirrors canonical host paths, so the paths the plugin is given are those.
        let state_dir = std::fs::canonicalize(&state_dir).unwrap_or(state_dir);
        let resolved = if program.is_absolute() {
            program.clone()
        } else {
            which(&program).unwrap_or_else(|| program.clone())
        };
        // execve does not search PATH; and the folder part is canonical (the file itself may
        // be a symlink a venv depends on, so it stays).
        let program = match (resolved.parent(), resolved.file_name()) {
            (Some(dir), Some(file)) => {
                std::fs::canonicalize(dir).map(|d| d.join(file)).unwrap_or(resolved.clone())
            }
            _ => resolved.clone(),
        };
        let dir = std::fs::canonicalize(&spec.dir).unwrap_or_else(|_| spec.dir.clone());
        let sandbox = SandboxPlan::build(spec, &resolved, &state_dir, &extra_read, host)?;
        if let Some((uid, gid)) = sandbox.run_as {
            nix::unistd::chown(
                &state_dir,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .map_err(|e| {
                format!("cannot hand {} to the plugin's user: {e}", state_dir.display())
            })?;
        }
        let mut env: Vec<(String, String)> = INHERITED_ENV
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect();
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
        }
        env.push(("PLUGD_FD".into(), PLUGIN_FD.to_string()));
        env.push(("PLUGD_PLUGIN_NAME".into(), m.name.clone()));
        env.push(("PLUGD_PLUGIN_VERSION".into(), m.version.to_string()));
        env.push(("PLUGD_STATE_DIR".into(), state_dir.display().to_string()));
        // For the SDKs' hint when an inet socket is refused (see the Python SDK's `serving`).
        env.push(("PLUGD_NETWORK".into(), m.sandbox.network.as_str().into()));
        if m.entrypoint.is_python() {
            // Output reaches the log line by line; the plugin folder is read-only anyway.
            env.push(("PYTHONUNBUFFERED".into(), "1".into()));
            env.push(("PYTHONDONTWRITEBYTECODE".into(), "1".into()));
        }
        if !m.sandbox.execve {
            // The SDK blocks execve for itself once it is running (see plugin-runner's lockdown).
            env.push(("PLUGD_LOCK_EXEC".into(), "1".into()));
        }
        env.extend(m.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(SpawnPlan {
            program,
            args,
            dir,
            env,
            sandbox: Arc::new(sandbox),
            transport: m.transport,
            listen: Vec::new(),
            shm: None,
        })
    }

    /// Hands `sockets` to the plugin the systemd way: descriptors 3.. with `LISTEN_FDS`,
    /// `LISTEN_FDNAMES` and `LISTEN_PID` (written by the child once it knows its pid); the
    /// protocol socket moves after them (`PLUGD_FD`).
    pub fn with_listeners(mut self, sockets: Vec<(&'static str, OwnedFd)>) -> SpawnPlan {
        if sockets.is_empty() {
            return self;
        }
        let n = sockets.len();
        let names: Vec<&str> = sockets.iter().map(|(name, _)| *name).collect();
        self.env
            .retain(|(k, _)| !matches!(k.as_str(), "PLUGD_FD" | "LISTEN_FDS" | "LISTEN_FDNAMES"));
        self.env.push(("PLUGD_FD".into(), (PLUGIN_FD + n as RawFd).to_string()));
        self.env.push(("LISTEN_FDS".into(), n.to_string()));
        self.env.push(("LISTEN_FDNAMES".into(), names.join(":")));
        self.listen = sockets;
        self
    }

    /// Hands the shared mapping `memfd` to the plugin (`transport = "shm"`): on the
    /// descriptor after the listeners (`PLUGD_SHM_FD`), with `PLUGD_SHM_WAIT`, and the
    /// protocol socket after it. Call it after [`SpawnPlan::with_listeners`].
    pub fn with_shm(mut self, memfd: OwnedFd, wait: plugin_proto::shm::WaitStrategy) -> SpawnPlan {
        let n = self.listen.len() as RawFd;
        self.env.retain(|(k, _)| !matches!(k.as_str(), "PLUGD_FD" | "PLUGD_SHM_FD"));
        self.env.push(("PLUGD_SHM_FD".into(), (PLUGIN_FD + n).to_string()));
        self.env.push(("PLUGD_SHM_WAIT".into(), wait.word().into()));
        self.env.push(("PLUGD_FD".into(), (PLUGIN_FD + n + 1).to_string()));
        self.shm = Some(memfd);
        self
    }
}

/// What to do about an entrypoint name found nowhere: a Python plugin is told how to name
/// its script or class, a native one to build it or give its path.
fn missing_name_hint(dir: &Path, name: &str) -> String {
    let python_here = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.path().extension().is_some_and(|x| x == "py"));
    if dir.join(format!("{name}.py")).is_file() {
        format!("{name}.py is here: for a Python plugin write entrypoint = \"{name}.py\" (or a class, \"module:Class\")")
    } else if python_here {
        "for a Python plugin name its script (entrypoint = \"main.py\") or its class (\"module:Class\"), or set runtime = \"python\"".into()
    } else {
        "build it (a Rust plugin: cargo build --release) or give its path".into()
    }
}

/// The program and arguments a spec runs: a path relative to the plugin folder, a bare
/// name found in the plugin folder or `bin_dirs`, or a command line.
pub fn entrypoint_program(
    spec: &PluginSpec,
    bin_dirs: &[PathBuf],
) -> Result<(PathBuf, Vec<String>), String> {
    let m = &spec.manifest;
    Ok(match &m.entrypoint {
        Entrypoint::Path(p) => {
            let full = spec.dir.join(p);
            check_executable(&full)
                .map_err(|e| format!("{}: `entrypoint` {e}", spec.manifest_path.display()))?;
            (full, Vec::new())
        }
        Entrypoint::Name(n) => {
            let dirs: Vec<PathBuf> =
                std::iter::once(spec.dir.clone()).chain(bin_dirs.iter().cloned()).collect();
            let found = dirs.iter().map(|d| d.join(n)).find(|p| check_executable(p).is_ok());
            let full = found.ok_or_else(|| {
                format!(
                    "{}: `entrypoint` = {n:?} was not found as an executable in {}; {}",
                    spec.manifest_path.display(),
                    dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "),
                    missing_name_hint(&spec.dir, n)
                )
            })?;
            (full, Vec::new())
        }
        Entrypoint::Command(argv) => (PathBuf::from(&argv[0]), argv[1..].to_vec()),
        // The module's file (what `entrypoint_sha256` pins); `SpawnPlan::for_spec` runs the
        // SDK's launcher with the venv python.
        Entrypoint::PyClass { module, .. } => {
            let path = spec.dir.join(module.replace('.', "/"));
            let file = path.with_extension("py");
            (if file.is_file() { file } else { path.join("__init__.py") }, Vec::new())
        }
        // The script itself; `SpawnPlan::for_spec` runs it with the plugin's venv python.
        Entrypoint::Script(p) => {
            let full = spec.dir.join(p);
            if !full.is_file() {
                return Err(format!(
                    "{}: `entrypoint` = {:?} is not a file in {}",
                    spec.manifest_path.display(),
                    p.display().to_string(),
                    spec.dir.display()
                ));
            }
            (full, Vec::new())
        }
    })
}

/// Finds a bare program name in `PATH`, for Landlock's execute rule.
fn which(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return std::fs::canonicalize(program).ok();
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| check_executable(p).is_ok())
}

/// A freshly spawned process, before it is attached to the async runtime.
pub struct RawChild {
    /// Process id of the tracked process (the jail's init, or the plugin); its group id.
    pub pid: i32,
    /// Process id of the plugin's own process, as the host sees it.
    pub plugin_pid: i32,
    /// Where the jail's init reports the plugin's wait status.
    pub status: Option<OwnedFd>,
    /// pidfd of the process.
    pub pidfd: OwnedFd,
    /// The supervisor's end of the protocol socket.
    pub socket: std::os::unix::net::UnixStream,
    /// The plugin's stdout pipe.
    pub stdout: OwnedFd,
    /// The plugin's stderr pipe.
    pub stderr: OwnedFd,
}

/// Replacing the whole process image (plugd's in-place upgrade).
pub struct ExecRequest {
    /// The program to exec.
    pub program: std::ffi::CString,
    /// argv, including argv[0].
    pub argv: Vec<std::ffi::CString>,
    /// The complete environment, as `KEY=value`.
    pub env: Vec<std::ffi::CString>,
    /// Descriptors that must survive the exec (their close-on-exec flag is cleared).
    pub keep_fds: Vec<RawFd>,
}

enum Job {
    Spawn(SpawnPlan, tokio::sync::oneshot::Sender<io::Result<RawChild>>),
    Exec(ExecRequest, tokio::sync::oneshot::Sender<io::Error>),
    Quit,
}

/// The long-lived thread that forks every plugin (see the module doc for why).
#[derive(Clone)]
pub struct Spawner {
    jobs: std::sync::mpsc::Sender<Job>,
}

/// The receiving end of a [`Spawner`], to run on the thread that is to fork every plugin.
pub struct SpawnerLoop {
    jobs: std::sync::mpsc::Receiver<Job>,
}

impl SpawnerLoop {
    /// Forks plugins (and runs an in-place exec) on the calling thread until every
    /// [`Spawner`] is dropped or [`Spawner::stop_loop`] is called. plugd runs it on the main
    /// thread: an exec keeps the calling thread, so the thread that forked the plugins of
    /// every generation is always the same one, and their parent-death signal never fires
    /// across any number of upgrades in a row.
    pub fn run(self) {
        for job in self.jobs {
            match job {
                Job::Spawn(plan, reply) => {
                    let _ = reply.send(spawn_now(&plan));
                }
                // Only returns if the exec failed.
                Job::Exec(req, reply) => {
                    let _ = reply.send(exec_now(&req));
                }
                Job::Quit => break,
            }
        }
    }
}

impl Spawner {
    /// A spawner served by the thread that will call [`SpawnerLoop::run`].
    pub fn on_current_thread() -> (Spawner, SpawnerLoop) {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        (Spawner { jobs: tx }, SpawnerLoop { jobs: rx })
    }

    /// Starts a dedicated spawner thread. It ends when the `Spawner` is dropped, and
    /// then the kernel kills every plugin it started.
    pub fn start() -> io::Result<Spawner> {
        let (spawner, lp) = Spawner::on_current_thread();
        std::thread::Builder::new().name("plugd-spawner".into()).spawn(move || lp.run())?;
        Ok(spawner)
    }

    /// Ends the loop once the jobs sent before are done (plugd's shutdown).
    pub fn stop_loop(&self) {
        let _ = self.jobs.send(Job::Quit);
    }

    /// Spawns a plugin process on the spawner thread.
    pub async fn spawn(&self, plan: SpawnPlan) -> io::Result<RawChild> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Job::Spawn(plan, tx))
            .map_err(|_| io::Error::other("the spawner thread has stopped"))?;
        rx.await.map_err(|_| io::Error::other("the spawner thread has stopped"))?
    }
}

impl Spawner {
    /// Replaces this process's image from the spawner thread, so that the plugins it
    /// forked keep their parent (PR_SET_PDEATHSIG follows the forking thread, and the
    /// thread that calls execve is the one that survives it). Returns only on failure.
    pub async fn exec(&self, req: ExecRequest) -> io::Error {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.jobs.send(Job::Exec(req, tx)).is_err() {
            return io::Error::other("the spawner thread has stopped");
        }
        rx.await.unwrap_or_else(|_| io::Error::other("the spawner thread has stopped"))
    }
}

fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    let flags = if on { nix::fcntl::FdFlag::FD_CLOEXEC } else { nix::fcntl::FdFlag::empty() };
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(flags)).map(|_| ()).map_err(io::Error::from)
}

fn exec_now(req: &ExecRequest) -> io::Error {
    for &fd in &req.keep_fds {
        if let Err(e) = set_cloexec(fd, false) {
            return io::Error::new(e.kind(), format!("keeping fd {fd} across exec: {e}"));
        }
    }
    let err = match nix::unistd::execve(&req.program, &req.argv, &req.env) {
        Err(e) => io::Error::from(e),
        Ok(never) => match never {},
    };
    for &fd in &req.keep_fds {
        let _ = set_cloexec(fd, true);
    }
    io::Error::new(err.kind(), format!("execve {:?}: {err}", req.program))
}

fn step<T>(what: &str, r: Result<T, impl Into<io::Error>>) -> io::Result<T> {
    r.map_err(|e| {
        let e: io::Error = e.into();
        io::Error::new(e.kind(), format!("{what}: {e}"))
    })
}

fn cstring(what: &str, s: &[u8]) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(s).map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{what} contains a NUL byte"))
    })
}

/// Pipe with both ends close-on-exec: (read, write).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    step("pipe", nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC))
}

/// Descriptor numbers the child arranges before anything else (see `child_fds`).
mod slot {
    pub const STDIN: i32 = 0;
    pub const STDOUT: i32 = 1;
    pub const STDERR: i32 = 2;
    pub const SOCKET: i32 = super::PLUGIN_FD;
    /// Where the child reports a failed step (close-on-exec, so exec closes it).
    pub const ERROR: i32 = 4;
    /// Where the init writes the plugin's wait status (jail only).
    pub const STATUS: i32 = 5;
    /// The supervisor's pidfd, to check it is still alive after each PR_SET_PDEATHSIG.
    pub const SUPERVISOR: i32 = 6;
    /// First descriptor that is closed.
    pub const FIRST_FREE: i32 = 7;
}

/// Everything the child touches, as raw values prepared before the clone.
struct ChildArgs<'a> {
    sandbox: &'a SandboxPlan,
    program: &'a std::ffi::CStr,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    dir: &'a std::ffi::CStr,
    /// (source descriptor, slot) pairs; -1 where there is none.
    fds: [(RawFd, RawFd); 7],
    /// Listening sockets to hand over (`[listen]`): placed on `FIRST_FREE..` by
    /// `child_fds`, moved to 3.. by `hand_listeners` in the plugin.
    listen: &'a [RawFd],
    /// Where the child writes its own pid, in decimal and NUL-terminated, into the
    /// `LISTEN_PID=` entry of `envp` (its private copy of this memory after the clone).
    listen_pid: *mut u8,
}

/// Sets the parent-death signal, then exits if the supervisor already died (the signal
/// would never come). Needed again after every credential change, which clears it.
/// Async-signal-safe.
fn die_with_supervisor(supervisor: RawFd) -> io::Result<()> {
    // SAFETY: prctl and poll with integers and a stack-owned pollfd.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut p = libc::pollfd { fd: supervisor, events: libc::POLLIN, revents: 0 };
        if libc::poll(&mut p, 1, 0) != 0 {
            libc::_exit(127);
        }
    }
    Ok(())
}

/// Reports a failed step through the error pipe and exits. Async-signal-safe.
fn fail(err_fd: RawFd, step: u32, index: u32, e: &io::Error) -> ! {
    let mut rec = [0u8; 12];
    rec[..4].copy_from_slice(&step.to_ne_bytes());
    rec[4..8].copy_from_slice(&index.to_ne_bytes());
    rec[8..].copy_from_slice(&e.raw_os_error().unwrap_or(libc::EIO).to_ne_bytes());
    // SAFETY: write from a stack buffer, then _exit; both async-signal-safe.
    unsafe {
        libc::write(err_fd, rec.as_ptr().cast(), rec.len());
        libc::_exit(127)
    }
}

/// The cloned child: pid 1 of the jail (then it forks the plugin) or, without a jail, the
/// plugin itself. Never returns. Async-signal-safe throughout: no allocation, no locks.
fn child_main(a: &ChildArgs<'_>) -> ! {
    let mut err_fd = a.fds[4].0;
    let jailed = a.sandbox.jail.is_some();
    if jailed {
        // The init takes its signals with sigwaitinfo; the plugin unblocks after its fork.
        crate::sandbox::jail::block_all_signals();
    }
    // The supervisor may have died between clone and prctl: then nobody would kill us.
    if let Err(e) = die_with_supervisor(a.fds[6].0) {
        fail(err_fd, step::PARENT, 0, &e);
    }
    // SAFETY: setpgid with integers only.
    unsafe { libc::setpgid(0, 0) };
    if let Err(e) = child_fds(&a.fds, a.listen) {
        fail(err_fd, step::FDS, 0, &e);
    }
    err_fd = slot::ERROR;
    if let Err(e) = a.sandbox.apply_cpus() {
        fail(err_fd, step::CPUS, 0, &e);
    }
    if let Err(e) = a.sandbox.apply_cgroup() {
        fail(err_fd, step::CGROUP, 0, &e);
    }
    let Some(jail) = &a.sandbox.jail else { exec_plugin(a, false) };
    if let Err((i, e)) = jail.build_in_child() {
        fail(err_fd, step::ROOT, i as u32, &e);
    }
    // The init drops to the plugin's ids too: it needs no privilege to reap and forward.
    if let Err(e) = a.sandbox.apply_identity() {
        fail(err_fd, step::IDS, 0, &e);
    }
    if let Err(e) = die_with_supervisor(slot::SUPERVISOR) {
        fail(err_fd, step::PARENT, 0, &e);
    }
    // SAFETY: a fork-like clone (no shared memory, no stack switch) followed in the child
    // only by async-signal-safe code; glibc's fork() is avoided because its atfork
    // handlers take locks another thread of the supervisor may have held at our clone.
    let plugin = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::SIGCHLD as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if plugin < 0 {
        fail(err_fd, step::FORK, 0, &io::Error::last_os_error());
    }
    if plugin == 0 {
        exec_plugin(a, true);
    }
    // SAFETY: close/dup2/prctl on descriptors and integers this process owns.
    unsafe {
        libc::close(slot::ERROR);
        libc::close(slot::SOCKET);
        libc::close(slot::SUPERVISOR);
        libc::syscall(libc::SYS_close_range, slot::FIRST_FREE as u32, u32::MAX, 0u32);
        libc::dup2(slot::STDIN, slot::STDOUT);
        libc::dup2(slot::STDIN, slot::STDERR);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    crate::sandbox::jail::init_loop(plugin as libc::pid_t, slot::STATUS)
}

/// Puts each descriptor on its slot, the listening sockets on `FIRST_FREE..`, and closes
/// everything else. Async-signal-safe.
fn child_fds(fds: &[(RawFd, RawFd); 7], listen: &[RawFd]) -> io::Result<()> {
    let mut high = [-1; 7];
    let above = slot::FIRST_FREE + listen.len() as RawFd;
    // First out of the way (a source may sit on another's slot), then into place.
    for (i, &(src, _)) in fds.iter().enumerate() {
        if src >= 0 {
            // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor we hold.
            high[i] = unsafe { libc::fcntl(src, libc::F_DUPFD_CLOEXEC, above) };
            if high[i] < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    for (i, &src) in listen.iter().enumerate() {
        // SAFETY: fcntl/dup2 on descriptors we hold: each listener goes out of the way,
        // then onto FIRST_FREE + i (not close-on-exec; its cloexec copy is closed below).
        unsafe {
            let h = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, above);
            if h < 0 || libc::dup2(h, slot::FIRST_FREE + i as RawFd) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    for (i, &(_, dst)) in fds.iter().enumerate() {
        // SAFETY: dup2 between descriptors we hold; the new one is not close-on-exec.
        if high[i] >= 0 && unsafe { libc::dup2(high[i], dst) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if high[i] < 0 {
            // An empty slot: whatever the supervisor had on that number is not passed on.
            // SAFETY: close on a descriptor number; EBADF (nothing there) is fine.
            unsafe { libc::close(dst) };
        }
    }
    // The error pipe must close at exec, so that the supervisor sees EOF on success.
    // SAFETY: fcntl and close_range on descriptor numbers only.
    unsafe {
        if libc::fcntl(slot::ERROR, libc::F_SETFD, libc::FD_CLOEXEC) != 0 {
            return Err(io::Error::last_os_error());
        }
        // Everything the supervisor had open (listeners, other plugins' sockets) is gone.
        if libc::syscall(libc::SYS_close_range, above as u32, u32::MAX, 0u32) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Moves `n` listening sockets from `FIRST_FREE..` to 3.. and the protocol socket after
/// them, and writes the plugin's pid into `LISTEN_PID`; returns where the error pipe went.
/// Runs before the rlimits (which may cap descriptor numbers). Async-signal-safe: fcntl,
/// dup2, close, getpid and writes to this process's own copy of the environment.
fn hand_listeners(n: RawFd, listen_pid: *mut u8) -> io::Result<RawFd> {
    let above = slot::FIRST_FREE + n;
    // SAFETY: fcntl/dup2/close on descriptors this process holds; `listen_pid` points at
    // 12 writable bytes of the environment block prepared before the clone (this process
    // has its own copy of that memory).
    unsafe {
        let err = libc::fcntl(slot::ERROR, libc::F_DUPFD_CLOEXEC, above);
        let sock = libc::fcntl(slot::SOCKET, libc::F_DUPFD, above);
        if err < 0 || sock < 0 {
            return Err(io::Error::last_os_error());
        }
        libc::close(slot::ERROR);
        // Upwards: slot 3+i is either free or a listener already moved (i >= 4).
        for i in 0..n {
            if libc::dup2(slot::FIRST_FREE + i, slot::SOCKET + i) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        for i in 0..n {
            if slot::FIRST_FREE + i > slot::SOCKET + n {
                libc::close(slot::FIRST_FREE + i);
            }
        }
        if libc::dup2(sock, slot::SOCKET + n) < 0 {
            return Err(io::Error::last_os_error());
        }
        libc::close(sock);
        if !listen_pid.is_null() {
            let mut pid = libc::getpid() as u32;
            let mut digits = [0u8; 11];
            let mut len = 0;
            loop {
                digits[len] = b'0' + (pid % 10) as u8;
                len += 1;
                pid /= 10;
                if pid == 0 {
                    break;
                }
            }
            for i in 0..len {
                *listen_pid.add(i) = digits[len - 1 - i];
            }
            *listen_pid.add(len) = 0;
        }
        Ok(err)
    }
}

/// The plugin's own process: signals, rlimits, identity (without a jail; inside one the
/// init already dropped it), no_new_privs, Landlock, seccomp, exec. Never returns.
fn exec_plugin(a: &ChildArgs<'_>, jailed: bool) -> ! {
    let mut err_fd = slot::ERROR;
    // SAFETY: sigaction/sigprocmask/close/prctl with stack-owned data and integers.
    unsafe {
        // Default dispositions (Rust ignores SIGPIPE; the supervisor's handlers mean nothing
        // here) and an empty mask, as after a plain fork+exec.
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for sig in 1..libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
            fail(err_fd, step::SIGNALS, 0, &io::Error::last_os_error());
        }
        libc::close(slot::STATUS);
        libc::close(slot::SUPERVISOR);
        if jailed && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            fail(err_fd, step::SIGNALS, 0, &io::Error::last_os_error());
        }
    }
    if !a.listen.is_empty() {
        match hand_listeners(a.listen.len() as RawFd, a.listen_pid) {
            Ok(moved) => err_fd = moved,
            Err(e) => fail(err_fd, step::FDS, 1, &e),
        }
    }
    if let Err(e) = a.sandbox.apply_rlimits() {
        fail(err_fd, step::RLIMITS, 0, &e);
    }
    if !jailed {
        if let Err(e) = a.sandbox.apply_identity() {
            fail(err_fd, step::IDS, 0, &e);
        }
    }
    // SAFETY: chdir to a NUL-terminated path prepared before the clone.
    if unsafe { libc::chdir(a.dir.as_ptr()) } != 0 {
        fail(err_fd, step::CHDIR, 0, &io::Error::last_os_error());
    }
    if let Err((step, e)) = a.sandbox.apply_confinement() {
        fail(err_fd, step, 0, &e);
    }
    // SAFETY: null-terminated arrays of pointers into CStrings that outlive this call.
    unsafe { libc::execve(a.program.as_ptr(), a.argv.as_ptr(), a.envp.as_ptr()) };
    fail(err_fd, step::EXEC, 0, &io::Error::last_os_error())
}

fn spawn_now(plan: &SpawnPlan) -> io::Result<RawChild> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (ours, theirs) = step(
        "socketpair",
        socketpair(
            AddressFamily::Unix,
            match plan.transport {
                Transport::Stream | Transport::Shm => SockType::Stream,
                Transport::SeqPacket => SockType::SeqPacket,
            },
            None,
            SockFlag::SOCK_CLOEXEC,
        ),
    )?;
    let c = clone_sandboxed(plan, theirs.as_raw_fd())?;
    drop(theirs);
    Ok(RawChild {
        pid: c.pid,
        plugin_pid: c.plugin_pid,
        pidfd: c.pidfd,
        socket: std::os::unix::net::UnixStream::from(ours),
        stdout: c.stdout,
        stderr: c.stderr,
        status: c.status,
    })
}

/// A process cloned into its sandbox and past its exec, not yet waited for.
struct Cloned {
    pid: i32,
    plugin_pid: i32,
    pidfd: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    status: Option<OwnedFd>,
}

/// Clones the child of `plan` (into its jail, if it has one) with `socket` on fd 3 (-1:
/// none), and waits until it has exec'd or reported the step that failed.
fn clone_sandboxed(plan: &SpawnPlan, socket: RawFd) -> io::Result<Cloned> {
    let (out_r, out_w) = pipe()?;
    let (errout_r, errout_w) = pipe()?;
    let (report_r, report_w) = pipe()?;
    let jailed = plan.sandbox.jail.is_some();
    let status = if jailed { Some(pipe()?) } else { None };
    let devnull = step(
        "open /dev/null",
        nix::fcntl::open(
            "/dev/null",
            nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        ),
    )?;
    // SAFETY: open returned this descriptor to us; nothing else owns it.
    let devnull = unsafe { OwnedFd::from_raw_fd(devnull) };
    let me = step("pidfd_open (self)", pidfd_open(std::process::id() as i32))?;

    let program = cstring("the program path", plan.program.as_os_str().as_encoded_bytes())?;
    let mut argv_c = vec![program.clone()];
    for a in &plan.args {
        argv_c.push(cstring("an argument", a.as_bytes())?);
    }
    let mut env_c = Vec::new();
    for (k, v) in &plan.env {
        env_c.push(cstring("the environment", format!("{k}={v}").as_bytes())?);
    }
    // `LISTEN_PID=` and room for the pid the child writes itself (see `hand_listeners`).
    let mut pid_entry: Vec<u8> = b"LISTEN_PID=000000000000\0".to_vec();
    // The listeners, then the shared mapping: all moved to 3.. by `hand_listeners`.
    let listen: Vec<RawFd> = plan
        .listen
        .iter()
        .map(|(_, fd)| fd.as_raw_fd())
        .chain(plan.shm.as_ref().map(|fd| fd.as_raw_fd()))
        .collect();
    let argv: Vec<*const libc::c_char> =
        argv_c.iter().map(|c| c.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    let mut envp: Vec<*const libc::c_char> = env_c.iter().map(|c| c.as_ptr()).collect();
    let listen_pid = if plan.listen.is_empty() {
        std::ptr::null_mut()
    } else {
        envp.push(pid_entry.as_ptr().cast());
        // SAFETY: "LISTEN_PID=" is 11 bytes; 12 more follow it in the buffer.
        unsafe { pid_entry.as_mut_ptr().add(11) }
    };
    envp.push(std::ptr::null());
    let dir = cstring("the plugin folder", plan.dir.as_os_str().as_encoded_bytes())?;
    let args = ChildArgs {
        sandbox: &plan.sandbox,
        program: &program,
        argv: &argv,
        envp: &envp,
        dir: &dir,
        fds: [
            (devnull.as_raw_fd(), slot::STDIN),
            (out_w.as_raw_fd(), slot::STDOUT),
            (errout_w.as_raw_fd(), slot::STDERR),
            (socket, slot::SOCKET),
            (report_w.as_raw_fd(), slot::ERROR),
            (status.as_ref().map(|(_, w)| w.as_raw_fd()).unwrap_or(-1), slot::STATUS),
            (me.as_raw_fd(), slot::SUPERVISOR),
        ],
        listen: &listen,
        listen_pid,
    };
    let flags = plan.sandbox.jail.as_ref().map(|j| j.clone_flags).unwrap_or(0);
    let mut pidfd: libc::c_int = -1;
    // SAFETY: a fork-like clone (no CLONE_VM, no new stack): the child gets a copy of this
    // thread's memory and runs only `child_main`, which is async-signal-safe and never
    // returns. CLONE_PIDFD stores the child's pidfd in `pidfd`, a live local.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::CLONE_PIDFD | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            &mut pidfd as *mut libc::c_int,
            0usize,
            0usize,
        )
    };
    if pid == 0 {
        child_main(&args);
    }
    if pid < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("clone (namespaces {flags:#x}): {e}")));
    }
    let pid = pid as i32;
    // SAFETY: CLONE_PIDFD filled in a new descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    drop((out_w, errout_w, report_w, devnull, me));
    let status = status.map(|(r, _w)| r);

    // EOF: the plugin exec'd. A record: a step failed.
    let mut rec = [0u8; 12];
    let mut got = 0;
    while got < rec.len() {
        match nix::unistd::read(report_r.as_raw_fd(), &mut rec[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                return Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("reading the child's report: {e}"),
                ))
            }
        }
    }
    if got > 0 {
        let word = |i: usize| [rec[i], rec[i + 1], rec[i + 2], rec[i + 3]];
        let (st, index, errno) =
            (u32::from_ne_bytes(word(0)), u32::from_ne_bytes(word(4)), i32::from_ne_bytes(word(8)));
        // SAFETY: pidfd_send_signal on the child's pidfd with no siginfo.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                libc::SIGKILL,
                0usize,
                0u32,
            )
        };
        let _ = waitid(pidfd.as_fd(), libc::WEXITED);
        let mut what = if st == step::EXEC {
            format!("exec {}: {}", plan.program.display(), io::Error::from_raw_os_error(errno))
        } else {
            crate::sandbox::explain_failure(&plan.sandbox, st, index, errno)
        };
        if let (true, Some((uid, gid))) =
            (st == step::EXEC || st == step::CHDIR, plan.sandbox.run_as)
        {
            if errno == libc::EACCES {
                what.push_str(&format!(
                    " (the plugin runs as uid {uid}, gid {gid}: its folder and program must be readable and executable by it — `chmod o+rX` them, or install the plugin with `plugctl install`, which hands the copy to the plugin's group)"
                ));
            }
        }
        return Err(io::Error::new(io::Error::from_raw_os_error(errno).kind(), what));
    }
    // Inside a jail the plugin is the init's only child at this point.
    let plugin_pid = if jailed { children_of(pid).first().copied().unwrap_or(pid) } else { pid };
    Ok(Cloned { pid, plugin_pid, pidfd, stdout: out_r, stderr: errout_r, status })
}

/// An install step's process (a `[build]` command, venv creation, pip), cloned into its
/// sandbox (see `SandboxPlan::for_job`) from the calling thread. That thread must be the
/// one that waits for it: the parent-death signal follows the thread that cloned.
pub struct JobProcess {
    pid: i32,
    pidfd: OwnedFd,
    status: Option<OwnedFd>,
    reaped: bool,
}

impl JobProcess {
    /// Starts `plan` with no protocol socket; returns the process, its stdout and stderr.
    pub fn start(plan: &SpawnPlan) -> io::Result<(JobProcess, OwnedFd, OwnedFd)> {
        let c = clone_sandboxed(plan, -1)?;
        Ok((
            JobProcess { pid: c.pid, pidfd: c.pidfd, status: c.status, reaped: false },
            c.stdout,
            c.stderr,
        ))
    }

    /// Waits up to `timeout` for the step to end, or for `wake` to turn readable (a
    /// cancel); its exit status once it has ended (reaped, with whatever it left behind
    /// killed), else `None`.
    pub fn wait_or(
        &mut self,
        wake: Option<std::os::fd::BorrowedFd<'_>>,
        timeout: Duration,
    ) -> Option<WaitStatus> {
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        let mut p = [
            libc::pollfd { fd: self.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd {
                fd: wake.map(|w| w.as_raw_fd()).unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on two stack-owned pollfds naming descriptors we hold (a negative fd
        // is ignored by poll).
        if unsafe { libc::poll(p.as_mut_ptr(), 2, ms) } <= 0 || p[0].revents == 0 {
            return None;
        }
        let (status, _) = try_reap(self.pidfd.as_fd(), self.pid)?;
        self.reaped = true;
        Some(self.status.as_ref().and_then(|fd| reported_status(fd.as_fd())).unwrap_or(status))
    }

    /// Kills the step and everything it started (its whole pid namespace when jailed).
    pub fn kill(&self) {
        if !self.reaped {
            let _ = nix::sys::signal::killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
            // SAFETY: pidfd_send_signal on a pidfd we own, with no siginfo.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    self.pidfd.as_raw_fd(),
                    libc::SIGKILL,
                    0usize,
                    0u32,
                )
            };
        }
    }
}

impl Drop for JobProcess {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill();
            let _ = waitid(self.pidfd.as_fd(), libc::WEXITED);
        }
    }
}

pub use crate::proc::proc_usage;
use crate::proc::{children_of, descendants, rss_of, zombie_cpu_secs};

// pidfd_open and waitid(P_PIDFD) stay raw libc calls: nix 0.29 has no pidfd API, and
// rustix (which has) would bring rustix and linux-raw-sys, taking the host library to 60
// crates, over the budget supervisor/tests/footprint.rs holds.
fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// How a process ended, as the kernel reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStatus {
    /// Normal exit with a status.
    Exited(i32),
    /// Killed by a signal.
    Signaled {
        /// Signal number.
        signal: i32,
        /// Core dumped.
        core_dumped: bool,
    },
}

impl WaitStatus {
    /// The exit reason when nothing else explains the exit.
    pub fn as_reason(self) -> ExitReason {
        match self {
            WaitStatus::Exited(code) => ExitReason::Exited { code },
            WaitStatus::Signaled { signal, core_dumped } => {
                ExitReason::Signaled { signal, core_dumped }
            }
        }
    }
}

/// What a [`Process`] gives up when it is handed to a successor (in-place upgrade).
pub struct Released {
    /// The tracked process (the jail's init, or the plugin).
    pub pid: i32,
    /// The plugin's own process.
    pub plugin_pid: i32,
    /// pidfd of the tracked process.
    pub pidfd: OwnedFd,
    /// The jail's status pipe, if any.
    pub status: Option<OwnedFd>,
}

/// A running plugin process, owned until reaped. Dropping it kills its process group
/// (and, in a jail, every process of the plugin: the init dies, the namespace with it).
pub struct Process {
    pid: i32,
    plugin_pid: i32,
    pidfd: AsyncFd<OwnedFd>,
    status: Option<OwnedFd>,
    reaped: Option<WaitStatus>,
    cpu_secs: Option<f64>,
    /// Handed over to a successor (in-place upgrade): dropping must not kill it.
    released: bool,
}

impl Process {
    /// Takes ownership of a spawned child (must run inside the tokio runtime). In a jail,
    /// `pid` is the init, `plugin_pid` the plugin and `status` the init's status pipe.
    pub fn attach(
        pid: i32,
        plugin_pid: i32,
        pidfd: OwnedFd,
        status: Option<OwnedFd>,
    ) -> io::Result<Process> {
        // SAFETY: the OwnedFd moves into the AsyncFd and is only closed when the AsyncFd
        // drops it, so the descriptor stays open and unchanged for the AsyncFd's lifetime.
        let pidfd =
            unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }?;
        Ok(Process {
            pid,
            plugin_pid,
            pidfd,
            status,
            reaped: None,
            cpu_secs: None,
            released: false,
        })
    }

    /// Process id of the plugin's own process (as the host sees it).
    pub fn pid(&self) -> u32 {
        self.plugin_pid as u32
    }

    /// The exit status, once reaped.
    pub fn status(&self) -> Option<WaitStatus> {
        self.reaped
    }

    /// Gives up ownership without killing (for a successor process to adopt).
    pub fn release(mut self) -> io::Result<Released> {
        let pidfd = self.pidfd.get_ref().try_clone()?;
        let status = self.status.take();
        self.released = true;
        Ok(Released { pid: self.pid, plugin_pid: self.plugin_pid, pidfd, status })
    }

    /// CPU seconds (user + system, with reaped children) the tracked process had used when
    /// it exited, read from its zombie; in a jail that includes the plugin, which the init reaped.
    pub fn cpu_secs(&self) -> Option<f64> {
        self.cpu_secs
    }

    /// Resident memory of every process of the plugin, in bytes (None once gone). In a
    /// jail the init is left out: it is a copy-on-write image of the supervisor.
    pub fn rss_bytes(&self) -> Option<u64> {
        if self.reaped.is_some() {
            return None;
        }
        let jailed = self.status.is_some();
        let own = if jailed { 0 } else { rss_of(self.pid)? };
        Some(own + descendants(self.pid).into_iter().filter_map(rss_of).sum::<u64>())
    }

    /// Sends `signal` to the whole process group (plugin and everything it forked; in a
    /// jail the init passes it on to the processes that left the group too).
    pub fn signal_group(&self, signal: Signal) {
        if self.reaped.is_none() {
            // The leader is not reaped, so the group id cannot have been reused.
            let _ = nix::sys::signal::killpg(Pid::from_raw(self.pid), signal);
        }
    }

    /// Waits for the leader to exit, kills what is left of its group, and reaps it.
    pub async fn wait(&mut self) -> WaitStatus {
        if let Some(s) = self.reaped {
            return s;
        }
        let status = loop {
            match self.pidfd.readable().await {
                Ok(mut guard) => {
                    if let Some((status, cpu)) = try_reap(self.pidfd.get_ref().as_fd(), self.pid) {
                        self.cpu_secs = cpu;
                        break status;
                    }
                    guard.clear_ready();
                }
                Err(_) => {
                    // The reactor refused the descriptor; fall back to a blocking wait.
                    break reap_blocking(self.pidfd.get_ref().as_fd(), self.pid);
                }
            }
        };
        let status =
            self.status.as_ref().and_then(|fd| reported_status(fd.as_fd())).unwrap_or(status);
        self.reaped = Some(status);
        status
    }
}

/// The plugin's wait status as its init wrote it (absent if the init was killed first).
fn reported_status(fd: std::os::fd::BorrowedFd<'_>) -> Option<WaitStatus> {
    let mut buf = [0u8; 4];
    // The init wrote it before exiting, and it has been reaped: the bytes are there or never.
    // SAFETY: a non-blocking read into a stack buffer we own.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), 4, libc::MSG_DONTWAIT) };
    let n = if n < 0 {
        // A pipe is not a socket: fall back to read (the write end is closed, so it cannot block).
        // SAFETY: as above.
        unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), 4) }
    } else {
        n
    };
    if n != 4 {
        return None;
    }
    let raw = i32::from_ne_bytes(buf);
    Some(if libc::WIFEXITED(raw) {
        WaitStatus::Exited(libc::WEXITSTATUS(raw))
    } else {
        WaitStatus::Signaled { signal: libc::WTERMSIG(raw), core_dumped: libc::WCOREDUMP(raw) }
    })
}

/// Kills leftovers of the group, then reaps the exited leader (and returns the CPU
/// seconds it used); `None` if it is still running.
fn try_reap(pidfd: std::os::fd::BorrowedFd<'_>, pid: i32) -> Option<(WaitStatus, Option<f64>)> {
    waitid(pidfd, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT)?;
    let cpu = zombie_cpu_secs(pid);
    // The leader has exited but is still a zombie: its group id is reserved, so
    // killing the group now cannot reach an unrelated process.
    let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
    waitid(pidfd, libc::WEXITED).map(|s| (s, cpu))
}

fn reap_blocking(pidfd: std::os::fd::BorrowedFd<'_>, pid: i32) -> WaitStatus {
    let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
    waitid(pidfd, libc::WEXITED).unwrap_or(WaitStatus::Signaled { signal: 9, core_dumped: false })
}

fn waitid(pidfd: std::os::fd::BorrowedFd<'_>, flags: libc::c_int) -> Option<WaitStatus> {
    // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: P_PIDFD with a descriptor we own, and a pointer to a siginfo_t we own.
        let rc = unsafe {
            libc::waitid(libc::P_PIDFD, pidfd.as_raw_fd() as libc::id_t, &mut info, flags)
        };
        if rc == 0 {
            break;
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return None;
        }
    }
    // SAFETY: waitid filled `info` for a child-state change (or left it zeroed under WNOHANG);
    // si_pid and si_status are the SIGCHLD fields of the union.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return None;
    }
    Some(match info.si_code {
        libc::CLD_EXITED => WaitStatus::Exited(status),
        libc::CLD_DUMPED => WaitStatus::Signaled { signal: status, core_dumped: true },
        _ => WaitStatus::Signaled { signal: status, core_dumped: false },
    })
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.reaped.is_some() || self.released {
            return;
        }
        // Nobody waited for this process: kill its group and reap it off-thread,
        // so no plugin outlives its handle and no zombie is left behind.
        let _ = nix::sys::signal::killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        if let Ok(fd) = self.pidfd.get_ref().try_clone() {
            let _ = std::thread::Builder::new().name("plugd-reaper".into()).spawn(move || {
                let _ = waitid(fd.as_fd(), libc::WEXITED);
            });
        }
    }
}

/// The SHA-256 of a file, as lowercase hex.
pub fn sha256_of(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
