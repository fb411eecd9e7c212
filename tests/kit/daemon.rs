//! A running plugd daemon in a temp folder, and plugctl against it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

pub use super::{alive, bin_dir, eventually_blocking as eventually};

/// `plugd` or `plugctl`, as cargo builds them in this test's profile. The first use in a
/// test process runs `cargo build -p plugd` (a no-op when up to date), so a test never
/// runs a stale daemon after an edit.
pub fn plugd_bin(name: &str) -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let dir = bin_dir();
    BUILT.call_once(|| {
        let mut cargo = Command::new(env!("CARGO"));
        // With the fault points crash tests stop at (inert unless PLUGD_FAULT is set).
        cargo.args(["build", "-q", "-p", "plugd", "--bins", "--features", "fault-injection"]);
        cargo.arg("--target-dir");
        cargo.arg(dir.parent().expect("cargo's target folder"));
        if dir.ends_with("release") {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("run cargo to build plugd and plugctl");
        assert!(status.success(), "building plugd and plugctl failed");
    });
    dir.join(name)
}

/// The bundled example plugin folders.
pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins")
}

/// The folder of example plugin `name` (its manifest, its source).
pub fn examples_dir_of(name: &str) -> PathBuf {
    examples().join(name)
}

/// Writes plugin folder `name` under `dir`: the example's manifest with an absolute entrypoint.
pub fn add_plugin(dir: &Path, example: &str, name: &str, extra: &str) {
    let text = std::fs::read_to_string(examples().join(example).join("plugin.toml")).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("entrypoint") {
            out.push_str(&format!("entrypoint = \"{}\"\n", bin_dir().join(example).display()));
        } else if line.starts_with("name =") {
            out.push_str(&format!("name = \"{name}\"\n"));
            // Top-level keys of `extra` (before its first table) must precede the tables.
            for l in extra.lines().take_while(|l| !l.starts_with('[')) {
                out.push_str(l);
                out.push('\n');
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    let tables: Vec<&str> = extra.lines().skip_while(|l| !l.starts_with('[')).collect();
    out.push_str(&tables.join("\n"));
    out.push('\n');
    std::fs::create_dir_all(dir.join(name)).unwrap();
    std::fs::write(dir.join(name).join("plugin.toml"), out).unwrap();
}

/// A plugd daemon with its own temp root, killed when the test ends.
pub struct Plugd {
    pub child: Child,
    pub socket: PathBuf,
    pub root: tempfile::TempDir,
}

impl Drop for Plugd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Plugd {
    pub fn plugins(&self) -> PathBuf {
        self.root.path().join("plugins")
    }

    pub fn start_with(root: tempfile::TempDir, env: &[(&str, String)]) -> Plugd {
        Plugd::start_exe(&plugd_bin("plugd"), root, env)
    }

    pub fn start_exe(exe: &Path, root: tempfile::TempDir, env: &[(&str, String)]) -> Plugd {
        Plugd::launch(exe, root, env, None)
    }

    /// Starts plugd as the ordinary user `uid`, from copies of plugd and of the example
    /// plugins `examples` in `<root>/bin` (the checkout may sit where that user cannot
    /// go); each example is added as a plugin with its own manifest. The whole folder
    /// belongs to `uid`.
    pub fn start_as_user(uid: u32, examples: &[&str]) -> Plugd {
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::copy(plugd_bin("plugd"), bin.join("plugd")).unwrap();
        for ex in examples {
            std::fs::copy(bin_dir().join(ex), bin.join(ex)).unwrap();
            let dir = root.path().join("plugins").join(ex);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(examples_dir_of(ex).join("plugin.toml"), dir.join("plugin.toml"))
                .unwrap();
        }
        std::fs::create_dir_all(root.path().join("plugins")).unwrap();
        let status = Command::new("chown")
            .arg("-R")
            .arg(format!("{uid}:{uid}"))
            .arg(root.path())
            .status()
            .unwrap();
        assert!(status.success(), "chown the test folder to {uid}");
        Plugd::launch(&bin.join("plugd"), root, &[], Some(uid))
    }

    fn launch(
        exe: &Path,
        root: tempfile::TempDir,
        env: &[(&str, String)],
        uid: Option<u32>,
    ) -> Plugd {
        let socket = root.path().join("run/plugd.sock");
        let config = root.path().join("plugd.toml");
        // A test may leave extra config (e.g. [defaults]) in `extra.toml` beside it.
        let extra = std::fs::read_to_string(root.path().join("extra.toml")).unwrap_or_default();
        std::fs::write(
            &config,
            format!("socket = \"run/plugd.sock\"\nplugin_dirs = [\"plugins\"]\nstate_dir = \"state\"\n{extra}"),
        )
        .unwrap();
        let log = std::fs::File::create(root.path().join("plugd.log")).unwrap();
        let mut cmd = Command::new(exe);
        cmd.arg("--config").arg(&config).stdout(Stdio::null()).stderr(log);
        if let Some(uid) = uid {
            use std::os::unix::process::CommandExt;
            for file in [&config, &root.path().join("plugd.log")] {
                std::os::unix::fs::chown(file, Some(uid), Some(uid)).unwrap();
            }
            cmd.uid(uid).gid(uid);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        // A binary copied a moment ago can be briefly "busy" while another test thread forks.
        let child = super::retry_busy(|| cmd.spawn()).unwrap();
        let p = Plugd { child, socket, root };
        eventually("plugd answers", || p.ctl(&["status"]).status.code() == Some(0));
        p
    }

    pub fn start(setup: impl FnOnce(&Path)) -> Plugd {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("plugins")).unwrap();
        setup(&root.path().join("plugins"));
        Plugd::start_with(root, &[])
    }

    pub fn restart(mut self) -> Plugd {
        self.signal(Signal::SIGTERM);
        assert!(self.child.wait().unwrap().success());
        // Same folder (config, plugins, state) for the next daemon.
        let root = std::mem::replace(&mut self.root, tempfile::tempdir().unwrap());
        Plugd::start_with(root, &[])
    }

    /// Starts a new plugd on the same folder after this one was killed.
    pub fn restart_after_kill(mut self) -> Plugd {
        let root = std::mem::replace(&mut self.root, tempfile::tempdir().unwrap());
        Plugd::start_with(root, &[])
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(plugd_bin("plugctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ctl(&a);
        assert!(out.status.success(), "plugctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn status(&self) -> Vec<Value> {
        self.json(&["status"]).as_array().unwrap().clone()
    }

    pub fn plugin(&self, name: &str) -> Value {
        self.status().into_iter().find(|p| p["name"] == name).unwrap_or(Value::Null)
    }

    pub fn pid(&self, name: &str) -> u64 {
        self.plugin(name)["pid"].as_u64().unwrap_or(0)
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    pub fn all_ready(&self, names: &[&str]) -> bool {
        let st = self.status();
        names.iter().all(|n| st.iter().any(|p| p["name"] == *n && p["state"] == "ready"))
    }
}
