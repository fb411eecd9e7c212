//! filewriter: tries to write wherever it is told.

use plugin_runner::{Methods, Plugin};

struct Writer;

impl Plugin for Writer {
    fn methods(m: &mut Methods<Self>) {
        m.typed("write", |_, path: String| -> Result<String, String> {
            Ok(match std::fs::write(&path, b"written by filewriter\n") {
                Ok(()) => "written".into(),
                Err(e) => format!("error: {e}"),
            })
        });
        m.typed("read", |_, path: String| -> Result<String, String> {
            Ok(match std::fs::read_to_string(&path) {
                Ok(_) => "read".into(),
                Err(e) => format!("error: {e}"),
            })
        });
        m.typed("state_dir", |_, _: ()| -> Result<String, String> {
            std::env::var("PLUGD_STATE_DIR").map_err(|e| e.to_string())
        });
    }
}

fn main() {
    plugin_runner::serve(Writer)
}
