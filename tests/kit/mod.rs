//! The test kit of the end-to-end tests: real binaries, real processes. The host-library
//! helpers are here; [`daemon`] runs a real plugd and plugctl against it.
#![allow(dead_code, unused_imports)] // each test file uses a different part

pub mod browser;
pub mod daemon;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use supervisor::{PluginSpec, Supervisor, SupervisorConfig};

/// Where cargo put the example binaries.
pub fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_echo")).parent().unwrap().to_path_buf()
}

/// A supervisor that finds the example binaries.
pub fn supervisor() -> Supervisor {
    Supervisor::new(SupervisorConfig { bin_dirs: vec![bin_dir()], ..Default::default() }).unwrap()
}

/// The bundled example plugin folder `name`.
pub fn example(name: &str) -> PluginSpec {
    PluginSpec::from_manifest(example_dir(name)).unwrap()
}

/// The folder of the bundled example plugin `name`.
#[allow(dead_code)]
pub fn example_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins").join(name)
}

/// A plugin folder in a temp dir with this manifest (entrypoint is set to the example binary `bin`).
pub fn plugin(dir: &tempfile::TempDir, name: &str, bin: &str, rest: &str) -> PluginSpec {
    let folder = dir.path().join(name);
    std::fs::create_dir_all(&folder).unwrap();
    let exe = bin_dir().join(bin);
    let text = format!(
        "name = \"{name}\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"{}\"\n{rest}",
        exe.display()
    );
    std::fs::write(folder.join("plugin.toml"), text).unwrap();
    PluginSpec::from_manifest(&folder).unwrap()
}

/// True if `pid` exists and is not a zombie.
pub fn alive(pid: impl std::fmt::Display) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state is the first field after the parenthesised command name.
            let state = stat.rsplit(')').next().and_then(|s| s.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

/// Polls `cond` until it holds or a generous deadline passes (only to avoid hanging).
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < give_up, "gave up waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Blocking flavour of [`eventually`] for tests without a runtime.
pub fn eventually_blocking(what: &str, mut cond: impl FnMut() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < give_up, "gave up waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills a spawned host process (and waits for it) when the test ends, pass or fail.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Host pids of the live processes in the pid namespace of `pid` (a plugin's jail).
pub fn jail_members(pid: u32) -> Vec<u32> {
    let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/pid")) else { return Vec::new() };
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok().as_ref() == Some(&ns))
        .filter(|p| alive(p))
        .collect()
}

/// Runs `start` (a spawn or `output` of a binary copied a moment ago) again while it fails
/// with ETXTBSY: the copy's write descriptor lives on, for an instant, in a child another
/// test thread is forking (the descriptor is close-on-exec, but not closed before exec).
#[allow(dead_code)]
pub fn retry_busy<T>(mut start: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    let mut result = start();
    for _ in 0..50 {
        match &result {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(Duration::from_millis(20));
                result = start();
            }
            _ => break,
        }
    }
    result
}

/// A folder of wheels for `packages` (pip requirement specifiers), downloaded from PyPI
/// once into the target folder and reused after; plugins install from it with
/// `--no-index --find-links`, so a test's pip never reaches the network itself.
pub fn wheelhouse(name: &str, packages: &[&str]) -> PathBuf {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("wheelhouse-{name}"));
    let marker = dir.join(".complete");
    let want = packages.join("\n");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(want.as_str()) {
        return dir;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // One package at a time: a wheelhouse may hold conflicting pins (two plugins' worth).
    for package in packages {
        let out = std::process::Command::new("python3")
            .args(["-m", "pip", "download", "-q", "--disable-pip-version-check"])
            .args(["--only-binary=:all:", "-d"])
            .arg(&dir)
            .arg(package)
            .output()
            .expect("python3 -m pip");
        assert!(
            out.status.success(),
            "downloading {package} from PyPI into {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::write(&marker, want).unwrap();
    dir
}
