//! The jail: the namespaces a plugin is cloned into, the minimal root it sees, and the
//! tiny init that is pid 1 inside.
//!
//! ```text
//! spawner thread ──clone(NEWPID|NEWNS|NEWIPC|NEWUTS[|NEWNET])──▶ init (pid 1, host pid tracked by pidfd)
//!                                                                 │ builds the root, then fork
//!                                                                 ▼
//!                                                               plugin (pid 2) ── drops ids, caps,
//!                                                                                 Landlock, seccomp, exec
//! ```
//!
//! The root is a fresh tmpfs (mounted over the empty `<state_root>/.jail` folder, in the
//! plugin's own mount namespace only) holding read-only binds of what the plugin needs at
//! the same paths as on the host — the system's `/usr` (and the `/bin`, `/lib*`
//! symlinks), its folder, its executable, its venv and interpreter, declared read paths —
//! a generated `/etc`, a `/dev` with null, zero, full, random and urandom only, its own
//! `/proc`, a private size-limited `/tmp`, and its state folder read-write. Then
//! `pivot_root` and the old root is detached: plugd's socket, config, token, the other
//! plugins' state and the rest of the host are not in the plugin's world at all.
//!
//! Everything is planned in the supervisor as a list of [`Op`]s (paths as C strings);
//! the init runs them in order with single syscalls, allocating nothing. A failing op is
//! reported by its index, which [`Jail::describe`] turns back into words.
//!
//! The init forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 from outside to
//! every process of the plugin, reaps orphans, and when the plugin's own process ends
//! writes its wait status to a pipe the supervisor reads, then exits; the kernel then
//! kills whatever is left in the pid namespace — a `setsid` double-fork included.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

/// One step of building the root, run in order by the init.
#[derive(Debug)]
enum Op {
    /// No mount event propagates between this namespace and the host.
    MakePrivate,
    Mount {
        src: Option<CString>,
        dst: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    Mkdir(CString),
    Touch(CString),
    Symlink {
        target: CString,
        path: CString,
    },
    Write {
        path: CString,
        text: Vec<u8>,
    },
    /// Writes an existing kernel file (`/proc/self/uid_map`): no create, no truncate.
    Proc {
        path: CString,
        text: Vec<u8>,
    },
    /// chdir into the new root, `pivot_root(".", ".")`, detach the old root.
    Pivot(CString),
}

/// How a path is bound into the jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Bind {
    /// Read-only, nosuid, nodev.
    ReadOnly,
    /// Read-write, nosuid, nodev, noexec.
    ReadWrite,
    /// Read-write with exec allowed, nosuid, nodev: the folder an install step builds in.
    Workspace,
    /// A device node: read-only mount, nosuid, noexec (devices stay usable).
    Device,
}

/// Everything the init needs, prepared before the fork.
#[derive(Debug)]
pub struct Jail {
    /// Namespace flags for `clone`.
    pub clone_flags: libc::c_int,
    ops: Vec<Op>,
    hostname: CString,
    /// What is visible inside, for the report and for Landlock: (path, how).
    pub binds: Vec<(PathBuf, Bind)>,
    /// The jail has its own root (else: own namespaces and /proc, host file system).
    pub own_root: bool,
}

fn c(path: &Path) -> CString {
    // Paths come from canonicalize or the manifest; a NUL byte is rejected earlier.
    CString::new(path.as_os_str().as_encoded_bytes()).unwrap_or_default()
}

fn cs(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

/// Files from the host's `/etc` a plugin may need, bound read-only where they exist.
const HOST_ETC: &[&str] = &[
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/alternatives",
    "/etc/mime.types",
];

/// System folders bound read-only (or re-created as the symlinks they are on the host).
const SYSTEM: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"];

/// Device nodes a plugin gets.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom"];

/// What goes into a plugin's jail, as the supervisor sees it before the fork.
#[derive(Debug)]
pub struct JailSpec<'a> {
    /// Plugin name (hostname inside, the account name in /etc/passwd).
    pub name: &'a str,
    /// The empty host folder the new root is mounted on.
    pub staging: &'a Path,
    /// uid/gid the plugin runs as.
    pub uid: u32,
    /// gid.
    pub gid: u32,
    /// `network = "none"`: own network namespace.
    pub own_network: bool,
    /// `filesystem = "isolated"`: build a minimal root (else only namespaces and /proc).
    pub own_root: bool,
    /// Read-only paths (plugin folder, executables, venv, interpreter, read_paths).
    pub read: Vec<PathBuf>,
    /// Read-write paths (state folder, write_paths).
    pub write: Vec<PathBuf>,
    /// The write paths may hold programs that run (an install step's workspace).
    pub write_exec: bool,
    /// Size of the private /tmp in bytes.
    pub tmp_size: u64,
    /// plugd is not root: a user namespace of its own, mapping uid/gid 0 inside to these
    /// (plugd's own) outside; `uid`/`gid` above are then the ids inside (0).
    pub user_ns: Option<(u32, u32)>,
}

impl Jail {
    /// Plans the jail. Fails on a path that cannot be bound (missing, or `/`).
    pub fn plan(spec: &JailSpec<'_>) -> Result<Jail, String> {
        let mut flags =
            libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        if spec.own_network {
            flags |= libc::CLONE_NEWNET;
        }
        let mut jail = Jail {
            clone_flags: flags,
            ops: Vec::new(),
            hostname: cs(&format!("plugd-{}", spec.name)),
            binds: Vec::new(),
            own_root: spec.own_root,
        };
        if let Some((uid, gid)) = spec.user_ns {
            // The cloned process maps itself: one id, its own (the only mapping an
            // unprivileged process may write), after giving up setgroups.
            jail.clone_flags |= libc::CLONE_NEWUSER;
            for (file, text) in [
                ("setgroups", "deny".to_string()),
                ("uid_map", format!("0 {uid} 1\n")),
                ("gid_map", format!("0 {gid} 1\n")),
            ] {
                jail.ops.push(Op::Proc {
                    path: cs(&format!("/proc/self/{file}")),
                    text: text.into_bytes(),
                });
            }
        }
        jail.ops.push(Op::MakePrivate);
        if !spec.own_root {
            // The host's file system, but a /proc that shows the plugin's pid namespace.
            jail.mount(
                Some("proc"),
                Path::new("/proc"),
                Some("proc"),
                NOSUID | NODEV | NOEXEC,
                None,
            );
            return Ok(jail);
        }
        let root = spec.staging;
        let at = |p: &str| root.join(p.trim_start_matches('/'));
        jail.mount(Some("tmpfs"), root, Some("tmpfs"), NOSUID | NODEV, Some("mode=0755,size=16m"));
        jail.ops.push(Op::Mkdir(c(&at("/proc"))));
        jail.mount(Some("proc"), &at("/proc"), Some("proc"), NOSUID | NODEV | NOEXEC, None);
        jail.ops.push(Op::Mkdir(c(&at("/tmp"))));
        let tmp = format!("mode=0700,uid={},gid={},size={}", spec.uid, spec.gid, spec.tmp_size);
        jail.mount(Some("tmpfs"), &at("/tmp"), Some("tmpfs"), NOSUID | NODEV, Some(&tmp));
        jail.ops.push(Op::Mkdir(c(&at("/dev"))));
        jail.mount(
            Some("tmpfs"),
            &at("/dev"),
            Some("tmpfs"),
            NOSUID | NOEXEC,
            Some("mode=0755,size=64k"),
        );
        jail.ops.push(Op::Mkdir(c(&at("/dev/shm"))));
        jail.mount(
            Some("tmpfs"),
            &at("/dev/shm"),
            Some("tmpfs"),
            NOSUID | NODEV | NOEXEC,
            Some("mode=1777,size=16m"),
        );
        for (link, target) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            jail.ops
                .push(Op::Symlink { target: cs(target), path: c(&at(&format!("/dev/{link}"))) });
        }
        jail.ops.push(Op::Mkdir(c(&at("/etc"))));
        jail.mount(
            Some("tmpfs"),
            &at("/etc"),
            Some("tmpfs"),
            NOSUID | NODEV | NOEXEC,
            Some("mode=0755,size=1m"),
        );
        let name = spec.name;
        let (uid, gid) = (spec.uid, spec.gid);
        let files = [
            (
                "passwd",
                if uid == 0 {
                    // A user namespace: the plugin is "root" inside, with no capabilities.
                    "root:x:0:0:root:/tmp:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n".to_string()
                } else {
                    format!("root:x:0:0:root:/:/usr/sbin/nologin\n{name}:x:{uid}:{gid}:plugd plugin {name}:/tmp:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
                },
            ),
            ("group", format!("root:x:0:\n{name}:x:{gid}:\nnogroup:x:65534:\n")),
            ("hostname", format!("plugd-{name}\n")),
            ("nsswitch.conf", "passwd: files\ngroup: files\nhosts: files dns\n".to_string()),
        ];
        for (file, text) in files {
            jail.ops
                .push(Op::Write { path: c(&at(&format!("/etc/{file}"))), text: text.into_bytes() });
        }

        // Binds, parents first. A path below an earlier bind exists there already (the
        // jail mirrors host paths), so nothing is ever created inside a bind (that would
        // write to the host).
        let mut binds: Vec<(PathBuf, Bind)> = Vec::new();
        for dev in DEVICES {
            binds.push((PathBuf::from(format!("/dev/{dev}")), Bind::Device));
        }
        for sys in SYSTEM {
            let p = Path::new(sys);
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.file_type().is_symlink() => {
                    if let Ok(target) = std::fs::read_link(p) {
                        jail.ops.push(Op::Symlink { target: c(&target), path: c(&at(sys)) });
                    }
                }
                Ok(m) if m.is_dir() => binds.push((p.to_path_buf(), Bind::ReadOnly)),
                _ => {}
            }
        }
        // Bound at their /etc names (resolv.conf and localtime are often symlinks).
        let etc_binds: Vec<(PathBuf, PathBuf)> = HOST_ETC
            .iter()
            .filter_map(|etc| Some((std::fs::canonicalize(etc).ok()?, PathBuf::from(etc))))
            .collect();
        for p in &spec.read {
            binds.push((canonical(p)?, Bind::ReadOnly));
        }
        let writable = if spec.write_exec { Bind::Workspace } else { Bind::ReadWrite };
        for p in &spec.write {
            binds.push((canonical(p)?, writable));
        }
        binds.sort();
        binds.dedup_by(|later, earlier| {
            later.0 == earlier.0 && {
                // The same path twice: keep the wider grant.
                earlier.1 = earlier.1.max(later.1);
                true
            }
        });
        let mut covered: Vec<PathBuf> = Vec::new();
        let mut made: Vec<PathBuf> = vec![PathBuf::from("/")];
        let mut remounts = Vec::new();
        let mut all: Vec<(PathBuf, PathBuf, Bind)> = binds
            .iter()
            .map(|(p, b)| (p.clone(), p.clone(), *b))
            .chain(etc_binds.into_iter().map(|(src, dst)| (src, dst, Bind::ReadOnly)))
            .collect();
        all.sort_by(|a, b| a.1.cmp(&b.1));
        for (src, dst, how) in all {
            if dst == Path::new("/") {
                return Err(
                    "`/` cannot be bound into a plugin's jail; name the folders it needs".into()
                );
            }
            let under_bind = covered.iter().any(|b| dst.starts_with(b));
            if under_bind && how == Bind::ReadOnly {
                // Already visible through its parent's bind.
                continue;
            }
            if !under_bind {
                for anc in dst.ancestors().collect::<Vec<_>>().into_iter().rev().skip(1) {
                    if anc == dst
                        || covered.iter().any(|b| anc.starts_with(b))
                        || made.iter().any(|m| m == anc)
                    {
                        continue;
                    }
                    jail.ops.push(Op::Mkdir(c(&at(&anc.to_string_lossy()))));
                    made.push(anc.to_path_buf());
                }
                let is_dir = std::fs::metadata(&src).map(|m| m.is_dir()).unwrap_or(false);
                let target = c(&at(&dst.to_string_lossy()));
                jail.ops.push(if is_dir { Op::Mkdir(target) } else { Op::Touch(target) });
                made.push(dst.clone());
            }
            let target = at(&dst.to_string_lossy());
            jail.mount(Some(&src.to_string_lossy()), &target, None, libc::MS_BIND, None);
            let flags = match how {
                Bind::ReadOnly => RDONLY | NOSUID | NODEV,
                Bind::ReadWrite => NOSUID | NODEV | NOEXEC,
                Bind::Workspace => NOSUID | NODEV,
                Bind::Device => RDONLY | NOSUID | NOEXEC,
            } | locked_flags(&src);
            remounts.push((target, flags));
            if src.is_dir() {
                covered.push(dst.clone());
            }
            jail.binds.push((dst, how));
        }
        // Read-only last: every folder above was created while the tmpfs mounts were writable.
        for (target, flags) in remounts {
            jail.mount(None, &target, None, libc::MS_REMOUNT | libc::MS_BIND | flags, None);
        }
        jail.mount(
            None,
            &at("/etc"),
            None,
            libc::MS_REMOUNT | RDONLY | NOSUID | NODEV | NOEXEC,
            None,
        );
        jail.mount(None, &at("/dev"), None, libc::MS_REMOUNT | RDONLY | NOSUID | NOEXEC, None);
        jail.ops.push(Op::Pivot(c(root)));
        jail.mount(None, Path::new("/"), None, libc::MS_REMOUNT | RDONLY | NOSUID | NODEV, None);
        Ok(jail)
    }

    fn mount(
        &mut self,
        src: Option<&str>,
        dst: &Path,
        fstype: Option<&str>,
        flags: libc::c_ulong,
        data: Option<&str>,
    ) {
        self.ops.push(Op::Mount {
            src: src.map(cs),
            dst: c(dst),
            fstype: fstype.map(cs),
            flags,
            data: data.map(cs),
        });
    }

    /// Words for the op a failure report names.
    pub fn describe(&self, index: usize) -> String {
        let show = |s: &CString| s.to_string_lossy().into_owned();
        match self.ops.get(index) {
            None => "an unknown step".into(),
            Some(Op::MakePrivate) => "making the mount namespace private".into(),
            Some(Op::Mount { src, dst, fstype, flags, .. }) => {
                if flags & libc::MS_REMOUNT != 0 {
                    format!("remounting {} with its final flags", show(dst))
                } else if flags & libc::MS_BIND != 0 {
                    format!("binding {} into the jail", src.as_ref().map(show).unwrap_or_default())
                } else {
                    format!(
                        "mounting {} on {}",
                        fstype.as_ref().map(show).unwrap_or_default(),
                        show(dst)
                    )
                }
            }
            Some(Op::Mkdir(p)) => format!("creating folder {}", show(p)),
            Some(Op::Touch(p)) => format!("creating mount point {}", show(p)),
            Some(Op::Symlink { path, .. }) => format!("creating symlink {}", show(path)),
            Some(Op::Write { path, .. }) | Some(Op::Proc { path, .. }) => {
                format!("writing {}", show(path))
            }
            Some(Op::Pivot(p)) => format!("pivot_root into {}", show(p)),
        }
    }

    /// Builds the root and sets the hostname. Runs in the init (pid 1 of the new
    /// namespaces, still privileged): single syscalls, no allocation. On failure returns
    /// the index of the failed op (`ops.len()` for the hostname) and the error.
    pub fn build_in_child(&self) -> Result<(), (usize, io::Error)> {
        for (i, op) in self.ops.iter().enumerate() {
            run_op(op).map_err(|e| (i, e))?;
        }
        // SAFETY: a NUL-terminated buffer prepared before the fork; the kernel copies it.
        let rc =
            unsafe { libc::sethostname(self.hostname.as_ptr(), self.hostname.as_bytes().len()) };
        if rc != 0 {
            return Err((self.ops.len(), io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// The flags of the mount `path` lies on that a bind of it keeps anyway, and that a
/// remount inside a user namespace must repeat (the kernel locks them): read-only,
/// nosuid, nodev, noexec and the atime mode.
fn locked_flags(path: &Path) -> libc::c_ulong {
    use nix::sys::statvfs::FsFlags;
    let Ok(st) = nix::sys::statvfs::statvfs(path) else { return 0 };
    let f = st.flags();
    [
        (FsFlags::ST_RDONLY, RDONLY),
        (FsFlags::ST_NOSUID, NOSUID),
        (FsFlags::ST_NODEV, NODEV),
        (FsFlags::ST_NOEXEC, NOEXEC),
        (FsFlags::ST_NOATIME, libc::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, libc::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, libc::MS_RELATIME),
    ]
    .into_iter()
    .filter(|(st, _)| f.contains(*st))
    .fold(0, |acc, (_, ms)| acc | ms)
}

fn canonical(p: &Path) -> Result<PathBuf, String> {
    std::fs::canonicalize(p)
        .map_err(|e| format!("{} cannot be bound into the jail: {e}", p.display()))
}

const RDONLY: libc::c_ulong = libc::MS_RDONLY;
const NOSUID: libc::c_ulong = libc::MS_NOSUID;
const NODEV: libc::c_ulong = libc::MS_NODEV;
const NOEXEC: libc::c_ulong = libc::MS_NOEXEC;

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn ptr(s: &Option<CString>) -> *const libc::c_char {
    s.as_ref().map(|s| s.as_ptr()).unwrap_or(std::ptr::null())
}

/// Opens `path` with `flags` (mode 0644 if created) and writes `text` in one write.
/// Async-signal-safe.
fn write_file(path: &CString, flags: libc::c_int, text: &[u8]) -> io::Result<()> {
    // SAFETY: a NUL-terminated path and a byte buffer owned by the plan; open, write and
    // close are async-signal-safe.
    unsafe {
        let fd = libc::open(path.as_ptr(), flags, 0o644);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = libc::write(fd, text.as_ptr().cast(), text.len());
        let e = io::Error::last_os_error();
        libc::close(fd);
        if n != text.len() as isize {
            return Err(e);
        }
    }
    Ok(())
}

/// One op, async-signal-safe: every pointer refers to data prepared before the fork.
fn run_op(op: &Op) -> io::Result<()> {
    // SAFETY (for each call below): the arguments are NUL-terminated strings or byte
    // buffers owned by the plan, which outlives the call; null where the syscall allows it.
    unsafe {
        match op {
            Op::MakePrivate => check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )),
            Op::Mount { src, dst, fstype, flags, data } => {
                check(libc::mount(ptr(src), dst.as_ptr(), ptr(fstype), *flags, ptr(data).cast()))
            }
            Op::Mkdir(p) => {
                if libc::mkdir(p.as_ptr(), 0o755) != 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(e);
                    }
                }
                Ok(())
            }
            Op::Touch(p) => {
                let fd =
                    libc::open(p.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            }
            Op::Symlink { target, path } => check(libc::symlink(target.as_ptr(), path.as_ptr())),
            Op::Write { path, text } => write_file(
                path,
                libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC | libc::O_CLOEXEC,
                text,
            ),
            Op::Proc { path, text } => write_file(path, libc::O_WRONLY | libc::O_CLOEXEC, text),
            Op::Pivot(root) => {
                check(libc::chdir(root.as_ptr()))?;
                // pivot_root(".", "."): the old root ends up stacked on the new one, and is
                // then detached, so no folder is needed to park it in.
                if libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) != 0 {
                    return Err(io::Error::last_os_error());
                }
                check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
                check(libc::chdir(c"/".as_ptr()))
            }
        }
    }
}

/// Signals the init passes on to the plugin's processes when they come from outside.
const FORWARDED: &[libc::c_int] =
    &[libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2];

/// Blocks every signal in the calling thread (the init takes them with sigwaitinfo).
pub fn block_all_signals() {
    // SAFETY: sigfillset/sigprocmask on a stack-owned set; async-signal-safe.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// The init's loop (pid 1 inside): forwards signals from outside, reaps every child, and
/// when `plugin` ends writes its raw wait status to `status_fd` and exits with a code
/// that says the same (`code`, or 128 + signal). Never returns.
pub fn init_loop(plugin: libc::pid_t, status_fd: libc::c_int) -> ! {
    // SAFETY: only async-signal-safe syscalls on stack-owned data.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        loop {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let sig = libc::sigwaitinfo(&set, &mut info);
            if sig == libc::SIGCHLD {
                loop {
                    let mut status: libc::c_int = 0;
                    let pid = libc::waitpid(-1, &mut status, libc::WNOHANG);
                    if pid <= 0 {
                        break;
                    }
                    if pid == plugin {
                        let bytes = status.to_ne_bytes();
                        libc::write(status_fd, bytes.as_ptr().cast(), bytes.len());
                        let code = if libc::WIFEXITED(status) {
                            libc::WEXITSTATUS(status)
                        } else {
                            128 + libc::WTERMSIG(status)
                        };
                        libc::_exit(code);
                    }
                }
            } else if sig > 0 && info.si_pid() == 0 && FORWARDED.contains(&sig) {
                // From an ancestor namespace (the supervisor): pass it on to everyone inside.
                libc::kill(-1, sig);
            }
        }
    }
}
