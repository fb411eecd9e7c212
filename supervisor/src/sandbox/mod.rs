//! The sandbox: what the supervisor applies to a plugin between fork and exec.
//!
//! Everything is decided and prepared in the supervisor before the fork
//! ([`SandboxPlan::build`]): rlimits, the cgroup to join, whether to enter a
//! new network namespace, the ids to drop to, the Landlock ruleset (an open
//! descriptor) and the compiled seccomp programs. The child then runs
//! [`SandboxPlan::apply_in_child`], a fixed sequence of single syscalls that
//! allocates nothing: rlimits → cgroup → network namespace → drop ids →
//! no_new_privs → Landlock → seccomp, then exec. A failing step is reported
//! by name.
//!
//! The plan records which layers are in force and which were requested but
//! are unavailable here, with the reason; `sandbox.require` turns a missing
//! layer into a start failure. Nothing pretends: a layer is listed as in
//! force only if the plan will apply it. The supervisor itself is never
//! sandboxed, and each child gets a fresh plan.

pub mod cgroup;
pub mod landlock;
pub mod rlimit;
pub mod seccomp;

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use seccompiler::BpfProgram;

use crate::manifest::PluginSpec;

/// Steps of the child-side sequence, in order; the index is encoded in a failure.
pub const STEPS: &[&str] = &[
    "rlimits and cpu affinity",
    "cgroup",
    "netns",
    "drop ids",
    "no_new_privs",
    "landlock",
    "seccomp",
];

/// Errors from the child carry `STEP_BASE + step * 1000 + errno`, so the parent can name the step.
const STEP_BASE: i32 = 100_000;

fn step_err(step: usize, e: io::Error) -> io::Error {
    io::Error::from_raw_os_error(STEP_BASE + step as i32 * 1000 + e.raw_os_error().unwrap_or(0))
}

/// Turns an error from `Command::spawn` back into "sandbox step X failed: …" when it came from a step.
pub fn explain_spawn_error(e: &io::Error) -> Option<String> {
    let code = e.raw_os_error()?;
    if code < STEP_BASE {
        return None;
    }
    let step = ((code - STEP_BASE) / 1000) as usize;
    let errno = (code - STEP_BASE) % 1000;
    let name = STEPS.get(step).copied().unwrap_or("unknown");
    Some(format!(
        "sandbox step '{name}' failed in the child: {}",
        io::Error::from_raw_os_error(errno)
    ))
}

/// Which layers a plugin runs under, and which it asked for but cannot have here.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SandboxReport {
    /// Layers the supervisor applies, e.g. `landlock(abi 7)`, `seccomp(default)`.
    pub in_force: Vec<String>,
    /// `layer: reason` for each requested layer that is not available.
    pub unavailable: Vec<String>,
}

/// Facts about the host the plan depends on, gathered once per supervisor.
#[derive(Debug, Clone)]
pub struct HostFacts {
    /// Whether the supervisor runs as root (CAP_SYS_ADMIN for namespaces, setuid).
    pub is_root: bool,
    /// The cgroup delegation, or why there is none.
    pub cgroup: Result<cgroup::Delegation, String>,
}

impl HostFacts {
    /// Looks at this machine.
    pub fn detect() -> HostFacts {
        let cgroup = cgroup::detect();
        if let Ok(d) = &cgroup {
            if let Err(e) = cgroup::prepare(d, std::process::id()) {
                return HostFacts { is_root: nix::unistd::geteuid().is_root(), cgroup: Err(e) };
            }
        }
        HostFacts { is_root: nix::unistd::geteuid().is_root(), cgroup }
    }
}

/// Everything the child applies, prepared before the fork.
#[derive(Debug, Default)]
pub struct SandboxPlan {
    rlimits: Vec<rlimit::Rlimit>,
    cpus: Option<nix::sched::CpuSet>,
    cgroup_procs: Option<CString>,
    netns: bool,
    ids: Option<(u32, u32)>,
    landlock: Option<OwnedFd>,
    seccomp: Vec<BpfProgram>,
    /// What is in force and what is missing.
    pub report: SandboxReport,
    /// The uid the plugin runs as, if dropped (its state dir is handed to it).
    pub run_as: Option<(u32, u32)>,
}

impl SandboxPlan {
    /// Plans the sandbox for one plugin start. `program` is the resolved executable,
    /// `state_dir` its private writable folder. Fails only when a layer named in
    /// `sandbox.require` is unavailable.
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
        let missing = |plan: &mut SandboxPlan, layer: &str, why: String| {
            plan.report.unavailable.push(format!("{layer}: {why}"));
        };

        plan.rlimits = rlimit::plan(&m.limits);
        let names: Vec<&str> = plan
            .rlimits
            .iter()
            .map(|r| match r.resource {
                libc::RLIMIT_AS => "as",
                libc::RLIMIT_CPU => "cpu",
                libc::RLIMIT_NOFILE => "nofile",
                libc::RLIMIT_NPROC => "nproc",
                libc::RLIMIT_FSIZE => "fsize",
                _ => "core=0",
            })
            .collect();
        plan.report.in_force.push(format!("rlimits({})", names.join(",")));
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
                plan.report.in_force.push(format!("cpus({})", list.join(",")));
            } else {
                missing(&mut plan, "cpus", format!("CPUs {bad:?} do not exist here (0..{online})"));
            }
        }
        if m.limits.processes.is_some() && host.is_root && sb.user.is_none() {
            missing(
                &mut plan,
                "rlimit-nproc",
                "not enforced for root: set sandbox.user to an unprivileged user".into(),
            );
        }

        let wants_cgroup = m.limits.memory.is_some()
            || m.limits.cpu_quota.is_some()
            || m.limits.processes.is_some();
        if wants_cgroup {
            match &host.cgroup {
                Ok(d) => match cgroup::plugin_cgroup(d, &m.name, &m.limits) {
                    Ok((procs, applied)) if !applied.is_empty() => {
                        plan.cgroup_procs = CString::new(procs.as_os_str().as_encoded_bytes()).ok();
                        plan.report.in_force.push(format!("cgroup({})", applied.join(",")));
                    }
                    Ok(_) => missing(
                        &mut plan,
                        "cgroup",
                        "no requested limit has an available controller".into(),
                    ),
                    Err(e) => missing(&mut plan, "cgroup", e),
                },
                Err(why) => missing(&mut plan, "cgroup", why.clone()),
            }
        }

        if sb.network == "none" {
            if host.is_root {
                plan.netns = true;
                plan.report.in_force.push("netns".into());
            } else {
                missing(
                    &mut plan,
                    "netns",
                    "needs root (CAP_SYS_ADMIN); the user-namespace mode is not implemented yet"
                        .into(),
                );
            }
            match seccomp::deny_inet() {
                Ok(p) => {
                    plan.seccomp.push(p);
                    plan.report.in_force.push("seccomp(no-inet)".into());
                }
                Err(e) => missing(&mut plan, "seccomp", e),
            }
        }

        if let Some(user) = &sb.user {
            if !host.is_root {
                missing(
                    &mut plan,
                    "user",
                    format!("cannot switch to {user:?}: the supervisor is not root"),
                );
            } else {
                let u = nix::unistd::User::from_name(user).ok().flatten().ok_or_else(|| {
                    format!(
                        "{}: `sandbox.user` = {user:?} does not exist on this machine",
                        spec.manifest_path.display()
                    )
                })?;
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
                    None => u.gid.as_raw(),
                };
                plan.ids = Some((u.uid.as_raw(), gid));
                plan.run_as = plan.ids;
                plan.report.in_force.push(format!("user({user})"));
            }
        }

        plan.report.in_force.push("no-new-privs".into());

        if sb.filesystem == "isolated" {
            let mut read: Vec<PathBuf> = landlock::SYSTEM_READ.iter().map(PathBuf::from).collect();
            read.push(spec.dir.clone());
            read.push(program.to_path_buf());
            read.extend(extra_read.iter().cloned());
            read.extend(sb.read_paths.iter().cloned());
            let mut write = vec![state_dir.to_path_buf()];
            write.extend(sb.write_paths.iter().cloned());
            match landlock::ruleset(&read, &write) {
                Ok((fd, abi)) => {
                    plan.landlock = Some(fd);
                    plan.report.in_force.push(format!("landlock(abi {abi})"));
                }
                Err(why) => missing(&mut plan, "landlock", why),
            }
        }

        match seccomp::profile(&sb.syscalls) {
            Ok(Some(p)) => {
                plan.seccomp.insert(0, p);
                plan.report.in_force.push(format!("seccomp({})", sb.syscalls));
            }
            Ok(None) => {}
            Err(e) => missing(&mut plan, "seccomp", e),
        }

        for layer in &sb.require {
            let present = plan
                .report
                .in_force
                .iter()
                .any(|l| l == layer || l.starts_with(&format!("{layer}(")));
            let present = present || (layer == "rlimits" && !plan.rlimits.is_empty());
            if !present {
                let why = plan
                    .report
                    .unavailable
                    .iter()
                    .find(|u| u.starts_with(layer.as_str()))
                    .cloned()
                    .unwrap_or_else(|| {
                        format!("{layer}: not requested by the rest of the manifest")
                    });
                return Err(format!(
                    "{}: `sandbox.require` names {layer:?}, which is unavailable here ({why}); remove it from require to run with a warning",
                    spec.manifest_path.display()
                ));
            }
        }
        Ok(plan)
    }

    /// Applies the plan to the calling (forked, not yet exec'd) process.
    /// Async-signal-safe: single syscalls on data prepared before the fork.
    pub fn apply_in_child(&self) -> io::Result<()> {
        rlimit::apply(&self.rlimits).map_err(|e| step_err(0, e))?;
        if let Some(set) = &self.cpus {
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), set)
                .map_err(|e| step_err(0, e.into()))?;
        }
        if let Some(procs) = &self.cgroup_procs {
            join_cgroup(procs).map_err(|e| step_err(1, e))?;
        }
        if self.netns {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| step_err(2, e.into()))?;
        }
        if let Some((uid, gid)) = self.ids {
            let gid = nix::unistd::Gid::from_raw(gid);
            nix::unistd::setgroups(&[gid]).map_err(|e| step_err(3, e.into()))?;
            nix::unistd::setresgid(gid, gid, gid).map_err(|e| step_err(3, e.into()))?;
            let uid = nix::unistd::Uid::from_raw(uid);
            nix::unistd::setresuid(uid, uid, uid).map_err(|e| step_err(3, e.into()))?;
        }
        // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1) takes integers only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(step_err(4, io::Error::last_os_error()));
        }
        if let Some(fd) = &self.landlock {
            landlock::restrict_self(fd.as_raw_fd()).map_err(|e| step_err(5, e))?;
        }
        for program in &self.seccomp {
            seccomp::install(program).map_err(|e| step_err(6, e))?;
        }
        Ok(())
    }
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
