//! Starting a plugin process and owning it until it is reaped.
//!
//! The order is fixed and every failing step is named: resolve the
//! entrypoint → socketpair → (fork) own process group → parent-death signal →
//! sandbox (see `sandbox`) → protocol socket on fd 3 → exec. Everything the child runs between fork and
//! exec is prepared before the fork and is async-signal-safe.
//!
//! Processes are tracked by pidfd: we wait for exit by polling the pidfd and
//! reap through it. Signals go to the whole process group with `killpg`, and
//! only while the leader is not yet reaped — a live or zombie leader keeps its
//! pid and group id reserved, so a recycled PID can never be hit.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits,
//! not the process. All forks therefore happen on one dedicated spawner
//! thread that lives as long as the [`Spawner`]; tokio's blocking-pool
//! threads, which come and go, would kill plugins at random.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;

use crate::exit::ExitReason;
use crate::manifest::{check_executable, Entrypoint, PluginSpec, Transport};
use crate::sandbox::{explain_spawn_error, HostFacts, SandboxPlan};

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
    /// The sandbox the child applies to itself before exec.
    pub sandbox: Arc<SandboxPlan>,
    /// The kind of socket the plugin talks on.
    pub transport: Transport,
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
        let mut extra_read = Vec::new();
        if let Entrypoint::Script(_) = &m.entrypoint {
            // Built beforehand by `python::prepare` (the slot does it on a blocking thread).
            let env = crate::python::current(spec, state_root)?;
            args = vec![program.display().to_string()];
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
        let resolved = if program.is_absolute() {
            program.clone()
        } else {
            which(&program).unwrap_or_else(|| program.clone())
        };
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
        if let Entrypoint::Script(_) = &m.entrypoint {
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
            dir: spec.dir.clone(),
            env,
            sandbox: Arc::new(sandbox),
            transport: m.transport,
        })
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
                    "{}: `entrypoint` = {n:?} was not found as an executable in {}; build it (cargo build --workspace) or give a path",
                    spec.manifest_path.display(),
                    dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
                )
            })?;
            (full, Vec::new())
        }
        Entrypoint::Command(argv) => (PathBuf::from(&argv[0]), argv[1..].to_vec()),
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
    /// Process id (also its process group id).
    pub pid: i32,
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
}

/// The long-lived thread that forks every plugin (see the module doc for why).
pub struct Spawner {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl Spawner {
    /// Starts the spawner thread. It ends when the `Spawner` is dropped, and
    /// then the kernel kills every plugin it started.
    pub fn start() -> io::Result<Spawner> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new().name("plugd-spawner".into()).spawn(move || {
            for job in rx {
                match job {
                    Job::Spawn(plan, reply) => {
                        let _ = reply.send(spawn_now(&plan));
                    }
                    // Only returns if the exec failed.
                    Job::Exec(req, reply) => {
                        let _ = reply.send(exec_now(&req));
                    }
                }
            }
        })?;
        Ok(Spawner { jobs: tx })
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

fn spawn_now(plan: &SpawnPlan) -> io::Result<RawChild> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (ours, theirs) = step(
        "socketpair",
        socketpair(
            AddressFamily::Unix,
            match plan.transport {
                Transport::Stream => SockType::Stream,
                Transport::SeqPacket => SockType::SeqPacket,
            },
            None,
            SockFlag::SOCK_CLOEXEC,
        ),
    )?;
    let child_fd = theirs.as_raw_fd();
    let parent = nix::unistd::getpid();
    let sandbox = plan.sandbox.clone();

    let mut cmd = Command::new(&plan.program);
    cmd.args(&plan.args)
        .current_dir(&plan.dir)
        .env_clear()
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec. It only makes
    // raw syscalls (setpgid, prctl, getppid, dup2, fcntl) through nix wrappers
    // that neither allocate nor take locks, and it captures only plain integers.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0))?;
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The supervisor may have died between fork and prctl: then nobody would kill us.
            if nix::unistd::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            // The sandbox goes first: it refers to descriptors by number (the Landlock
            // ruleset), and one of them may be 3, which the dup2 below would overwrite.
            sandbox.apply_in_child()?;
            if child_fd == PLUGIN_FD {
                nix::fcntl::fcntl(
                    PLUGIN_FD,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                )?;
            } else {
                // dup2 leaves the new descriptor without FD_CLOEXEC, so it survives exec.
                nix::unistd::dup2(child_fd, PLUGIN_FD)?;
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| match explain_spawn_error(&e) {
        Some(why) => io::Error::other(why),
        None => io::Error::new(e.kind(), format!("exec {}: {e}", plan.program.display())),
    })?;
    drop(theirs);
    let pid = child.id() as i32;
    let pidfd = match pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = child.wait();
            return Err(io::Error::new(e.kind(), format!("pidfd_open: {e}")));
        }
    };
    // Both pipes were requested above, so they are present.
    let stdout: OwnedFd =
        child.stdout.take().map(OwnedFd::from).ok_or_else(|| io::Error::other("no stdout pipe"))?;
    let stderr: OwnedFd =
        child.stderr.take().map(OwnedFd::from).ok_or_else(|| io::Error::other("no stderr pipe"))?;
    Ok(RawChild { pid, pidfd, socket: std::os::unix::net::UnixStream::from(ours), stdout, stderr })
}

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

/// A running plugin process, owned until reaped. Dropping it kills its process group.
pub struct Process {
    pid: i32,
    pidfd: AsyncFd<OwnedFd>,
    reaped: Option<WaitStatus>,
    cpu_secs: Option<f64>,
    /// Handed over to a successor (in-place upgrade): dropping must not kill it.
    released: bool,
}

impl Process {
    /// Takes ownership of a spawned child (must run inside the tokio runtime).
    pub fn attach(pid: i32, pidfd: OwnedFd) -> io::Result<Process> {
        // SAFETY: the OwnedFd moves into the AsyncFd and is only closed when the AsyncFd
        // drops it, so the descriptor stays open and unchanged for the AsyncFd's lifetime.
        let pidfd =
            unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }?;
        Ok(Process { pid, pidfd, reaped: None, cpu_secs: None, released: false })
    }

    /// Process id (and process group id).
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// The exit status, once reaped.
    pub fn status(&self) -> Option<WaitStatus> {
        self.reaped
    }

    /// Gives up ownership without killing: returns the pid and a duplicate of the pidfd
    /// (for a successor process to adopt).
    pub fn release(mut self) -> io::Result<(i32, OwnedFd)> {
        let fd = self.pidfd.get_ref().try_clone()?;
        self.released = true;
        Ok((self.pid, fd))
    }

    /// CPU seconds (user + system) the leader had used when it exited, read from its zombie.
    pub fn cpu_secs(&self) -> Option<f64> {
        self.cpu_secs
    }

    /// Resident memory of the running leader, in bytes (from /proc; None once gone).
    pub fn rss_bytes(&self) -> Option<u64> {
        if self.reaped.is_some() {
            return None;
        }
        rss_of(self.pid)
    }

    /// Sends `signal` to the whole process group (plugin and everything it forked).
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
        loop {
            match self.pidfd.readable().await {
                Ok(mut guard) => {
                    if let Some((status, cpu)) = try_reap(self.pidfd.get_ref().as_fd(), self.pid) {
                        self.reaped = Some(status);
                        self.cpu_secs = cpu;
                        return status;
                    }
                    guard.clear_ready();
                }
                Err(_) => {
                    // The reactor refused the descriptor; fall back to a blocking wait.
                    let status = reap_blocking(self.pidfd.get_ref().as_fd(), self.pid);
                    self.reaped = Some(status);
                    return status;
                }
            }
        }
    }
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

/// Resident memory (bytes) and CPU time used (seconds, user + system) of a process, from
/// /proc; for status displays and metrics.
pub fn proc_usage(pid: u32) -> Option<(u64, f64)> {
    Some((rss_of(pid as i32)?, zombie_cpu_secs(pid as i32)?))
}

/// Resident memory of a process in bytes, from /proc/<pid>/statm.
fn rss_of(pid: i32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf with a constant name has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    Some(pages * page)
}

/// utime + stime of a process (running, or exited and not yet reaped), from /proc/<pid>/stat.
fn zombie_cpu_secs(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command name: state is field 3, utime field 14, stime field 15 (1-based).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf with a constant name has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((utime + stime) / hz)
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
