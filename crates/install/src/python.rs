//! Python plugins: one virtualenv per plugin version, built in the plugin's build jail.
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
//! Every command of the build (`python -m venv`, pip, uv) runs as the plugin's uid in its
//! build jail ([`crate::install::Steps`]): it sees the system folders, the plugin folder,
//! the interpreter's installation and the venv being built, which is the only thing it
//! can write; it has a network only with `python.network = "host"`. The finished venv is
//! handed back to root before plugd writes the SDK and the stamp into it.
//!
//! Plugins never share a venv, so two plugins cannot conflict over a dependency; within
//! one plugin, pip's resolver decides, and its refusal is reported word for word.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::install::{write_new, Cancel, Steps};
use supervisor::manifest::PluginSpec;
pub use supervisor::python::{built_requirements, requirements_of, venv_dir, venvs_of, PythonEnv};
use supervisor::python::{
    current, env_of, find_in_path, requirements_text, stamp_for, Installer, STAMP,
};
use supervisor::sandbox::{HostFacts, JobSpec};

/// The SDK files plugd puts into every Python plugin's venv, as (relative path, text).
pub const SDK_FILES: &[(&str, &str)] = &[
    (
        "plugd_plugin/__init__.py",
        include_str!("../../../plugin-runner/python/plugd_plugin/__init__.py"),
    ),
    ("plugd_plugin/wire.py", include_str!("../../../plugin-runner/python/plugd_plugin/wire.py")),
    (
        "plugd_plugin/schema.py",
        include_str!("../../../plugin-runner/python/plugd_plugin/schema.py"),
    ),
    (
        "plugd_plugin/lockdown.py",
        include_str!("../../../plugin-runner/python/plugd_plugin/lockdown.py"),
    ),
    ("plugd_plugin/py.typed", include_str!("../../../plugin-runner/python/plugd_plugin/py.typed")),
    ("plugd_plugin/kinds.py", include_str!("../../../plugin-runner/python/plugd_plugin/kinds.py")),
    (
        "plugd_plugin/launch.py",
        include_str!("../../../plugin-runner/python/plugd_plugin/launch.py"),
    ),
    (
        "plugd_plugin/serving.py",
        include_str!("../../../plugin-runner/python/plugd_plugin/serving.py"),
    ),
];

/// The venv's build output (what was run and what it printed).
pub const BUILD_LOG: &str = "build.log";

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

/// Builds Python plugins' venvs before each start: give it to a
/// [`Supervisor`](supervisor::Supervisor) as its `prepare` (the daemon and `plugctl
/// validate` do; a reused venv costs one file read).
#[derive(Debug, Default, Clone, Copy)]
pub struct Venvs;

impl supervisor::PrepareRuntime for Venvs {
    fn prepare(
        &self,
        spec: &PluginSpec,
        state_root: &Path,
        host: &HostFacts,
    ) -> Result<Vec<String>, String> {
        prepare(spec, state_root, host, None).map(|p| p.log)
    }
}

/// Makes sure the venv of `spec` exists and matches its recipe; builds it if not.
/// Blocking (pip may take minutes): call it from a blocking thread.
pub fn prepare(
    spec: &PluginSpec,
    state_root: &Path,
    host: &HostFacts,
    cancel: Option<&Cancel>,
) -> Result<Prepared, String> {
    let name = spec.name();
    let dir = venv_dir(state_root, spec.venv_name(), &spec.manifest.version);
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
    let built = std::fs::create_dir(&tmp)
        .map_err(|e| format!("create {}: {e}", tmp.display()))
        .and_then(|_| {
            build(
                spec,
                state_root,
                host,
                &interpreter,
                installer,
                &requirements,
                &tmp,
                &mut log,
                cancel,
            )
        })
        .and_then(|_| {
            // Kept for `cat`: an install-time build happens before the plugin has a log.
            let mut text = log.join("\n");
            text.push('\n');
            write_new(&tmp.join(BUILD_LOG), text.as_bytes())?;
            write_new(&tmp.join(STAMP), stamp.as_bytes())
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

/// The folder an interpreter's installation lives in, bound read-only into the build
/// jail: `<prefix>` of `<prefix>/bin/python3` (or pyenv's `<root>/shims/python3`).
fn interpreter_root(interpreter: &Path) -> Option<PathBuf> {
    let real = std::fs::canonicalize(interpreter).ok()?;
    let dir = real.parent()?;
    let root = match dir.file_name()?.to_str()? {
        "bin" | "shims" => dir.parent()?,
        _ => dir,
    };
    Some(root.to_path_buf()).filter(|r| r.parent().is_some())
}

#[allow(clippy::too_many_arguments)]
fn build(
    spec: &PluginSpec,
    state_root: &Path,
    host: &HostFacts,
    interpreter: &Path,
    installer: Installer,
    requirements: &Option<String>,
    tmp: &Path,
    log: &mut Vec<String>,
    cancel: Option<&Cancel>,
) -> Result<(), String> {
    let tmp = &std::fs::canonicalize(tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let python = tmp.join("bin/python");
    let wants_packages = requirements.as_deref().is_some_and(has_requirements);
    let req_file = spec.dir.join(&spec.manifest.python.requirements);
    let pip_args: Vec<&OsStr> = spec.manifest.python.pip_args.iter().map(OsStr::new).collect();
    let mut read: Vec<PathBuf> = interpreter_root(interpreter).into_iter().collect();
    if installer == Installer::Uv {
        read.extend(find_in_path("uv").and_then(|p| std::fs::canonicalize(p).ok()));
    }
    let steps = Steps::new(
        &JobSpec { spec, state_root, read, workspace: tmp, network: spec.manifest.python.network },
        host,
        "python.network",
    )?;
    log.push(steps.describe());
    let os = |p: &Path| p.as_os_str().to_owned();
    // The interpreter itself, not a launcher in front of it (pyenv's shims would try to
    // rehash after pip, writing to the host's pyenv folder): asked inside the jail.
    let ask = [OsStr::new("-c"), OsStr::new("import sys; print(sys.executable)")];
    let real =
        steps.run(interpreter, &ask, tmp, "python -c sys.executable", &mut Vec::new(), cancel)?;
    let real = PathBuf::from(real.trim());
    let interpreter = if real.is_absolute() { real.as_path() } else { interpreter };
    match installer {
        Installer::Uv => {
            let uv = PathBuf::from("uv");
            let args = [
                OsStr::new("venv"),
                OsStr::new("--quiet"),
                OsStr::new("--allow-existing"),
                OsStr::new("--python"),
                interpreter.as_os_str(),
                tmp.as_os_str(),
            ];
            steps.run(&uv, &args, tmp, "uv venv", log, cancel)?;
            if wants_packages {
                let mut args: Vec<&OsStr> = vec![
                    OsStr::new("pip"),
                    OsStr::new("install"),
                    OsStr::new("--python"),
                    python.as_os_str(),
                    OsStr::new("-r"),
                    req_file.as_os_str(),
                ];
                args.extend(&pip_args);
                steps.run(&uv, &args, &spec.dir, "uv pip install", log, cancel)?;
            }
        }
        Installer::Pip => {
            let args = [
                OsStr::new("-m"),
                OsStr::new("venv"),
                OsStr::new("--without-pip"),
                tmp.as_os_str(),
            ];
            steps.run(interpreter, &args, tmp, "python -m venv", log, cancel)?;
            if wants_packages {
                // The host's pip installs into the venv (`--python`, pip >= 22.3): much faster
                // than bootstrapping pip into every venv. Without it, bootstrap.
                let probe = [OsStr::new("-m"), OsStr::new("pip"), OsStr::new("--version")];
                let host_pip = steps
                    .run(
                        interpreter,
                        &probe,
                        tmp,
                        "python -m pip --version",
                        &mut Vec::new(),
                        cancel,
                    )
                    .is_ok_and(|out| pip_can_target(&out));
                let mut args: Vec<std::ffi::OsString> = Vec::new();
                let pip_python = if host_pip {
                    args.extend([
                        os(Path::new("-m")),
                        os(Path::new("pip")),
                        os(Path::new("--python")),
                        os(&python),
                    ]);
                    interpreter.to_path_buf()
                } else {
                    let ensure =
                        [OsStr::new("-m"), OsStr::new("ensurepip"), OsStr::new("--default-pip")];
                    steps.run(&python, &ensure, tmp, "python -m ensurepip", log, cancel)?;
                    args.extend([os(Path::new("-m")), os(Path::new("pip"))]);
                    python.clone()
                };
                for a in [
                    "install",
                    "--disable-pip-version-check",
                    "--no-input",
                    "--progress-bar",
                    "off",
                    "-r",
                ] {
                    args.push(a.into());
                }
                args.push(req_file.clone().into_os_string());
                args.extend(pip_args.iter().map(|a| a.to_os_string()));
                let args: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
                steps.run(&pip_python, &args, &spec.dir, "pip install", log, cancel)?;
            }
        }
    }
    // Back to root before plugd itself writes into it; the interpreter links stay.
    steps.seal(|rel, target| {
        rel.parent() == Some(Path::new("bin"))
            && target.is_absolute()
            && target.file_name().is_some_and(|f| f.to_string_lossy().starts_with("python"))
    })?;
    let site = site_packages(tmp)?;
    write_sdk(&site)?;
    log.push(format!("installed the plugd_plugin SDK into {}", site.display()));
    Ok(())
}

/// Writes the SDK files into a venv's site-packages (never through a symlink).
fn write_sdk(site: &Path) -> Result<(), String> {
    for (rel, text) in SDK_FILES {
        let path = site.join(rel);
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).map_err(|e| format!("create {}: {e}", p.display()))?;
        }
        write_new(&path, text.as_bytes())?;
    }
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
            write_new(&path, text.as_bytes())?;
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

/// Whether `pip --version` output names a pip that can install into another
/// interpreter's environment (`--python`, pip >= 22.3): "pip 23.2.1 from ...".
fn pip_can_target(version_output: &str) -> bool {
    let version = version_output.split_whitespace().nth(1).unwrap_or("");
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (22, 3)
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

/// The requirements a requirements file lists (`name` + specifier, normalised; comments,
/// options and blank lines left out).
pub fn requirements_list(text: &str) -> Vec<String> {
    text.lines().filter_map(parse_requirement).map(|(name, spec)| format!("{name}{spec}")).collect()
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
