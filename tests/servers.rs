//! End to end: plugins that run their own server. The bundled `client-manager` (a FastAPI
//! app on uvicorn, brought as its plugin.json and class) serves the socket plugd binds for
//! it, is `starting` until its health check passes, is updated hot under a client loop
//! with no refused connection and no failed request, and is restarted when it wedges; a
//! plain-asyncio plugin shows the start timeout and the method check.

mod kit;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kit::daemon::*;

/// The server's stack, as its requirements.txt pins it.
const SERVER_WHEELS: &[&str] = &["fastapi==0.165.0", "uvicorn==0.55.0"];

/// A port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

const TOKEN: &str = "servers-test-token-0123456789";

/// `[defaults]` that make every Python plugin install from `wheels` only, and the HTTP
/// API on `api_port`.
fn offline_pip(root: &Path, wheels: &Path, api_port: u16) {
    let w = wheels.display().to_string();
    std::fs::write(root.join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(
        root.join("extra.toml"),
        format!(
            "[http]\nlisten = \"127.0.0.1:{api_port}\"\ntoken_file = \"token\"\n[defaults]\npython = {{ pip_args = [\"--no-index\", \"--find-links\", {w:?}] }}\nsandbox = {{ read_paths = [{w:?}] }}\n"
        ),
    )
    .unwrap();
}

/// The bundled client-manager, copied into `plugins` as it is, but for its port.
fn client_manager(plugins: &Path, port: u16) {
    let src = examples_dir_of("client-manager");
    let dst = plugins.join("client-manager");
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["plugin.json", "plugin.py", "requirements.txt"] {
        let text = std::fs::read_to_string(src.join(f)).unwrap();
        std::fs::write(dst.join(f), text.replace("127.0.0.1:10000", &format!("127.0.0.1:{port}")))
            .unwrap();
    }
}

/// One HTTP/1.1 request on a new connection: (status, body), or what went wrong.
fn http(port: u16, method: &str, path: &str) -> Result<(u16, String), String> {
    http_as(port, method, path, "")
}

/// A GET to plugd's own HTTP API, with the token.
fn api(port: u16, path: &str) -> String {
    let (code, body) =
        http_as(port, "GET", path, &format!("Authorization: Bearer {TOKEN}\r\n")).unwrap();
    assert_eq!(code, 200, "{path}: {body}");
    body
}

fn http_as(port: u16, method: &str, path: &str, headers: &str) -> Result<(u16, String), String> {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).map_err(|e| format!("send: {e}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| format!("read: {e}"))?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {text:?}"))?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    Ok((code, body))
}

fn body_json(port: u16, path: &str) -> serde_json::Value {
    let (code, body) = http(port, "GET", path).unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn start_client_manager(port: u16, api_port: u16) -> Plugd {
    let wheels = kit::wheelhouse("server", SERVER_WHEELS);
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("plugins")).unwrap();
    offline_pip(root.path(), &wheels, api_port);
    client_manager(&root.path().join("plugins"), port);
    Plugd::start_with(root, &[])
}

#[test]
fn the_ported_fastapi_plugin_serves_the_socket_plugd_binds_and_is_ready_when_healthy() {
    let (port, api_port) = (free_port(), free_port());
    let d = start_client_manager(port, api_port);
    eventually("client_manager ready (pip installs fastapi first)", || {
        d.all_ready(&["client_manager"])
    });
    let st = d.plugin("client_manager");
    assert_eq!(st["health"]["state"], "healthy", "{st}");
    assert_eq!(st["health"]["check"], "http GET /health every 1 s");
    // Its own network namespace, no inet sockets of its own: the socket is plugd's.
    let sandbox = st["sandbox"].to_string();
    assert!(sandbox.contains("netns") && sandbox.contains("seccomp(no-inet)"), "{sandbox}");
    assert_eq!(body_json(port, "/api/clients")["version"], "1.0.0");
    let (code, _) = http(port, "POST", "/api/clients/alice").unwrap();
    assert_eq!(code, 200);
    // The class's public method is served as a plugin method too.
    let out = d.ctl(&["call", "client_manager", "clients"]);
    let clients: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(clients, serde_json::json!(["alice"]));
    // The HTTP API and /metrics show it too.
    let one: serde_json::Value =
        serde_json::from_str(&api(api_port, "/v1/plugins/client_manager")).unwrap();
    let one = if one.is_array() { one[0].clone() } else { one };
    assert_eq!(one["health"]["state"], "healthy", "{one}");
    let metrics = api(api_port, "/metrics");
    assert!(metrics.contains("plugd_plugin_healthy{plugin=\"client_manager\"} 1"), "{metrics}");
    assert!(metrics.contains("plugd_plugin_health_failures{plugin=\"client_manager\"} 0"));

    // The SDK's stop under the race it cannot see (a connection that uvicorn's shutdown
    // finds with its request unread is served, not closed), run with the plugin's own
    // virtualenv, where uvicorn is.
    let venv = d.root.path().join("state/plugins/.venv/client_manager");
    let python = std::fs::read_dir(&venv)
        .unwrap()
        .map(|e| e.unwrap().path().join("bin/python"))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no virtualenv python under {}", venv.display()));
    let out = std::process::Command::new(python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/py/serving_spares_unread.py"))
        .env("PLUGD_SDK_PATH", concat!(env!("CARGO_MANIFEST_DIR"), "/../plugin-runner/python"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

#[test]
fn a_hot_update_of_the_server_refuses_no_connection_and_fails_no_request() {
    let port = free_port();
    let d = start_client_manager(port, free_port());
    eventually("client_manager ready", || d.all_ready(&["client_manager"]));
    let old_pid = d.pid("client_manager");

    // A client loop: a new connection per request, as fast as it goes.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let versions = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    // Versions that answered requests sent once the update had returned.
    let updated = Arc::new(AtomicBool::new(false));
    let after = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::<String>::new()));
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let client = {
        let (stop, ok, failed, versions, errors) =
            (stop.clone(), ok.clone(), failed.clone(), versions.clone(), errors.clone());
        let (updated, after) = (updated.clone(), after.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let sent_after_update = updated.load(Ordering::SeqCst);
                match http(port, "GET", "/api/clients") {
                    Ok((200, body)) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                        let v = v["version"].as_str().unwrap_or("?").to_string();
                        if sent_after_update {
                            after.lock().unwrap().insert(v.clone());
                        }
                        let mut seen = versions.lock().unwrap();
                        if seen.last() != Some(&v) {
                            seen.push(v);
                        }
                    }
                    Ok((code, body)) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        errors.lock().unwrap().push(format!("{code}: {body}"));
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        errors.lock().unwrap().push(e);
                    }
                }
            }
        })
    };
    eventually("the client loop is served", || ok.load(Ordering::SeqCst) > 20);

    let manifest = d.plugins().join("client-manager/plugin.json");
    let text = std::fs::read_to_string(&manifest).unwrap().replace("\"1.0.0\"", "\"1.1.0\"");
    std::fs::write(&manifest, text).unwrap();
    let st = d.json(&["update", "client_manager"]);
    assert_eq!(st[0]["version"], "1.1.0", "{st}");
    updated.store(true, Ordering::SeqCst);
    let served_during = ok.load(Ordering::SeqCst);
    eventually("the new version answers", || {
        versions.lock().unwrap().last().map(String::as_str) == Some("1.1.0")
    });
    let before = ok.load(Ordering::SeqCst);
    eventually("more requests after the update", || ok.load(Ordering::SeqCst) > before + 20);
    stop.store(true, Ordering::SeqCst);
    client.join().unwrap();

    assert_eq!(failed.load(Ordering::SeqCst), 0, "failed requests: {:?}", errors.lock().unwrap());
    // Both versions answer while they overlap (one shared accept queue); once the update
    // has returned, only the new one does.
    let seen = versions.lock().unwrap().clone();
    assert_eq!(seen.first().map(String::as_str), Some("1.0.0"), "{seen:?}");
    assert_eq!(seen.last().map(String::as_str), Some("1.1.0"), "{seen:?}");
    assert_eq!(after.lock().unwrap().iter().collect::<Vec<_>>(), ["1.1.0"]);
    assert!(served_during > 20);
    assert_ne!(d.pid("client_manager"), old_pid);
    assert!(!kit::alive(old_pid), "the old instance is gone");
    assert_eq!(d.plugin("client_manager")["restarts"], 0);
}

#[test]
fn a_wedged_server_is_restarted_as_unhealthy() {
    let port = free_port();
    let d = start_client_manager(port, free_port());
    eventually("client_manager ready", || d.all_ready(&["client_manager"]));
    let pid = d.pid("client_manager");
    let (code, _) = http(port, "POST", "/debug/wedge").unwrap();
    assert_eq!(code, 200);
    // The process lives and answers plugd's pings; only the health check sees it.
    eventually("health failing", || d.plugin("client_manager")["health"]["state"] == "failing");
    eventually("restarted as unhealthy", || {
        let st = d.plugin("client_manager");
        st["restarts"] == 1 && st["state"] == "ready" && st["health"]["state"] == "healthy"
    });
    let st = d.plugin("client_manager");
    let why = st["last_exit"].as_str().unwrap_or_default();
    assert!(
        why.starts_with("unhealthy: http GET /health failed 3 times in a row: no answer within"),
        "{st}"
    );
    assert_eq!(st["exits"]["unhealthy"], 1);
    assert_ne!(d.pid("client_manager"), pid);
    assert!(!kit::alive(pid));
    // Served again, by the new instance, on the same socket.
    assert_eq!(body_json(port, "/health")["status"], "ok");
}

/// A plain-asyncio server plugin (no third-party package): `GET /health` answers only
/// when the `HEALTHY` file exists in its state folder; `ping` is its method check.
const ASYNC_SERVER: &str = r#"
import asyncio, os
from plugd_plugin import Plugin, method, serve, serving

STATE = os.environ["PLUGD_STATE_DIR"]

async def handle(reader, writer):
    await reader.readuntil(b"\r\n\r\n")
    if os.path.exists(os.path.join(STATE, "HEALTHY")):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    else:
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    await writer.drain()
    writer.close()

class Server(Plugin):
    async def on_start(self):
        self.servers = [await asyncio.start_server(handle, sock=s) for s in serving.listen_sockets()]
        self.names = serving.listen_names()

    @method()
    async def names_(self, _):
        return self.names

    @method()
    async def bind_own(self, port):
        # What a server that ignores [listen] does: its own inet socket, refused.
        import socket
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", port))
            return "bound"
        except OSError as e:
            return type(e).__name__

    @method()
    async def ping(self, _):
        if not os.path.exists(os.path.join(STATE, "HEALTHY")):
            raise RuntimeError("not yet")
        return "pong"

serve(Server())
"#;

fn async_server(plugins: &Path, name: &str, health: &str, port: u16) {
    let dir = plugins.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("main.py"), ASYNC_SERVER).unwrap();
    std::fs::write(
        dir.join("plugin.toml"),
        format!(
            "name = {name:?}\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"main.py\"\n\n[listen]\ntcp = [\"127.0.0.1:{port}\"]\n\n[health]\n{health}\ninterval = \"200ms\"\ntimeout = \"1s\"\nstart_timeout = \"3s\"\nfailures = 2\n"
        ),
    )
    .unwrap();
}

#[test]
fn a_server_stays_starting_until_its_check_passes_and_fails_past_the_start_timeout() {
    let (http_port, method_port) = (free_port(), free_port());
    let tcp_port = free_port();
    let d = Plugd::start(|dir| {
        async_server(dir, "web", "http = \"/health\"", http_port);
        async_server(dir, "svc", "method = \"ping\"", method_port);
        async_server(dir, "tcp", "tcp = true", tcp_port);
    });
    let state = d.root.path().join("state/plugins");
    // No HEALTHY file: both answer the handshake but never pass; past start_timeout (3 s)
    // plugd gives up on them, saying which check failed and how.
    eventually("both failed their start", || {
        d.status().iter().filter(|p| p["name"] != "tcp").all(|p| {
            p["state"] == "failed"
                && p["last_exit"].as_str().is_some_and(|w| w.contains("(start_timeout)"))
        })
    });
    let web = d.plugin("web")["last_exit"].to_string();
    assert!(
        web.contains("unhealthy: http GET /health did not pass within 3 s") && web.contains("503"),
        "{web}"
    );
    let svc = d.plugin("svc")["last_exit"].to_string();
    assert!(
        svc.contains("unhealthy: method ping did not pass") && svc.contains("not yet"),
        "{svc}"
    );

    // Started by hand: `starting` (with what the check got) until it passes.
    for name in ["web", "svc"] {
        let sock = d.socket.clone();
        let start = std::thread::spawn(move || {
            std::process::Command::new(plugd_bin("plugctl"))
                .arg("--socket")
                .arg(sock)
                .args(["start", name])
                .output()
                .unwrap()
        });
        eventually("starting, waiting for health", || {
            let p = d.plugin(name);
            p["state"] == "starting" && p["health"]["last_error"].is_string()
        });
        std::fs::write(state.join(name).join("HEALTHY"), "").unwrap();
        let out = start.join().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(d.plugin(name)["state"], "ready");
        assert_eq!(d.plugin(name)["health"]["state"], "healthy");
    }
    let (code, body) = http(http_port, "GET", "/").unwrap();
    assert_eq!((code, body.as_str()), (200, "ok"));
    // What the plugin was handed: its [listen] socket, and the private probe socket for
    // an HTTP check (none for a method check).
    let names = |n: &str| -> serde_json::Value {
        serde_json::from_slice(&d.ctl(&["call", n, "names_"]).stdout).unwrap()
    };
    assert_eq!(names("web"), serde_json::json!(["tcp", "plugd-health"]));
    assert_eq!(names("svc"), serde_json::json!(["tcp"]));

    // A TCP check passes once the socket accepts (the kernel queues the connection).
    assert_eq!(d.plugin("tcp")["state"], "ready");
    assert_eq!(d.plugin("tcp")["health"]["check"], "tcp connect every 0.2 s");
    // A plugin making its own inet socket is refused by the sandbox, and its log says
    // which manifest keys allow a server or outbound traffic.
    let out = d.ctl(&["call", "tcp", "bind_own", &free_port().to_string()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "PermissionError");
    eventually("the hint is logged", || {
        let logs = String::from_utf8(d.ctl(&["logs", "tcp", "-n", "50"]).stdout).unwrap();
        logs.contains("refuses inet sockets")
            && logs.contains("[listen]")
            && logs.contains("sandbox.network = \"host\"")
    });
}

#[test]
fn an_in_place_upgrade_hands_the_server_and_its_sockets_over() {
    let port = free_port();
    let d = start_client_manager(port, free_port());
    eventually("client_manager ready", || d.all_ready(&["client_manager"]));
    let pid = d.pid("client_manager");
    d.signal(nix::sys::signal::Signal::SIGUSR2);
    eventually("the next generation answers", || {
        let out = d.ctl(&["--json", "info"]);
        out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["generation"] == 1
    });
    assert_eq!(d.pid("client_manager"), pid, "the same process serves on");
    assert_eq!(body_json(port, "/api/clients")["version"], "1.0.0");
    // The new plugd holds the sockets: a hot update hands them on (no "address in use"),
    // and the new instance's health is checked through its own probe socket.
    let manifest = d.plugins().join("client-manager/plugin.json");
    let text = std::fs::read_to_string(&manifest).unwrap().replace("\"1.0.0\"", "\"1.2.0\"");
    std::fs::write(&manifest, text).unwrap();
    let st = d.json(&["update", "client_manager"]);
    assert_eq!(st[0]["version"], "1.2.0", "{st}");
    assert_eq!(body_json(port, "/api/clients")["version"], "1.2.0");
    assert_eq!(d.plugin("client_manager")["health"]["state"], "healthy");
    // A second upgrade after that (the instance it adopts was started in between): same
    // pid again, and a restart after it still gets the sockets the first plugd bound.
    let pid = d.pid("client_manager");
    d.signal(nix::sys::signal::Signal::SIGUSR2);
    eventually("the third generation answers", || {
        let out = d.ctl(&["--json", "info"]);
        out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["generation"] == 2
    });
    assert_eq!(d.pid("client_manager"), pid);
    assert_eq!(body_json(port, "/api/clients")["version"], "1.2.0");
    assert!(d.ctl(&["restart", "client_manager"]).status.success());
    eventually("restarted and healthy", || {
        let st = d.plugin("client_manager");
        st["state"] == "ready" && st["health"]["state"] == "healthy" && st["pid"] != pid
    });
    assert_eq!(body_json(port, "/api/clients")["version"], "1.2.0");
}

#[test]
fn a_hot_update_waits_for_the_new_versions_health_and_keeps_the_old_one_when_it_never_passes() {
    let port = free_port();
    let d = Plugd::start(|dir| async_server(dir, "web", "method = \"ping\"", port));
    let state = d.root.path().join("state/plugins/web");
    eventually("the state folder", || state.is_dir());
    std::fs::write(state.join("HEALTHY"), "").unwrap();
    let out = d.ctl(&["start", "web"]);
    assert!(out.status.success() || d.plugin("web")["state"] == "ready");
    eventually("web ready", || d.all_ready(&["web"]));
    let pid = d.pid("web");
    // Version 2 checks a method it does not have: it never becomes healthy, so the update
    // fails after its start_timeout and version 1 serves on, untouched.
    let manifest = d.plugins().join("web/plugin.toml");
    let text = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("version = \"1.0.0\"", "version = \"2.0.0\"")
        .replace("method = \"ping\"", "method = \"no_such_check\"");
    std::fs::write(&manifest, text).unwrap();
    let out = d.ctl(&["update", "web"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no_such_check") && err.contains("start_timeout"), "{err}");
    let st = d.plugin("web");
    assert_eq!((st["version"].as_str(), st["state"].as_str()), (Some("1.0.0"), Some("ready")));
    assert_eq!(d.pid("web"), pid, "the old instance was never stopped");
    let (code, body) = http(port, "GET", "/").unwrap();
    assert_eq!((code, body.as_str()), (200, "ok"));
}

/// A server that binds its own port (for `network = "host"`, no `[listen]`).
const OWN_PORT_SERVER: &str = r#"
import asyncio, os
from plugd_plugin import Plugin, serve

async def handle(reader, writer):
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    await writer.drain()
    writer.close()

class Own(Plugin):
    async def on_start(self):
        port = int(os.environ["PORT"])
        self.server = await asyncio.start_server(handle, "127.0.0.1", port)

serve(Own())
"#;

#[test]
fn a_unix_listen_socket_and_an_address_check_for_a_host_network_server() {
    let (unix_dir, own_port) = (tempfile::tempdir().unwrap(), free_port());
    let path = unix_dir.path().join("web.sock");
    let d = Plugd::start(|dir| {
        // [listen] unix: plugd binds the path and hands the socket over.
        let web = dir.join("unixweb");
        std::fs::create_dir_all(&web).unwrap();
        std::fs::write(web.join("main.py"), ASYNC_SERVER).unwrap();
        std::fs::write(
            web.join("plugin.toml"),
            format!(
                "name = \"unixweb\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"main.py\"\n\n[listen]\nunix = [{:?}]\n\n[health]\ntcp = true\ninterval = \"200ms\"\n",
                path.display().to_string()
            ),
        )
        .unwrap();
        // network = "host", no [listen]: the check connects to the address it names.
        let own = dir.join("hostweb");
        std::fs::create_dir_all(&own).unwrap();
        std::fs::write(own.join("main.py"), OWN_PORT_SERVER).unwrap();
        std::fs::write(
            own.join("plugin.toml"),
            format!(
                "name = \"hostweb\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"main.py\"\n\n[env]\nPORT = \"{own_port}\"\n\n[sandbox]\nnetwork = \"host\"\n\n[health]\nhttp = \"http://127.0.0.1:{own_port}/\"\ninterval = \"200ms\"\n"
            ),
        )
        .unwrap();
    });
    eventually("both ready", || d.all_ready(&["unixweb", "hostweb"]));
    assert_eq!(
        d.plugin("hostweb")["health"]["check"],
        format!("http GET http://127.0.0.1:{own_port}/ every 0.2 s")
    );
    // The unix socket plugd bound answers with the plugin's server behind it.
    let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    // (503: the plugin's own answer while its HEALTHY file is absent.)
    assert!(text.starts_with("HTTP/1.1 503 Service Unavailable"), "{text}");
    // Its own port, in the host's network.
    let (code, body) = http(own_port, "GET", "/").unwrap();
    assert_eq!((code, body.as_str()), (200, "ok"));
}

/// A plugin whose `ping` stops answering once a `WEDGED` file is in its state folder.
const WEDGING: &str = r#"
import asyncio, os
from plugd_plugin import Plugin, method, serve

STATE = os.environ["PLUGD_STATE_DIR"]

class Wedging(Plugin):
    @method()
    async def ping(self, _):
        if os.path.exists(os.path.join(STATE, "WEDGED")):
            await asyncio.sleep(3600)
        return "pong"

serve(Wedging())
"#;

#[test]
fn a_health_probe_that_times_out_counts_as_unhealthy_not_as_a_hang() {
    let d = Plugd::start(|dir| {
        let w = dir.join("wedging");
        std::fs::create_dir_all(&w).unwrap();
        std::fs::write(w.join("main.py"), WEDGING).unwrap();
        // The hang rule would fire after 2 missed deadlines; the health rule after 4 failed
        // checks. Probes are the health rule's.
        std::fs::write(
            w.join("plugin.toml"),
            "name = \"wedging\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"main.py\"\n\n[timeouts]\nmissed_deadlines = 2\n\n[health]\nmethod = \"ping\"\ninterval = \"200ms\"\ntimeout = \"300ms\"\nfailures = 4\n",
        )
        .unwrap();
    });
    eventually("ready", || d.all_ready(&["wedging"]));
    std::fs::write(d.root.path().join("state/plugins/wedging/WEDGED"), "").unwrap();
    eventually("restarted", || d.plugin("wedging")["restarts"].as_u64() >= Some(1));
    let why = d.plugin("wedging")["last_exit"].as_str().unwrap_or_default().to_string();
    assert!(why.starts_with("unhealthy: method ping failed 4 times in a row"), "{why}");
}
