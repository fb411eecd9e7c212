//! crasher: dies on command, or after N ticks, in the way the config says.
//!
//! `[config]`: `crash_after` (ticks, 0 = never), `mode` ("abort" → SIGABRT,
//! "segv" → SIGSEGV, "exit" → exit(3)), `fail_on_load` (on_load returns an error),
//! `die_after_ms` (dies that long after loading, whatever it is doing).

use plugd_examples::{Order, Tick};
use plugin_runner::{LoadContext, Methods, Plugin};
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(default)]
struct Config {
    crash_after: u64,
    mode: String,
    fail_on_load: bool,
    die_after_ms: u64,
}

#[derive(Default)]
struct Crasher {
    config: Config,
    ticks: u64,
}

fn die(mode: &str) -> ! {
    eprintln!("crasher: dying by {mode}");
    match mode {
        "segv" => {
            use nix::sys::signal::{raise, signal, SigHandler, Signal};
            // Rust's runtime handles SIGSEGV (stack-overflow detection); restore the default first.
            // SAFETY: installing SIG_DFL runs no handler code.
            let _ = unsafe { signal(Signal::SIGSEGV, SigHandler::SigDfl) };
            let _ = raise(Signal::SIGSEGV);
            std::process::abort()
        }
        "exit" => std::process::exit(3),
        _ => std::process::abort(),
    }
}

impl Plugin for Crasher {
    fn methods(m: &mut Methods<Self>) {
        // The tick-engine calls on_tick_order (a strategy that places orders); this one
        // only holds, and dies when its time comes.
        for name in ["on_tick", "on_tick_order"] {
            m.typed(name, |c: &mut Crasher, _t: Tick| -> Result<Order, String> {
                c.ticks += 1;
                if c.config.crash_after > 0 && c.ticks >= c.config.crash_after {
                    die(&c.config.mode);
                }
                Ok(Order::Hold)
            });
        }
        m.typed("crash", |_, mode: String| -> Result<(), String> { die(&mode) });
        m.typed("panic", |_, what: String| -> Result<(), String> { panic!("{what}") });
        m.typed("ping", |_, _: ()| -> Result<&'static str, String> { Ok("pong") });
    }

    fn on_load(&mut self, ctx: &LoadContext) -> Result<(), String> {
        self.config = ctx.config()?;
        if self.config.fail_on_load {
            return Err("fail_on_load is set in [config]".into());
        }
        if self.config.die_after_ms > 0 {
            let (ms, mode) = (self.config.die_after_ms, self.config.mode.clone());
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(ms));
                die(&mode)
            });
        }
        Ok(())
    }
}

fn main() {
    plugin_runner::serve(Crasher::default())
}
