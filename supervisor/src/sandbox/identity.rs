//! Who a plugin runs as: a uid/gid of its own, allocated from a range (like systemd's
//! DynamicUser), stable across restarts, never one that exists in `/etc/passwd` or
//! `/etc/group`, or the user named by `sandbox.user`.
//!
//! Allocations are recorded in `<state_root>/.uids/<plugin>` (a root-owned 0700 folder
//! the plugin never sees, so it cannot rewrite its own uid). A lock file serialises
//! supervisors that share a state root. The uid doubles as the gid.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::ops::RangeInclusive;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// systemd's DynamicUser range, the default for plugin uids.
pub const DEFAULT_RANGE: RangeInclusive<u32> = 61184..=65519;

fn records(state_root: &Path) -> PathBuf {
    state_root.join(".uids")
}

/// Ids listed in a passwd- or group-style file (third field).
fn ids_in(file: &str) -> BTreeSet<u32> {
    fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(':').nth(2)?.parse().ok())
        .collect()
}

/// The uid of plugin `name`: its recorded one, or a new one from `range` that no account
/// and no other plugin of this state root uses.
pub fn plugin_uid(state_root: &Path, name: &str, range: &RangeInclusive<u32>) -> io::Result<u32> {
    let dir = records(state_root);
    fs::create_dir_all(&dir)?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
    let lock =
        fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(".lock"))?;
    // SAFETY: flock on a descriptor we own; the lock is released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mine = dir.join(name);
    if let Some(uid) = fs::read_to_string(&mine).ok().and_then(|t| t.trim().parse::<u32>().ok()) {
        if range.contains(&uid) {
            return Ok(uid);
        }
    }
    let mut taken = ids_in("/etc/passwd");
    taken.extend(ids_in("/etc/group"));
    for entry in fs::read_dir(&dir)?.flatten() {
        if let Some(uid) = fs::read_to_string(entry.path()).ok().and_then(|t| t.trim().parse().ok())
        {
            taken.insert(uid);
        }
    }
    // Start at a point derived from the name, so two state roots (two test supervisors, say)
    // rarely hand the same uid to different plugins.
    let span = (range.end() - range.start()) as u64 + 1;
    let start = name.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)) % span;
    let uid = (0..span)
        .map(|i| range.start() + ((start + i) % span) as u32)
        .find(|u| !taken.contains(u))
        .ok_or_else(|| {
            io::Error::other(format!(
                "every uid in {}..={} is taken; widen the plugin uid range",
                range.start(),
                range.end()
            ))
        })?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = fs::File::create(&tmp)?;
    writeln!(f, "{uid}")?;
    f.sync_all()?;
    fs::rename(&tmp, &mine)?;
    Ok(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_stable_distinct_and_not_accounts() {
        let root = tempfile::tempdir().unwrap();
        let range = DEFAULT_RANGE;
        let a = plugin_uid(root.path(), "alpha", &range).unwrap();
        let b = plugin_uid(root.path(), "beta", &range).unwrap();
        assert_ne!(a, b);
        assert!(range.contains(&a) && range.contains(&b));
        assert_eq!(plugin_uid(root.path(), "alpha", &range).unwrap(), a, "stable across starts");
        let accounts = ids_in("/etc/passwd");
        assert!(!accounts.contains(&a) && !accounts.contains(&b));
    }

    #[test]
    fn a_full_range_is_an_error_that_says_what_to_do() {
        let root = tempfile::tempdir().unwrap();
        let range = 70000..=70000;
        plugin_uid(root.path(), "one", &range).unwrap();
        let err = plugin_uid(root.path(), "two", &range).unwrap_err().to_string();
        assert!(err.contains("widen"), "{err}");
    }
}
