//! Resource limits (setrlimit) from `[limits]`, applied in the child before exec.
//!
//! Through nix's resource module (the design card's other choice beside the `rlimit`
//! crate): nix is already here, so it costs no crate, and its `setrlimit` is one syscall
//! with no allocation, as the child between fork and exec needs.

use nix::sys::resource::{setrlimit, Resource};

use crate::manifest::Limits;

/// The short name a report shows for a limit (`core=0` for the one always set).
pub fn short_name(resource: Resource) -> &'static str {
    match resource {
        Resource::RLIMIT_AS => "as",
        Resource::RLIMIT_CPU => "cpu",
        Resource::RLIMIT_NOFILE => "nofile",
        Resource::RLIMIT_NPROC => "nproc",
        Resource::RLIMIT_FSIZE => "fsize",
        _ => "core=0",
    }
}

/// One rlimit to set: resource, soft, hard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    /// Which limit.
    pub resource: Resource,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// The rlimits for these limits. Core dumps are always off (a dump of a
/// plugin's memory is a leak of whatever secrets it held, and slow).
pub fn plan(limits: &Limits) -> Vec<Rlimit> {
    let mut out = vec![Rlimit { resource: Resource::RLIMIT_CORE, soft: 0, hard: 0 }];
    let mut set = |resource, v: u64| out.push(Rlimit { resource, soft: v, hard: v });
    // `memory` is resident memory over all the plugin's processes, watched by the
    // supervisor (and cgroup memory.max where delegated): RLIMIT_AS would refuse runtimes
    // that reserve far more address space than they touch. It is an explicit option.
    if let Some(m) = limits.address_space {
        set(Resource::RLIMIT_AS, m);
    }
    if let Some(n) = limits.open_files {
        set(Resource::RLIMIT_NOFILE, n);
    }
    if let Some(n) = limits.processes {
        set(Resource::RLIMIT_NPROC, n);
    }
    if let Some(n) = limits.file_size {
        set(Resource::RLIMIT_FSIZE, n);
    }
    if let Some(cpu) = limits.cpu_time {
        // SIGXCPU at the soft limit, SIGKILL one second later for a plugin that ignores it.
        let secs = cpu.as_secs().max(1);
        out.push(Rlimit { resource: Resource::RLIMIT_CPU, soft: secs, hard: secs + 1 });
    }
    out
}

/// Applies the limits to the calling process. Async-signal-safe (one syscall each).
pub fn apply(limits: &[Rlimit]) -> std::io::Result<()> {
    for l in limits {
        setrlimit(l.resource, l.soft, l.hard).map_err(std::io::Error::from)?;
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
        assert!(p.contains(&Rlimit { resource: Resource::RLIMIT_CORE, soft: 0, hard: 0 }));
        assert!(p.contains(&Rlimit {
            resource: Resource::RLIMIT_AS,
            soft: 64 << 20,
            hard: 64 << 20
        }));
        assert!(p.contains(&Rlimit { resource: Resource::RLIMIT_CPU, soft: 2, hard: 3 }));
        assert!(p.contains(&Rlimit { resource: Resource::RLIMIT_FSIZE, soft: 4096, hard: 4096 }));
        assert_eq!(plan(&Limits::default()).len(), 1, "only core dumps off by default");
    }
}
