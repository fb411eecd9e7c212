//! Manifests users already have: `plugin.yaml` and `plugin.json` beside (instead of)
//! `plugin.toml`.
//!
//! Trading platforms write `plugin.yaml` (`name: HedgeV2`, `type: strategy`,
//! `entrypoint: plugin.HedgeV2`), plugin runtimes write `plugin.json` (`class_path`,
//! `dependencies`), home consoles `plugin.json` with an `id`. [`translate`] maps their keys
//! onto plugin.toml's, so one validator ([`crate::manifest::Manifest`]) checks them all;
//! keys plugd has no use for are kept (and shown) rather than refused, and a name with
//! capitals is kept for display beside the lowercase name the CLI uses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::manifest::ManifestError;

/// The manifest files a plugin folder may hold (one of them).
pub const MANIFEST_FILES: &[&str] = &["plugin.toml", "plugin.yaml", "plugin.yml", "plugin.json"];

/// The manifest file of the plugin folder `dir`: None when there is none, an error naming
/// them when there are two or more.
pub fn find_manifest(dir: &Path) -> Result<Option<PathBuf>, ManifestError> {
    let found: Vec<PathBuf> =
        MANIFEST_FILES.iter().map(|f| dir.join(f)).filter(|p| p.is_file()).collect();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.into_iter().next()),
        _ => {
            let names: Vec<String> = found
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect();
            Err(ManifestError::Invalid {
                file: dir.to_path_buf(),
                key: names.join(", "),
                problem: format!(
                    "are all manifests of this one plugin folder; keep one of {} and remove the others",
                    names.join(" or ")
                ),
            })
        }
    }
}

/// Whether the folder `dir` holds a manifest file.
pub fn has_manifest(dir: &Path) -> bool {
    MANIFEST_FILES.iter().any(|f| dir.join(f).is_file())
}

/// The manifest file of the plugin folder `dir`, or `dir/plugin.toml` when it has none (so
/// reading it says what is missing); an error when it has two.
pub fn manifest_path(dir: &Path) -> Result<PathBuf, ManifestError> {
    Ok(find_manifest(dir)?.unwrap_or_else(|| dir.join("plugin.toml")))
}

/// What a foreign manifest says besides what plugin.toml can hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Foreign {
    /// The name as written, when it is not a valid plugd name as it stands (`HedgeV2`).
    pub display_name: Option<String>,
    /// Keys plugd has no use for, kept as written.
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Reads a `plugin.yaml`/`plugin.yml`/`plugin.json` into plugin.toml's shape.
pub fn translate(text: &str, file: &Path) -> Result<(toml::Table, Foreign), ManifestError> {
    let parse_err = |message: String| ManifestError::Parse { file: file.into(), message };
    let value: serde_json::Value = match file.extension().and_then(|e| e.to_str()) {
        Some("json") => serde_json::from_str(text).map_err(|e| parse_err(e.to_string()))?,
        _ => from_yaml(text).map_err(parse_err)?,
    };
    let serde_json::Value::Object(map) = value else {
        return Err(parse_err("is not a mapping of keys to values".into()));
    };
    to_toml(map, file)
}

#[cfg(feature = "yaml")]
fn from_yaml(text: &str) -> Result<serde_json::Value, String> {
    yaml_serde::from_str(text).map_err(|e| e.to_string())
}

#[cfg(not(feature = "yaml"))]
fn from_yaml(_text: &str) -> Result<serde_json::Value, String> {
    Err("this build of the supervisor library reads plugin.yaml only with its `yaml` feature \
         (plugd has it); turn it on, or write plugin.toml or plugin.json"
        .into())
}

/// plugin.toml's own top-level keys: a foreign manifest may use them as they are.
const OWN_KEYS: &[&str] = &[
    "kind",
    "api_version",
    "entrypoint",
    "entrypoint_sha256",
    "description",
    "requires",
    "restart",
    "timeouts",
    "limits",
    "sandbox",
    "env",
    "config",
    "build",
    "runtime",
    "python",
    "transport",
    "calls",
    "instances",
    "listen",
    "health",
];

/// The plugd name for `name` as written: lowercase, with spaces and dots as `-`.
pub fn normalize_name(name: &str) -> String {
    name.trim()
        .chars()
        .map(|c| match c {
            ' ' | '.' => '-',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// `"1.4+"` (at least 1.4) as a semver requirement; anything else as written.
fn api_version(text: &str) -> String {
    match text.trim().strip_suffix('+') {
        Some(base) => format!(">={base}"),
        None => text.trim().to_string(),
    }
}

fn to_toml(
    mut map: serde_json::Map<String, serde_json::Value>,
    file: &Path,
) -> Result<(toml::Table, Foreign), ManifestError> {
    let bad = |key: &str, problem: String| ManifestError::Invalid {
        file: file.into(),
        key: key.into(),
        problem,
    };
    let mut foreign = Foreign::default();
    let mut table = toml::Table::new();
    let text_of = |key: &str, v: serde_json::Value| -> Result<String, ManifestError> {
        match v {
            serde_json::Value::String(s) => Ok(s),
            serde_json::Value::Number(n) => Ok(n.to_string()),
            other => Err(bad(key, format!("= {other} is not text"))),
        }
    };
    // The identifier: `id` where a home console has one (its `name` is then for people).
    let id = map.remove("id");
    let name = map.remove("name");
    let (name, shown) = match (id, name) {
        (Some(id), name) => {
            let id = text_of("id", id)?;
            let shown = name.map(|n| text_of("name", n)).transpose()?;
            (id, shown)
        }
        (None, Some(name)) => {
            let name = text_of("name", name)?;
            (name.clone(), Some(name))
        }
        (None, None) => return Err(bad("name", "is missing; give the plugin a name".into())),
    };
    let normalized = normalize_name(&name);
    foreign.display_name = shown.filter(|s| *s != normalized);
    table.insert("name".into(), toml::Value::String(normalized));
    match map.remove("version") {
        Some(v) => {
            table.insert("version".into(), toml::Value::String(text_of("version", v)?));
        }
        None => return Err(bad("version", "is missing; write e.g. \"1.0.0\"".into())),
    }
    // `type` is the kind where it names one plugd knows; kept as written otherwise.
    if let Some(kind) = map.remove("type") {
        let text = text_of("type", kind.clone())?;
        match text.to_ascii_lowercase().as_str() {
            k @ ("strategy" | "signal" | "adapter" | "engine" | "utility") => {
                table.insert("kind".into(), toml::Value::String(k.into()));
            }
            _ => {
                foreign.extra.insert("type".into(), kind);
            }
        }
    }
    let api = map.remove("api_version").map(|v| text_of("api_version", v)).transpose()?;
    table.insert(
        "api_version".into(),
        toml::Value::String(api.map_or("*".into(), |a| api_version(&a))),
    );
    // A class (`plugin.HedgeV2`, `pkg.mod:Class`) or a script: a Python plugin either way.
    let entry = match (map.remove("entrypoint"), map.remove("class_path")) {
        (Some(_), Some(_)) => {
            return Err(bad("class_path", "and `entrypoint` both name the code; keep one".into()))
        }
        (Some(e), None) => Some(("entrypoint", e)),
        (None, Some(c)) => Some(("class_path", c)),
        (None, None) => None,
    };
    match entry {
        Some((_, serde_json::Value::String(s))) => {
            if !map.contains_key("runtime") {
                table.insert("runtime".into(), toml::Value::String("python".into()));
            }
            table.insert("entrypoint".into(), toml::Value::String(s.trim().to_string()));
        }
        Some((key, other)) => {
            return Err(bad(key, format!("= {other} is not text; write e.g. \"plugin.MyPlugin\"")))
        }
        None => {
            // A home console's plugin.json names no code: main.py holds the plugin's class
            // (its loader imports it), or serves itself when imported.
            if !map.contains_key("runtime") {
                table.insert("runtime".into(), toml::Value::String("python".into()));
            }
            table.insert("entrypoint".into(), toml::Value::String("main:*".into()));
        }
    }
    // `dependencies` of a manifest are other plugins (Python packages live in
    // requirements.txt); plugd's `requires` takes "name" or "name ^1.2".
    if let Some(deps) = map.remove("dependencies") {
        if map.contains_key("requires") {
            return Err(bad(
                "dependencies",
                "and `requires` both list what must run first; keep one".into(),
            ));
        }
        map.insert("requires".into(), deps);
    }
    for (key, value) in map {
        if OWN_KEYS.contains(&key.as_str()) {
            let v = toml::Value::try_from(strip_nulls(value))
                .map_err(|e| bad(&key, format!("cannot be read as plugin.toml's `{key}`: {e}")))?;
            table.insert(key, v);
        } else {
            foreign.extra.insert(key, value);
        }
    }
    Ok((table, foreign))
}

/// TOML has no null: a null value is taken as absent.
fn strip_nulls(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => serde_json::Value::Object(
            m.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k, strip_nulls(v))).collect(),
        ),
        serde_json::Value::Array(a) => serde_json::Value::Array(
            a.into_iter().filter(|v| !v.is_null()).map(strip_nulls).collect(),
        ),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str) -> Result<(toml::Table, Foreign), ManifestError> {
        translate(text, Path::new("/p/plugin.json"))
    }

    #[test]
    fn a_runtime_manifest_with_class_path_and_dependencies_maps_onto_plugin_toml() {
        let (t, f) = json(
            r#"{"class_path": "plugins.client_manager.plugin.ClientManagerPlugin",
                "name": "client_manager", "version": "1.0.0",
                "description": "Client Manager", "dependencies": [], "homepage": "x"}"#,
        )
        .unwrap();
        assert_eq!(t["name"].as_str(), Some("client_manager"));
        assert_eq!(t["runtime"].as_str(), Some("python"));
        assert_eq!(
            t["entrypoint"].as_str(),
            Some("plugins.client_manager.plugin.ClientManagerPlugin")
        );
        assert_eq!(t["api_version"].as_str(), Some("*"));
        assert_eq!(t["requires"].as_array().map(Vec::len), Some(0));
        assert_eq!(f.display_name, None);
        assert_eq!(f.extra["homepage"], serde_json::json!("x"), "unknown keys are kept");
    }

    #[test]
    fn a_console_manifest_names_by_id_and_keeps_its_type() {
        let (t, f) =
            json(r#"{"id": "test_plugin", "name": "Test Plugin", "version": "1.0.0", "type": "internal"}"#)
                .unwrap();
        assert_eq!(t["name"].as_str(), Some("test_plugin"));
        assert_eq!(f.display_name.as_deref(), Some("Test Plugin"));
        assert_eq!(f.extra["type"], serde_json::json!("internal"));
        assert_eq!(t["entrypoint"].as_str(), Some("main:*"));
    }

    #[test]
    fn bad_shapes_say_which_key() {
        let e = json(r#"{"version": "1.0.0"}"#).unwrap_err().to_string();
        assert!(e.contains("`name`") && e.contains("/p/plugin.json"), "{e}");
        let e = json(r#"{"name": "x"}"#).unwrap_err().to_string();
        assert!(e.contains("`version`"), "{e}");
        let e = json(r#"{"name": "x", "version": "1", "entrypoint": 3}"#).unwrap_err().to_string();
        assert!(e.contains("`entrypoint`") && e.contains("not text"), "{e}");
        let e = json("[1]").unwrap_err().to_string();
        assert!(e.contains("not a mapping"), "{e}");
        let e = json(r#"{"name": "x", "version": "1", "entrypoint": "a.B", "class_path": "a.B"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("keep one"), "{e}");
    }

    #[test]
    fn names_and_api_ranges_as_users_write_them() {
        assert_eq!(normalize_name("HedgeV2"), "hedgev2");
        assert_eq!(normalize_name("Test Plugin.x"), "test-plugin-x");
        assert_eq!(api_version("1.4+"), ">=1.4");
        assert_eq!(api_version("^1"), "^1");
    }

    #[cfg(feature = "yaml")]
    #[test]
    fn a_trading_platforms_plugin_yaml() {
        let text = "name: HedgeV2\ntype: strategy\nversion: 1.0.3\nentrypoint: plugin.HedgeV2\ndescription: hedge\nauthor: desk\n";
        let (t, f) = translate(text, Path::new("/p/plugin.yaml")).unwrap();
        assert_eq!(t["name"].as_str(), Some("hedgev2"));
        assert_eq!(t["kind"].as_str(), Some("strategy"));
        assert_eq!(t["version"].as_str(), Some("1.0.3"));
        assert_eq!(f.display_name.as_deref(), Some("HedgeV2"));
        assert_eq!(f.extra["author"], serde_json::json!("desk"));
    }

    #[test]
    fn two_manifests_in_one_folder_are_named() {
        let dir = tempfile::tempdir().unwrap();
        assert!(find_manifest(dir.path()).unwrap().is_none());
        std::fs::write(dir.path().join("plugin.json"), "{}").unwrap();
        assert_eq!(find_manifest(dir.path()).unwrap(), Some(dir.path().join("plugin.json")));
        std::fs::write(dir.path().join("plugin.toml"), "").unwrap();
        let e = find_manifest(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("plugin.toml") && e.contains("plugin.json") && e.contains("keep one"),
            "{e}"
        );
    }
}
