//! Installed plugins: `<state>/installed/<name>/<version>/` and a `current` symlink.
//!
//! Installing copies a validated plugin folder into a temporary folder beside
//! its final place and renames it there, so a crash leaves either nothing or
//! the whole version. `current` is switched by renaming a fresh symlink over
//! it, so it always names a complete version. Nothing outside
//! `installed/<name>` (and, with purge, the plugin's own state folder) is ever
//! removed.

use std::path::{Path, PathBuf};

/// The folder of installed plugins under a state folder.
pub fn root(state_dir: &Path) -> PathBuf {
    state_dir.join("installed")
}

/// Installed versions of `name`, sorted by semver, and the current one.
pub fn versions(root: &Path, name: &str) -> (Vec<semver::Version>, Option<semver::Version>) {
    let dir = root.join(name);
    let mut out: Vec<semver::Version> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("plugin.toml").is_file() && e.file_name() != "current")
        .filter_map(|e| semver::Version::parse(&e.file_name().to_string_lossy()).ok())
        .collect();
    out.sort();
    let current = std::fs::read_link(dir.join("current"))
        .ok()
        .and_then(|t| semver::Version::parse(&t.to_string_lossy()).ok());
    (out, current)
}

/// Copies a folder tree (files and folders; symlinks are refused, they could point anywhere).
pub fn copy_tree(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| format!("create {}: {e}", to.display()))?;
    let entries = std::fs::read_dir(from).map_err(|e| format!("read {}: {e}", from.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("read {}: {e}", from.display()))?;
        let kind = entry.file_type().map_err(|e| e.to_string())?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if kind.is_symlink() {
            return Err(format!(
                "{} is a symlink; plugin folders must hold real files",
                src.display()
            ));
        } else if kind.is_dir() {
            copy_tree(&src, &dst)?;
        } else if kind.is_file() {
            std::fs::copy(&src, &dst).map_err(|e| format!("copy {}: {e}", src.display()))?;
        } else {
            return Err(format!("{} is not a regular file or folder", src.display()));
        }
    }
    Ok(())
}

/// Copies `source` into `<root>/<name>/<version>` atomically (temp folder, then rename).
pub fn place(
    root: &Path,
    name: &str,
    version: &str,
    source: &Path,
    force: bool,
) -> Result<PathBuf, String> {
    let target = root.join(name).join(version);
    if target.exists() && !force {
        return Err(format!(
            "{name} {version} is already installed ({}); use --force to replace it",
            target.display()
        ));
    }
    let tmp = root.join(name).join(format!(".incoming-{}-{version}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    if let Err(e) = copy_tree(source, &tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if target.exists() {
        let old = root.join(name).join(format!(".replaced-{}-{version}", std::process::id()));
        std::fs::rename(&target, &old)
            .map_err(|e| format!("move aside {}: {e}", target.display()))?;
        let _ = std::fs::remove_dir_all(&old);
    }
    std::fs::rename(&tmp, &target).map_err(|e| format!("rename into {}: {e}", target.display()))?;
    Ok(target)
}

/// Points `<root>/<name>/current` at `version`, atomically.
pub fn set_current(root: &Path, name: &str, version: &str) -> Result<(), String> {
    let dir = root.join(name);
    let tmp = dir.join(".current.new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(version, &tmp)
        .map_err(|e| format!("symlink {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join("current"))
        .map_err(|e| format!("switch {}/current: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn place_switch_and_list() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("plugin.toml"), "x").unwrap();
        std::fs::create_dir(src.path().join("bin")).unwrap();
        std::fs::write(src.path().join("bin/tool"), "y").unwrap();
        let state = tempfile::tempdir().unwrap();
        let root = root(state.path());
        place(&root, "p", "1.0.0", src.path(), false).unwrap();
        place(&root, "p", "1.2.0", src.path(), false).unwrap();
        let e = place(&root, "p", "1.0.0", src.path(), false).unwrap_err();
        assert!(e.contains("already installed") && e.contains("--force"), "{e}");
        place(&root, "p", "1.0.0", src.path(), true).unwrap();
        assert!(root.join("p/1.0.0/bin/tool").is_file());
        set_current(&root, "p", "1.2.0").unwrap();
        let (all, current) = versions(&root, "p");
        assert_eq!(all.iter().map(|v| v.to_string()).collect::<Vec<_>>(), vec!["1.0.0", "1.2.0"]);
        assert_eq!(current.map(|v| v.to_string()).as_deref(), Some("1.2.0"));
        assert!(std::fs::read_dir(root.join("p")).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".incoming")));
    }

    #[test]
    fn symlinks_are_refused_and_leave_nothing() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("plugin.toml"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.path().join("sneaky")).unwrap();
        let state = tempfile::tempdir().unwrap();
        let root = root(state.path());
        let e = place(&root, "p", "1.0.0", src.path(), false).unwrap_err();
        assert!(e.contains("sneaky") && e.contains("symlink"), "{e}");
        assert!(!root.join("p/1.0.0").exists());
        assert_eq!(std::fs::read_dir(root.join("p")).unwrap().count(), 0);
    }
}
