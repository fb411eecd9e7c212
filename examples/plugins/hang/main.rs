//! hang: stops answering, and ignores SIGTERM and Shutdown.
//!
//! `[config] hang_on`: "call" (the `hang` method never returns, so pings go
//! unanswered), "start" (on_load never returns). Shutdown always hangs.

use plugin_runner::{LoadContext, Methods, Plugin};
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(default)]
struct Config {
    hang_on: String,
}

#[derive(Default)]
struct Hang;

fn forever() -> ! {
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

impl Plugin for Hang {
    fn methods(m: &mut Methods<Self>) {
        m.typed("hang", |_, _: ()| -> Result<(), String> { forever() });
        m.typed("ping", |_, _: ()| -> Result<&'static str, String> { Ok("pong") });
    }

    fn on_load(&mut self, ctx: &LoadContext) -> Result<(), String> {
        // SAFETY: setting SIGTERM to SIG_IGN installs no handler code; nothing can run unsafely.
        unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGTERM,
                nix::sys::signal::SigHandler::SigIgn,
            )
        }
        .map_err(|e| e.to_string())?;
        let config: Config = ctx.config()?;
        if config.hang_on == "start" {
            forever();
        }
        Ok(())
    }

    fn on_shutdown(&mut self) -> Option<Vec<u8>> {
        forever()
    }
}

fn main() {
    plugin_runner::serve(Hang)
}
