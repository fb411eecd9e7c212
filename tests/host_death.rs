//! End to end: when the host process is SIGKILLed, no plugin survives it.
//!
//! Well-behaved plugins exit when their socket closes anyway; `garbage` (in its
//! bundled "after-ready" mode) ignores the closed socket and sleeps, so only the
//! parent-death signal can end it. That is what this test is about.

mod kit;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use kit::*;

#[test]
fn sigkill_of_the_host_leaves_no_plugin_alive() {
    let engine = Command::new(env!("CARGO_BIN_EXE_tick-engine"))
        .args(["--ticks", "0", "--rate", "200"])
        .arg("--plugins")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/plugins"))
        .arg("--extra")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/plugins/garbage"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut engine = ChildGuard(engine);
    let stdout = engine.0.stdout.take().unwrap();
    let mut pids = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("plugin ") {
            let pid: u32 = rest.rsplit(' ').next().unwrap().parse().unwrap();
            pids.push(pid);
        }
        if line.starts_with("engine ready") {
            break;
        }
    }
    assert_eq!(pids.len(), 5, "the three bundled strategies, the exchange adapter and garbage");
    for &pid in &pids {
        assert!(alive(pid), "plugin {pid} runs while the host runs");
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(engine.0.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = engine.0.wait();
    eventually_blocking("plugins die with their host", || pids.iter().all(|&p| !alive(p)));
}
