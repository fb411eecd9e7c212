//! End to end: plugins brought as their users wrote them — a plugin.yaml naming a
//! `StrategyPlugin` class, a plugin.json naming a plain class by `class_path` — reach their
//! first call with no plugd-specific file; a class that cannot be imported says why; a
//! folder with two manifests is refused, naming both.

mod kit;

use std::sync::Arc;
use std::time::Duration;

use kit::*;
use serde_json::json;
use supervisor::{Deadline, HostCall, Payload, PluginSpec};

fn python_supervisor(state: &tempfile::TempDir) -> supervisor::Supervisor {
    supervisor::Supervisor::new(supervisor::SupervisorConfig {
        bin_dirs: vec![bin_dir()],
        state_dir: state.path().to_path_buf(),
        prepare: Some(Arc::new(plugd_install::python::Venvs)),
        ..Default::default()
    })
    .unwrap()
}

async fn call(
    h: &supervisor::PluginHandle,
    method: &str,
    arg: serde_json::Value,
) -> serde_json::Value {
    let deadline = Deadline::after(Duration::from_secs(10));
    match h.call_raw(method, Payload::json(&arg).unwrap(), deadline).await {
        Ok(p) => p.decode().unwrap(),
        Err(e) => panic!("{method}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_yaml_strategy_class_runs_as_it_was_written() {
    let state = tempfile::tempdir().unwrap();
    let sup = python_supervisor(&state);
    sup.host_method(
        "send_order",
        |c: &HostCall<'_>, order: serde_json::Value| -> Result<_, String> {
            Ok(json!({"filled": order["qty"], "side": order["side"], "for": c.plugin}))
        },
    );
    let spec = PluginSpec::from_manifest(example_dir("py-hedge")).unwrap();
    assert_eq!(spec.name(), "hedgev2", "a name with capitals is lowercased for the CLI");
    assert_eq!(spec.manifest.display_name.as_deref(), Some("HedgeV2"));
    assert_eq!(spec.manifest.kind, supervisor::PluginKind::Strategy);
    assert_eq!(spec.manifest.extra["author"], json!("the desk"), "unknown keys are kept");
    let hedge = sup.load(spec).await.unwrap();
    // on_tick(ctx): the tick as ctx.tick, the order through ctx.send_order to the host.
    let done = call(&hedge, "on_tick", json!({"exposure": 2.0})).await;
    assert_eq!(
        done,
        json!({"hedge": 1.0, "fill": {"filled": 1.0, "side": "Sell", "for": "hedgev2"}})
    );
    assert_eq!(call(&hedge, "on_tick", json!({"exposure": 0.0})).await, json!({"hedge": 0}));
    // A method with no argument, and the async on_load(self) with no config ran.
    let pos = call(&hedge, "position", json!(null)).await;
    assert_eq!(pos, json!({"exposure": 2.0, "hedged": 1.0, "loaded": true}));
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_json_class_path_and_an_unimportable_class() {
    let state = tempfile::tempdir().unwrap();
    let sup = python_supervisor(&state);
    let dir = tempfile::tempdir().unwrap();
    // A runtime's plugin: class_path from a package root above the folder, a plain class
    // (no plugd base), async hooks, a config-taking __init__.
    let folder = dir.path().join("plugins/client_manager");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join("plugin.json"),
        r#"{"class_path": "plugins.client_manager.plugin.ClientManagerPlugin",
            "name": "client_manager", "version": "1.0.0",
            "description": "Client Manager", "dependencies": [],
            "config": {"greeting": "hello"}, "homepage": "https://example.invalid"}"#,
    )
    .unwrap();
    std::fs::write(
        folder.join("plugin.py"),
        "class ClientManagerPlugin:\n    def __init__(self, config):\n        self.greeting = config['greeting']\n        self.started = False\n    async def on_load(self):\n        pass\n    async def on_start(self):\n        self.started = True\n    def greet(self, who):\n        return '%s %s (started: %s)' % (self.greeting, who, self.started)\n    def _private(self):\n        return 'hidden'\n",
    )
    .unwrap();
    let spec = PluginSpec::from_manifest(&folder).unwrap();
    assert_eq!(spec.manifest.extra["homepage"], json!("https://example.invalid"));
    let cm = sup.load(spec).await.unwrap();
    assert_eq!(call(&cm, "greet", json!("ann")).await, json!("hello ann (started: True)"));
    let deadline = Deadline::after(Duration::from_secs(10));
    let err = cm.call_raw("_private", Payload::json(&json!(null)).unwrap(), deadline).await;
    assert!(err.is_err_and(|e| e.message.contains("no method")), "private methods are not served");

    // A class whose module imports what is not installed: the load fails, in words.
    let broken = dir.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(
        broken.join("plugin.json"),
        r#"{"name": "broken", "version": "1.0.0", "class_path": "plugin.Broken"}"#,
    )
    .unwrap();
    std::fs::write(
        broken.join("plugin.py"),
        "import no_such_package_here\nclass Broken:\n    pass\n",
    )
    .unwrap();
    let err = sup.load(PluginSpec::from_manifest(&broken).unwrap()).await.unwrap_err().to_string();
    assert!(
        err.contains("load failed: cannot import plugin") && err.contains("no_such_package_here"),
        "{err}"
    );

    // A script that runs and ends without serve(): told what is missing.
    let quiet = dir.path().join("quiet");
    std::fs::create_dir_all(&quiet).unwrap();
    std::fs::write(
        quiet.join("plugin.json"),
        r#"{"name": "quiet", "version": "1.0.0", "entrypoint": "main.py"}"#,
    )
    .unwrap();
    std::fs::write(quiet.join("main.py"), "print('set up, all done')\n").unwrap();
    let err = sup.load(PluginSpec::from_manifest(&quiet).unwrap()).await.unwrap_err().to_string();
    assert!(
        err.contains("status 0 before its Hello") && err.contains("serve(MyPlugin())"),
        "{err}"
    );
    // A script whose import fails before its serve(): the load fails saying which import
    // and where to look, not a bare "exited(1)".
    let missing = dir.path().join("missing");
    std::fs::create_dir_all(&missing).unwrap();
    std::fs::write(
        missing.join("plugin.json"),
        r#"{"name": "missing", "version": "1.0.0", "entrypoint": "main.py"}"#,
    )
    .unwrap();
    std::fs::write(missing.join("main.py"), "import no_such_dep\nfrom plugd_plugin import serve\n")
        .unwrap();
    let err = sup.load(PluginSpec::from_manifest(&missing).unwrap()).await.unwrap_err().to_string();
    assert!(
        err.contains("load failed: cannot import")
            && err.contains("main.py")
            && err.contains("No module named 'no_such_dep'")
            && err.contains("requirements.txt"),
        "{err}"
    );
    // A home console's plugin.json names no code: the one class in main.py is served.
    let console = dir.path().join("console");
    std::fs::create_dir_all(&console).unwrap();
    std::fs::write(
        console.join("plugin.json"),
        r#"{"id": "test_plugin", "name": "Test Plugin", "version": "1.0.0", "type": "internal"}"#,
    )
    .unwrap();
    std::fs::write(
        console.join("main.py"),
        "class TestPlugin:\n    async def on_load(self):\n        self.loaded = True\n    def ping(self):\n        return 'pong (loaded: %s)' % self.loaded\n",
    )
    .unwrap();
    let tp = sup.load(PluginSpec::from_manifest(&console).unwrap()).await.unwrap();
    assert_eq!(call(&tp, "ping", json!(null)).await, json!("pong (loaded: True)"));
    // A Python script named like a binary: told how to name it, not to run cargo.
    let named = dir.path().join("named");
    std::fs::create_dir_all(&named).unwrap();
    std::fs::write(
        named.join("plugin.toml"),
        "name = \"named\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"main\"\n",
    )
    .unwrap();
    std::fs::write(named.join("main.py"), "").unwrap();
    let err = sup.load(PluginSpec::from_manifest(&named).unwrap()).await.unwrap_err().to_string();
    assert!(err.contains("main.py is here") && !err.contains("cargo"), "{err}");

    // Two manifests in one folder: refused, naming both.
    std::fs::write(folder.join("plugin.toml"), "name = \"x\"\n").unwrap();
    let err = PluginSpec::from_manifest(&folder).unwrap_err().to_string();
    assert!(
        err.contains("plugin.toml") && err.contains("plugin.json") && err.contains("keep one"),
        "{err}"
    );
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_file_plugin_runs_from_a_copy_away_from_its_neighbours() {
    let state = tempfile::tempdir().unwrap();
    let sup = python_supervisor(&state);
    let plugins = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(plugins.path().join("neighbour")).unwrap();
    let secret = plugins.path().join("neighbour/secret.txt");
    std::fs::write(&secret, "the neighbour's key").unwrap();
    let file = plugins.path().join("greeter_plugin.py");
    std::fs::write(
        &file,
        "class Greeter:\n    def greet(self, who):\n        return 'hello ' + who\n\n    def peek(self, path):\n        try:\n            with open(path) as f:\n                return f.read()\n        except OSError as e:\n            return type(e).__name__\n",
    )
    .unwrap();
    let stage = state.path().join("single");
    let spec = PluginSpec::single_file(&file, &stage).unwrap();
    assert_eq!(spec.name(), "greeter");
    assert_eq!(spec.manifest_path, file);
    assert!(spec.dir.starts_with(std::fs::canonicalize(&stage).unwrap()), "{}", spec.dir.display());
    let greeter = sup.load(spec).await.unwrap();
    assert_eq!(call(&greeter, "greet", json!("ann")).await, json!("hello ann"));
    // Its jail holds the staged copy, not the folder of plugins beside it.
    let seen = call(&greeter, "peek", json!(secret.display().to_string())).await;
    assert_ne!(seen, json!("the neighbour's key"), "{seen}");
    // A file that defines two classes says so.
    let two = plugins.path().join("twins_plugin.py");
    std::fs::write(&two, "class A:\n    pass\nclass B:\n    pass\n").unwrap();
    let err =
        sup.load(PluginSpec::single_file(&two, &stage).unwrap()).await.unwrap_err().to_string();
    assert!(err.contains("defines 2 classes (A, B)"), "{err}");
    sup.shutdown().await;
}

/// The two home-console tool plugins, as bundled: plugin.json, requirements.txt, main.py.
#[test]
fn two_console_tool_plugins_with_conflicting_pins_run_side_by_side() {
    use kit::daemon::*;
    let wheels = kit::wheelhouse("tools", &["pydantic>=2,<3", "pydantic<2"]);
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    for ex in ["hc-weather", "hc-legacy-sensor"] {
        let dst = plugins.join(ex);
        std::fs::create_dir_all(&dst).unwrap();
        for f in ["plugin.json", "requirements.txt", "main.py"] {
            std::fs::copy(examples_dir_of(ex).join(f), dst.join(f)).unwrap();
        }
    }
    let w = wheels.display().to_string();
    std::fs::write(
        root.path().join("extra.toml"),
        format!("[defaults]\npython = {{ pip_args = [\"--no-index\", \"--find-links\", {w:?}] }}\nsandbox = {{ read_paths = [{w:?}] }}\n"),
    )
    .unwrap();
    let d = Plugd::start_with(root, &[]);
    eventually("both tools ready", || d.all_ready(&["weather", "legacy_sensor"]));
    let call = |name: &str, method: &str, arg: &str| -> serde_json::Value {
        let out = d.ctl(&["call", name, method, arg]);
        assert!(out.status.success(), "{name}.{method}: {}", String::from_utf8_lossy(&out.stderr));
        // plugctl prints a string result as it is, anything else as JSON.
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
    };
    let v2 = call("weather", "pydantic_version", "null");
    let v1 = call("legacy_sensor", "pydantic_version", "null");
    assert!(v2.as_str().unwrap().starts_with("2."), "{v2}");
    assert!(v1.as_str().unwrap().starts_with("1."), "{v1}");
    assert_eq!(
        call("weather", "forecast", r#"{"city": "Oslo", "celsius": 10}"#),
        json!({"city": "Oslo", "fahrenheit": 50.0})
    );
    assert_eq!(
        call("legacy_sensor", "reading", r#"{"sensor": "t1", "value": "21.5"}"#),
        json!({"sensor": "t1", "value": 21.5})
    );
    let st = d.plugin("weather");
    assert_eq!(st["display_name"], "Weather", "{st}");
    // One plugin's status lists what it requires (the dashboard's detail shows it).
    assert_eq!(d.json(&["status", "weather"])[0]["requirements"], json!(["pydantic>=2,<3"]));
    assert_eq!(d.json(&["status", "legacy_sensor"])[0]["requirements"], json!(["pydantic<2"]));
    assert_eq!(st["manifest_extra"]["type"], "internal");
}
