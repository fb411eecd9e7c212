//! Resource limits (setrlimit) from `[limits]`, applied in the child before exec.

use crate::manifest::Limits;

/// One rlimit to set: resource, soft, hard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    /// `libc::RLIMIT_*`.
    pub resource: libc::__rlimit_resource_t,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// The rlimits for these limits. Core dumps are always off (a dump of a
/// plugin's memory is a leak of whatever secrets it held, and slow).
pub fn plan(limits: &Limits) -> Vec<Rlimit> {
    let mut out = vec![Rlimit { resource: libc::RLIMIT_CORE, soft: 0, hard: 0 }];
    let mut set = |resource, v: u64| out.push(Rlimit { resource, soft: v, hard: v });
    // `memory` is resident memory over all the plugin's processes, watched by the
    // supervisor (and cgroup memory.max where delegated): RLIMIT_AS would refuse runtimes
    // that reserve far more address space than they touch. It is an explicit option.
    if let Some(m) = limits.address_space {
        set(libc::RLIMIT_AS, m);
    }
    if let Some(n) = limits.open_files {
        set(libc::RLIMIT_NOFILE, n);
    }
    if let Some(n) = limits.processes {
        set(libc::RLIMIT_NPROC, n);
    }
    if let Some(n) = limits.file_size {
        set(libc::RLIMIT_FSIZE, n);
    }
    if let Some(cpu) = limits.cpu_time {
        // SIGXCPU at the soft limit, SIGKILL one second later for a plugin that ignores it.
        let secs = cpu.as_secs().max(1);
        out.push(Rlimit { resource: libc::RLIMIT_CPU, soft: secs, hard: secs + 1 });
    }
    out
}

/// Applies the limits to the calling process. Async-signal-safe (one syscall each).
pub fn apply(limits: &[Rlimit]) -> std::io::Result<()> {
    for l in limits {
        let r = libc::rlimit { rlim_cur: l.soft, rlim_max: l.hard };
        // SAFETY: setrlimit reads a struct we own; no other memory is touched.
        if unsafe { libc::setrlimit(l.resource, &r) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn limits_map_to_rlimits() {
        let limits = Limits {
            memory: Some(32 << 20),
            address_space: Some(64 << 20),
            cpu_time: Some(Duration::from_secs(2)),
            file_size: Some(4096),
            ..Default::default()
        };
        let p = plan(&limits);
        assert!(p.contains(&Rlimit { resource: libc::RLIMIT_CORE, soft: 0, hard: 0 }));
        assert!(p.contains(&Rlimit { resource: libc::RLIMIT_AS, soft: 64 << 20, hard: 64 << 20 }));
        assert!(p.contains(&Rlimit { resource: libc::RLIMIT_CPU, soft: 2, hard: 3 }));
        assert!(p.contains(&Rlimit { resource: libc::RLIMIT_FSIZE, soft: 4096, hard: 4096 }));
        assert_eq!(plan(&Limits::default()).len(), 1, "only core dumps off by default");
    }
}
