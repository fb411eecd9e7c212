//! Plugins shipped as Python wheels: `pkg-0.2.1-py3-none-any.whl` declares its plugins as
//! entry points (group `plugd.plugins`, `name = "module:Class"`), its name and version in
//! its metadata. Each entry point becomes a plugin folder plugd installs as any other: the
//! wheel, a requirements file naming it (so the plugin's own venv gets it, and its
//! dependencies, from pip), and a generated `plugin.toml`. A `plugin.toml` beside the wheel
//! adds its sections (limits, sandbox, python, …) to every plugin of the wheel.

use std::io::Read;
use std::path::{Path, PathBuf};

/// The group of entry points that declares plugd plugins.
pub const ENTRY_POINT_GROUP: &str = "plugd.plugins";

/// The most a wheel's metadata files may hold (they are read into memory).
const MAX_METADATA: u64 = 1 << 20;

/// What a wheel says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WheelInfo {
    /// The distribution's name (`Name:`).
    pub name: String,
    /// Its version (`Version:`), as semver.
    pub version: String,
    /// Its one-line summary (`Summary:`).
    pub summary: Option<String>,
    /// `plugd.plugins` entry points: (plugin name, `module:Class`).
    pub plugins: Vec<(String, String)>,
}

/// Whether `source` names a wheel (a file or a URL ending in `.whl`).
pub fn is_wheel(source: &str) -> bool {
    source.ends_with(".whl")
}

/// A Python version (`0.2`, `1.0.3`, `2.1.0rc1`) as semver (`0.2.0`, `1.0.3`, `2.1.0-rc1`).
fn semver_of(version: &str) -> Result<String, String> {
    let v = version.trim();
    let split = v.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(v.len());
    let (release, rest) = v.split_at(split);
    let mut parts: Vec<&str> = release.split('.').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() || parts.len() > 3 {
        return Err(format!("version {version:?} is not one plugd can order (want e.g. 1.2.3)"));
    }
    while parts.len() < 3 {
        parts.push("0");
    }
    let pre = rest.trim_start_matches(['.', '-', '_']);
    let text = if pre.is_empty() { parts.join(".") } else { format!("{}-{pre}", parts.join(".")) };
    semver::Version::parse(&text)
        .map(|s| s.to_string())
        .map_err(|e| format!("version {version:?} is not one plugd can order ({e})"))
}

/// Reads the metadata and `plugd.plugins` entry points of the wheel at `path`.
pub fn read(path: &Path) -> Result<WheelInfo, String> {
    let shown = path.display();
    let file = std::fs::File::open(path).map_err(|e| format!("open {shown}: {e}"))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| format!("{shown}: not a wheel ({e})"))?;
    let names: Vec<String> = zip.file_names().map(str::to_string).collect();
    let dist_info = names
        .iter()
        .filter_map(|n| n.split_once(".dist-info/").map(|(d, _)| d.to_string()))
        .find(|d| !d.contains('/'))
        .ok_or_else(|| format!("{shown}: not a wheel (no .dist-info folder)"))?;
    let mut text_of = |file: &str| -> Result<Option<String>, String> {
        let entry = format!("{dist_info}.dist-info/{file}");
        let Ok(f) = zip.by_name(&entry) else { return Ok(None) };
        let mut text = String::new();
        f.take(MAX_METADATA)
            .read_to_string(&mut text)
            .map_err(|e| format!("{shown}: {entry}: {e}"))?;
        Ok(Some(text))
    };
    let metadata = text_of("METADATA")?
        .ok_or_else(|| format!("{shown}: no {dist_info}.dist-info/METADATA"))?;
    let field = |key: &str| {
        metadata
            .lines()
            .take_while(|l| !l.is_empty())
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
            .map(|v| v.trim().to_string())
    };
    let name = field("Name").ok_or_else(|| format!("{shown}: its METADATA has no Name"))?;
    let raw_version =
        field("Version").ok_or_else(|| format!("{shown}: its METADATA has no Version"))?;
    let version = semver_of(&raw_version).map_err(|e| format!("{shown}: {e}"))?;
    let summary = field("Summary").filter(|s| !s.is_empty() && s != "UNKNOWN");
    let entry_points = text_of("entry_points.txt")?.unwrap_or_default();
    let plugins = entry_points_of(&entry_points, ENTRY_POINT_GROUP);
    if plugins.is_empty() {
        return Err(format!(
            "{shown}: declares no plugin; a wheel names its plugins as entry points of the group {ENTRY_POINT_GROUP:?} (in pyproject.toml: [project.entry-points.\"{ENTRY_POINT_GROUP}\"] my-tool = \"my_pkg.tools:MyTool\")"
        ));
    }
    Ok(WheelInfo { name, version, summary, plugins })
}

/// The file name pip wants for the wheel at `path` (`{name}-{version}-{tag}.whl`, from its
/// METADATA and WHEEL), or None when it is not a wheel (a plain .zip).
pub fn file_name(path: &Path) -> Option<String> {
    let file = std::fs::File::open(path).ok()?;
    let mut zip = zip::ZipArchive::new(file).ok()?;
    let dist_info = zip
        .file_names()
        .filter_map(|n| n.split_once(".dist-info/").map(|(d, _)| d.to_string()))
        .find(|d| !d.contains('/'))?;
    let mut text_of = |file: &str| -> Option<String> {
        let mut text = String::new();
        let f = zip.by_name(&format!("{dist_info}.dist-info/{file}")).ok()?;
        f.take(MAX_METADATA).read_to_string(&mut text).ok()?;
        Some(text)
    };
    let (metadata, wheel) = (text_of("METADATA")?, text_of("WHEEL")?);
    let header = |text: &str, key: &str| {
        text.lines()
            .take_while(|l| !l.is_empty())
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
            .map(|v| v.trim().to_string())
    };
    let safe = |s: &str| {
        !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "._+!".contains(c))
    };
    let name = header(&metadata, "Name")?.replace(['-', '.'], "_");
    let version = header(&metadata, "Version")?;
    let tag = header(&wheel, "Tag")?;
    [&name, &version].iter().all(|s| safe(s)).then_some(())?;
    tag.split('-').all(safe).then(|| format!("{name}-{version}-{tag}.whl"))
}

/// The `name = value` lines of `[group]` in an entry_points.txt.
fn entry_points_of(text: &str, group: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line.trim_matches(['[', ']']).trim() == group;
        } else if let (true, Some((k, v))) = (inside, line.split_once('=')) {
            // `module:Class [extra]`: extras are not plugd's business.
            let target = v.split('[').next().unwrap_or("").trim();
            out.push((k.trim().to_string(), target.to_string()));
        }
    }
    out
}

/// Writes one plugin folder per entry point of the wheel at `wheel` into `into`: the wheel,
/// `requirements.txt` naming it, and a `plugin.toml` (with `extra`'s sections, from a
/// plugin.toml beside the wheel). Returns the folders.
pub fn plugin_folders(
    wheel: &Path,
    info: &WheelInfo,
    extra: Option<&toml::Table>,
    into: &Path,
) -> Result<Vec<PathBuf>, String> {
    let file = wheel.file_name().ok_or("a wheel file has a name")?.to_string_lossy().to_string();
    let mut out = Vec::new();
    for (plugin, target) in &info.plugins {
        let name = supervisor::foreign::normalize_name(plugin);
        supervisor::manifest::check_name(&name)
            .map_err(|e| format!("{file}: entry point {plugin:?}: {e}"))?;
        if !target.contains(':') {
            return Err(format!(
                "{file}: entry point {plugin} = {target:?} names no class; write \"module:Class\""
            ));
        }
        let dir = into.join(&name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        std::fs::copy(wheel, dir.join(&file)).map_err(|e| format!("copy {file}: {e}"))?;
        std::fs::write(
            dir.join("requirements.txt"),
            format!("# The wheel this plugin came in (plugd installs it into the plugin's venv).\n./{file}\n"),
        )
        .map_err(|e| format!("write requirements.txt: {e}"))?;
        let mut table = extra.cloned().unwrap_or_default();
        for own in ["name", "version", "entrypoint", "runtime", "api_version", "instances"] {
            table.remove(own);
        }
        table.insert("name".into(), toml::Value::String(name.clone()));
        table.insert("version".into(), toml::Value::String(info.version.clone()));
        table.insert("api_version".into(), toml::Value::String("*".into()));
        table.insert("runtime".into(), toml::Value::String("python".into()));
        table.insert("entrypoint".into(), toml::Value::String(target.clone()));
        // The module is in the venv (pip installs the wheel there), not in the folder.
        let python =
            table.entry("python").or_insert_with(|| toml::Value::Table(Default::default()));
        if let Some(python) = python.as_table_mut() {
            python.insert("packaged".into(), toml::Value::Boolean(true));
        }
        if !table.contains_key("description") {
            let about = info.summary.clone().unwrap_or_else(|| info.name.clone());
            table.insert("description".into(), toml::Value::String(format!("{about} ({file})")));
        }
        let text = format!(
            "# Made by plugd from the entry point {plugin} of {file}.\n{}",
            toml::to_string(&table).map_err(|e| e.to_string())?
        );
        std::fs::write(dir.join("plugin.toml"), text)
            .map_err(|e| format!("write plugin.toml: {e}"))?;
        out.push(dir);
    }
    Ok(out)
}

/// The sections of a `plugin.toml` beside `wheel`, if there is one.
pub fn beside(wheel: &Path) -> Result<Option<toml::Table>, String> {
    let Some(path) = wheel.parent().map(|d| d.join("plugin.toml")).filter(|p| p.is_file()) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    toml::from_str(&text).map(Some).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn wheel(dir: &Path, entry_points: &str) -> PathBuf {
        let path = dir.join("demo_tools-0.2-py3-none-any.whl");
        let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let opts = zip::write::SimpleFileOptions::default();
        z.start_file("demo_tools/__init__.py", opts).unwrap();
        z.write_all(b"class Calc:\n    def add(self, a):\n        return a\n").unwrap();
        z.start_file("demo_tools-0.2.dist-info/METADATA", opts).unwrap();
        z.write_all(b"Metadata-Version: 2.1\nName: demo-tools\nVersion: 0.2\nSummary: Demo tools\n\nlong text\nVersion: 9\n").unwrap();
        z.start_file("demo_tools-0.2.dist-info/entry_points.txt", opts).unwrap();
        z.write_all(entry_points.as_bytes()).unwrap();
        z.finish().unwrap();
        path
    }

    #[test]
    fn a_wheels_entry_points_become_plugin_folders() {
        let dir = tempfile::tempdir().unwrap();
        let w = wheel(
            dir.path(),
            "[console_scripts]\nx = demo_tools:main\n\n[plugd.plugins]\ncalc = demo_tools:Calc\nBing = demo_tools.search:Bing [extra]\n",
        );
        let info = read(&w).unwrap();
        assert_eq!(info.name, "demo-tools");
        assert_eq!(info.version, "0.2.0", "the body's Version line is not the header's");
        assert_eq!(
            info.plugins,
            [
                ("calc".into(), "demo_tools:Calc".into()),
                ("Bing".into(), "demo_tools.search:Bing".into())
            ]
        );
        let extra: toml::Table =
            toml::from_str("name = \"x\"\n[limits]\nmemory = \"64MiB\"\n").unwrap();
        let out = dir.path().join("out");
        let folders = plugin_folders(&w, &info, Some(&extra), &out).unwrap();
        assert_eq!(folders, [out.join("calc"), out.join("bing")]);
        assert_eq!(file_name(&w), None, "no WHEEL file: not a wheel pip would take");
        let spec = supervisor::PluginSpec::from_manifest(&folders[1]).unwrap();
        assert_eq!(spec.name(), "bing");
        assert_eq!(spec.manifest.version.to_string(), "0.2.0");
        assert_eq!(spec.manifest.limits.memory, Some(64 << 20), "the sections beside it apply");
        assert!(spec.manifest.entrypoint.is_python());
        let req = std::fs::read_to_string(folders[0].join("requirements.txt")).unwrap();
        assert!(req.contains("./demo_tools-0.2-py3-none-any.whl"), "{req}");
        assert!(folders[0].join("demo_tools-0.2-py3-none-any.whl").is_file());
    }

    #[test]
    fn a_wheel_without_plugins_or_versions_plugd_can_order_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let w = wheel(dir.path(), "[console_scripts]\nx = demo_tools:main\n");
        let e = read(&w).unwrap_err();
        assert!(e.contains("declares no plugin") && e.contains("plugd.plugins"), "{e}");
        assert_eq!(semver_of("2.1.0rc1").unwrap(), "2.1.0-rc1");
        assert!(semver_of("1.2.3.4").is_err());
        assert!(read(&dir.path().join("missing.whl")).is_err());
    }
}
