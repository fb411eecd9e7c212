//! ptracer: tries to attach to its parent (the supervisor) and read its memory.

use plugin_runner::{Methods, Plugin};

struct Tracer;

impl Plugin for Tracer {
    fn methods(m: &mut Methods<Self>) {
        m.typed("ptrace", |_, _: ()| -> Result<String, String> {
            // SAFETY: ptrace with PTRACE_ATTACH takes integers and null pointers.
            let rc = unsafe {
                libc::ptrace(
                    libc::PTRACE_ATTACH,
                    libc::getppid(),
                    std::ptr::null_mut::<libc::c_void>(),
                    std::ptr::null_mut::<libc::c_void>(),
                )
            };
            Ok(if rc == 0 {
                "attached".into()
            } else {
                format!("error: {}", std::io::Error::last_os_error())
            })
        });
        m.typed("vm_read", |_, _: ()| -> Result<String, String> {
            let mut buf = [0u8; 16];
            let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
            let remote =
                libc::iovec { iov_base: 0x400000 as *mut libc::c_void, iov_len: buf.len() };
            // SAFETY: the iovecs describe a local buffer we own and a remote range the kernel checks.
            let rc = unsafe { libc::process_vm_readv(libc::getppid(), &local, 1, &remote, 1, 0) };
            Ok(if rc >= 0 {
                "read".into()
            } else {
                format!("error: {}", std::io::Error::last_os_error())
            })
        });
    }
}

fn main() {
    plugin_runner::serve(Tracer)
}
