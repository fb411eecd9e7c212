//! slow: replies after the delay it is asked for.

use plugin_runner::{Methods, Plugin};

struct Slow;

impl Plugin for Slow {
    fn methods(m: &mut Methods<Self>) {
        m.typed("slow", |_, ms: u64| -> Result<u64, String> {
            // Tests wait for this line to know the call reached this instance.
            tracing::info!("answering in {ms} ms");
            std::thread::sleep(std::time::Duration::from_millis(ms));
            Ok(ms)
        });
    }
}

fn main() {
    plugin_runner::serve(Slow)
}
