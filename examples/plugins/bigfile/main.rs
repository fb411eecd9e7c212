//! bigfile: writes a file in its state folder until told size, past its file-size limit.

use std::io::Write;

use plugin_runner::{Methods, Plugin};

struct Big;

impl Plugin for Big {
    fn methods(m: &mut Methods<Self>) {
        m.typed("write", |_, bytes: u64| -> Result<u64, String> {
            let dir = std::env::var("PLUGD_STATE_DIR").map_err(|e| e.to_string())?;
            let mut f =
                std::fs::File::create(format!("{dir}/big.bin")).map_err(|e| e.to_string())?;
            let chunk = vec![0u8; 64 * 1024];
            let mut written = 0;
            while written < bytes {
                f.write_all(&chunk).map_err(|e| format!("after {written} bytes: {e}"))?;
                written += chunk.len() as u64;
            }
            Ok(written)
        });
    }
}

fn main() {
    plugin_runner::serve(Big)
}
