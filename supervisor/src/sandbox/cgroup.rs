//! cgroup v2 limits, only beneath the cgroup the supervisor was started in.
//!
//! plugd never creates cgroups at the root of a hierarchy and never uses
//! cgroup v1: moving plugins out of the cgroup it was started in would let
//! them escape the limits its operator placed on it. The delegation model is
//! systemd's `Delegate=yes`: plugd moves itself into a `supervisor` leaf
//! (the "no internal processes" rule), enables controllers in its
//! `cgroup.subtree_control`, and gives each plugin `plugin-<name>` with
//! `memory.max` + `memory.oom.group`, `cpu.max` and `pids.max`.
//!
//! Every decision reads and writes through a root path so the tests can run
//! it against a fake cgroupfs in a temporary folder.

use std::fs;
use std::path::{Path, PathBuf};

use crate::manifest::Limits;

/// Controllers plugd uses.
pub const WANTED: &[&str] = &["memory", "cpu", "pids"];

/// Where our cgroup is and what it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delegation {
    /// The supervisor's cgroup directory (mount point + own path).
    pub dir: PathBuf,
    /// Controllers available there, among [`WANTED`].
    pub controllers: Vec<String>,
}

/// Finds the supervisor's own cgroup v2 directory from `/proc/self/cgroup` and
/// `/proc/self/mountinfo` texts, under `root` (normally "/").
pub fn own_cgroup(root: &Path, proc_cgroup: &str, mountinfo: &str) -> Result<PathBuf, String> {
    let own = proc_cgroup.lines().find_map(|l| l.strip_prefix("0::")).ok_or(
        "this process has no cgroup v2 membership (only v1 hierarchies; plugd never uses v1)",
    )?;
    let mount = mountinfo
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| pre.split_whitespace().nth(4).map(str::to_string))?
        })
        .ok_or("no cgroup2 filesystem is mounted")?;
    let rel = Path::new(own.trim()).strip_prefix("/").unwrap_or(Path::new(""));
    let mount_rel = Path::new(&mount).strip_prefix("/").unwrap_or(Path::new(""));
    Ok(root.join(mount_rel).join(rel))
}

/// Decides whether per-plugin cgroups can be used under `dir`, and with which controllers.
pub fn probe(dir: &Path) -> Result<Delegation, String> {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).map_err(|e| {
        format!(
            "cannot read {}/cgroup.controllers ({e}); is this a cgroup v2 directory?",
            dir.display()
        )
    })?;
    let controllers: Vec<String> =
        available.split_whitespace().filter(|c| WANTED.contains(c)).map(str::to_string).collect();
    if controllers.is_empty() {
        return Err(format!(
            "cgroup v2 at {} offers none of {WANTED:?} (here they live in v1 hierarchies); run plugd under systemd with Delegate=yes to turn this layer on",
            dir.display()
        ));
    }
    let probe_dir = dir.join("cgroup.subtree_control");
    let writable = fs::OpenOptions::new().append(true).open(&probe_dir).is_ok();
    if !writable {
        return Err(format!(
            "{} is not writable: the cgroup is not delegated to plugd (systemd: Delegate=yes)",
            probe_dir.display()
        ));
    }
    Ok(Delegation { dir: dir.to_path_buf(), controllers })
}

/// Moves the supervisor into `<dir>/supervisor` and enables the controllers for children.
pub fn prepare(d: &Delegation, own_pid: u32) -> Result<(), String> {
    let leaf = d.dir.join("supervisor");
    fs::create_dir_all(&leaf).map_err(|e| format!("create {}: {e}", leaf.display()))?;
    fs::write(leaf.join("cgroup.procs"), own_pid.to_string())
        .map_err(|e| format!("move plugd into {}: {e}", leaf.display()))?;
    let enable: Vec<String> = d.controllers.iter().map(|c| format!("+{c}")).collect();
    fs::write(d.dir.join("cgroup.subtree_control"), enable.join(" "))
        .map_err(|e| format!("enable {} in {}: {e}", enable.join(" "), d.dir.display()))
}

/// Creates `<dir>/plugin-<name>` with the plugin's limits; returns its `cgroup.procs` path.
pub fn plugin_cgroup(
    d: &Delegation,
    name: &str,
    limits: &Limits,
) -> Result<(PathBuf, Vec<String>), String> {
    let dir = d.dir.join(format!("plugin-{name}"));
    fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let has = |c: &str| d.controllers.iter().any(|x| x == c);
    let mut applied = Vec::new();
    let write = |file: &str, value: String| -> Result<(), String> {
        fs::write(dir.join(file), &value)
            .map_err(|e| format!("write {value:?} to {}/{file}: {e}", dir.display()))
    };
    if let (true, Some(m)) = (has("memory"), limits.memory) {
        write("memory.max", m.to_string())?;
        write("memory.oom.group", "1".into())?;
        applied.push("memory".to_string());
    }
    if let (true, Some(pct)) = (has("cpu"), limits.cpu_quota) {
        let period = 100_000u64;
        write("cpu.max", format!("{} {period}", period * pct as u64 / 100))?;
        applied.push("cpu".to_string());
    }
    if let (true, Some(n)) = (has("pids"), limits.processes) {
        write("pids.max", n.to_string())?;
        applied.push("pids".to_string());
    }
    Ok((dir.join("cgroup.procs"), applied))
}

/// The cgroup layer for this machine: `Ok` with the delegation, or why it is unavailable.
pub fn detect() -> Result<Delegation, String> {
    let cg = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("read /proc/self/cgroup: {e}"))?;
    let mi = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("read /proc/self/mountinfo: {e}"))?;
    let dir = own_cgroup(Path::new("/"), &cg, &mi)?;
    probe(&dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MOUNTINFO: &str = "30 24 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n";

    fn fake(controllers: &str) -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let own = root.path().join("sys/fs/cgroup/system.slice/plugd.service");
        fs::create_dir_all(&own).unwrap();
        fs::write(own.join("cgroup.controllers"), controllers).unwrap();
        fs::write(own.join("cgroup.subtree_control"), "").unwrap();
        (root, own)
    }

    #[test]
    fn finds_own_cgroup_below_the_v2_mount() {
        let root = Path::new("/fake");
        let dir = own_cgroup(root, "0::/system.slice/plugd.service\n", MOUNTINFO).unwrap();
        assert_eq!(dir, Path::new("/fake/sys/fs/cgroup/system.slice/plugd.service"));
        let err = own_cgroup(root, "4:memory:/x\n", MOUNTINFO).unwrap_err();
        assert!(err.contains("v1"), "{err}");
        let err =
            own_cgroup(root, "0::/\n", "1 0 0:1 / /sys/fs/cgroup/memory rw - cgroup cgroup rw\n")
                .unwrap_err();
        assert!(err.contains("no cgroup2"), "{err}");
    }

    #[test]
    fn no_controllers_means_unavailable_with_the_reason() {
        let (_root, own) = fake("");
        let err = probe(&own).unwrap_err();
        assert!(err.contains("offers none") && err.contains("Delegate=yes"), "{err}");
    }

    #[test]
    fn delegated_cgroup_gets_a_leaf_and_per_plugin_limits() {
        let (_root, own) = fake("cpuset cpu io memory pids");
        let d = probe(&own).unwrap();
        assert_eq!(d.controllers, vec!["cpu", "memory", "pids"]);
        prepare(&d, 4242).unwrap();
        assert_eq!(fs::read_to_string(own.join("supervisor/cgroup.procs")).unwrap(), "4242");
        assert_eq!(
            fs::read_to_string(own.join("cgroup.subtree_control")).unwrap(),
            "+cpu +memory +pids"
        );
        let limits = Limits {
            memory: Some(256 << 20),
            cpu_quota: Some(50),
            processes: Some(32),
            cpu_time: Some(Duration::from_secs(5)),
            ..Default::default()
        };
        let (procs, applied) = plugin_cgroup(&d, "strat", &limits).unwrap();
        let pdir = own.join("plugin-strat");
        assert_eq!(procs, pdir.join("cgroup.procs"));
        assert_eq!(
            fs::read_to_string(pdir.join("memory.max")).unwrap(),
            (256u64 << 20).to_string()
        );
        assert_eq!(fs::read_to_string(pdir.join("memory.oom.group")).unwrap(), "1");
        assert_eq!(fs::read_to_string(pdir.join("cpu.max")).unwrap(), "50000 100000");
        assert_eq!(fs::read_to_string(pdir.join("pids.max")).unwrap(), "32");
        assert_eq!(applied, vec!["memory", "cpu", "pids"]);
        // Nothing is ever written outside our own cgroup.
        assert!(!own.parent().unwrap().join("plugin-strat").exists());
    }

    #[test]
    fn only_available_controllers_are_used() {
        let (_root, own) = fake("pids");
        let d = probe(&own).unwrap();
        let limits = Limits { memory: Some(1 << 20), processes: Some(4), ..Default::default() };
        let (_, applied) = plugin_cgroup(&d, "p", &limits).unwrap();
        assert_eq!(applied, vec!["pids"]);
        assert!(!own.join("plugin-p/memory.max").exists());
    }
}
