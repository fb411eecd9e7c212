//! forkbomb: forks in a loop until the kernel says no; the children sleep.

use plugin_runner::{Methods, Plugin};
use serde::Serialize;

#[derive(Serialize)]
struct Outcome {
    forked: u32,
    error: String,
}

struct Bomb;

impl Plugin for Bomb {
    fn methods(m: &mut Methods<Self>) {
        m.typed("bomb", |_, max: u32| -> Result<Outcome, String> {
            let mut forked = 0;
            while forked < max {
                // SAFETY: the child only calls async-signal-safe functions (pause, _exit).
                match unsafe { libc::fork() } {
                    -1 => {
                        let error = std::io::Error::last_os_error().to_string();
                        return Ok(Outcome { forked, error });
                    }
                    0 => unsafe {
                        // SAFETY: see above.
                        libc::pause();
                        libc::_exit(0);
                    },
                    _ => forked += 1,
                }
            }
            Ok(Outcome { forked, error: String::new() })
        });
    }
}

fn main() {
    plugin_runner::serve(Bomb)
}
