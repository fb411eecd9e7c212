//! execve: tries to run /bin/sh, by replacing itself and by spawning a child.

use std::ffi::CString;

use plugin_runner::{Methods, Plugin};

struct Exec;

impl Plugin for Exec {
    fn methods(m: &mut Methods<Self>) {
        // Replace this process with a shell (what a dropper would do).
        m.typed("exec_self", |_, _: ()| -> Result<String, String> {
            let sh = CString::new("/bin/sh").map_err(|e| e.to_string())?;
            let args = [
                sh.clone(),
                CString::new("-c").map_err(|e| e.to_string())?,
                CString::new("true").map_err(|e| e.to_string())?,
            ];
            let err = nix::unistd::execv(&sh, &args).unwrap_err();
            Ok(format!("error: {err}"))
        });
        // Spawn a shell as a child.
        m.typed("spawn", |_, _: ()| -> Result<String, String> {
            match std::process::Command::new("/bin/sh").args(["-c", "echo shell ran"]).output() {
                Ok(out) if out.status.success() => {
                    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
                }
                Ok(out) => Ok(format!("shell failed: {}", out.status)),
                Err(e) => Ok(format!("error: {e}")),
            }
        });
    }
}

fn main() {
    plugin_runner::serve(Exec)
}
