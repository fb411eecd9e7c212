//! Landlock: the plugin may read its own folder, its executable and the
//! system's library folders, and write only its state folder (plus declared
//! extra paths). The ruleset is built in the supervisor before the fork; the
//! child only calls `landlock_restrict_self` on the inherited descriptor.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use landlock::{
    path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, ABI,
};

/// System paths every dynamically linked program needs to start, read-only.
pub const SYSTEM_READ: &[&str] = &[
    "/usr",
    "/lib",
    "/lib64",
    "/bin",
    "/etc",
    "/proc",
    "/sys/devices/system/cpu",
    "/dev/urandom",
    "/dev/null",
];

/// The Landlock ABI the running kernel supports (0 = none).
pub fn kernel_abi() -> i32 {
    // SAFETY: with a null attribute pointer, size 0 and LANDLOCK_CREATE_RULESET_VERSION the
    // call only returns the ABI version (or an error); no memory is read or written.
    let v = unsafe {
        libc::syscall(libc::SYS_landlock_create_ruleset, std::ptr::null::<u8>(), 0usize, 1u32)
    };
    if v < 0 {
        0
    } else {
        v as i32
    }
}

fn abi_enum(v: i32) -> ABI {
    match v {
        i32::MIN..=0 => ABI::Unsupported,
        1 => ABI::V1,
        2 => ABI::V2,
        3 => ABI::V3,
        4 => ABI::V4,
        5 => ABI::V5,
        // The crate's newest ABI covers every filesystem right it knows; newer kernels keep them.
        _ => ABI::V6,
    }
}

/// Builds the ruleset; returns its descriptor and the ABI used.
pub fn ruleset(read: &[PathBuf], write: &[PathBuf]) -> Result<(OwnedFd, i32), String> {
    let v = kernel_abi();
    if v <= 0 {
        return Err(
            "the kernel has no Landlock (needs Linux 5.13+ with landlock in the lsm= list)".into(),
        );
    }
    let abi = abi_enum(v);
    let created = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(read, AccessFs::from_read(abi))))
        .and_then(|r| r.add_rules(path_beneath_rules(write, AccessFs::from_all(abi))))
        .map_err(|e| format!("building the Landlock ruleset: {e}"))?;
    let fd: Option<OwnedFd> = created.into();
    let fd = fd.ok_or_else(|| "the kernel refused to create a Landlock ruleset".to_string())?;
    Ok((fd, v))
}

/// Restricts the calling process with the ruleset. Async-signal-safe (one syscall).
pub fn restrict_self(ruleset_fd: i32) -> std::io::Result<()> {
    // SAFETY: landlock_restrict_self takes a descriptor and flags; no memory is passed.
    let rc = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset_fd, 0u32) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
