//! Installed plugins: `<state>/installed/<name>/<version>/` and a `current` symlink.
//!
//! Installing copies a validated plugin folder into a temporary folder beside
//! its final place and renames it there, so a crash leaves either nothing or
//! the whole version. `current` is switched by renaming a fresh symlink over
//! it, so it always names a complete version. Nothing outside
//! `installed/<name>` (and, with purge, the plugin's own state folder) is ever
//! removed.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sandbox::{HostFacts, JobSpec, SandboxPlan};
use crate::spawn::{JobProcess, SpawnPlan, WaitStatus};

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
        .filter(|e| supervisor::foreign::has_manifest(&e.path()) && e.file_name() != "current")
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

/// Copies `source` into `<root>/<name>/<version>` atomically (temp folder, then rename);
/// `prepare` runs on the temp copy first (build, validate) and can veto the install.
pub fn place(
    root: &Path,
    name: &str,
    version: &str,
    source: &Path,
    force: bool,
    prepare: impl FnOnce(&Path) -> Result<(), String>,
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
    if let Err(e) = copy_tree(source, &tmp).and_then(|_| prepare(&tmp)) {
        let _ = std::fs::remove_dir_all(&tmp);
        // A plugin's first install that failed leaves no trace (only if empty: other
        // versions stay).
        let _ = std::fs::remove_dir(root.join(name));
        return Err(e);
    }
    crate::fault::point("install.copied");
    if target.exists() {
        let old = root.join(name).join(format!(".replaced-{}-{version}", std::process::id()));
        std::fs::rename(&target, &old)
            .map_err(|e| format!("move aside {}: {e}", target.display()))?;
        let _ = std::fs::remove_dir_all(&old);
    }
    std::fs::rename(&tmp, &target).map_err(|e| format!("rename into {}: {e}", target.display()))?;
    Ok(target)
}

/// Tells a running install to stop: every step checks it, and a running command is killed
/// at once — the waits wake on it (a pipe a blocking wait polls beside the step's pidfd, a
/// Notify for async waits), nothing polls a flag on a timer.
#[derive(Debug)]
pub struct Cancel {
    flag: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
    /// Read end (polled by blocking waits) and write end (a byte is written on cancel).
    pipe: Option<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)>,
}

impl Default for Cancel {
    fn default() -> Self {
        let pipe =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK).ok();
        Cancel { flag: Default::default(), notify: Default::default(), pipe }
    }
}

impl Cancel {
    /// Asks the install to stop.
    pub fn cancel(&self) {
        self.flag.store(true, std::sync::atomic::Ordering::SeqCst);
        self.notify.notify_waiters();
        if let Some((_, w)) = &self.pipe {
            let _ = nix::unistd::write(w, b"x");
        }
    }

    /// True once cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Resolves once cancelled.
    pub async fn cancelled(&self) {
        loop {
            let woken = self.notify.notified();
            if self.is_cancelled() {
                return;
            }
            woken.await;
        }
    }

    /// The descriptor that turns readable on cancel, for a blocking wait to poll.
    pub fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.pipe.as_ref().map(|(r, _)| r.as_fd())
    }
}

/// The error of a cancelled install.
pub const CANCELLED: &str = "cancelled";

/// How long one install step (a build, pip, uv) may take before it is killed.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(600);

/// Host variables an install step inherits; everything else is cleared.
const STEP_ENV: &[&str] = &["PATH", "LANG", "LC_ALL", "TZ"];

/// Runs the install steps of one plugin (its `[build]` command, venv creation, pip) in
/// the plugin's build jail: its own uid, no capabilities, own namespaces (network only
/// when the manifest says so), a minimal root where only the workspace is writable (see
/// [`SandboxPlan::for_job`]). Before the first step the workspace is handed to the
/// plugin's uid; [`Steps::seal`] hands it back to root once the steps are done.
pub struct Steps {
    sandbox: Arc<SandboxPlan>,
    workspace: PathBuf,
    network: bool,
    /// Where the network setting lives, for the hint on failure.
    network_key: String,
    /// Ownership to give the tree back (root, the plugin's group) when jailed.
    seal_ids: Option<u32>,
}

impl Steps {
    /// Plans the jail for steps of `job` and hands the workspace (recursively) to the
    /// plugin's uid. `network_key` names the manifest key that allows the network.
    pub fn new(job: &JobSpec<'_>, host: &HostFacts, network_key: &str) -> Result<Steps, String> {
        let sandbox = SandboxPlan::for_job(job, host)?;
        if let Some((uid, gid)) = sandbox.run_as {
            chown_tree(job.workspace, uid, gid)?;
        }
        Ok(Steps {
            seal_ids: sandbox.run_as.map(|(_, gid)| gid),
            sandbox: Arc::new(sandbox),
            workspace: job.workspace.to_path_buf(),
            network: job.network,
            network_key: format!(
                "`{network_key} = \"host\"` in {}",
                job.spec.manifest_path.display()
            ),
        })
    }

    /// One line for the job's output: the layers the steps run under.
    pub fn describe(&self) -> String {
        let r = &self.sandbox.report;
        let mut line = format!("(install steps run jailed: {})", r.in_force_text().join(" "));
        if !r.unavailable.is_empty() {
            line = format!("{line}; unavailable: {}", r.unavailable_text().join("; "));
        }
        line
    }

    /// Runs `program args` in `dir` inside the jail, its output going to `log`; kills it
    /// (and everything it started) after [`STEP_TIMEOUT`] or when `cancel` is set. Returns
    /// what it printed; on failure the error carries the last lines.
    pub fn run(
        &self,
        program: &Path,
        args: &[&OsStr],
        dir: &Path,
        what: &str,
        log: &mut Vec<String>,
        cancel: Option<&Cancel>,
    ) -> Result<String, String> {
        if cancel.is_some_and(Cancel::is_cancelled) {
            return Err(CANCELLED.into());
        }
        log.push(format!("$ {what}"));
        let mut env: Vec<(String, String)> = STEP_ENV
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect();
        for (k, v) in [
            ("HOME", "/tmp"),
            ("TMPDIR", "/tmp"),
            ("XDG_CACHE_HOME", "/tmp/.cache"),
            ("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
            ("PIP_NO_INPUT", "1"),
        ] {
            env.push((k.into(), v.into()));
        }
        let resolved = resolve_program(program, dir);
        let plan = SpawnPlan {
            program: resolved.clone(),
            args: args.iter().map(|a| a.to_string_lossy().into_owned()).collect(),
            dir: dir.to_path_buf(),
            env,
            sandbox: self.sandbox.clone(),
            transport: crate::manifest::Transport::Stream,
            listen: Vec::new(),
            shm: None,
        };
        let (mut child, stdout, stderr) = JobProcess::start(&plan).map_err(|e| {
            let hint = if self.sandbox.jail.is_some() {
                " (install steps run in the plugin's jail, which holds the system folders, the plugin folder and `sandbox.read_paths`: add the tool's folder to read_paths)"
            } else {
                ""
            };
            format!("cannot run {what}: {e}{hint}")
        })?;
        let readers: Vec<std::thread::JoinHandle<String>> = [stdout, stderr]
            .into_iter()
            .map(|fd| {
                let mut r = std::fs::File::from(fd);
                std::thread::spawn(move || {
                    let mut bytes = Vec::new();
                    let _ = r.read_to_end(&mut bytes);
                    String::from_utf8_lossy(&bytes).into_owned()
                })
            })
            .collect();
        let deadline = Instant::now() + STEP_TIMEOUT;
        // Ok(status), or Err(true) when cancelled, Err(false) when out of time.
        let status = loop {
            // Sleeps in poll() on the pidfd and the cancel pipe, until the deadline.
            let mut left = deadline.saturating_duration_since(Instant::now());
            let wake = cancel.and_then(Cancel::fd);
            if cancel.is_some() && wake.is_none() {
                // No pipe (out of descriptors when the job was made): look at the flag often.
                left = left.min(Duration::from_millis(50));
            }
            if let Some(status) = child.wait_or(wake, left) {
                break Ok(status);
            }
            if Instant::now() >= deadline || cancel.is_some_and(Cancel::is_cancelled) {
                child.kill();
                drop(child);
                break Err(cancel.is_some_and(Cancel::is_cancelled));
            }
        };
        let output: String = readers.into_iter().filter_map(|r| r.join().ok()).collect();
        log.extend(output.lines().filter(|l| !l.trim().is_empty()).map(str::to_string));
        match status {
            Ok(WaitStatus::Exited(0)) => Ok(output),
            Err(true) => Err(CANCELLED.into()),
            other => {
                let tail: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
                let tail = &tail[tail.len().saturating_sub(20)..];
                let how = match other {
                    Ok(WaitStatus::Exited(code)) => format!("exit status {code}"),
                    Ok(WaitStatus::Signaled { signal, .. }) => {
                        format!("killed by {}", crate::exit::signal_name(signal))
                    }
                    Err(_) => format!("killed after {} s", STEP_TIMEOUT.as_secs()),
                };
                let hint = if self.network {
                    String::new()
                } else {
                    format!(
                        "\n(this step ran without a network; if it must download, set {})",
                        self.network_key
                    )
                };
                Err(format!("{what} failed ({how}):\n{}{hint}", tail.join("\n")))
            }
        }
    }

    /// After the last step: gives the workspace back to root (group: the plugin's, with
    /// read access, so the plugin can read what was built and write none of it), clears
    /// setuid/setgid bits, removes fifos and sockets, and refuses device nodes and
    /// symlinks that lead out of the workspace (`allow_link` may accept some, e.g. a
    /// venv's `bin/python`). Nothing here follows a symlink.
    pub fn seal(&self, allow_link: impl Fn(&Path, &Path) -> bool) -> Result<(), String> {
        seal_tree(&self.workspace, &self.workspace, self.seal_ids, &allow_link)
    }
}

/// Finds a bare program name in `PATH` (the jail mirrors host paths); a relative path is
/// taken from `dir`.
fn resolve_program(program: &Path, dir: &Path) -> PathBuf {
    if program.is_absolute() {
        return program.to_path_buf();
    }
    if program.components().count() > 1 {
        return dir.join(program);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| crate::manifest::check_executable(p).is_ok())
        .unwrap_or_else(|| program.to_path_buf())
}

/// Hands a tree to `uid:gid` (without following symlinks).
fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<(), String> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .map_err(|e| format!("cannot hand {} to the plugin's user: {e}", path.display()))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.is_dir() {
        let entries =
            std::fs::read_dir(path).map_err(|e| format!("read {}: {e}", path.display()))?;
        for e in entries {
            let e = e.map_err(|e| format!("read {}: {e}", path.display()))?;
            chown_tree(&e.path(), uid, gid)?;
        }
    }
    Ok(())
}

fn seal_tree(
    root: &Path,
    path: &Path,
    gid: Option<u32>,
    allow_link: &dyn Fn(&Path, &Path) -> bool,
) -> Result<(), String> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let kind = meta.file_type();
    let rel = path.strip_prefix(root).unwrap_or(path);
    if kind.is_symlink() {
        let target = std::fs::read_link(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !link_stays_inside(rel, &target) && !allow_link(rel, &target) {
            return Err(format!(
                "the install step left {} pointing at {}, outside the plugin's folder; plugd refuses it (a plugin folder holds its own files)",
                path.display(),
                target.display()
            ));
        }
    } else if kind.is_fifo() || kind.is_socket() {
        std::fs::remove_file(path).map_err(|e| format!("remove {}: {e}", path.display()))?;
        return Ok(());
    } else if kind.is_block_device() || kind.is_char_device() {
        return Err(format!(
            "the install step left a device node at {}; plugd refuses it",
            path.display()
        ));
    } else {
        // Owner's bits for the group too (minus write); no setuid, setgid or sticky bit.
        let mode = meta.permissions().mode() & 0o777;
        let mode = match gid {
            // Owner as it was, group = owner without write, others without write.
            Some(_) => (mode & 0o700) | ((mode & 0o500) >> 3) | (mode & 0o005),
            None => mode,
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    }
    if let Some(gid) = gid {
        std::os::unix::fs::lchown(path, Some(0), Some(gid))
            .map_err(|e| format!("cannot give {} back to root: {e}", path.display()))?;
    }
    if kind.is_dir() {
        let entries =
            std::fs::read_dir(path).map_err(|e| format!("read {}: {e}", path.display()))?;
        for e in entries {
            let e = e.map_err(|e| format!("read {}: {e}", path.display()))?;
            seal_tree(root, &e.path(), gid, allow_link)?;
        }
    }
    Ok(())
}

/// Whether a symlink at `rel` (relative to the workspace) with `target` resolves inside
/// the workspace, by its words alone (a relative target that never climbs out).
fn link_stays_inside(rel: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth = rel.components().count() as i64 - 1;
    for part in target.components() {
        match part {
            std::path::Component::ParentDir => depth -= 1,
            std::path::Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

/// Writes `text` to `path` as a new file, replacing whatever is there without following
/// a symlink (the folder was written by an install step running as the plugin).
pub fn write_new(path: &Path, text: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => Ok(()),
    }
    .map_err(|e| format!("replace {}: {e}", path.display()))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .and_then(|mut f| f.write_all(text))
        .map_err(|e| format!("write {}: {e}", path.display()))
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

/// Finishes or discards what an interrupted install left behind (run at daemon start):
/// half-copied folders are removed, and a plugin whose versions exist but whose
/// `current` was never set gets its newest version (every version folder is complete,
/// since it only ever appears by rename).
pub fn recover(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            let _ = std::fs::remove_dir_all(&path);
            continue;
        }
        if let Ok(inner) = std::fs::read_dir(&path) {
            for e in inner.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(".incoming-") || n.starts_with(".replaced-") {
                    let _ = std::fs::remove_dir_all(e.path());
                } else if n == ".current.new" {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let (all, current) = versions(root, &name);
        if current.is_none() {
            if let Some(newest) = all.last() {
                let _ = set_current(root, &name, &newest.to_string());
            }
        }
    }
}

/// Limits on what an archive may unpack to.
pub const MAX_ENTRIES: usize = 10_000;
/// Largest total unpacked size of an archive.
pub const MAX_BYTES: u64 = 256 << 20;

/// Unpacks a `.tar.gz` into `into`, refusing anything that could write outside it or
/// be more than a plugin: absolute paths, `..`, symlinks and hard links, device files,
/// and archives over [`MAX_ENTRIES`] entries or [`MAX_BYTES`] bytes. Each refusal names
/// the entry.
pub fn unpack_tar_gz(archive: &Path, into: &Path) -> Result<(), String> {
    let file =
        std::fs::File::open(archive).map_err(|e| format!("open {}: {e}", archive.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let entries =
        tar.entries().map_err(|e| format!("{}: not a .tar.gz ({e})", archive.display()))?;
    std::fs::create_dir_all(into).map_err(|e| format!("create {}: {e}", into.display()))?;
    let (mut count, mut total) = (0usize, 0u64);
    for entry in entries {
        let mut entry =
            entry.map_err(|e| format!("{}: damaged archive ({e})", archive.display()))?;
        count += 1;
        if count > MAX_ENTRIES {
            return Err(format!("{}: more than {MAX_ENTRIES} entries", archive.display()));
        }
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let path = PathBuf::from(String::from_utf8_lossy(&raw).into_owned());
        use std::path::Component;
        if path.is_absolute()
            || path.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(format!(
                "{}: entry {shown:?} points outside the plugin folder (absolute or ..)",
                archive.display()
            ));
        }
        let kind = entry.header().entry_type();
        total += entry.header().size().unwrap_or(0);
        if total > MAX_BYTES {
            return Err(format!(
                "{}: unpacks to more than {} MiB (at {shown:?})",
                archive.display(),
                MAX_BYTES >> 20
            ));
        }
        let dst = into.join(&path);
        match kind {
            tar::EntryType::Directory => {
                std::fs::create_dir_all(&dst)
                    .map_err(|e| format!("create {}: {e}", dst.display()))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = dst.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| format!("create {}: {e}", parent.display()))?;
                }
                let mut out = std::fs::File::create(&dst)
                    .map_err(|e| format!("create {}: {e}", dst.display()))?;
                std::io::copy(&mut entry, &mut out)
                    .map_err(|e| format!("unpack {shown:?}: {e}"))?;
                let mode = entry.header().mode().unwrap_or(0o644) & 0o755;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| e.to_string())?;
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                return Err(format!(
                    "{}: entry {shown:?} is a link; plugin archives must hold real files",
                    archive.display()
                ));
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                return Err(format!("{}: entry {shown:?} is a device or fifo", archive.display()));
            }
            // pax and GNU extension headers are metadata the tar crate already applied.
            tar::EntryType::XHeader
            | tar::EntryType::XGlobalHeader
            | tar::EntryType::GNULongName => {}
            other => {
                return Err(format!(
                    "{}: entry {shown:?} has an unsupported type {other:?}",
                    archive.display()
                ))
            }
        }
    }
    Ok(())
}

/// Unpacks a `.zip` into `into` with the same refusals as [`unpack_tar_gz`].
pub fn unpack_zip(archive: &Path, into: &Path) -> Result<(), String> {
    let file =
        std::fs::File::open(archive).map_err(|e| format!("open {}: {e}", archive.display()))?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| format!("{}: not a .zip ({e})", archive.display()))?;
    if zip.len() > MAX_ENTRIES {
        return Err(format!("{}: more than {MAX_ENTRIES} entries", archive.display()));
    }
    std::fs::create_dir_all(into).map_err(|e| format!("create {}: {e}", into.display()))?;
    let mut total = 0u64;
    for i in 0..zip.len() {
        let mut entry =
            zip.by_index(i).map_err(|e| format!("{}: damaged archive ({e})", archive.display()))?;
        let shown = entry.name().to_string();
        let raw_hostile = shown.starts_with('/') || shown.split(['/', '\\']).any(|c| c == "..");
        let Some(path) = entry.enclosed_name().filter(|_| !raw_hostile) else {
            return Err(format!(
                "{}: entry {shown:?} points outside the plugin folder (absolute or ..)",
                archive.display()
            ));
        };
        if entry.is_symlink() {
            return Err(format!(
                "{}: entry {shown:?} is a link; plugin archives must hold real files",
                archive.display()
            ));
        }
        let kind = entry.unix_mode().map(|m| m & 0o170000);
        if matches!(kind, Some(k) if k != 0 && k != 0o100000 && k != 0o040000) {
            return Err(format!("{}: entry {shown:?} is a device or fifo", archive.display()));
        }
        total += entry.size();
        if total > MAX_BYTES {
            return Err(format!(
                "{}: unpacks to more than {} MiB (at {shown:?})",
                archive.display(),
                MAX_BYTES >> 20
            ));
        }
        let dst = into.join(path);
        if entry.is_dir() {
            std::fs::create_dir_all(&dst).map_err(|e| format!("create {}: {e}", dst.display()))?;
            continue;
        }
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("create {}: {e}", parent.display()))?;
        }
        let mut out =
            std::fs::File::create(&dst).map_err(|e| format!("create {}: {e}", dst.display()))?;
        // Never trust the declared size alone: stop copying at the cap.
        let copied = std::io::copy(&mut (&mut entry).take(MAX_BYTES + 1), &mut out)
            .map_err(|e| format!("unpack {shown:?}: {e}"))?;
        if copied > MAX_BYTES {
            return Err(format!("{}: entry {shown:?} is larger than declared", archive.display()));
        }
        let mode = entry.unix_mode().unwrap_or(0o644) & 0o755;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The plugin folder inside an unpacked archive or a clone: the top, or its single subfolder.
pub fn plugin_folder(top: &Path) -> Result<PathBuf, String> {
    use supervisor::foreign::has_manifest;
    if has_manifest(top) {
        return Ok(top.to_path_buf());
    }
    let subs: Vec<PathBuf> = std::fs::read_dir(top)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| has_manifest(p))
        .collect();
    match subs.as_slice() {
        [one] => Ok(one.clone()),
        [] => {
            Err("no plugin.toml, plugin.yaml or plugin.json at the top or in a single subfolder"
                .into())
        }
        _ => Err("several subfolders hold a manifest; install one folder at a time".into()),
    }
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
        let ok = |_: &Path| Ok(());
        place(&root, "p", "1.0.0", src.path(), false, ok).unwrap();
        place(&root, "p", "1.2.0", src.path(), false, ok).unwrap();
        let e = place(&root, "p", "1.0.0", src.path(), false, ok).unwrap_err();
        assert!(e.contains("already installed") && e.contains("--force"), "{e}");
        place(&root, "p", "1.0.0", src.path(), true, ok).unwrap();
        let e =
            place(&root, "p", "1.3.0", src.path(), false, |_| Err("vetoed".into())).unwrap_err();
        assert_eq!(e, "vetoed");
        assert!(!root.join("p/1.3.0").exists());
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

    /// Writes a .tar.gz whose single entry has a raw name and type, bypassing the tar
    /// crate's own path checks (a malicious archive would).
    fn evil_archive(dir: &Path, name: &[u8], kind: tar::EntryType, link: Option<&str>) -> PathBuf {
        let path = dir.join("evil.tar.gz");
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&path).unwrap(),
            flate2::Compression::fast(),
        );
        let mut b = tar::Builder::new(gz);
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(kind);
        h.set_mode(0o644);
        if let Some(l) = link {
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        let data = b"payload";
        h.set_size(if kind == tar::EntryType::Regular { data.len() as u64 } else { 0 });
        h.set_cksum();
        let body: &[u8] = if kind == tar::EntryType::Regular { data } else { &[] };
        b.append(&h, body).unwrap();
        b.into_inner().unwrap().finish().unwrap();
        path
    }

    #[test]
    fn malicious_archives_are_refused_naming_the_entry() {
        let cases: &[(&[u8], tar::EntryType, Option<&str>, &str)] = &[
            (b"../evil", tar::EntryType::Regular, None, "outside"),
            (b"/tmp/plugd-evil", tar::EntryType::Regular, None, "outside"),
            (b"plugin/../../evil", tar::EntryType::Regular, None, "outside"),
            (b"link", tar::EntryType::Symlink, Some("/etc/passwd"), "is a link"),
            (b"hard", tar::EntryType::Link, Some("/etc/passwd"), "is a link"),
            (b"dev", tar::EntryType::Char, None, "device"),
        ];
        for (name, kind, link, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            let archive = evil_archive(dir.path(), name, *kind, *link);
            let into = dir.path().join("out");
            let e = unpack_tar_gz(&archive, &into).unwrap_err();
            let shown = String::from_utf8_lossy(name);
            assert!(e.contains(want) && e.contains(&*shown), "{shown}: {e}");
            assert!(!dir.path().join("evil").exists() && !Path::new("/tmp/plugd-evil").exists());
        }
    }

    #[test]
    fn a_good_archive_unpacks_with_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("good.tar.gz");
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&path).unwrap(),
            flate2::Compression::fast(),
        );
        let mut b = tar::Builder::new(gz);
        for (name, mode) in [("p-1.0/plugin.toml", 0o644), ("p-1.0/bin/p", 0o755)] {
            let mut h = tar::Header::new_gnu();
            h.set_size(3);
            h.set_mode(mode);
            h.set_cksum();
            b.append_data(&mut h, name, &b"abc"[..]).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap();
        let into = dir.path().join("out");
        unpack_tar_gz(&path, &into).unwrap();
        let folder = plugin_folder(&into).unwrap();
        assert_eq!(folder, into.join("p-1.0"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(folder.join("bin/p")).unwrap().permissions().mode() & 0o777,
            0o755
        );
    }

    #[test]
    fn zip_archives_get_the_same_refusals() {
        use std::io::Write;
        let write = |dir: &Path, f: &dyn Fn(&mut zip::ZipWriter<std::fs::File>)| {
            let path = dir.join("a.zip");
            let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
            f(&mut z);
            z.finish().unwrap();
            path
        };
        let opts = || zip::write::SimpleFileOptions::default().unix_permissions(0o755);
        let dir = tempfile::tempdir().unwrap();
        let good = write(dir.path(), &|z| {
            z.start_file("p/plugin.toml", opts()).unwrap();
            z.write_all(b"x").unwrap();
            z.start_file("p/bin/p", opts()).unwrap();
            z.write_all(b"y").unwrap();
        });
        unpack_zip(&good, &dir.path().join("out")).unwrap();
        assert_eq!(plugin_folder(&dir.path().join("out")).unwrap(), dir.path().join("out/p"));
        for (name, link) in [("../evil", false), ("/tmp/plugd-evil-zip", false), ("sneaky", true)] {
            let dir = tempfile::tempdir().unwrap();
            let bad = write(dir.path(), &|z| {
                if link {
                    z.add_symlink(name, "/etc/passwd", opts()).unwrap();
                } else {
                    z.start_file(name, opts()).unwrap();
                    z.write_all(b"x").unwrap();
                }
            });
            // The writer may store a sanitized name; what matters is the name in the file.
            let stored = zip::ZipArchive::new(std::fs::File::open(&bad).unwrap())
                .unwrap()
                .by_index(0)
                .unwrap()
                .name()
                .to_string();
            let hostile = link || stored.starts_with('/') || stored.split('/').any(|c| c == "..");
            let result = unpack_zip(&bad, &dir.path().join("out"));
            if hostile {
                let e = result.unwrap_err();
                assert!(
                    e.contains(&stored) && (e.contains("outside") || e.contains("link")),
                    "{stored}: {e}"
                );
            }
            assert!(
                !dir.path().join("evil").exists() && !Path::new("/tmp/plugd-evil-zip").exists()
            );
        }
    }

    #[test]
    fn symlinks_are_refused_and_leave_nothing() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("plugin.toml"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.path().join("sneaky")).unwrap();
        let state = tempfile::tempdir().unwrap();
        let root = root(state.path());
        let e = place(&root, "p", "1.0.0", src.path(), false, |_| Ok(())).unwrap_err();
        assert!(e.contains("sneaky") && e.contains("symlink"), "{e}");
        assert!(!root.join("p").exists(), "a failed first install leaves no folder");
    }
}
