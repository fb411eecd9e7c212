//! seccomp-bpf profiles, compiled before the fork, installed in the child.
//!
//! Two filters are stacked (the kernel applies the strictest answer):
//!
//! - the **syscall profile**: `default` traps a deny-list of syscalls no
//!   plugin needs (ptrace, mount, kexec, bpf, module loading, namespaces, …);
//!   the default also traps `clone` with a namespace flag and `mknod`/`mknodat` of
//!   a device, and answers `clone3` with ENOSYS (its flags are out of seccomp's
//!   reach; libc then falls back to `clone`);
//!   `strict` traps everything outside an allow-list enough for an SDK
//!   plugin's run loop (and for the dynamic loader before it). A trapped
//!   syscall raises SIGSYS; the SDK prints its number to stderr before dying
//!   so the supervisor can name it ("sandbox violation: ptrace").
//! - the **network filter** (`sandbox.network = "none"`): `socket()` for any
//!   family but AF_UNIX fails with EACCES, so the plugin sees an ordinary
//!   error instead of dying.

use std::collections::BTreeMap;

use crate::manifest::SyscallProfile;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Syscalls the default profile refuses, with their names for reports.
pub const DEFAULT_DENY: &[(&str, i64)] = &[
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("reboot", libc::SYS_reboot),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("personality", libc::SYS_personality),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("kcmp", libc::SYS_kcmp),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ("quotactl", libc::SYS_quotactl),
    ("fanotify_init", libc::SYS_fanotify_init),
    // io_uring performs socket(), openat() and more without passing through this filter.
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    // The new mount API, which mount/umount2/pivot_root above would otherwise leave open.
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("open_tree", libc::SYS_open_tree),
    ("move_mount", libc::SYS_move_mount),
    ("mount_setattr", libc::SYS_mount_setattr),
    // The host's clock, names and kernel log.
    ("adjtimex", libc::SYS_adjtimex),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("sethostname", libc::SYS_sethostname),
    ("setdomainname", libc::SYS_setdomainname),
    ("syslog", libc::SYS_syslog),
];

/// Namespace flags `clone` may not carry (the default profile traps them). `CLONE_NEWTIME`
/// is left out: in `clone`'s flags its bit is part of the exit signal.
const CLONE_NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
];

/// Syscalls the strict profile allows (everything else traps).
pub const STRICT_ALLOW: &[(&str, i64)] = &[
    // the run loop
    ("read", libc::SYS_read),
    ("write", libc::SYS_write),
    ("readv", libc::SYS_readv),
    ("writev", libc::SYS_writev),
    ("recvfrom", libc::SYS_recvfrom),
    ("sendto", libc::SYS_sendto),
    ("recvmsg", libc::SYS_recvmsg),
    ("sendmsg", libc::SYS_sendmsg),
    ("close", libc::SYS_close),
    ("dup", libc::SYS_dup),
    ("dup2", libc::SYS_dup2),
    ("dup3", libc::SYS_dup3),
    ("poll", libc::SYS_poll),
    ("ppoll", libc::SYS_ppoll),
    ("futex", libc::SYS_futex),
    ("clock_gettime", libc::SYS_clock_gettime),
    ("clock_nanosleep", libc::SYS_clock_nanosleep),
    ("nanosleep", libc::SYS_nanosleep),
    ("sched_yield", libc::SYS_sched_yield),
    ("getpid", libc::SYS_getpid),
    ("gettid", libc::SYS_gettid),
    ("getppid", libc::SYS_getppid),
    ("exit", libc::SYS_exit),
    ("exit_group", libc::SYS_exit_group),
    ("kill", libc::SYS_kill),
    ("tgkill", libc::SYS_tgkill),
    // memory
    ("brk", libc::SYS_brk),
    ("mmap", libc::SYS_mmap),
    ("munmap", libc::SYS_munmap),
    ("mremap", libc::SYS_mremap),
    ("mprotect", libc::SYS_mprotect),
    ("madvise", libc::SYS_madvise),
    // signals
    ("rt_sigaction", libc::SYS_rt_sigaction),
    ("rt_sigprocmask", libc::SYS_rt_sigprocmask),
    ("rt_sigreturn", libc::SYS_rt_sigreturn),
    ("sigaltstack", libc::SYS_sigaltstack),
    // process start-up (exec, dynamic loader, libc and Rust runtime init)
    ("execve", libc::SYS_execve),
    ("arch_prctl", libc::SYS_arch_prctl),
    ("set_tid_address", libc::SYS_set_tid_address),
    ("set_robust_list", libc::SYS_set_robust_list),
    ("rseq", libc::SYS_rseq),
    ("prlimit64", libc::SYS_prlimit64),
    ("getrandom", libc::SYS_getrandom),
    ("openat", libc::SYS_openat),
    ("access", libc::SYS_access),
    ("newfstatat", libc::SYS_newfstatat),
    ("fstat", libc::SYS_fstat),
    ("statx", libc::SYS_statx),
    ("pread64", libc::SYS_pread64),
    ("lseek", libc::SYS_lseek),
    ("fcntl", libc::SYS_fcntl),
    ("ioctl", libc::SYS_ioctl),
    ("readlink", libc::SYS_readlink),
    ("sched_getaffinity", libc::SYS_sched_getaffinity),
    ("getcwd", libc::SYS_getcwd),
    ("prctl", libc::SYS_prctl),
    ("seccomp", libc::SYS_seccomp),
    ("getuid", libc::SYS_getuid),
    ("geteuid", libc::SYS_geteuid),
    ("getgid", libc::SYS_getgid),
    ("getegid", libc::SYS_getegid),
    ("uname", libc::SYS_uname),
];

/// The name of a syscall number, if it is one this module names.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    DEFAULT_DENY
        .iter()
        .chain(STRICT_ALLOW)
        .chain(EXTRA_NAMES)
        .find(|(_, n)| *n == nr)
        .map(|(name, _)| *name)
}

/// Names of syscalls a plugin commonly trips over under `strict` or the SDK's exec lock.
const EXTRA_NAMES: &[(&str, i64)] = &[
    ("execveat", libc::SYS_execveat),
    ("socket", libc::SYS_socket),
    ("connect", libc::SYS_connect),
    ("clone", libc::SYS_clone),
    ("clone3", libc::SYS_clone3),
    ("fork", libc::SYS_fork),
    ("vfork", libc::SYS_vfork),
    ("unlinkat", libc::SYS_unlinkat),
    ("mkdirat", libc::SYS_mkdirat),
    ("mknodat", libc::SYS_mknodat),
    #[cfg(target_arch = "x86_64")]
    ("mknod", libc::SYS_mknod),
];

fn arch() -> Result<TargetArch, String> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| format!("seccomp profiles are not available on {}", std::env::consts::ARCH))
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, String> {
    let filter =
        SeccompFilter::new(rules, mismatch, matched, arch()?).map_err(|e| e.to_string())?;
    BpfProgram::try_from(filter).map_err(|e| e.to_string())
}

/// The syscall profile for `sandbox.syscalls` ("default" or "strict"; "off" has none):
/// one or more filters, all installed (the kernel applies the strictest answer).
pub fn profile(kind: SyscallProfile) -> Result<Vec<BpfProgram>, String> {
    match kind {
        SyscallProfile::Off => Ok(Vec::new()),
        SyscallProfile::Strict => {
            let rules = STRICT_ALLOW.iter().map(|(_, nr)| (*nr, vec![])).collect();
            Ok(vec![compile(rules, SeccompAction::Trap, SeccompAction::Allow)?])
        }
        SyscallProfile::Default => {
            let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
                DEFAULT_DENY.iter().map(|(_, nr)| (*nr, vec![])).collect();
            // clone with any namespace flag: one rule per flag, any of them matches.
            let mut clone = Vec::new();
            for &flag in CLONE_NAMESPACE_FLAGS {
                clone.push(rule(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(flag), flag)?);
            }
            rules.insert(libc::SYS_clone, clone);
            // mknod of a character or block device (fifos and sockets stay allowed).
            let s_ifmt = libc::S_IFMT as u64;
            let mut devices = |nr: i64, mode_arg: u8| -> Result<(), String> {
                let mut list = Vec::new();
                for kind in [libc::S_IFCHR as u64, libc::S_IFBLK as u64] {
                    list.push(rule(
                        mode_arg,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::MaskedEq(s_ifmt),
                        kind,
                    )?);
                }
                rules.insert(nr, list);
                Ok(())
            };
            #[cfg(target_arch = "x86_64")]
            devices(libc::SYS_mknod, 1)?;
            devices(libc::SYS_mknodat, 2)?;
            let deny = compile(rules, SeccompAction::Allow, SeccompAction::Trap)?;
            // clone3 passes its flags in memory, where seccomp cannot look: answer ENOSYS,
            // and libc falls back to clone, whose flags the filter above checks.
            let clone3 = BTreeMap::from([(libc::SYS_clone3, vec![])]);
            let clone3 =
                compile(clone3, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32))?;
            Ok(vec![deny, clone3])
        }
    }
}

fn rule(
    arg: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompRule, String> {
    let cond = SeccompCondition::new(arg, len, op, value).map_err(|e| e.to_string())?;
    SeccompRule::new(vec![cond]).map_err(|e| e.to_string())
}

/// `socket(family != AF_UNIX, …)` fails with EACCES; every other syscall is untouched.
pub fn deny_inet() -> Result<BpfProgram, String> {
    let not_unix =
        SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, libc::AF_UNIX as u64)
            .map_err(|e| e.to_string())?;
    let rule = SeccompRule::new(vec![not_unix]).map_err(|e| e.to_string())?;
    let rules = BTreeMap::from([(libc::SYS_socket, vec![rule])]);
    compile(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EACCES as u32))
}

/// Installs a compiled filter on the calling thread (sets no_new_privs). Async-signal-safe.
pub fn install(program: &BpfProgram) -> std::io::Result<()> {
    seccompiler::apply_filter(program).map_err(|e| match e {
        seccompiler::Error::Prctl(e) | seccompiler::Error::Seccomp(e) => e,
        _ => std::io::Error::from_raw_os_error(libc::EINVAL),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_compile() {
        assert_eq!(profile(SyscallProfile::Default).unwrap().len(), 2);
        assert_eq!(profile(SyscallProfile::Strict).unwrap().len(), 1);
        assert!(profile(SyscallProfile::Off).unwrap().is_empty());
        assert_eq!(syscall_name(libc::SYS_io_uring_setup), Some("io_uring_setup"));
        assert_eq!(syscall_name(libc::SYS_mknodat), Some("mknodat"));
        assert!(!deny_inet().unwrap().is_empty());
        assert_eq!(syscall_name(libc::SYS_ptrace), Some("ptrace"));
        assert_eq!(syscall_name(libc::SYS_execve), Some("execve"));
    }
}
