//! The sandbox: what the supervisor applies to a plugin between clone and exec.
//!
//! Everything is decided and prepared in the supervisor before the clone
//! ([`SandboxPlan::build`]): the plugin's uid, the jail (namespaces and the minimal
//! root, see [`jail`]), rlimits, the cgroup to join, the Landlock rules and the compiled
//! seccomp programs. The child side (in `spawn`) then runs a fixed sequence of single
//! syscalls that allocates nothing, in the order of the Firecracker jailer:
//!
//! descriptors → cpu affinity → cgroup → namespaces (clone) → root (mounts, pivot_root)
//! → drop ids and capabilities → (fork the plugin under its init) → signals → rlimits
//! → no_new_privs → Landlock → seccomp → exec.
//!
//! A failing step is reported by name ([`STEPS`]), and for the root by the mount that
//! failed. The plan records which layers are in force and which are unavailable here,
//! with the reason; `sandbox.require` turns a missing layer into a start failure.
//! Nothing pretends: a layer is listed as in force only if the supervisor applies it.
//! What a plugin does to itself (the SDK's lockdown) is listed apart, as voluntary.

pub mod cgroup;
pub mod identity;
pub mod jail;
pub mod landlock;
pub mod layer;
pub mod rlimit;
pub mod seccomp;

pub use layer::{Layer, LayerKind, Missing};

use std::ffi::CString;
use std::io;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use seccompiler::BpfProgram;

use crate::manifest::{Filesystem, Network, PluginSpec, SyscallProfile};

/// Steps of the child-side sequence, in order; a failure names one.
pub const STEPS: &[&str] = &[
    "supervisor gone before the plugin started",
    "descriptors",
    "cpu affinity",
    "cgroup",
    "jail root",
    "drop ids and capabilities",
    "fork the plugin under its init",
    "signals",
    "rlimits",
    "no_new_privs",
    "landlock",
    "seccomp",
    "chdir into the plugin folder",
    "exec",
];

/// Index of a step in [`STEPS`].
#[allow(missing_docs)]
pub mod step {
    pub const PARENT: u32 = 0;
    pub const FDS: u32 = 1;
    pub const CPUS: u32 = 2;
    pub const CGROUP: u32 = 3;
    pub const ROOT: u32 = 4;
    pub const IDS: u32 = 5;
    pub const FORK: u32 = 6;
    pub const SIGNALS: u32 = 7;
    pub const RLIMITS: u32 = 8;
    pub const NO_NEW_PRIVS: u32 = 9;
    pub const LANDLOCK: u32 = 10;
    pub const SECCOMP: u32 = 11;
    pub const CHDIR: u32 = 12;
    pub const EXEC: u32 = 13;
}

/// Words for a child-side failure: the step, the op within it (jail root), the error.
pub fn explain_failure(plan: &SandboxPlan, step: u32, index: u32, errno: i32) -> String {
    let name = STEPS.get(step as usize).copied().unwrap_or("unknown");
    let err = io::Error::from_raw_os_error(errno);
    match (&plan.jail, step) {
        (Some(j), step::ROOT) => {
            format!(
                "sandbox step '{name}' failed in the child ({}): {err}",
                j.describe(index as usize)
            )
        }
        _ => format!("sandbox step '{name}' failed in the child: {err}"),
    }
}

/// Which layers a plugin runs under, and which it asked for but cannot have here.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SandboxReport {
    /// Layers the supervisor applies, e.g. `landlock(abi 7)`, `seccomp(default)`.
    pub in_force: Vec<Layer>,
    /// `layer: reason` for each requested layer that is not available.
    pub unavailable: Vec<Missing>,
}

impl SandboxReport {
    /// The layers in force, as status shows them (`landlock(abi 7)`).
    pub fn in_force_text(&self) -> Vec<String> {
        self.in_force.iter().map(ToString::to_string).collect()
    }

    /// The missing layers, as status shows them (`cgroup: why`).
    pub fn unavailable_text(&self) -> Vec<String> {
        self.unavailable.iter().map(ToString::to_string).collect()
    }
}

/// Facts about the host the plan depends on, gathered once per supervisor.
#[derive(Debug, Clone)]
pub struct HostFacts {
    /// Whether the supervisor runs as root (CAP_SYS_ADMIN for namespaces, setuid).
    pub is_root: bool,
    /// The cgroup delegation, or why there is none.
    pub cgroup: Result<cgroup::Delegation, String>,
    /// Where plugin uids are allocated from.
    pub uid_range: RangeInclusive<u32>,
    /// The highest capability number this kernel knows (for clearing the bounding set).
    pub last_cap: u32,
    /// Without root: whether this process may create a user namespace (the jail's
    /// unprivileged mode), or why not.
    pub user_ns: Result<(), String>,
}

impl HostFacts {
    /// Looks at this machine.
    pub fn detect() -> HostFacts {
        let mut cgroup = cgroup::detect();
        if let Ok(d) = &cgroup {
            if let Err(e) = cgroup::prepare(d, std::process::id()) {
                cgroup = Err(e);
            }
        }
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(63);
        let is_root = nix::unistd::geteuid().is_root();
        HostFacts {
            is_root,
            cgroup,
            uid_range: identity::DEFAULT_RANGE,
            last_cap,
            user_ns: if is_root { Ok(()) } else { probe_user_ns() },
        }
    }

    /// The outer ids a user-namespace jail maps to 0 (plugd's own), when plugd is not
    /// root and may create one.
    fn user_ns_ids(&self) -> Option<(u32, u32)> {
        (!self.is_root && self.user_ns.is_ok())
            .then(|| (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw()))
    }
}

/// Tries it: a child cloned into a new user namespace that exits at once.
fn probe_user_ns() -> Result<(), String> {
    // SAFETY: a fork-like clone whose child only calls _exit (async-signal-safe); the
    // parent reaps it below.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid == 0 {
        // SAFETY: _exit in the child; nothing else runs there.
        unsafe { libc::_exit(0) };
    }
    if pid < 0 {
        let e = io::Error::last_os_error();
        return Err(format!(
            "this machine does not let an unprivileged process create a user namespace ({e}; see /proc/sys/user/max_user_namespaces and kernel.apparmor_restrict_unprivileged_userns)"
        ));
    }
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
    Ok(())
}

/// Size of a jailed plugin's private /tmp.
const TMP_SIZE: u64 = 64 << 20;

/// Size of an install step's private /tmp (pip unpacks and builds wheels there).
const JOB_TMP_SIZE: u64 = 1 << 30;

/// What an install step of one plugin (its `[build]` command, venv creation, pip) may see.
#[derive(Debug)]
pub struct JobSpec<'a> {
    /// The plugin the step works for: its uid, its folder and `sandbox.read_paths`.
    pub spec: &'a PluginSpec,
    /// The supervisor's state folder (where plugin uids are recorded).
    pub state_root: &'a Path,
    /// Read-only paths beside the plugin folder (the interpreter, an installer).
    pub read: Vec<PathBuf>,
    /// The one folder the step writes.
    pub workspace: &'a Path,
    /// Whether the step may use the network (`build.network` / `python.network` = "host").
    pub network: bool,
}

/// Device nodes a plugin may read and write.
const DEVICE_FILES: &[&str] =
    &["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"];

/// System folders a plugin may read.
const SYSTEM_READ: &[&str] =
    &["/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/etc", "/proc"];

/// Everything the child applies, prepared before the clone.
#[derive(Debug, Default)]
pub struct SandboxPlan {
    rlimits: Vec<rlimit::Rlimit>,
    cpus: Option<nix::sched::CpuSet>,
    cgroup_procs: Option<CString>,
    ids: Option<(u32, u32)>,
    /// Clear the capability bounding set up to this number and every other capability set.
    drop_caps: Option<u32>,
    landlock: Option<landlock::Rules>,
    seccomp: Vec<BpfProgram>,
    /// The jail (namespaces and root), when the supervisor can build one.
    pub jail: Option<jail::Jail>,
    /// What is in force and what is missing.
    pub report: SandboxReport,
    /// The uid the plugin runs as, if dropped (its state dir is handed to it).
    pub run_as: Option<(u32, u32)>,
}

impl SandboxPlan {
    /// Plans the sandbox for one plugin start. `program` is the resolved executable,
    /// `state_dir` its private writable folder, `state_root` where uids are recorded.
    /// Fails when a layer named in `sandbox.require` is unavailable, or a path cannot be
    /// bound into the jail.
    pub fn build(
        spec: &PluginSpec,
        program: &Path,
        state_dir: &Path,
        extra_read: &[PathBuf],
        host: &HostFacts,
    ) -> Result<SandboxPlan, String> {
        let m = &spec.manifest;
        let sb = &m.sandbox;
        let mut plan = SandboxPlan::default();
        let missing = |plan: &mut SandboxPlan, kind: LayerKind, why: String| {
            plan.report.unavailable.push(Missing { kind: Some(kind), why });
        };
        let state_root = state_dir.parent().unwrap_or(state_dir);

        plan.rlimits = rlimit::plan(&m.limits);
        let names: Vec<&str> =
            plan.rlimits.iter().map(|r| rlimit::short_name(r.resource)).collect();
        plan.report.in_force.push(Layer::applied(LayerKind::Rlimits, Some(names.join(","))));
        if let Some(bytes) = m.limits.memory {
            // Counted over every process of the plugin by the supervisor (see `instance`).
            plan.report.in_force.push(Layer::applied(
                LayerKind::MemoryWatch,
                Some(format!("{} MiB, all processes", bytes >> 20)),
            ));
        }
        if let Some(cpus) = &m.limits.cpus {
            let mut set = nix::sched::CpuSet::new();
            let online = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            let mut bad = Vec::new();
            for &cpu in cpus {
                if cpu >= online || set.set(cpu).is_err() {
                    bad.push(cpu);
                }
            }
            if bad.is_empty() {
                plan.cpus = Some(set);
                let list: Vec<String> = cpus.iter().map(|c| c.to_string()).collect();
                plan.report.in_force.push(Layer::applied(LayerKind::Cpus, Some(list.join(","))));
            } else {
                missing(
                    &mut plan,
                    LayerKind::Cpus,
                    format!("CPUs {bad:?} do not exist here (0..{online})"),
                );
            }
        }

        let wants_cgroup = m.limits.memory.is_some()
            || m.limits.cpu_quota.is_some()
            || m.limits.processes.is_some();
        if wants_cgroup {
            match &host.cgroup {
                Ok(d) => match cgroup::plugin_cgroup(d, &m.name, &m.limits) {
                    Ok((procs, applied)) if !applied.is_empty() => {
                        plan.cgroup_procs = CString::new(procs.as_os_str().as_encoded_bytes()).ok();
                        plan.report
                            .in_force
                            .push(Layer::applied(LayerKind::Cgroup, Some(applied.join(","))));
                    }
                    Ok(_) => missing(
                        &mut plan,
                        LayerKind::Cgroup,
                        "no requested limit has an available controller".into(),
                    ),
                    Err(e) => missing(&mut plan, LayerKind::Cgroup, e),
                },
                Err(why) => missing(&mut plan, LayerKind::Cgroup, why.clone()),
            }
        }

        // Identity: a uid of its own unless spelled out; root only as `user = "root"`.
        if host.is_root {
            let (uid, gid, label) = plugin_ids(spec, state_root, host)?;
            plan.ids = Some((uid, gid));
            plan.run_as = plan.ids;
            plan.report.in_force.push(label);
            plan.drop_caps = Some(host.last_cap);
            plan.report.in_force.push(Layer::applied(LayerKind::NoCapabilities, None));
        } else if let Some((uid, _)) = host.user_ns_ids() {
            plan.drop_caps = Some(host.last_cap);
            plan.report.in_force.push(Layer::applied(
                LayerKind::Userns,
                Some(format!("plugd's uid {uid} as 0 inside")),
            ));
            plan.report.in_force.push(Layer::applied(LayerKind::NoCapabilities, None));
            missing(&mut plan, LayerKind::User, format!("plugd is not root, so the plugin has no uid of its own: it runs as plugd's uid {uid} (0 in its own user namespace, with no capabilities), sharing its process count; it reaches plugd's files only through its binds"));
        } else {
            let why = format!("plugd is not root and {}: the plugin runs as plugd's own uid, in plugd's pid, mount, ipc and uts namespaces, on the host's file system (Landlock and seccomp still apply)", host.user_ns.as_ref().err().map(String::as_str).unwrap_or("has no user namespace"));
            missing(&mut plan, LayerKind::User, why.clone());
            missing(&mut plan, LayerKind::Jail, why);
            if sb.network == Network::None {
                missing(
                    &mut plan,
                    LayerKind::Netns,
                    "needs root or a user namespace (see jail)".into(),
                );
            }
        }

        // The jail: namespaces and a minimal root.
        let isolated = sb.filesystem == Filesystem::Isolated;
        let executables = landlock::executables_behind(program);
        let mut read: Vec<PathBuf> = vec![spec.dir.clone()];
        read.extend(executables.iter().cloned());
        read.extend(extra_read.iter().cloned());
        read.extend(sb.read_paths.iter().cloned());
        let mut write = vec![state_dir.to_path_buf()];
        write.extend(sb.write_paths.iter().cloned());
        let jail_ids = match (host.is_root, plan.ids) {
            (true, Some(ids)) => Some(ids),
            (false, _) => host.user_ns_ids().map(|_| (0, 0)),
            _ => None,
        };
        if let Some((uid, gid)) = jail_ids {
            let staging = state_root.join(".jail");
            std::fs::create_dir_all(&staging)
                .map_err(|e| format!("cannot create {}: {e}", staging.display()))?;
            let j = jail::Jail::plan(&jail::JailSpec {
                name: &m.name,
                staging: &staging,
                uid,
                gid,
                own_network: sb.network == Network::None,
                own_root: isolated,
                read: read.clone(),
                write: write.clone(),
                write_exec: false,
                tmp_size: TMP_SIZE,
                user_ns: host.user_ns_ids(),
            })
            .map_err(|e| format!("{}: {e}", spec.manifest_path.display()))?;
            let mut ns = if host.is_root { vec![] } else { vec!["user"] };
            ns.extend(["pid", "mount", "ipc", "uts"]);
            if sb.network == Network::None {
                ns.push("net");
                plan.report.in_force.push(Layer::applied(LayerKind::Netns, None));
            }
            plan.report.in_force.push(Layer::applied(LayerKind::Namespaces, Some(ns.join(","))));
            let root = if isolated { "minimal, pivot_root" } else { "host file system" };
            plan.report.in_force.push(Layer::applied(LayerKind::Root, Some(root.into())));
            plan.report.in_force.push(Layer::applied(
                LayerKind::Init,
                Some("pid 1: reaps, forwards signals".into()),
            ));
            plan.jail = Some(j);
        }

        if sb.network == Network::None {
            match seccomp::deny_inet() {
                Ok(p) => {
                    plan.seccomp.push(p);
                    plan.report
                        .in_force
                        .push(Layer::applied(LayerKind::Seccomp, Some("no-inet".into())));
                }
                Err(e) => missing(&mut plan, LayerKind::Seccomp, e),
            }
        }

        plan.report.in_force.push(Layer::applied(LayerKind::NoNewPrivs, None));

        if isolated {
            use landlock::Grant;
            let jailed = plan.jail.is_some();
            let dir_grant = if sb.execve { Grant::Exec } else { Grant::Read };
            let mut rules: Vec<(PathBuf, Grant)> =
                SYSTEM_READ.iter().map(|p| (PathBuf::from(p), dir_grant)).collect();
            rules.extend(DEVICE_FILES.iter().map(|p| (PathBuf::from(p), Grant::Device)));
            if !jailed {
                rules.push(("/sys/devices/system/cpu".into(), Grant::Read));
            }
            rules.extend(read.iter().map(|p| (p.clone(), dir_grant)));
            rules.extend(executables.iter().map(|p| (p.clone(), Grant::Exec)));
            rules.extend(write.iter().map(|p| (p.clone(), Grant::Write)));
            if jailed {
                // The jail's own /tmp and /dev/shm; on the host they would be shared ones.
                rules.push(("/tmp".into(), Grant::Write));
                rules.push(("/dev/shm".into(), Grant::Write));
                // The jail's /dev holds only the nodes above: it may be listed.
                rules.push(("/dev".into(), Grant::Read));
            }
            match landlock::Rules::plan(&rules, sb.network == Network::None) {
                Ok(r) => {
                    plan.report.in_force.push(Layer::applied(
                        LayerKind::Landlock,
                        Some(format!("abi {}", r.abi())),
                    ));
                    if !sb.execve {
                        plan.report
                            .in_force
                            .push(Layer::applied(LayerKind::Exec, Some("entrypoint only".into())));
                    }
                    if r.scoped() {
                        plan.report.in_force.push(Layer::applied(
                            LayerKind::LandlockScope,
                            Some("signals,abstract-unix".into()),
                        ));
                    }
                    plan.landlock = Some(r);
                }
                Err(why) => missing(&mut plan, LayerKind::Landlock, why),
            }
        }

        match seccomp::profile(sb.syscalls) {
            Ok(p) if p.is_empty() => {}
            Ok(p) => {
                plan.seccomp.splice(0..0, p);
                plan.report
                    .in_force
                    .push(Layer::applied(LayerKind::Seccomp, Some(sb.syscalls.to_string())));
            }
            Err(e) => missing(&mut plan, LayerKind::Seccomp, e),
        }

        for &layer in &sb.require {
            let present = match layer {
                // A uid of its own: root (`sandbox.user = "root"`) is not one.
                LayerKind::User => plan.run_as.is_some_and(|(uid, _)| uid != 0),
                LayerKind::Rlimits => !plan.rlimits.is_empty(),
                _ => plan.report.in_force.iter().any(|l| l.kind() == Some(layer)),
            };
            if !present {
                let root = layer == LayerKind::User && plan.run_as.is_some_and(|(uid, _)| uid == 0);
                let why = plan
                    .report
                    .unavailable
                    .iter()
                    .find(|u| u.kind == Some(layer))
                    .map(|u| u.to_string())
                    .unwrap_or_else(|| {
                        if root {
                            "user: `sandbox.user = \"root\"` runs it as root, with no uid of its own".into()
                        } else {
                            format!("{layer}: not requested by the rest of the manifest")
                        }
                    });
                return Err(format!(
                    "{}: `sandbox.require` names {:?}, which is unavailable here ({why}); remove it from require to run with a warning",
                    spec.manifest_path.display(),
                    layer.word()
                ));
            }
        }
        Ok(plan)
    }

    /// Plans the jail an install step of a plugin runs in (a `[build]` command, venv
    /// creation, pip): the plugin's own uid, no capabilities, its own pid, mount, ipc, uts
    /// (and, unless `job.network`, network) namespaces, a minimal root holding the system
    /// folders, the plugin folder, `sandbox.read_paths` and `job.read` read-only and the
    /// workspace read-write (programs built there may run), a 1 GiB private /tmp, the
    /// default seccomp list and no core dumps. Landlock is left out: a build runs
    /// compilers and scripts, and sees nothing but its root anyway. Without root there is
    /// no jail: the plan says so in `report.unavailable`, and the step runs as plugd's user.
    pub fn for_job(job: &JobSpec<'_>, host: &HostFacts) -> Result<SandboxPlan, String> {
        let spec = job.spec;
        let mut plan = SandboxPlan {
            rlimits: vec![rlimit::Rlimit {
                resource: nix::sys::resource::Resource::RLIMIT_CORE,
                soft: 0,
                hard: 0,
            }],
            ..SandboxPlan::default()
        };
        let user_ns = host.user_ns_ids();
        if host.is_root || user_ns.is_some() {
            let (uid, gid) = if host.is_root {
                let (uid, gid, label) = plugin_ids(spec, job.state_root, host)?;
                plan.ids = Some((uid, gid));
                plan.run_as = plan.ids;
                plan.report.in_force.push(label);
                (uid, gid)
            } else {
                let outer = user_ns.map(|(u, _)| u).unwrap_or_default();
                plan.report.in_force.push(Layer::applied(
                    LayerKind::Userns,
                    Some(format!("plugd's uid {outer} as 0 inside")),
                ));
                (0, 0)
            };
            plan.drop_caps = Some(host.last_cap);
            plan.report.in_force.push(Layer::applied(LayerKind::NoCapabilities, None));
            let mut read = vec![spec.dir.clone()];
            read.extend(job.read.iter().cloned());
            read.extend(spec.manifest.sandbox.read_paths.iter().cloned());
            let staging = job.state_root.join(".jail");
            std::fs::create_dir_all(&staging)
                .map_err(|e| format!("cannot create {}: {e}", staging.display()))?;
            let jail = jail::Jail::plan(&jail::JailSpec {
                name: &spec.manifest.name,
                staging: &staging,
                uid,
                gid,
                own_network: !job.network,
                own_root: true,
                read,
                write: vec![job.workspace.to_path_buf()],
                write_exec: true,
                tmp_size: JOB_TMP_SIZE,
                user_ns,
            })
            .map_err(|e| format!("{}: {e}", spec.manifest_path.display()))?;
            let mut ns = if host.is_root { vec![] } else { vec!["user"] };
            ns.extend(["pid", "mount", "ipc", "uts"]);
            if !job.network {
                ns.push("net");
            }
            plan.report.in_force.push(Layer::applied(LayerKind::Namespaces, Some(ns.join(","))));
            plan.report
                .in_force
                .push(Layer::applied(LayerKind::Root, Some("minimal, pivot_root".into())));
            plan.jail = Some(jail);
        } else {
            plan.report.unavailable.push(Missing {
                kind: Some(LayerKind::Jail),
                why: format!(
                    "plugd is not root and {}, so the step runs as plugd's own user on the host's file system",
                    host.user_ns.as_ref().err().map(String::as_str).unwrap_or("has no user namespace")
                ),
            });
        }
        let network = if job.network { "host" } else { "none" };
        plan.report.in_force.push(Layer::applied(LayerKind::Network, Some(network.into())));
        plan.report.in_force.push(Layer::applied(LayerKind::NoNewPrivs, None));
        match seccomp::profile(SyscallProfile::Default) {
            Ok(p) => {
                plan.seccomp = p;
                plan.report
                    .in_force
                    .push(Layer::applied(LayerKind::Seccomp, Some("default".into())));
            }
            Err(e) => {
                plan.report.unavailable.push(Missing { kind: Some(LayerKind::Seccomp), why: e })
            }
        }
        Ok(plan)
    }

    // The child side. Every function below runs between clone and exec: single syscalls
    // on data prepared before the clone, no allocation, no locks.

    /// CPU affinity. Async-signal-safe.
    pub fn apply_cpus(&self) -> io::Result<()> {
        if let Some(set) = &self.cpus {
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), set)?;
        }
        Ok(())
    }

    /// Joins the plugin's cgroup. Async-signal-safe.
    pub fn apply_cgroup(&self) -> io::Result<()> {
        match &self.cgroup_procs {
            Some(procs) => join_cgroup(procs),
            None => Ok(()),
        }
    }

    /// rlimits. Async-signal-safe.
    pub fn apply_rlimits(&self) -> io::Result<()> {
        rlimit::apply(&self.rlimits)
    }

    /// Switches to the plugin's ids and drops every capability (bounding, permitted,
    /// effective, inheritable, ambient). Async-signal-safe.
    pub fn apply_identity(&self) -> io::Result<()> {
        // SAFETY: prctl/setgroups/setres[ug]id/capset with integers and stack-owned structs.
        unsafe {
            if let Some(last) = self.drop_caps {
                for cap in 0..=last {
                    // EINVAL for a capability this kernel lacks: nothing to drop.
                    if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
                        && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
            }
            if let Some((uid, gid)) = self.ids {
                // Raw syscalls: glibc's wrappers broadcast the change to every thread it
                // knows of, and after a clone from a multi-threaded process it still "knows"
                // the supervisor's threads, so it would wait for them forever.
                if libc::syscall(libc::SYS_setgroups, 1usize, &gid as *const libc::gid_t) != 0
                    || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                    || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            if self.drop_caps.is_some() {
                #[repr(C)]
                struct Header {
                    version: u32,
                    pid: i32,
                }
                #[repr(C)]
                #[derive(Clone, Copy)]
                struct Data {
                    effective: u32,
                    permitted: u32,
                    inheritable: u32,
                }
                const VERSION_3: u32 = 0x2008_0522;
                let header = Header { version: VERSION_3, pid: 0 };
                let data = [Data { effective: 0, permitted: 0, inheritable: 0 }; 2];
                if libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr()) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        Ok(())
    }

    /// no_new_privs, Landlock, seccomp; returns the failing step and error. Async-signal-safe.
    pub fn apply_confinement(&self) -> Result<(), (u32, io::Error)> {
        // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1) takes integers only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err((step::NO_NEW_PRIVS, io::Error::last_os_error()));
        }
        if let Some(rules) = &self.landlock {
            rules.restrict_self().map_err(|e| (step::LANDLOCK, e))?;
        }
        for program in &self.seccomp {
            seccomp::install(program).map_err(|e| (step::SECCOMP, e))?;
        }
        Ok(())
    }
}

/// The uid, gid and report label plugin `spec` runs as (and its install steps too): its
/// own uid from the range unless `sandbox.user` names an account (or "root").
pub fn plugin_ids(
    spec: &PluginSpec,
    state_root: &Path,
    host: &HostFacts,
) -> Result<(u32, u32, Layer), String> {
    let m = &spec.manifest;
    let sb = &m.sandbox;
    let (uid, gid, label) = match sb.user.as_deref() {
        Some("root") => {
            (0, 0, Layer::applied(LayerKind::User, Some("root: no uid isolation".into())))
        }
        Some(user) => {
            let u = nix::unistd::User::from_name(user).ok().flatten().ok_or_else(|| {
                format!(
                    "{}: `sandbox.user` = {user:?} does not exist on this machine; create it or remove the key (each plugin gets a uid of its own)",
                    spec.manifest_path.display()
                )
            })?;
            (
                u.uid.as_raw(),
                u.gid.as_raw(),
                Layer::applied(LayerKind::User, Some(user.to_string())),
            )
        }
        None => {
            let uid = identity::plugin_uid(state_root, &m.name, &host.uid_range)
                .map_err(|e| format!("plugin {}: cannot allocate its uid: {e}", m.name))?;
            (uid, uid, Layer::applied(LayerKind::User, Some(format!("uid {uid}"))))
        }
    };
    let gid = match &sb.group {
        Some(g) => nix::unistd::Group::from_name(g)
            .ok()
            .flatten()
            .ok_or_else(|| {
                format!(
                    "{}: `sandbox.group` = {g:?} does not exist on this machine",
                    spec.manifest_path.display()
                )
            })?
            .gid
            .as_raw(),
        None => gid,
    };
    Ok((uid, gid, label))
}

/// Writes "0" (this process) into a cgroup's `cgroup.procs`. Async-signal-safe.
fn join_cgroup(procs: &CString) -> io::Result<()> {
    // SAFETY: `procs` is a valid NUL-terminated path prepared before the fork; open, write
    // and close are async-signal-safe and touch only the stack buffer below.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let rc = libc::write(fd, b"0".as_ptr().cast(), 1);
        libc::close(fd);
        if rc != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
