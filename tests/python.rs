//! End to end: Python plugins under the real plugd, each in its own virtualenv.
//!
//! No internet: the tests write tiny wheels (`demo-dep` 1.0 and 2.0, …) into a local
//! folder and point pip at it with `--no-index --find-links`. Two plugins pinned to
//! the two versions run side by side, sandboxed, and each reports what it imported.

mod kit;

use std::path::{Path, PathBuf};
use std::process::Command;

use kit::daemon::*;

/// Writes `<name>-<version>-py3-none-any.whl` holding a module whose `__version__` is `version`.
fn wheel(dir: &Path, name: &str, version: &str) {
    let module = name.replace('-', "_");
    let script = format!(
        r#"
import zipfile
m, v, n = {module:?}, {version:?}, {name:?}
info = "%s-%s.dist-info" % (m, v)
with zipfile.ZipFile("%s-%s-py3-none-any.whl" % (m, v), "w") as z:
    z.writestr(m + "/__init__.py", "__version__ = %r\n" % v)
    z.writestr(info + "/METADATA", "Metadata-Version: 2.1\nName: %s\nVersion: %s\n" % (n, v))
    z.writestr(info + "/WHEEL", "Wheel-Version: 1.0\nGenerator: plugd-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr(info + "/RECORD", "%s/__init__.py,,\n%s/METADATA,,\n%s/WHEEL,,\n%s/RECORD,,\n" % (m, info, info, info))
"#
    );
    let st = Command::new("python3").arg("-c").arg(script).current_dir(dir).status().unwrap();
    assert!(st.success(), "writing the {name} {version} wheel");
}

fn wheels() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (n, v) in
        [("demo-dep", "1.0"), ("demo-dep", "2.0"), ("helper-dep", "1.0"), ("new-dep", "1.0")]
    {
        wheel(dir.path(), n, v);
    }
    dir
}

const MAIN_PY: &str = r#"
import importlib

from plugd_plugin import Plugin, method, serve


class Deps(Plugin):
    @method()
    def dep_version(self, module):
        return importlib.import_module(module).__version__

    @method()
    def try_write(self, path):
        try:
            with open(path, "w") as f:
                f.write("escaped")
            return "written"
        except OSError as e:
            return type(e).__name__


    @method()
    def exec_shell(self, _):
        import os
        os.execv("/bin/sh", ["sh", "-c", "true"])


serve(Deps())
"#;

/// A Python plugin folder whose requirements are `requirements`, installed from `wheels` only.
fn py_plugin(src: &Path, name: &str, version: &str, requirements: &str, wheels: &Path) -> PathBuf {
    let dir = src.join(format!("{name}-{version}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("plugin.toml"),
        format!(
            // pip runs in the plugin's build jail: the wheels folder is bound in as a read path.
            "name = {name:?}\nversion = {version:?}\napi_version = \"^1\"\nentrypoint = \"main.py\"\n\n[python]\npip_args = [\"--no-index\", \"--find-links\", {w:?}]\n\n[sandbox]\nread_paths = [{w:?}]\n",
            w = wheels.display().to_string()
        ),
    )
    .unwrap();
    std::fs::write(dir.join("main.py"), MAIN_PY).unwrap();
    std::fs::write(dir.join("requirements.txt"), requirements).unwrap();
    dir
}

/// The type (as /proc/net/unix shows it: 0001 stream, 0005 seqpacket) of `pid`'s fd 3.
fn socket_type(pid: u64) -> String {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/3")).unwrap();
    let link = link.to_string_lossy();
    let inode = link.trim_start_matches("socket:[").trim_end_matches(']');
    let table = std::fs::read_to_string("/proc/net/unix").unwrap();
    let row = table
        .lines()
        .find(|l| l.split_whitespace().nth(6) == Some(inode))
        .unwrap_or_else(|| panic!("socket {inode} of pid {pid} is not in /proc/net/unix"));
    row.split_whitespace().nth(4).unwrap().to_string()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn call(d: &Plugd, name: &str, method: &str, arg: &str) -> String {
    let out = d.ctl(&["call", name, method, arg]);
    assert!(out.status.success(), "call {name}.{method}: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn two_plugins_pinned_to_different_versions_run_side_by_side_sandboxed() {
    let wheels = wheels();
    let src = tempfile::tempdir().unwrap();
    let d = Plugd::start(|_| {});
    let a =
        py_plugin(src.path(), "dep-a", "1.0.0", "demo-dep==1.0\nhelper-dep==1.0\n", wheels.path());
    let b = py_plugin(src.path(), "dep-b", "1.0.0", "demo-dep==2.0\n", wheels.path());
    // dep-b talks over a seqpacket socket (the Python SDK reads records whole too).
    let manifest = b.join("plugin.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, format!("transport = \"seqpacket\"\n{text}")).unwrap();
    for dir in [&a, &b] {
        let out = d.ctl(&["install", dir.to_str().unwrap()]);
        assert!(out.status.success(), "install {}: {}", dir.display(), stderr(&out));
    }
    eventually("both ready", || d.all_ready(&["dep-a", "dep-b"]));
    assert_eq!(call(&d, "dep-a", "dep_version", "\"demo_dep\""), "1.0");
    assert_eq!(call(&d, "dep-b", "dep_version", "\"demo_dep\""), "2.0");
    assert_eq!(socket_type(d.pid("dep-a")), "0001", "dep-a: a stream socket");
    assert_eq!(socket_type(d.pid("dep-b")), "0005", "dep-b: a seqpacket socket");
    assert_eq!(call(&d, "dep-a", "dep_version", "\"helper_dep\""), "1.0");

    // One venv per plugin version, under the state folder, with the SDK in it.
    let venvs = d.root.path().join("state/plugins/.venv");
    let venv_a = venvs.join("dep-a/1.0.0");
    assert!(venv_a.join("bin/python").exists() && venv_a.join(".plugd-venv").is_file());
    assert!(venvs.join("dep-b/1.0.0/bin/python").exists());
    let build_log = std::fs::read_to_string(venv_a.join("build.log")).unwrap();
    assert!(build_log.contains("pip install") && build_log.contains("demo-dep"), "{build_log}");
    if nix::unistd::geteuid().is_root() {
        // pip ran as the plugin, jailed and offline; the venv it left is root's now.
        let uid = d.plugin("dep-a")["sandbox"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|l| {
                l.as_str()?.strip_prefix("user(uid ")?.strip_suffix(')').map(String::from)
            })
            .expect("dep-a runs as a uid of its own");
        let jailed = format!("install steps run jailed: user(uid {uid}) no-capabilities namespaces(pid,mount,ipc,uts,net)");
        assert!(build_log.contains(&jailed), "{build_log}");
        use std::os::unix::fs::MetadataExt;
        let site = std::fs::metadata(venv_a.join("pyvenv.cfg")).unwrap();
        assert_eq!((site.uid(), site.gid()), (0, uid.parse().unwrap()));
    }

    // The sandbox applies to the interpreter: Landlock and seccomp are in force, and the
    // plugin can write neither outside its state folder nor into its own venv.
    let st = d.plugin("dep-a");
    let layers: Vec<&str> =
        st["sandbox"].as_array().unwrap().iter().filter_map(|l| l.as_str()).collect();
    assert!(layers.iter().any(|l| l.starts_with("landlock")), "{layers:?}");
    assert!(layers.iter().any(|l| l.starts_with("seccomp(default")), "{layers:?}");
    assert!(
        layers.contains(&"no-exec(sdk, voluntary)"),
        "the Python SDK blocked execve: {layers:?}"
    );
    // The host folder is not in its world at all; its venv is a read-only bind.
    let outside = src.path().join("escaped.txt");
    assert_eq!(
        call(&d, "dep-a", "try_write", &format!("{:?}", outside.display().to_string())),
        "FileNotFoundError"
    );
    assert!(!outside.exists());
    let in_venv = venv_a.join("planted.py");
    assert_eq!(
        call(&d, "dep-a", "try_write", &format!("{:?}", in_venv.display().to_string())),
        "OSError"
    );
    let own = d.root.path().join("state/plugins/dep-a/ok.txt");
    assert_eq!(
        call(&d, "dep-a", "try_write", &format!("{:?}", own.display().to_string())),
        "written"
    );

    // An execve after start is a sandbox violation, named as such; the plugin is restarted.
    let pid_b = d.pid("dep-b");
    assert!(!d.ctl(&["call", "dep-b", "exec_shell", "null"]).status.success());
    eventually("dep-b restarted after its violation", || {
        // New pid first, then Ready: two reads in this order cannot pair stale with fresh.
        ![0, pid_b].contains(&d.pid("dep-b")) && d.all_ready(&["dep-b"])
    });
    let last = d.plugin("dep-b")["last_exit"].as_str().unwrap_or_default().to_string();
    assert!(last.contains("sandbox violation"), "{last}");

    // A restart reuses the venv as it is.
    let stamp_time = std::fs::metadata(venv_a.join(".plugd-venv")).unwrap().modified().unwrap();
    let pid = d.pid("dep-a");
    assert!(d.ctl(&["restart", "dep-a"]).status.success());
    eventually("dep-a back", || ![0, pid].contains(&d.pid("dep-a")) && d.all_ready(&["dep-a"]));
    assert_eq!(
        std::fs::metadata(venv_a.join(".plugd-venv")).unwrap().modified().unwrap(),
        stamp_time
    );

    // A second version: the dry run shows the dependency diff, the update switches to it.
    let a2 =
        py_plugin(src.path(), "dep-a", "2.0.0", "demo-dep==2.0\nnew-dep==1.0\n", wheels.path());
    let out = d.ctl(&["install", a2.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let plan = d.json(&["update", "dep-a", "2.0.0", "--dry-run"]);
    let deps = &plan["changes"]["dependencies"];
    assert_eq!(deps["added"], serde_json::json!(["new-dep==1.0"]), "{plan}");
    assert_eq!(deps["removed"], serde_json::json!(["helper-dep==1.0"]), "{plan}");
    assert_eq!(deps["changed"], serde_json::json!(["demo-dep: ==1.0 -> ==2.0"]), "{plan}");
    let human = d.ctl(&["update", "dep-a", "2.0.0", "--dry-run"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("+ new-dep==1.0") && text.contains("~ demo-dep: ==1.0 -> ==2.0"),
        "{text}"
    );
    assert_eq!(d.plugin("dep-a")["version"], "1.0.0", "a dry run changes nothing");
    let st = d.json(&["update", "dep-a", "2.0.0"]);
    assert_eq!(st[0]["version"], "2.0.0");
    assert_eq!(call(&d, "dep-a", "dep_version", "\"demo_dep\""), "2.0");
    assert_eq!(call(&d, "dep-a", "dep_version", "\"new_dep\""), "1.0");
    assert_eq!(call(&d, "dep-b", "dep_version", "\"demo_dep\""), "2.0");

    // Uninstall with purge removes the venvs and the state, and touches nothing else.
    let out = d.ctl(&["uninstall", "dep-a", "--purge"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!venvs.join("dep-a").exists());
    assert!(!d.root.path().join("state/plugins/dep-a").exists());
    assert!(venvs.join("dep-b/1.0.0/bin/python").exists());
    assert_eq!(call(&d, "dep-b", "dep_version", "\"demo_dep\""), "2.0");
}

#[test]
fn a_failed_pip_install_fails_the_install_and_leaves_nothing() {
    let wheels = wheels();
    let src = tempfile::tempdir().unwrap();
    let d = Plugd::start(|_| {});
    let installed = d.root.path().join("state/installed");
    let venvs = d.root.path().join("state/plugins/.venv");

    let missing = py_plugin(src.path(), "dep-c", "1.0.0", "no-such-package==9.9\n", wheels.path());
    let out = d.ctl(&["install", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("pip install failed") && err.contains("no-such-package"), "{err}");
    assert!(
        err.contains(
            "this step ran without a network; if it must download, set `python.network = \"host\"`"
        ),
        "{err}"
    );
    // pip's own words (or uv's, where uv is installed) are shown.
    assert!(
        err.contains("No matching distribution")
            || err.contains("not found in the provided package locations"),
        "{err}"
    );

    // Conflicting pins inside one plugin: pip's resolver refuses, and says why.
    let conflict =
        py_plugin(src.path(), "dep-d", "1.0.0", "demo-dep==1.0\ndemo-dep==2.0\n", wheels.path());
    let out = d.ctl(&["install", conflict.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let lower = err.to_lowercase();
    assert!(lower.contains("conflict") || lower.contains("unsatisfiable"), "{err}");

    for name in ["dep-c", "dep-d"] {
        assert!(!installed.join(name).join("1.0.0").exists(), "{name} half-installed");
        assert!(!venvs.join(name).exists(), "{name}'s venv left behind");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&installed)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten().flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary folders left: {leftovers:?}");
    assert!(d.status().iter().all(|p| p["name"] != "dep-c" && p["name"] != "dep-d"));
}

#[test]
fn a_folder_plugin_edited_in_place_shows_and_gets_its_new_dependencies() {
    let wheels = wheels();
    let w = wheels.path().to_path_buf();
    let d = Plugd::start(move |dir| {
        py_plugin(dir, "folder-py", "1.0.0", "demo-dep==1.0\n", &w);
    });
    eventually("ready", || d.all_ready(&["folder-py"]));
    assert_eq!(call(&d, "folder-py", "dep_version", "\"demo_dep\""), "1.0");
    let req = d.plugins().join("folder-py-1.0.0/requirements.txt");
    std::fs::write(&req, "demo-dep==2.0\nnew-dep==1.0\n").unwrap();
    // The diff is against what the running venv was built from, not the edited file.
    let plan = d.json(&["update", "folder-py", "--dry-run"]);
    let deps = &plan["changes"]["dependencies"];
    assert_eq!(deps["changed"], serde_json::json!(["demo-dep: ==1.0 -> ==2.0"]), "{plan}");
    assert_eq!(deps["added"], serde_json::json!(["new-dep==1.0"]), "{plan}");
    let st = d.json(&["update", "folder-py"]);
    assert_eq!(st[0]["state"], "ready", "{st}");
    assert_eq!(call(&d, "folder-py", "dep_version", "\"demo_dep\""), "2.0");
    assert_eq!(call(&d, "folder-py", "dep_version", "\"new_dep\""), "1.0");
}
