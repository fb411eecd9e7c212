//! logbomb: hostile to plugd's logs. Sends huge `Log` frames, lines that try to forge
//! plugd log lines (newlines, carriage returns, terminal escapes), and floods.

use plugin_runner::{Methods, Plugin};

#[derive(Default)]
struct LogBomb;

impl Plugin for LogBomb {
    fn methods(m: &mut Methods<Self>) {
        // `n` Log frames of `mib` MiB each (a frame may be up to 16 MiB).
        m.typed("big", |_, (n, mib): (u32, usize)| -> Result<String, String> {
            let text = "x".repeat(mib << 20);
            for _ in 0..n {
                tracing::info!("{text}");
            }
            Ok("sent".into())
        });
        // A line that, written raw, would look like plugd's own.
        m.typed("forge", |_, _: ()| -> Result<String, String> {
            let fake = "innocent\n2026-12-02T00:00:00.000000Z  INFO supervisor::daemon: plugd stopped (forged)";
            tracing::warn!("{fake}");
            eprintln!("{}", fake.replace('\n', "\r"));
            println!("\x1b[2J\x1b[Hterminal cleared (forged)");
            Ok("sent".into())
        });
        // `n` short lines as fast as it can.
        m.typed("flood", |_, n: u32| -> Result<String, String> {
            for i in 0..n {
                tracing::info!("flood line {i}");
            }
            Ok("sent".into())
        });
    }
}

fn main() {
    plugin_runner::serve(LogBomb)
}
