//! What an operator waits for: `plugctl call` and `plugctl status` against a plugd running
//! many plugins, next to the cost of starting any process at all (`/bin/true`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::{bin_dir, stats, with_ratio, Stats};

/// The three figures, each as the time of one command from start to exit.
#[derive(Debug, Serialize)]
pub struct PlugctlCost {
    /// Plugins loaded in the daemon.
    pub plugins: usize,
    /// `/bin/true`: the floor of starting a process and waiting for it.
    pub spawn_floor: Stats,
    /// `plugctl call echo-0 echo '"x"'`.
    pub call: Stats,
    /// `plugctl status` (the table of every plugin).
    pub status: Stats,
}

struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

fn time_command(name: &str, rounds: usize, mut make: impl FnMut() -> Command) -> Result<Stats> {
    let mut ns = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let mut cmd = make();
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let t0 = Instant::now();
        let out = cmd.output().with_context(|| format!("running {name}"))?;
        ns.push(t0.elapsed().as_nanos() as u64);
        if !out.status.success() {
            bail!("{name} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(stats(name, 0, ns))
}

/// Starts plugd with `n` echo plugins and times `rounds` of each command.
pub fn measure(n: usize, rounds: usize) -> Result<PlugctlCost> {
    let bins = bin_dir()?;
    let root = tempfile::tempdir()?;
    let echo = bins.join("echo");
    for i in 0..n {
        let dir = root.path().join("plugins").join(format!("echo-{i}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("plugin.toml"),
            format!(
                "name = \"echo-{i}\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"{}\"\n",
                echo.display()
            ),
        )?;
    }
    std::fs::write(
        root.path().join("plugd.toml"),
        "socket = \"run/plugd.sock\"\nplugin_dirs = [\"plugins\"]\nstate_dir = \"state\"\n",
    )?;
    let socket = root.path().join("run/plugd.sock");
    let _daemon = Daemon(
        Command::new(bins.join("plugd"))
            .arg("--config")
            .arg(root.path().join("plugd.toml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting plugd")?,
    );
    wait_ready(&bins.join("plugctl"), &socket, n)?;
    let plugctl = bins.join("plugctl");
    let spawn_floor = time_command("/bin/true", rounds, || Command::new("/bin/true"))?;
    let call = time_command("plugctl call", rounds, || {
        let mut c = Command::new(&plugctl);
        c.arg("--socket").arg(&socket).args(["call", "echo-0", "echo", "\"x\""]);
        c
    })?;
    let status = time_command("plugctl status", rounds, || {
        let mut c = Command::new(&plugctl);
        c.arg("--socket").arg(&socket).arg("status");
        c
    })?;
    Ok(PlugctlCost {
        plugins: n,
        call: with_ratio(call, &spawn_floor),
        status: with_ratio(status, &spawn_floor),
        spawn_floor,
    })
}

fn wait_ready(plugctl: &Path, socket: &Path, n: usize) -> Result<()> {
    let give_up = Instant::now() + Duration::from_secs(120);
    loop {
        let out = Command::new(plugctl)
            .arg("--socket")
            .arg(socket)
            .args(["--json", "status"])
            .stderr(Stdio::null())
            .output()?;
        let ready = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().map(|a| a.iter().filter(|p| p["state"] == "ready").count()))
            .unwrap_or(0);
        if ready == n {
            return Ok(());
        }
        if Instant::now() > give_up {
            bail!("plugd did not get {n} plugins ready within 120 s ({ready} ready)");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
