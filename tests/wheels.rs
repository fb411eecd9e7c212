//! End to end: plugins shipped as a Python wheel. The test builds a wheel with `pip wheel`
//! from a fixture package declaring two `plugd.plugins` entry points, installs it from a
//! file and (a later version) from an `http://127.0.0.1` URL; both plugins answer, with no
//! plugin.toml written by anyone; versions sit side by side, update, rollback and
//! uninstall work as for folders.

mod kit;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use kit::daemon::*;

/// Builds `plugd_demo_tools-<version>` as a wheel into `out` with `pip wheel` (offline:
/// setuptools and wheel come from the test wheelhouse).
fn build_wheel(src: &Path, out: &Path, version: &str, wheels: &Path) -> PathBuf {
    let pkg = src.join(format!("pkg-{version}"));
    std::fs::create_dir_all(pkg.join("plugd_demo_tools")).unwrap();
    std::fs::write(
        pkg.join("pyproject.toml"),
        format!(
            r#"[build-system]
requires = ["setuptools>=61", "wheel"]
build-backend = "setuptools.build_meta"

[project]
name = "plugd-demo-tools"
version = "{version}"
description = "Two demo tools"

[project.entry-points."plugd.plugins"]
calc = "plugd_demo_tools:Calc"
greet = "plugd_demo_tools.greeting:Greeter"
"#
        ),
    )
    .unwrap();
    std::fs::write(
        pkg.join("plugd_demo_tools/__init__.py"),
        format!("VERSION = {version:?}\n\nclass Calc:\n    seen = 0\n\n    def add(self, pair: list[float]) -> float:\n        \"\"\"Adds two numbers.\"\"\"\n        Calc.seen += 1\n        return pair[0] + pair[1]\n\n    def calls(self) -> int:\n        return Calc.seen\n\n    def release(self) -> str:\n        return VERSION\n"),
    )
    .unwrap();
    std::fs::write(
        pkg.join("plugd_demo_tools/greeting.py"),
        "import logging\n\nclass Greeter:\n    def __init__(self, config=None):\n        self.greeting = (config or {}).get('greeting', 'hello')\n\n    def greet(self, who: str) -> str:\n        return '%s, %s' % (self.greeting, who)\n\n    def search(self, query: str, *, cfg: dict | None = None) -> str:\n        \"\"\"Searches, with the caller's API key.\"\"\"\n        logging.info('searching for %s', query)\n        key = (cfg or {}).get('api_key')\n        return '%s: %s' % (query, 'key of %d chars' % len(key) if key else 'no key')\n\n    def count(self, n: int):\n        \"\"\"Counts to n, a piece at a time.\"\"\"\n        for i in range(n):\n            yield i\n        return 'counted %d' % n\n",
    )
    .unwrap();
    let st = std::process::Command::new("python3")
        .args(["-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps"])
        .args(["--no-index", "--find-links"])
        .arg(wheels)
        .arg("-w")
        .arg(out)
        .arg(&pkg)
        .status()
        .unwrap();
    assert!(st.success(), "pip wheel {version}");
    out.join(format!("plugd_demo_tools-{version}-py3-none-any.whl"))
}

/// Serves the file `path` once per connection at `http://127.0.0.1:PORT/<its name>`.
fn serve_file(path: PathBuf) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let mut req = [0u8; 4096];
            let n = conn.read(&mut req).unwrap_or(0);
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let wanted = String::from_utf8_lossy(&req[..n]).starts_with(&format!("GET /{name} "));
            let body = if wanted { std::fs::read(&path).unwrap() } else { Vec::new() };
            let status = if wanted { "200 OK" } else { "404 Not Found" };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(&body);
        }
    });
    port
}

const TOKEN: &str = "wheels-test-token-0123456789";

/// POSTs `body` to plugd's HTTP API with the token: the JSON answer.
fn post(port: u16, path: &str, body: &[u8]) -> serde_json::Value {
    let (_, body) = post_with(port, path, &[], body);
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// POSTs `body` with the token and `headers`: the response's head and body.
fn post_with(port: u16, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/octet-stream\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_string(), body.to_string())
}

/// One MCP JSON-RPC request to `/mcp`, with the token unless `token` is None: the head and
/// the body of the answer.
fn mcp_raw(port: u16, token: Option<&str>, body: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        s,
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\nMCP-Protocol-Version: 2025-06-18\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_string(), body.to_string())
}

/// One MCP request with the token: the JSON-RPC answer (from a JSON body, or the last
/// `data:` event of a stream).
fn mcp(port: u16, request: serde_json::Value) -> serde_json::Value {
    let (head, body) = mcp_raw(port, Some(TOKEN), &request.to_string());
    let lower = head.to_ascii_lowercase();
    let json = if lower.contains("text/event-stream") {
        body.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(str::trim)
            .rfind(|l| l.starts_with('{'))
            .unwrap_or_default()
            .to_string()
    } else if lower.contains("transfer-encoding: chunked") {
        // One chunk: its size line, then the JSON.
        body.lines().nth(1).unwrap_or_default().to_string()
    } else {
        body.clone()
    };
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {head}\n\n{body}"))
}

fn call(d: &Plugd, name: &str, method: &str, arg: &str) -> String {
    let out = d.ctl(&["call", name, method, arg]);
    assert!(out.status.success(), "{name}.{method}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_wheel_with_two_entry_points_installs_as_two_plugins_from_a_file_and_a_url() {
    let build = kit::wheelhouse("wheel-build", &["setuptools>=61", "wheel"]);
    let src = tempfile::tempdir().unwrap();
    let dist = src.path().join("dist");
    let v1 = build_wheel(src.path(), &dist, "0.2.1", &build);
    let v2 = build_wheel(src.path(), &dist.join("v2"), "0.3.0", &build);
    let v3 = build_wheel(src.path(), &dist.join("v3"), "0.4.0", &build);
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("plugins")).unwrap();
    std::fs::write(root.path().join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(
        root.path().join("extra.toml"),
        format!("[http]\nlisten = \"127.0.0.1:{api}\"\ntoken_file = \"token\"\n\n[mcp]\nexpose = [\"greet.*\", \"calc.add\"]\n"),
    )
    .unwrap();
    let d = Plugd::start_with(root, &[]);

    // From a file: two plugins, named by the entry points, versioned by the wheel.
    let out = d.ctl(&["install", v1.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually("both ready", || d.all_ready(&["calc", "greet"]));
    assert_eq!(call(&d, "calc", "add", "[2, 3]"), "5");
    assert_eq!(call(&d, "calc", "release", "null"), "0.2.1");
    assert_eq!(call(&d, "greet", "greet", "\"ann\""), "hello, ann");
    assert_eq!(d.plugin("calc")["version"], "0.2.1");
    // Described methods: from the docstring and type hints, shown by `plugctl show`...
    let shown = d.json(&["show", "calc"]);
    let add = shown[0]["methods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "add")
        .unwrap()
        .clone();
    assert_eq!(
        add,
        serde_json::json!({"name": "add", "description": "Adds two numbers.",
            "input": {"type": "array", "items": {"type": "number"}}, "output": {"type": "number"}})
    );
    // ...and an input that does not match is refused by plugd, before the plugin sees it.
    let out = d.ctl(&["call", "calc", "add", r#"["two", 3]"#]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused");
    assert!(
        err.contains(
            "the input of add does not match its schema: $[0]: expected number, got string"
        ),
        "{err}"
    );
    assert_eq!(call(&d, "calc", "calls", "null"), "1", "only the valid call reached the plugin");

    // A per-call cfg (an API key) reaches the handler beside the input, from plugctl (inline
    // or from a file) and over HTTP (a header), and is written nowhere by plugd.
    const SECRET: &str = "sk-live-0123456789abcdef";
    let cfg = format!(r#"{{"api_key":"{SECRET}"}}"#);
    let out = d.ctl(&["call", "greet", "search", "\"rust\"", "--cfg", &cfg]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "rust: key of 24 chars");
    let cfg_file = src.path().join("cfg.json");
    std::fs::write(&cfg_file, &cfg).unwrap();
    let out =
        d.ctl(&["call", "greet", "search", "\"py\"", "--cfg-file", cfg_file.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "py: key of 24 chars");
    assert_eq!(call(&d, "greet", "search", "\"no\""), "no: no key");
    let (_, body) =
        post_with(api, "/v1/plugins/greet/call/search", &[("X-Plugd-Cfg", &cfg)], b"\"web\"");
    assert_eq!(body, r#""web: key of 24 chars""#);
    // The cfg is not part of the described input; a cfg that is not JSON is refused
    // without being quoted back.
    let shown = d.json(&["show", "greet"]);
    let search = shown[0]["methods"].as_array().unwrap().iter().find(|m| m["name"] == "search");
    assert_eq!(search.unwrap()["input"], serde_json::json!({"type": "string"}));
    let out = d.ctl(&["call", "greet", "search", "\"x\"", "--cfg", "{sk-live-broken"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cfg of the call"), "{err}");
    assert!(!err.contains("sk-live"), "the error quotes the cfg: {err}");
    let logs = d.ctl(&["logs", "greet", "-n", "200"]);
    let logs = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.contains("searching for rust"), "{logs}");
    let metrics = {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", api)).unwrap();
        write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    };
    assert!(metrics.contains("plugd_plugin_calls_total"), "{metrics}");
    let plugd_log = std::fs::read_to_string(d.root.path().join("plugd.log")).unwrap();
    for (place, text) in
        [("plugin logs", &*logs), ("/metrics", &metrics), ("plugd's log", &plugd_log)]
    {
        assert!(!text.contains("sk-live"), "the secret is in {place}");
    }

    // MCP: the exposed methods as tools, over the streamable HTTP transport (JSON-RPC
    // POSTs to /mcp), with the schemas; a method not exposed is neither listed nor called.
    let (head, _) = mcp_raw(api, None, r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#);
    assert!(head.starts_with("HTTP/1.1 401"), "MCP without the token: {head}");
    let init = mcp(
        api,
        serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "plugd-test", "version": "1"}}}),
    );
    assert_eq!(init["result"]["serverInfo"]["name"], "plugd", "{init}");
    assert!(init["result"]["capabilities"]["tools"].is_object(), "{init}");
    let list = mcp(api, serde_json::json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}));
    let tools = list["result"]["tools"].as_array().unwrap_or_else(|| panic!("{list}"));
    let mut names: Vec<&str> = tools.iter().filter_map(|t| t["name"].as_str()).collect();
    names.sort();
    assert_eq!(names, ["calc.add", "greet.count", "greet.greet", "greet.search"], "{list}");
    let add = tools.iter().find(|t| t["name"] == "calc.add").unwrap();
    assert_eq!(add["description"], "Adds two numbers.");
    assert_eq!(
        add["inputSchema"],
        serde_json::json!({"type": "object", "required": ["input"],
            "properties": {"input": {"type": "array", "items": {"type": "number"}}}})
    );
    let call_tool = |id: u64, name: &str, args: serde_json::Value, meta: serde_json::Value| {
        let mut params = serde_json::json!({"name": name, "arguments": args});
        if !meta.is_null() {
            params["_meta"] = meta;
        }
        mcp(
            api,
            serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params}),
        )
    };
    let r = call_tool(3, "calc.add", serde_json::json!({"input": [2, 3]}), serde_json::Value::Null);
    assert_eq!(r["result"]["content"][0]["text"], "5", "{r}");
    assert_ne!(r["result"]["isError"], true, "{r}");
    // Through the normal path: the schema check refuses a bad input, as a tool error.
    let r =
        call_tool(4, "calc.add", serde_json::json!({"input": ["two", 3]}), serde_json::Value::Null);
    assert_eq!(r["result"]["isError"], true, "{r}");
    assert!(
        r["result"]["content"][0]["text"].as_str().unwrap().contains("does not match its schema"),
        "{r}"
    );
    // The cfg rides in _meta.
    let meta = serde_json::json!({"plugd/cfg": {"api_key": SECRET}});
    let r = call_tool(5, "greet.search", serde_json::json!({"input": "mcp"}), meta);
    assert_eq!(r["result"]["content"][0]["text"], "mcp: key of 24 chars", "{r}");
    // A streaming method streams as progress notifications, then its result.
    let req = serde_json::json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
        "name": "greet.count", "arguments": {"input": 3}, "_meta": {"progressToken": "p1"}}});
    let (head, body) = mcp_raw(api, Some(TOKEN), &req.to_string());
    assert!(head.to_ascii_lowercase().contains("text/event-stream"), "{head}");
    let events: Vec<serde_json::Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|l| serde_json::from_str(l.trim()).ok())
        .collect();
    let progress: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["method"] == "notifications/progress").collect();
    let pieces: Vec<&str> =
        progress.iter().filter_map(|e| e["params"]["message"].as_str()).collect();
    assert_eq!(pieces, ["0", "1", "2"], "{body}");
    assert!(progress.iter().all(|e| e["params"]["progressToken"] == "p1"), "{body}");
    let last = events.last().unwrap();
    assert_eq!(last["id"], 7, "{body}");
    assert_eq!(last["result"]["content"][0]["text"], "counted 3", "{body}");
    // Not exposed: not callable either.
    let before = call(&d, "calc", "calls", "null");
    let r = call_tool(6, "calc.release", serde_json::json!({}), serde_json::Value::Null);
    assert!(r["error"]["message"].as_str().is_some_and(|m| m.contains("no tool named")), "{r}");
    assert_eq!(call(&d, "calc", "calls", "null"), before, "the unexposed tool did not run");

    // From a URL: the next version, installed beside the running one.
    let port = serve_file(v2.clone());
    let url = format!("http://127.0.0.1:{port}/{}", v2.file_name().unwrap().to_string_lossy());
    let out = d.ctl(&["install", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(d.plugin("calc")["version"], "0.2.1", "the running version keeps running");
    let versions = d.json(&["versions", "calc"]);
    assert_eq!(
        versions,
        serde_json::json!([{"version":"0.2.1","current":true},{"version":"0.3.0","current":false}])
    );
    let st = d.json(&["update", "calc", "0.3.0"]);
    assert_eq!(st[0]["version"], "0.3.0");
    assert_eq!(call(&d, "calc", "release", "null"), "0.3.0");
    let st = d.json(&["rollback", "calc"]);
    assert_eq!(st[0]["version"], "0.2.1");
    assert_eq!(call(&d, "calc", "release", "null"), "0.2.1");

    // Uploaded over HTTP (the dashboard's file input): a wheel, not taken for a .zip.
    let job = post(api, "/v1/install", &std::fs::read(&v3).unwrap());
    let id = job["job_id"].as_u64().unwrap_or_else(|| panic!("{job}"));
    eventually("the upload's job ends", || {
        let j = d.json(&["jobs", &id.to_string()]);
        j["state"] == "succeeded" || j["state"] == "failed"
    });
    let j = d.json(&["jobs", &id.to_string()]);
    assert_eq!(j["state"], "succeeded", "{j}");
    let versions = d.json(&["versions", "greet"]);
    assert_eq!(versions.as_array().map(Vec::len), Some(3), "{versions}");
    let uploads = d.root.path().join("state/uploads");
    let left = std::fs::read_dir(&uploads).map(|r| r.count()).unwrap_or(0);
    assert_eq!(left, 0, "an installed upload is removed");

    // Uninstall one plugin of the wheel; the other is untouched.
    assert!(d.ctl(&["uninstall", "greet"]).status.success());
    assert!(d.plugin("greet").is_null());
    assert_eq!(call(&d, "calc", "add", "[1, 1]"), "2");

    // A wheel that declares no plugin says how to declare one.
    let plain = build_wheel(src.path(), &dist.join("plain"), "1.0.0", &build);
    let bare = src.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    {
        // The same wheel without its entry points.
        let mut zin = zip::ZipArchive::new(std::fs::File::open(&plain).unwrap()).unwrap();
        let target = bare.join(plain.file_name().unwrap());
        let mut zout = zip::ZipWriter::new(std::fs::File::create(&target).unwrap());
        for i in 0..zin.len() {
            let f = zin.by_index(i).unwrap();
            if !f.name().ends_with("entry_points.txt") {
                zout.raw_copy_file(f).unwrap();
            }
        }
        zout.finish().unwrap();
        let out = d.ctl(&["install", target.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && err.contains("declares no plugin")
                && err.contains("plugd.plugins"),
            "{err}"
        );
    }
}
