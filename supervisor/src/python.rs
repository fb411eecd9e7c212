//! Python plugins' virtualenvs, as the host finds them (it never builds one).
//!
//! A plugin with `runtime = "python"` runs `<venv>/bin/python <script>`, where the venv is
//! `<state_root>/.venv/<name>/<version>`. Building a venv (pip, uv, the build jail) is the
//! installer's job (`plugd_install::python`), handed to a [`Supervisor`](crate::Supervisor)
//! as a [`PrepareRuntime`](crate::PrepareRuntime); this module only says where a venv is,
//! what recipe it must match (the stamp) and what a sandboxed plugin must read to run it.

use std::path::{Path, PathBuf};

use crate::manifest::PluginSpec;

/// Name of the file in a venv that records what it was built from.
pub const STAMP: &str = ".plugd-venv";

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

/// Which tool builds venvs here (part of a venv's recipe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installer {
    /// `uv venv` + `uv pip`.
    Uv,
    /// `python -m venv` + pip.
    Pip,
}

impl Installer {
    /// uv when it is on `PATH` (and `PLUGD_NO_UV` is unset), else pip.
    pub fn detect() -> Installer {
        if std::env::var_os("PLUGD_NO_UV").is_none() && find_in_path("uv").is_some() {
            Installer::Uv
        } else {
            Installer::Pip
        }
    }

    /// How the build log and the stamp name it.
    pub fn name(self) -> &'static str {
        match self {
            Installer::Uv => "uv",
            Installer::Pip => "python -m venv + pip",
        }
    }
}

/// `program` itself if it names a file, else the first match on `PATH`.
pub fn find_in_path(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

/// The plugin's requirements file, `None` if it has none.
pub fn requirements_text(spec: &PluginSpec) -> Result<Option<String>, String> {
    let file = spec.dir.join(&spec.manifest.python.requirements);
    match std::fs::read_to_string(&file) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("plugin {}: cannot read {}: {e}", spec.name(), file.display())),
    }
}

/// The stamp a venv built for `spec` with this interpreter and installer must carry.
pub fn stamp_for(
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
    let dir = venv_dir(state_root, spec.venv_name(), &spec.manifest.version);
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
            "plugin {}: its virtualenv {} is missing or out of date; install the plugin with plugd (`plugctl install`), or give this host's SupervisorConfig a `prepare` (plugd_install::python::Venvs) to build it",
            spec.name(),
            dir.display()
        ));
    }
    env_of(&dir)
}

/// The environment of the venv in `dir`: its python and what a jailed plugin must read.
pub fn env_of(dir: &Path) -> Result<PythonEnv, String> {
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

/// The requirements text the venv of `spec`'s version was built from, if it exists.
pub fn built_requirements(state_root: &Path, spec: &PluginSpec) -> Option<String> {
    let dir = venv_dir(state_root, spec.venv_name(), &spec.manifest.version);
    let stamp = std::fs::read_to_string(dir.join(STAMP)).ok()?;
    stamp.split_once("\nrequirements:\n").map(|(_, r)| r.to_string())
}

/// The requirements text of a plugin version (empty if it has no requirements file).
pub fn requirements_of(spec: &PluginSpec) -> String {
    requirements_text(spec).ok().flatten().unwrap_or_default()
}
