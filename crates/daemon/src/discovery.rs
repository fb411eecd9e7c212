//! Finding plugins in folders and checking them as a set before anything starts.
//!
//! Each subfolder of a plugin directory that holds a manifest (`plugin.toml`,
//! `plugin.yaml` or `plugin.json`) is a plugin; a subfolder with none is reported.
//! The set is checked as a whole — duplicate names, `requires` that
//! are missing or not satisfied by the version present, dependency cycles —
//! and every problem goes into one report. What remains valid is returned in
//! dependency order (a plugin after everything it requires); stopping goes in
//! reverse.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::manifest::PluginSpec;
use supervisor::foreign::has_manifest;

/// The outcome of scanning plugin directories.
#[derive(Debug, Default)]
pub struct Discovery {
    /// Valid plugins, in start order.
    pub plugins: Vec<PluginSpec>,
    /// One line per problem, each naming the file and the fix.
    pub problems: Vec<String>,
}

/// Scans `dirs` (missing directories are reported, not fatal) and checks the set;
/// `defaults` (plugd.toml `[defaults]`) fill what each manifest leaves out.
/// plugd.toml's `[[instances]]` (plugin, instance): a plugin named by them runs as those
/// instances instead of under its own name. With `stage` (a folder of plugd's state), a
/// `NAME_plugin.py` file in a plugin directory is a plugin of its own, copied there to run
/// ([`PluginSpec::single_file`]); without, such files are left alone.
pub fn discover(
    dirs: &[PathBuf],
    defaults: &toml::Table,
    instances: &[(String, supervisor::manifest::Instance)],
    stage: Option<&Path>,
) -> Discovery {
    let mut found = Vec::new();
    let mut problems = Vec::new();
    for dir in dirs {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                problems.push(format!(
                    "plugin directory {}: {e}; create it or remove it from the config",
                    dir.display()
                ));
                continue;
            }
        };
        // A plugin folder, or an installed plugin: `<name>/current` → the active version.
        // A folder holds plugin.toml, plugin.yaml or plugin.json (two of them is a problem
        // `from_manifest` names); one with none is reported, never skipped in silence.
        let mut folders: Vec<PathBuf> = Vec::new();
        for p in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            let file_name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            let hidden = file_name.as_deref().is_some_and(|n| n.starts_with('.'));
            let single = file_name.as_deref().is_some_and(|n| n.ends_with("_plugin.py"));
            if let (true, true, Some(stage)) = (single, p.is_file(), stage) {
                match PluginSpec::single_file(&p, stage) {
                    Ok(spec) => found.push(spec),
                    Err(e) => problems.push(e.to_string()),
                }
                continue;
            }
            if !p.is_dir() || hidden {
                continue;
            }
            if has_manifest(&p) {
                folders.push(p);
            } else if has_manifest(&p.join("current")) {
                folders.push(p.join("current"));
            } else {
                problems.push(format!(
                    "{}: no plugin.toml, plugin.yaml or plugin.json in this folder of {}; it is not loaded (add a manifest, or move the folder out)",
                    p.display(),
                    dir.display()
                ));
            }
        }
        folders.sort();
        for folder in folders {
            match PluginSpec::from_manifest_with_defaults(&folder, defaults) {
                // A plugin with [[instances]] is one plugin per instance.
                Ok(spec) => found.extend(spec.instances()),
                Err(e) => problems.push(e.to_string()),
            }
        }
    }
    for (plugin, inst) in instances {
        if !found.iter().any(|s: &PluginSpec| s.name() == plugin) {
            problems.push(format!(
                "plugd.toml: instance {} names plugin {plugin}, which no plugin folder holds",
                inst.name
            ));
        }
    }
    let found = found
        .into_iter()
        .flat_map(|spec| {
            let mine: Vec<_> = instances
                .iter()
                .filter(|(p, _)| p == spec.name())
                .map(|(_, i)| i.clone())
                .collect();
            if mine.is_empty() {
                return vec![spec];
            }
            let mut spec = spec;
            spec.manifest.instances = mine;
            spec.instances()
        })
        .collect();
    let mut d = check(found);
    problems.append(&mut d.problems);
    d.problems = problems;
    d
}

/// Checks a set of specs: duplicates, requirements, cycles; orders the valid ones.
pub fn check(specs: Vec<PluginSpec>) -> Discovery {
    let mut problems = Vec::new();
    let mut by_name: BTreeMap<String, PluginSpec> = BTreeMap::new();
    for spec in specs {
        if let Some(first) = by_name.get(spec.name()) {
            problems.push(format!(
                "{}: plugin name {:?} is already used by {}; rename one of them",
                spec.manifest_path.display(),
                spec.name(),
                first.manifest_path.display()
            ));
            continue;
        }
        by_name.insert(spec.name().to_string(), spec);
    }
    // Drop plugins whose requirements are missing or unsatisfied, until nothing changes
    // (dropping one can break another that required it).
    loop {
        let mut bad: Vec<(String, String)> = Vec::new();
        for spec in by_name.values() {
            for req in &spec.manifest.requires {
                match by_name.get(&req.name) {
                    None => bad.push((spec.name().to_string(), format!(
                        "{}: requires plugin {:?}, which is not available; install it or remove it from `requires`",
                        spec.manifest_path.display(), req.name
                    ))),
                    Some(dep) if !req.version.matches(&dep.manifest.version) => bad.push((spec.name().to_string(), format!(
                        "{}: requires {} {}, but version {} is installed; install a matching version or relax the requirement",
                        spec.manifest_path.display(), req.name, req.version, dep.manifest.version
                    ))),
                    Some(_) => {}
                }
            }
        }
        if bad.is_empty() {
            break;
        }
        for (name, why) in bad {
            if by_name.remove(&name).is_some() {
                problems.push(why);
            }
        }
    }
    // Topological order (Kahn); what is left over sits on a cycle.
    let mut order = Vec::new();
    let mut placed: BTreeSet<String> = BTreeSet::new();
    loop {
        let ready: Vec<String> = by_name
            .values()
            .filter(|s| !placed.contains(s.name()))
            .filter(|s| s.manifest.requires.iter().all(|r| placed.contains(&r.name)))
            .map(|s| s.name().to_string())
            .collect();
        if ready.is_empty() {
            break;
        }
        for name in ready {
            placed.insert(name.clone());
            order.push(name);
        }
    }
    let cyclic: Vec<&PluginSpec> =
        by_name.values().filter(|s| !placed.contains(s.name())).collect();
    if !cyclic.is_empty() {
        let names: Vec<&str> = cyclic.iter().map(|s| s.name()).collect();
        for s in &cyclic {
            problems.push(format!(
                "{}: part of a `requires` cycle among {}; break the cycle",
                s.manifest_path.display(),
                names.join(", ")
            ));
        }
    }
    let plugins = order.into_iter().filter_map(|n| by_name.remove(&n)).collect();
    Discovery { plugins, problems }
}

/// A fingerprint of what a plugin would run: manifest text and entrypoint file metadata.
/// A change means SIGHUP must restart the plugin.
pub fn fingerprint(spec: &PluginSpec, program: Option<&Path>) -> String {
    let manifest = std::fs::read(&spec.manifest_path).unwrap_or_default();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&manifest, &mut h);
    if let Some(meta) = program.and_then(|p| std::fs::metadata(p).ok()) {
        std::hash::Hash::hash(&meta.len(), &mut h);
        std::hash::Hash::hash(&meta.modified().ok(), &mut h);
    }
    if spec.manifest.runtime == crate::manifest::Runtime::Python {
        // A changed requirements file means a new venv, so a restart.
        std::hash::Hash::hash(&crate::python::requirements_of(spec), &mut h);
    }
    format!("{:016x}", std::hash::Hasher::finish(&h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, name: &str, version: &str, requires: &[&str]) {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let reqs: Vec<String> = requires.iter().map(|r| format!("{r:?}")).collect();
        std::fs::write(
            dir.join("plugin.toml"),
            format!("name = {name:?}\nversion = {version:?}\napi_version = \"^1\"\nentrypoint = \"x\"\nrequires = [{}]\n", reqs.join(", ")),
        )
        .unwrap();
    }

    fn names(d: &Discovery) -> Vec<&str> {
        d.plugins.iter().map(|p| p.name()).collect()
    }

    #[test]
    fn orders_by_requirements() {
        let t = tempfile::tempdir().unwrap();
        write(t.path(), "a-strategy", "1.0.0", &["feed ^1", "risk"]);
        write(t.path(), "feed", "1.2.0", &[]);
        write(t.path(), "risk", "0.3.0", &["feed"]);
        let d = discover(&[t.path().to_path_buf()], &Default::default(), &[], None);
        assert!(d.problems.is_empty(), "{:?}", d.problems);
        assert_eq!(names(&d), vec!["feed", "risk", "a-strategy"]);
    }

    #[test]
    fn reports_every_problem_and_keeps_the_valid_rest() {
        let t = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        write(t.path(), "ok", "1.0.0", &[]);
        write(t.path(), "needs-ghost", "1.0.0", &["ghost"]);
        write(t.path(), "needs-new-feed", "1.0.0", &["feed ^2"]);
        write(t.path(), "feed", "1.0.0", &[]);
        write(t.path(), "needs-broken", "1.0.0", &["needs-ghost"]);
        write(t.path(), "cyc-a", "1.0.0", &["cyc-b"]);
        write(t.path(), "cyc-b", "1.0.0", &["cyc-a"]);
        write(other.path(), "ok", "2.0.0", &[]);
        std::fs::create_dir_all(t.path().join("broken")).unwrap();
        std::fs::write(t.path().join("broken/plugin.toml"), "name = 1").unwrap();
        let d = discover(
            &[t.path().to_path_buf(), other.path().to_path_buf(), t.path().join("nope")],
            &Default::default(),
            &[],
            None,
        );
        assert_eq!(names(&d), vec!["feed", "ok"]);
        let all = d.problems.join("\n");
        for want in [
            "requires plugin \"ghost\", which is not available",
            "requires feed ^2, but version 1.0.0 is installed",
            "requires plugin \"needs-ghost\"",
            "part of a `requires` cycle among cyc-a, cyc-b",
            "plugin name \"ok\" is already used by",
            "broken/plugin.toml",
            "plugin directory",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
    }

    #[test]
    fn a_name_plugin_py_file_is_a_plugin_when_there_is_a_stage_and_a_bare_folder_is_reported() {
        let t = tempfile::tempdir().unwrap();
        let plugins = t.path().join("plugins");
        std::fs::create_dir_all(plugins.join("notes")).unwrap();
        std::fs::write(plugins.join("greeter_plugin.py"), "class G:\n    pass\n").unwrap();
        std::fs::write(plugins.join("helper.py"), "").unwrap();
        let stage = t.path().join("stage");
        let d = discover(std::slice::from_ref(&plugins), &toml::Table::new(), &[], Some(&stage));
        let names: Vec<&str> = d.plugins.iter().map(|s| s.name()).collect();
        assert_eq!(names, ["greeter"], "{:?}", d.problems);
        assert!(stage.join("greeter/greeter_plugin.py").is_file(), "staged");
        assert!(
            d.problems.iter().any(|p| p.contains("notes") && p.contains("no plugin.toml")),
            "{:?}",
            d.problems
        );
        // Without a stage (plugctl validate), single files are left alone.
        let d = discover(&[plugins], &toml::Table::new(), &[], None);
        assert!(d.plugins.is_empty());
    }
}
