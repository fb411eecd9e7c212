//! Self-lockdown: what the SDK tightens once the plugin is running.
//!
//! The supervisor's sandbox must let the plugin's own `execve` through (it
//! is applied before exec). Once started, the SDK closes that door itself
//! when the supervisor asks (`PLUGD_LOCK_EXEC=1`, from `sandbox.execve =
//! false`) and tells the supervisor so; it also installs a SIGSYS handler
//! that prints the number of a syscall the seccomp profile trapped, so the
//! supervisor can name it in the exit reason.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, Ordering};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Prefix the supervisor looks for on stderr; must match the supervisor's `logs::VIOLATION_MARKER`.
const MARKER: &[u8] = b"plugd: sandbox violation: syscall ";

/// Where the SIGSYS handler writes: a duplicate of the stderr the supervisor captures,
/// kept open (close-on-exec) so a forked child that redirected its own stderr still
/// reaches the supervisor.
static REPORT_FD: AtomicI32 = AtomicI32::new(2);

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS; on Linux its `_sigsys` member
    // holds the call address (a pointer) and then the syscall number (an int), right after the
    // three leading ints and their padding, i.e. at byte offset 16 + pointer size.
    let nr = unsafe {
        let base = info as *const u8;
        *(base.add(16 + std::mem::size_of::<usize>()) as *const i32)
    };
    let mut buf = [0u8; 64];
    buf[..MARKER.len()].copy_from_slice(MARKER);
    let mut len = MARKER.len();
    let mut digits = [0u8; 12];
    let mut n = nr.unsigned_abs();
    let mut d = 0;
    loop {
        digits[d] = b'0' + (n % 10) as u8;
        d += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    while d > 0 {
        d -= 1;
        buf[len] = digits[d];
        len += 1;
    }
    buf[len] = b'\n';
    len += 1;
    // SAFETY: write, signal and kill are async-signal-safe; the buffer is on this stack.
    // SIGSYS stays blocked until the handler returns, then the default action ends the process.
    unsafe {
        libc::write(REPORT_FD.load(Ordering::Relaxed), buf.as_ptr().cast(), len);
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        libc::kill(libc::getpid(), libc::SIGSYS);
    }
}

/// Installs the SIGSYS reporter.
pub(crate) fn report_sigsys() {
    // SAFETY: F_DUPFD_CLOEXEC duplicates our own stderr; no memory is passed.
    let fd = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 500) };
    if fd >= 0 {
        REPORT_FD.store(fd, Ordering::Relaxed);
    }
    // SAFETY: the sigaction struct is fully initialised below; the handler only uses
    // async-signal-safe calls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut());
    }
}

/// Blocks execve/execveat for every thread of this process if the supervisor asked for it.
/// Returns the layers applied (for the `plugd.lockdown` notification).
pub(crate) fn apply_requested() -> Result<Vec<String>, String> {
    if std::env::var("PLUGD_LOCK_EXEC").as_deref() != Ok("1") {
        return Ok(Vec::new());
    }
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| e.to_string())?;
    let rules = BTreeMap::from([(libc::SYS_execve, vec![]), (libc::SYS_execveat, vec![])]);
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Trap, arch)
        .map_err(|e| e.to_string())?;
    let program = BpfProgram::try_from(filter).map_err(|e| e.to_string())?;
    seccompiler::apply_filter_all_threads(&program).map_err(|e| format!("blocking execve: {e}"))?;
    Ok(vec!["no-exec".to_string()])
}
