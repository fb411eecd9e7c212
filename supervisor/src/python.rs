//! Python plugins: one virtualenv per plugin version, built by plugd outside the sandbox.
//!
//! A plugin with `runtime = "python"` runs `<venv>/bin/python <script>`, where the venv is
//! `<state_root>/.venv/<name>/<version>` (beside the plugins' own state folders, but not
//! inside one: the plugin may read its venv, never write it). plugd makes the venv with
//! `uv` when it is on `PATH`, else with `python3 -m venv` and pip, copies the pure-Python
//! SDK (`plugin-runner/python/plugd_plugin`, embedded in this binary) into it, and installs
//! the plugin's `requirements.txt`. A stamp file records what the venv was made from
//! (interpreter, installer, pip arguments, the requirements text); while it matches, the
//! venv is reused and a start costs one file read; `build.log` in it keeps what pip
//! printed. A new venv is built in a temporary
//! folder and renamed into place, so a failed or interrupted build leaves nothing behind.
//!
//! Plugins never share a venv, so two plugins cannot conflict over a dependency; within
//! one plugin, pip's resolver decides, and its refusal is reported word for word.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::install::{run_step, Cancel};
use crate::manifest::PluginSpec;

/// The SDK files plugd puts into every Python plugin's venv, as (relative path, text).
pub const SDK_FILES: &[(&str, &str)] = &[
    (
        "plugd_plugin/__init__.py",
        include_str!("../../plugin-runner/python/plugd_plugin/__init__.py"),
    ),
    ("plugd_plugin/wire.py", include_str!("../../plugin-runner/python/plugd_plugin/wire.py")),
    ("plugd_plugin/schema.py", include_str!("../../plugin-runner/python/plugd_plugin/schema.py")),
    (
        "plugd_plugin/lockdown.py",
        include_str!("../../plugin-runner/python/plugd_plugin/lockdown.py"),
    ),
];

/// Name of the file in a venv that records what it was built from.
const STAMP: &str = ".plugd-venv";

/// The venv's build output (what was run and what it printed).
pub const BUILD_LOG: &str = "build.log";

/// All venvs of one plugin.
pub fn venvs_of(state_root: &Path, name: &str) -> PathBuf {
    state_root.join(".venv").join(name)
}

/// The venv of one plugin version.
pub fn venv_dir(state_root: &Path, name: &str, version: &semver::Version) -> PathBuf {
    venvs_of(state_root, name).join(version.to_string())
}

/// A venv ready to run a plugin.
#[derive(Debug, Clone)]
pub struct PythonEnv {
    /// `<venv>/bin/python`.
    pub python: PathBuf,
    /// What the sandboxed plugin must be able to read: the venv and the base interpreter's prefix.
    pub read_paths: Vec<PathBuf>,
}

/// What [`prepare`] did.
#[derive(Debug)]
pub struct Prepared {
    /// The environment.
    pub env: PythonEnv,
    /// True if an existing venv was reused as it was.
    pub reused: bool,
    /// What was run and printed, for the plugin's log.
    pub log: Vec<String>,
}

/// Which tool builds venvs here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Installer {
    Uv,
    Pip,
}

impl Installer {
    fn detect() -> Installer {
        if std::env::var_os("PLUGD_NO_UV").is_none() && find_in_path("uv").is_some() {
            Installer::Uv
        } else {
            Installer::Pip
        }
    }

    fn name(self) -> &'static str {
        match self {
            Installer::Uv => "uv",
            Installer::Pip => "python -m venv + pip",
        }
    }
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

fn requirements_text(spec: &PluginSpec) -> Result<Option<String>, String> {
    let file = spec.dir.join(&spec.manifest.python.requirements);
    match std::fs::read_to_string(&file) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("plugin {}: cannot read {}: {e}", spec.name(), file.display())),
    }
}

fn stamp_for(
    spec: &PluginSpec,
    interpreter: &Path,
    installer: Installer,
    requirements: &Option<String>,
) -> String {
    format!(
        "plugd venv 1\ninterpreter {}\ninstaller {}\npip_args {:?}\nrequirements:\n{}",
        interpreter.display(),
        installer.name(),
        spec.manifest.python.pip_args,
        requirements.as_deref().unwrap_or("")
    )
}

/// The venv of `spec` if it exists and matches the plugin's current recipe.
pub fn current(spec: &PluginSpec, state_root: &Path) -> Result<PythonEnv, String> {
    let dir = venv_dir(state_root, spec.name(), &spec.manifest.version);
    let interpreter = find_in_path(&spec.manifest.python.interpreter).ok_or_else(|| {
        format!(
            "plugin {}: the Python interpreter {:?} was not found in PATH; install python3 or set `python.interpreter` in {}",
            spec.name(),
            spec.manifest.python.interpreter,
            spec.manifest_path.display()
        )
    })?;
    let want = stamp_for(spec, &interpreter, Installer::detect(), &requirements_text(spec)?);
    let have = std::fs::read_to_string(dir.join(STAMP)).unwrap_or_default();
    if have != want || !dir.join("bin/python").exists() {
        return Err(format!(
            "plugin {}: its virtualenv {} is missing or out of date",
            spec.name(),
            dir.display()
        ));
    }
    env_of(&dir)
}

fn env_of(dir: &Path) -> Result<PythonEnv, String> {
    let mut read_paths = vec![dir.to_path_buf()];
    // The venv's python is a symlink to the base interpreter, whose standard library lives
    // under its prefix (`home` in pyvenv.cfg is `<prefix>/bin`).
    let cfg = std::fs::read_to_string(dir.join("pyvenv.cfg"))
        .map_err(|e| format!("cannot read {}/pyvenv.cfg: {e}", dir.display()))?;
    for line in cfg.lines() {
        if let Some((key, value)) = line.split_once('=') {
            if key.trim() == "home" {
                let home = PathBuf::from(value.trim());
                let home = std::fs::canonicalize(&home).unwrap_or(home);
                read_paths.push(home.parent().map(Path::to_path_buf).unwrap_or(home));
            }
        }
    }
    if let Ok(real) = std::fs::canonicalize(dir.join("bin/python")) {
        if let Some(prefix) = real.parent().and_then(Path::parent) {
            read_paths.push(prefix.to_path_buf());
        }
    }
    read_paths.sort();
    read_paths.dedup();
    Ok(PythonEnv { python: dir.join("bin/python"), read_paths })
}

/// Makes sure the venv of `spec` exists and matches its recipe; builds it if not.
/// Blocking (pip may take minutes): call it from a blocking thread.
pub fn prepare(
    spec: &PluginSpec,
    state_root: &Path,
    cancel: Option<&Cancel>,
) -> Result<Prepared, String> {
    let name = spec.name();
    let dir = venv_dir(state_root, name, &spec.manifest.version);
    if let Ok(env) = current(spec, state_root) {
        sync_sdk(&dir)?;
        return Ok(Prepared { env, reused: true, log: Vec::new() });
    }
    let interpreter = find_in_path(&spec.manifest.python.interpreter).ok_or_else(|| {
        format!(
            "plugin {name}: the Python interpreter {:?} was not found in PATH; install python3 or set `python.interpreter` in {}",
            spec.manifest.python.interpreter,
            spec.manifest_path.display()
        )
    })?;
    let installer = Installer::detect();
    let requirements = requirements_text(spec)?;
    let stamp = stamp_for(spec, &interpreter, installer, &requirements);
    let parent = dir.parent().unwrap_or(state_root);
    std::fs::create_dir_all(parent).map_err(|e| format!("create {}: {e}", parent.display()))?;
    let tmp = parent.join(format!(".building-{}-{}", spec.manifest.version, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let mut log = vec![format!(
        "building the virtualenv {} with {} ({})",
        dir.display(),
        installer.name(),
        interpreter.display()
    )];
    let built = build(spec, &interpreter, installer, &requirements, &tmp, &mut log, cancel)
        .and_then(|_| {
            // Kept for `cat`: an install-time build happens before the plugin has a log.
            let mut text = log.join("\n");
            text.push('\n');
            std::fs::write(tmp.join(BUILD_LOG), text)
                .and_then(|_| std::fs::write(tmp.join(STAMP), &stamp))
                .map_err(|e| format!("write {}: {e}", tmp.display()))
        })
        .and_then(|_| {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&tmp, &dir).or_else(|e| {
                // Another plugd (or host) sharing this state folder may have just built it.
                let _ = std::fs::remove_dir_all(&tmp);
                current(spec, state_root)
                    .map(|_| ())
                    .map_err(|_| format!("rename {} to {}: {e}", tmp.display(), dir.display()))
            })
        });
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(&tmp);
        let _ = std::fs::remove_dir(parent); // only if empty: other versions stay
        return Err(format!("plugin {name}: cannot build its virtualenv: {e}"));
    }
    log.push("virtualenv ready".into());
    Ok(Prepared { env: env_of(&dir)?, reused: false, log })
}

fn build(
    spec: &PluginSpec,
    interpreter: &Path,
    installer: Installer,
    requirements: &Option<String>,
    tmp: &Path,
    log: &mut Vec<String>,
    cancel: Option<&Cancel>,
) -> Result<(), String> {
    let python = tmp.join("bin/python");
    let wants_packages = requirements.as_deref().is_some_and(has_requirements);
    let req_file = spec.dir.join(&spec.manifest.python.requirements);
    let pip_args = &spec.manifest.python.pip_args;
    match installer {
        Installer::Uv => {
            let mut venv = Command::new("uv");
            venv.args(["venv", "--quiet", "--python"]).arg(interpreter).arg(tmp);
            run_step(&mut venv, "uv venv", log, cancel)?;
            if wants_packages {
                let mut pip = Command::new("uv");
                pip.args(["pip", "install", "--python"])
                    .arg(&python)
                    .arg("-r")
                    .arg(&req_file)
                    .args(pip_args)
                    .current_dir(&spec.dir);
                run_step(&mut pip, "uv pip install", log, cancel)?;
            }
        }
        Installer::Pip => {
            let mut venv = Command::new(interpreter);
            venv.args(["-m", "venv", "--without-pip"]).arg(tmp);
            run_step(&mut venv, "python -m venv", log, cancel)?;
            if wants_packages {
                // The host's pip installs into the venv (`--python`, pip >= 22.3): much faster
                // than bootstrapping pip into every venv. Without it, bootstrap.
                let mut pip = if host_pip_can_target(interpreter) {
                    let mut c = Command::new(interpreter);
                    c.args(["-m", "pip", "--python"]).arg(&python);
                    c
                } else {
                    let mut ensure = Command::new(&python);
                    ensure.args(["-m", "ensurepip", "--default-pip"]);
                    run_step(&mut ensure, "python -m ensurepip", log, cancel)?;
                    let mut c = Command::new(&python);
                    c.args(["-m", "pip"]);
                    c
                };
                pip.args([
                    "install",
                    "--disable-pip-version-check",
                    "--no-input",
                    "--progress-bar",
                    "off",
                    "-r",
                ])
                .arg(&req_file)
                .args(pip_args)
                .current_dir(&spec.dir);
                run_step(&mut pip, "pip install", log, cancel)?;
            }
        }
    }
    let site = site_packages(tmp)?;
    for (rel, text) in SDK_FILES {
        let path = site.join(rel);
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).map_err(|e| format!("create {}: {e}", p.display()))?;
        }
        std::fs::write(&path, text).map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    log.push(format!("installed the plugd_plugin SDK into {}", site.display()));
    Ok(())
}

/// Rewrites the SDK files of a reused venv if this plugd carries a different SDK.
fn sync_sdk(dir: &Path) -> Result<(), String> {
    let site = site_packages(dir)?;
    for (rel, text) in SDK_FILES {
        let path = site.join(rel);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(*text) {
            if let Some(p) = path.parent() {
                std::fs::create_dir_all(p).map_err(|e| format!("create {}: {e}", p.display()))?;
            }
            std::fs::write(&path, text).map_err(|e| format!("write {}: {e}", path.display()))?;
        }
    }
    Ok(())
}

fn site_packages(venv: &Path) -> Result<PathBuf, String> {
    let lib = venv.join("lib");
    std::fs::read_dir(&lib)
        .map_err(|e| format!("read {}: {e}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages"))
        .find(|p| p.is_dir())
        .ok_or_else(|| format!("no site-packages folder under {}", lib.display()))
}

fn has_requirements(text: &str) -> bool {
    text.lines().any(|l| {
        let l = l.split('#').next().unwrap_or("").trim();
        !l.is_empty()
    })
}

fn host_pip_can_target(interpreter: &Path) -> bool {
    let Ok(out) = Command::new(interpreter)
        .args(["-m", "pip", "--version"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    else {
        return false;
    };
    // "pip 23.2.1 from ..."
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split_whitespace().nth(1).unwrap_or("");
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    out.status.success() && (major, minor) >= (22, 3)
}

/// One requirement line, split into a normalised project name and the rest.
fn parse_requirement(line: &str) -> Option<(String, String)> {
    let line = line.split('#').next().unwrap_or("").trim();
    if line.is_empty() || line.starts_with('-') {
        return None;
    }
    let end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || "._-".contains(c)))
        .unwrap_or(line.len());
    if end == 0 {
        return None;
    }
    // PEP 503 normalisation: case-insensitive, runs of -_. are the same.
    let mut name = String::new();
    for ch in line[..end].chars() {
        let ch = if "._-".contains(ch) { '-' } else { ch.to_ascii_lowercase() };
        if !(ch == '-' && name.ends_with('-')) {
            name.push(ch);
        }
    }
    let spec: String = line[end..].split_whitespace().collect();
    Some((name, spec))
}

/// How the requirements of two versions of a plugin differ.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DependencyDiff {
    /// Projects only the new version requires, with their version specifiers.
    pub added: Vec<String>,
    /// Projects only the old version required.
    pub removed: Vec<String>,
    /// Projects whose specifier changed, as `name: old -> new`.
    pub changed: Vec<String>,
}

impl DependencyDiff {
    /// True if both versions require the same things.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// Compares two requirements files (text; missing = empty).
pub fn requirements_diff(old: &str, new: &str) -> DependencyDiff {
    let parse = |t: &str| -> std::collections::BTreeMap<String, String> {
        t.lines().filter_map(parse_requirement).collect()
    };
    let (o, n) = (parse(old), parse(new));
    let show = |name: &str, spec: &str| {
        if spec.is_empty() {
            name.to_string()
        } else {
            format!("{name}{spec}")
        }
    };
    let mut diff = DependencyDiff::default();
    for (name, spec) in &n {
        match o.get(name) {
            None => diff.added.push(show(name, spec)),
            Some(old) if old != spec => {
                let old = if old.is_empty() { "(any)" } else { old };
                let new = if spec.is_empty() { "(any)" } else { spec };
                diff.changed.push(format!("{name}: {old} -> {new}"))
            }
            Some(_) => {}
        }
    }
    for (name, spec) in &o {
        if !n.contains_key(name) {
            diff.removed.push(show(name, spec));
        }
    }
    diff
}

/// The requirements text the venv of `spec`'s version was built from, if it exists.
pub fn built_requirements(state_root: &Path, spec: &PluginSpec) -> Option<String> {
    let dir = venv_dir(state_root, spec.name(), &spec.manifest.version);
    let stamp = std::fs::read_to_string(dir.join(STAMP)).ok()?;
    stamp.split_once("\nrequirements:\n").map(|(_, r)| r.to_string())
}

/// The requirements text of a plugin version (empty if it has no requirements file).
pub fn requirements_of(spec: &PluginSpec) -> String {
    requirements_text(spec).ok().flatten().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirement_lines_are_normalised() {
        assert_eq!(parse_requirement("NumPy<2  # pinned"), Some(("numpy".into(), "<2".into())));
        assert_eq!(parse_requirement("demo_dep == 1.0"), Some(("demo-dep".into(), "==1.0".into())));
        assert_eq!(parse_requirement("a.b__c"), Some(("a-b-c".into(), "".into())));
        assert_eq!(parse_requirement("--find-links wheels"), None);
        assert_eq!(parse_requirement("   # only a comment"), None);
    }

    #[test]
    fn diff_names_added_removed_and_changed() {
        let old = "numpy<2\nrequests==2.31\nsix\n";
        let new = "NumPy>=2\nrequests==2.31\npandas==2.2  # new\n";
        let d = requirements_diff(old, new);
        assert_eq!(d.added, vec!["pandas==2.2"]);
        assert_eq!(d.removed, vec!["six"]);
        assert_eq!(d.changed, vec!["numpy: <2 -> >=2"]);
        assert!(requirements_diff(old, old).is_empty());
        assert_eq!(requirements_diff("", "x==1").added, vec!["x==1"]);
    }

    #[test]
    fn blank_and_comment_only_files_need_no_pip() {
        assert!(!has_requirements("\n# nothing yet\n   \n"));
        assert!(has_requirements("# deps\ndemo-dep==1.0\n"));
    }
}
