//! conformance: the SDK behaviours both SDKs must share, in Rust. Its twin in Python is
//! `main.py` beside it; `tests/conformance.rs` drives both the same way (not a bundled
//! plugin: it has no manifest, and plugd never discovers it).

use plugin_runner::{LoadContext, Methods, Payload, Plugin};

#[derive(Default)]
struct Conformance {
    count: i64,
    state: Option<String>,
    last_notify: Option<String>,
}

impl Plugin for Conformance {
    fn methods(m: &mut Methods<Self>) {
        m.typed("bump", |me: &mut Conformance, n: i64| -> Result<i64, String> {
            me.count += n;
            Ok(me.count)
        });
        m.typed("count", |me: &mut Conformance, _: ()| -> Result<i64, String> { Ok(me.count) });
        m.typed("state", |me: &mut Conformance, _: ()| -> Result<Option<String>, String> {
            Ok(me.state.clone())
        });
        m.typed("last_notify", |me: &mut Conformance, _: ()| -> Result<Option<String>, String> {
            Ok(me.last_notify.clone())
        });
    }

    fn on_load(&mut self, ctx: &LoadContext) -> Result<(), String> {
        let config: serde_json::Value = ctx.config()?;
        if config["fail_load"] == true {
            return Err("asked to fail in on_load".into());
        }
        Ok(())
    }

    fn restore_state(&mut self, blob: &[u8]) {
        self.state = Some(String::from_utf8_lossy(blob).into_owned());
    }

    fn on_notify(&mut self, method: &str, _payload: &Payload) {
        self.last_notify = Some(method.to_string());
    }

    fn on_shutdown(&mut self) -> Option<Vec<u8>> {
        Some(self.count.to_string().into_bytes())
    }
}

fn main() {
    plugin_runner::serve(Conformance::default())
}
