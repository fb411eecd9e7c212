//! echo: answers every call with its argument, unchanged; plus a few probes tests use.

use plugin_runner::{LoadContext, Methods, Payload, Plugin};

/// The argument of `add`: its JSON Schema comes from this type.
#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Pair {
    /// The first number.
    a: f64,
    /// The second number.
    b: f64,
}

#[derive(Default)]
struct Echo {
    config: String,
}

impl Plugin for Echo {
    fn methods(m: &mut Methods<Self>) {
        m.raw("echo", |_, p: &Payload| Ok(p.clone()));
        m.describe("echo", "Answers with its argument, unchanged.");
        // Described: plugd knows its input and result shapes and checks calls against them.
        m.described("add", "Adds two numbers.", |_, p: Pair| -> Result<f64, String> {
            Ok(p.a + p.b)
        });
        // Calls the host's `method` with `arg` and returns its answer, or the error as
        // "Code: message" (for host-call tests).
        m.with_ctx("host", |_, ctx, (method, arg): (String, String)| -> Result<String, String> {
            ctx.call::<_, String>(&method, &arg).map_err(|e| format!("{:?}: {}", e.code, e.message))
        });
        // Calls `method` of another `plugin` through plugd with `arg` (plugin-to-plugin tests).
        m.with_ctx(
            "relay",
            |_, ctx, (plugin, method, arg): (String, String, String)| -> Result<String, String> {
                ctx.call_plugin::<_, String>(&plugin, &method, &arg)
                    .map_err(|e| format!("{:?}: {}", e.code, e.message))
            },
        );
        // Calls `bounce` on the plugin named in the argument, naming itself: two plugins that
        // bounce to each other make a cycle (cut by the deadline).
        m.with_ctx("bounce", |_, ctx, other: String| -> Result<String, String> {
            let me = std::env::var("PLUGD_PLUGIN_NAME").unwrap_or_default();
            ctx.call_plugin::<_, String>(&other, "bounce", &me)
                .map_err(|e| format!("{:?}: {}", e.code, e.message))
        });
        // Asks plugd for this plugin's own status (plugd.status).
        m.with_ctx("whoami", |_, ctx, _: ()| -> Result<plugin_runner::OwnStatus, String> {
            ctx.status().map_err(|e| format!("{:?}: {}", e.code, e.message))
        });
        // Logs a line with fields through plugd.log (one way).
        m.with_ctx(
            "log_fields",
            |_, ctx, (text, fields): (String, Vec<(String, String)>)| -> Result<(), String> {
                let shown: Vec<(&str, &dyn std::fmt::Display)> =
                    fields.iter().map(|(k, v)| (k.as_str(), v as &dyn std::fmt::Display)).collect();
                ctx.log(plugin_runner::LogLevel::Info, &text, &shown).map_err(|e| e.to_string())
            },
        );
        // How long the value under `key` is in the call's cfg (None: no cfg, or no such
        // key): the caller's per-call configuration reaches the handler.
        m.with_ctx("cfg_len", |_, ctx, key: String| -> Result<Option<usize>, String> {
            let cfg = ctx.cfg::<std::collections::BTreeMap<String, String>>();
            let cfg = cfg.transpose().map_err(|e| e.message)?;
            Ok(cfg.and_then(|c| c.get(&key).map(String::len)))
        });
        // Hostile (transport = "shm"): writes a frame out of turn where plugd reads the
        // next reply, then stays in the handler for `ms` milliseconds while plugd waits.
        m.typed("shm_scribble", |_, ms: u64| -> Result<(), String> {
            own_mapping()?.poison_next_reply(u64::MAX);
            std::thread::sleep(std::time::Duration::from_millis(ms));
            Ok(())
        });
        // Hostile (transport = "shm"): random bytes from `seed` over the plugin's side of
        // the live mapping (see `Mapping::fuzz_plugin_side`), then `ms` milliseconds' wait.
        m.typed("shm_fuzz", |_, (seed, ms): (u64, u64)| -> Result<(), String> {
            own_mapping()?.fuzz_plugin_side(seed);
            std::thread::sleep(std::time::Duration::from_millis(ms));
            Ok(())
        });
        // Hostile (transport = "shm", protocol 4): puts calls to the host's `method` on
        // the replies ring as fast as there is room, for `ms` milliseconds, never reading
        // an answer; plugd must still end the call being served at its deadline. Its own
        // ring writer leaves the SDK's behind: what the SDK writes after is out of turn.
        m.typed("shm_host_flood", |_, (method, ms): (String, u64)| -> Result<u64, String> {
            let map = own_mapping()?;
            let mut ring = map.replies().producer();
            let until = std::time::Instant::now() + std::time::Duration::from_millis(ms);
            let mut sent = 0u64;
            let mut frame = Vec::new();
            while std::time::Instant::now() < until {
                let call = plugin_proto::Message::Call(plugin_proto::Call {
                    id: 1_000_000 + sent,
                    method: method.clone(),
                    deadline_us: 0,
                    payload: plugin_proto::Payload::empty(),
                });
                frame.clear();
                plugin_proto::frame::encode_frame(&call, &mut frame).map_err(|e| e.to_string())?;
                if ring.push(&frame).map_err(|e| e.to_string())? {
                    sent += 1;
                }
            }
            Ok(sent)
        });
        // Hostile (transport = "shm"): tries to shrink the mapping to nothing under plugd
        // (whose next access would then fault). Returns why it could not.
        m.typed("shm_truncate", |_, _: ()| -> Result<(), String> {
            let fd: i32 = std::env::var("PLUGD_SHM_FD")
                .map_err(|e| e.to_string())?
                .parse()
                .map_err(|_| "bad fd")?;
            // SAFETY: ftruncate on a descriptor number this process holds; no memory is
            // touched by the call itself.
            if unsafe { libc::ftruncate(fd, 0) } != 0 {
                return Err(std::io::Error::last_os_error().to_string());
            }
            Ok(())
        });
        m.typed("pid", |_, _: ()| -> Result<u32, String> { Ok(std::process::id()) });
        // Answers `ms` after `ms` milliseconds (a call slower than any spin).
        m.typed("nap", |_, ms: u64| -> Result<u64, String> {
            std::thread::sleep(std::time::Duration::from_millis(ms));
            Ok(ms)
        });
        // Echo tagged with the version that answered (for hot-update tests).
        m.typed("tagged", |_, n: u64| -> Result<(u64, String), String> {
            Ok((n, std::env::var("PLUGD_PLUGIN_VERSION").unwrap_or_default()))
        });
        m.typed("config", |me: &mut Echo, _: ()| -> Result<String, String> {
            Ok(me.config.clone())
        });
        m.typed("env", |_, key: String| -> Result<Option<String>, String> {
            Ok(std::env::var(key).ok())
        });
        m.typed("log", |_, text: String| -> Result<(), String> {
            tracing::warn!("{text}");
            println!("stdout: {text}");
            Ok(())
        });
    }

    fn on_load(&mut self, ctx: &LoadContext) -> Result<(), String> {
        self.config = ctx.config_json().to_string();
        Ok(())
    }
}

fn main() {
    plugin_runner::serve(Echo::default())
}

/// The shared mapping plugd handed this process (transport = "shm"), mapped once more.
fn own_mapping() -> Result<std::sync::Arc<plugin_proto::shm::Mapping>, String> {
    let fd: i32 =
        std::env::var("PLUGD_SHM_FD").map_err(|e| e.to_string())?.parse().map_err(|_| "bad fd")?;
    // SAFETY: a descriptor number this process holds open (the runner owns the original);
    // dup makes one this function owns.
    let dup = unsafe { libc::dup(fd) };
    if dup < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: dup just returned this descriptor to us alone.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) };
    let map = plugin_proto::shm::Mapping::open(&owned).map_err(|e| e.to_string())?;
    Ok(std::sync::Arc::new(map))
}
