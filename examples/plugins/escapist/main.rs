//! escapist: a hostile plugin with the default manifest that tries each way out of its
//! jail. Every method reports what happened in words ("ok: …" or "error: …"); the ones
//! that seccomp traps end the plugin with a named sandbox violation instead.
//!
//! It skips the SDK's voluntary exec lock on purpose (it removes `PLUGD_LOCK_EXEC`
//! before serving), so the exec rule it meets is the supervisor's alone.

use std::ffi::CString;

use plugin_runner::{Methods, Plugin};

struct Escapist;

fn errno() -> String {
    format!("error: {}", std::io::Error::last_os_error())
}

fn outcome(rc: libc::c_long) -> String {
    if rc < 0 {
        errno()
    } else {
        format!("ok: {rc}")
    }
}

fn c(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|e| e.to_string())
}

/// A child that touches `mib` MiB of fresh memory and then sleeps. Only raw syscalls run
/// after the fork (no allocator), so it is safe whatever threads the parent has.
fn hog_child(mib: u64) -> libc::pid_t {
    // SAFETY: fork, then only mmap, writes into the new mapping, and pause in the child.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            let len = (mib << 20) as usize;
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            ) as *mut u8;
            if !p.is_null() && p as isize != -1 {
                let mut i = 0;
                while i < len {
                    *p.add(i) = 1;
                    i += 4096;
                }
            }
            loop {
                libc::pause();
            }
        }
        pid
    }
}

impl Plugin for Escapist {
    fn methods(m: &mut Methods<Self>) {
        // Identity and capabilities, as the kernel reports them.
        m.typed("whoami", |_, _: ()| -> Result<String, String> {
            let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
            let keep = [
                "Uid:",
                "Gid:",
                "CapInh:",
                "CapPrm:",
                "CapEff:",
                "CapBnd:",
                "CapAmb:",
                "NoNewPrivs:",
            ];
            Ok(status
                .lines()
                .filter(|l| keep.iter().any(|k| l.starts_with(k)))
                .collect::<Vec<_>>()
                .join("\n"))
        });
        m.typed("read", |_, path: String| -> Result<String, String> {
            Ok(match std::fs::read(&path) {
                Ok(bytes) => format!("ok: {} bytes", bytes.len()),
                Err(e) => format!("error: {e}"),
            })
        });
        m.typed("list", |_, path: String| -> Result<String, String> {
            Ok(match std::fs::read_dir(&path) {
                Ok(rd) => {
                    let mut names: Vec<String> = rd
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect();
                    names.sort();
                    format!("ok: {}", names.join(" "))
                }
                Err(e) => format!("error: {e}"),
            })
        });
        m.typed("write", |_, path: String| -> Result<String, String> {
            Ok(match std::fs::write(&path, b"escaped") {
                Ok(()) => "ok: written".into(),
                Err(e) => format!("error: {e}"),
            })
        });
        // Signals and scheduling of a process by pid (the test passes plugd's own pid).
        m.typed("kill", |_, (pid, sig): (i32, i32)| -> Result<String, String> {
            // SAFETY: kill with integers.
            Ok(outcome(unsafe { libc::kill(pid, sig) } as libc::c_long))
        });
        m.typed("renice", |_, pid: i32| -> Result<String, String> {
            // SAFETY: setpriority with integers.
            Ok(outcome(unsafe { libc::setpriority(libc::PRIO_PROCESS, pid as libc::id_t, 19) }
                as libc::c_long))
        });
        m.typed("prlimit", |_, pid: i32| -> Result<String, String> {
            let lim = libc::rlimit { rlim_cur: 1, rlim_max: 1 };
            // SAFETY: prlimit reads a struct we own.
            Ok(outcome(unsafe {
                libc::prlimit(pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut())
            } as libc::c_long))
        });
        m.typed("connect", |_, path: String| -> Result<String, String> {
            Ok(match std::os::unix::net::UnixStream::connect(&path) {
                Ok(_) => "ok: connected".into(),
                Err(e) => format!("error: {e}"),
            })
        });
        // Sends one request line to a control socket and returns the answer line.
        m.typed("control", |_, (path, line): (String, String)| -> Result<String, String> {
            use std::io::{BufRead, Write};
            let mut conn = match std::os::unix::net::UnixStream::connect(&path) {
                Ok(c) => c,
                Err(e) => return Ok(format!("error: {e}")),
            };
            conn.write_all(format!("{line}\n").as_bytes()).map_err(|e| e.to_string())?;
            let mut answer = String::new();
            std::io::BufReader::new(conn).read_line(&mut answer).map_err(|e| e.to_string())?;
            Ok(answer.trim().to_string())
        });
        // A character device (1, 3 is /dev/null's number: harmless, but a device all the same).
        m.typed("mknod", |_, path: String| -> Result<String, String> {
            let p = c(&path)?;
            // SAFETY: mknod with a NUL-terminated path we own.
            Ok(outcome(unsafe {
                libc::mknod(p.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3))
            } as libc::c_long))
        });
        m.typed("io_uring", |_, _: ()| -> Result<String, String> {
            let mut params = [0u8; 120];
            // SAFETY: io_uring_setup reads and writes a params buffer we own (120 bytes).
            Ok(outcome(unsafe {
                libc::syscall(libc::SYS_io_uring_setup, 8u32, params.as_mut_ptr())
            }))
        });
        m.typed("clone_newuser", |_, _: ()| -> Result<String, String> {
            // SAFETY: a fork-like clone; the child exits at once.
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
                // SAFETY: _exit in the child.
                unsafe { libc::_exit(0) };
            }
            Ok(outcome(pid))
        });
        m.typed("clone3", |_, _: ()| -> Result<String, String> {
            // struct clone_args with only exit_signal = SIGCHLD (a plain fork).
            let mut args = [0u64; 11];
            args[4] = libc::SIGCHLD as u64;
            // SAFETY: clone3 reads the args struct we own; a child would _exit at once.
            let pid = unsafe {
                libc::syscall(libc::SYS_clone3, args.as_mut_ptr(), std::mem::size_of_val(&args))
            };
            if pid == 0 {
                // SAFETY: _exit in the child.
                unsafe { libc::_exit(0) };
            }
            Ok(outcome(pid))
        });
        m.typed("sethostname", |_, name: String| -> Result<String, String> {
            // SAFETY: sethostname reads a buffer we own.
            Ok(outcome(
                unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } as libc::c_long
            ))
        });
        m.typed("hostname", |_, _: ()| -> Result<String, String> {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .map_err(|e| e.to_string())
        });
        m.typed("exec_sh", |_, _: ()| -> Result<String, String> {
            Ok(
                match std::process::Command::new("/bin/sh").args(["-c", "echo shell ran"]).output()
                {
                    Ok(out) => format!(
                        "ok: {} {}",
                        out.status,
                        String::from_utf8_lossy(&out.stdout).trim()
                    ),
                    Err(e) => format!("error: {e}"),
                },
            )
        });
        // Descriptors it holds (0, 1, 2 and its protocol socket, plus the one reading the list).
        m.typed("fds", |_, _: ()| -> Result<Vec<String>, String> {
            let mut out: Vec<String> = std::fs::read_dir("/proc/self/fd")
                .map_err(|e| e.to_string())?
                .flatten()
                .map(|e| {
                    let target = std::fs::read_link(e.path())
                        .map(|t| t.display().to_string())
                        .unwrap_or_default();
                    format!("{}={target}", e.file_name().to_string_lossy())
                })
                .collect();
            out.sort();
            Ok(out)
        });
        // A grandchild that leaves the process group and session, then sleeps forever.
        m.typed("double_fork", |_, _: ()| -> Result<String, String> {
            // SAFETY: fork; the children only call setsid, fork, pause and _exit.
            unsafe {
                let child = libc::fork();
                if child == 0 {
                    libc::setsid();
                    if libc::fork() == 0 {
                        loop {
                            libc::pause();
                        }
                    }
                    libc::_exit(0);
                }
                let mut st = 0;
                libc::waitpid(child, &mut st, 0);
            }
            Ok("ok: forked".into())
        });
        m.typed("hog_children", |_, (n, mib): (u32, u64)| -> Result<String, String> {
            let pids: Vec<libc::pid_t> = (0..n).map(|_| hog_child(mib)).collect();
            Ok(format!("ok: {pids:?}"))
        });
    }
}

fn main() {
    // A hostile plugin does not lock itself down: whatever holds it, the supervisor applied.
    std::env::remove_var("PLUGD_LOCK_EXEC");
    plugin_runner::serve(Escapist)
}
