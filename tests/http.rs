//! End to end: the HTTP admin API of a real plugd, with real requests over TCP.

mod kit;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

use kit::daemon::*;
use serde_json::Value;

const TOKEN: &str = "test-token-0123456789abcdef";

/// One HTTP/1.1 request; returns the status code and the body.
fn http(port: u16, method: &str, path: &str, token: Option<&str>, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{auth}\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    // A server may answer (413) before reading a large body; a failed write is fine then.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    if let Err(e) = s.read_to_end(&mut raw) {
        eprintln!("read error: {e}");
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status: u16 = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (headers, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if headers.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut out = String::new();
        let mut rest = rest;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        rest.to_string()
    };
    (status, body)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start_with_http(extra: &str) -> (Plugd, u16) {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("plugins")).unwrap();
    add_plugin(&root.path().join("plugins"), "echo", "echo", "");
    add_plugin(&root.path().join("plugins"), "crasher", "crasher", "");
    std::fs::write(root.path().join("token"), format!("{TOKEN}\n")).unwrap();
    let port = free_port();
    std::fs::write(
        root.path().join("extra.toml"),
        format!("[http]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"token\"\n{extra}"),
    )
    .unwrap();
    let d = Plugd::start_with(root, &[]);
    eventually("ready", || d.all_ready(&["echo", "crasher"]));
    (d, port)
}

#[test]
fn every_endpoint_answers_and_mutations_need_the_token() {
    let (d, port) = start_with_http("max_body = \"64KiB\"\n");

    let (code, body) = http(port, "GET", "/v1/plugins", Some(TOKEN), b"");
    assert_eq!(code, 200, "{body}");
    let list: Value = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> =
        list.as_array().unwrap().iter().filter_map(|p| p["name"].as_str()).collect();
    assert!(names.contains(&"echo") && names.contains(&"crasher"), "{names:?}");
    let (code, body) = http(port, "GET", "/v1/plugins/echo", Some(TOKEN), b"");
    assert_eq!(code, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["state"], "ready");
    let (code, body) = http(port, "GET", "/v1/plugins/nope", Some(TOKEN), b"");
    assert_eq!(code, 404, "{body}");
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["kind"], "not_found", "{body}");
    assert!(error["error"].as_str().unwrap().contains("no plugin named nope"), "{body}");

    // MCP is off without [mcp], and says how to turn it on.
    let (code, body) = http(
        port,
        "POST",
        "/mcp",
        Some(TOKEN),
        br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
    );
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("[mcp] expose"), "{body}");

    // Calls: JSON in, JSON out; only with the token.
    let (code, body) = http(port, "POST", "/v1/plugins/echo/call/echo", None, br#"{"hi":1}"#);
    assert_eq!(code, 401, "{body}");
    let (code, _) =
        http(port, "POST", "/v1/plugins/echo/call/echo", Some("wrong-token-wrong-token"), b"1");
    assert_eq!(code, 401);
    for i in 0..5 {
        let (code, body) = http(
            port,
            "POST",
            "/v1/plugins/echo/call/echo",
            Some(TOKEN),
            format!("{{\"n\":{i}}}").as_bytes(),
        );
        assert_eq!((code, body), (200, format!("{{\"n\":{i}}}")));
    }
    let (code, body) = http(port, "POST", "/v1/plugins/echo/call/echo", Some(TOKEN), b"{\"hi\":");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not valid JSON"), "{body}");
    let (code, body) = http(port, "POST", "/v1/plugins/echo/call/nosuch", Some(TOKEN), b"null");
    assert_eq!(code, 502, "the plugin said no: {body}");
    assert!(body.contains("unknown method") && body.contains(r#""kind":"plugin""#), "{body}");
    let big = vec![b' '; 100 * 1024];
    let (code, _) = http(port, "POST", "/v1/plugins/echo/call/echo", Some(TOKEN), &big);
    assert_eq!(code, 413);

    // Lifecycle actions, as plugctl would do them.
    let (code, body) = http(port, "POST", "/v1/plugins/crasher/stop", Some(TOKEN), b"");
    assert_eq!(code, 200, "{body}");
    assert_eq!(d.plugin("crasher")["state"], "stopped");
    let (_, body) = http(port, "GET", "/v1/plugins/crasher", Some(TOKEN), b"");
    let st: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(st["exits"]["stopped"], 1, "{st}");
    let (code, body) = http(port, "POST", "/v1/plugins/crasher/call/ping", Some(TOKEN), b"null");
    assert_eq!(code, 409, "{body}");
    for action in ["start", "restart", "disable", "enable"] {
        let (code, body) =
            http(port, "POST", &format!("/v1/plugins/crasher/{action}"), Some(TOKEN), b"");
        assert_eq!(code, 200, "{action}: {body}");
    }
    eventually("crasher back", || d.all_ready(&["crasher"]));
    let (code, _) = http(port, "POST", "/v1/plugins/crasher/explode", Some(TOKEN), b"");
    assert_eq!(code, 404);
    let (code, body) = http(port, "GET", "/v1/plugins/echo/logs?n=5", Some(TOKEN), b"");
    assert_eq!(code, 200, "{body}");
    assert!(serde_json::from_str::<Value>(&body)
        .unwrap()
        .as_array()
        .is_some_and(|l| !l.is_empty()));
    let (code, body) = http(port, "GET", "/v1/plugins/echo/versions", Some(TOKEN), b"");
    assert_eq!(code, 404, "echo comes from a folder, not an install: {body}");
    let (code, _) = http(port, "POST", "/v1/reload", None, b"");
    assert_eq!(code, 401);
    let (code, body) = http(port, "POST", "/v1/reload", Some(TOKEN), b"");
    assert_eq!(code, 200, "{body}");

    // Metrics: Prometheus text with this plugin's counters after the calls above.
    let (code, text) = http(port, "GET", "/metrics", Some(TOKEN), b"");
    assert_eq!(code, 200);
    let sample = |line_start: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
    };
    assert!(sample("plugd_plugin_calls_total{plugin=\"echo\",result=\"ok\"}") >= 5.0);
    assert!(sample("plugd_plugin_calls_total{plugin=\"echo\",result=\"error\"}") >= 1.0);
    assert_eq!(sample("plugd_plugin_state{plugin=\"echo\",state=\"ready\"}"), 1.0);
    assert!(sample("plugd_plugin_resident_memory_bytes{plugin=\"echo\"}") > 0.0);
    assert!(
        text.contains("plugd_plugin_sandbox_layer{plugin=\"echo\",layer=\"netns\"} 1"),
        "{text}"
    );
    assert!(sample("plugd_plugin_restarts_total{plugin=\"crasher\"}") >= 0.0);
    assert!(sample("plugd_plugin_call_duration_seconds_count{plugin=\"echo\"}") >= 6.0);
}

#[test]
fn a_thousand_concurrent_http_calls_are_all_answered() {
    let (d, port) = start_with_http("");
    let rss_kib = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
            .unwrap_or(0)
    };
    let before = rss_kib(d.child.id());
    // All connected and sent at once, behind a barrier.
    let gate = std::sync::Arc::new(std::sync::Barrier::new(1000));
    let threads: Vec<_> = (0..1000u32)
        .map(|i| {
            let gate = gate.clone();
            std::thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || {
                    gate.wait();
                    let arg = serde_json::json!({ "i": i });
                    let (code, body) = http(
                        port,
                        "POST",
                        "/v1/plugins/echo/call/echo",
                        Some(TOKEN),
                        arg.to_string().as_bytes(),
                    );
                    assert_eq!(code, 200, "{body}");
                    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), arg);
                })
                .unwrap()
        })
        .collect();
    let failed = threads.into_iter().filter_map(|t| t.join().err()).count();
    assert_eq!(failed, 0, "{failed} of 1000 concurrent calls failed");
    let (_, text) = http(port, "GET", "/metrics", Some(TOKEN), b"");
    assert!(
        text.contains("plugd_plugin_calls_total{plugin=\"echo\",result=\"ok\"} 1000"),
        "{text}"
    );
    let after = rss_kib(d.child.id());
    assert!(after < before + 64 * 1024, "daemon RSS grew from {before} KiB to {after} KiB");
}

#[test]
fn a_public_listen_without_a_token_is_refused_at_start() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("plugins")).unwrap();
    std::fs::write(
        root.path().join("plugd.toml"),
        "socket = \"run/plugd.sock\"\nplugin_dirs = [\"plugins\"]\nstate_dir = \"state\"\n[http]\nlisten = \"0.0.0.0:0\"\n",
    )
    .unwrap();
    let out = Command::new(plugd_bin("plugd"))
        .arg("--config")
        .arg(root.path().join("plugd.toml"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a loopback address") && err.contains("token_file"), "{err}");
}

#[test]
fn plugctl_top_shows_what_each_plugin_costs() {
    let (d, port) = start_with_http("");
    // Calls during the measured interval, so calls/s is not zero.
    let caller = std::thread::spawn(move || {
        for _ in 0..200 {
            let (code, _) = http(port, "POST", "/v1/plugins/echo/call/echo", Some(TOKEN), b"1");
            assert_eq!(code, 200);
        }
    });
    let out = d.ctl(&["--json", "top", "--once", "--interval", "0.5"]);
    caller.join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    let echo = rows.as_array().unwrap().iter().find(|r| r["name"] == "echo").unwrap().clone();
    assert_eq!(echo["state"], "ready");
    assert!(echo["rss_bytes"].as_u64().unwrap() > 0, "{echo}");
    assert!(echo["cpu_percent"].as_f64().is_some(), "{echo}");
    assert!(echo["calls_per_s"].as_f64().unwrap() > 0.0, "{echo}");
    assert!(echo["p99_us"].as_u64().is_some(), "{echo}");
    // The human table too.
    let out = d.ctl(&["top", "--once", "--interval", "0.2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("PLUGIN") && text.contains("echo") && text.contains("crasher"),
        "{text}"
    );
}

const STREAMER: &str = r#"
import os
import time

from plugd_plugin import Plugin, method, serve


class Streamer(Plugin):
    @method()
    def two_pieces(self, _):
        yield "first"
        # The second piece waits for the test to have seen the first: proof that pieces
        # travel as they are made, not all at the end.
        go = os.path.join(os.environ["PLUGD_STATE_DIR"], "go")
        for _ in range(2000):
            if os.path.exists(go):
                break
            time.sleep(0.01)
        yield "second"
        return "done"


serve(Streamer())
"#;

/// Reads an SSE response line by line, calling `on_event(event, data)` for each event.
fn read_sse(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
    mut on_event: impl FnMut(&str, &str) -> bool,
) {
    use std::io::BufRead;
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n{auth}\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut event = String::new();
    for line in std::io::BufReader::new(s).lines() {
        let line = line.unwrap();
        if let Some(e) = line.strip_prefix("event: ") {
            event = e.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            if !on_event(&event, d) {
                return;
            }
        }
    }
}

#[test]
fn streamed_calls_arrive_piece_by_piece_and_logs_can_be_followed() {
    let (d, port) = start_with_http("");
    let dir = d.plugins().join("streamer");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("plugin.toml"),
        "name = \"streamer\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"main.py\"\n[timeouts]\ncall = \"30s\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("main.py"), STREAMER).unwrap();
    assert!(d.ctl(&["reload"]).status.success());
    eventually("streamer ready", || d.all_ready(&["streamer"]));

    let go = d.root.path().join("state/plugins/streamer/go");
    let mut seen = Vec::new();
    read_sse(
        port,
        "POST",
        "/v1/plugins/streamer/call/two_pieces?stream=true",
        Some(TOKEN),
        b"null",
        |e, data| {
            seen.push((e.to_string(), data.to_string()));
            if e == "chunk" && data == "\"first\"" {
                std::fs::write(&go, "").unwrap();
            }
            e == "chunk"
        },
    );
    let want: Vec<(String, String)> =
        [("chunk", "\"first\""), ("chunk", "\"second\""), ("reply", "\"done\"")]
            .iter()
            .map(|(e, d)| (e.to_string(), d.to_string()))
            .collect();
    assert_eq!(seen, want);

    // Following the log: the lines already there arrive as `log` events.
    let mut lines = Vec::new();
    read_sse(port, "GET", "/v1/plugins/echo/logs?follow=true&n=50", Some(TOKEN), b"", |e, data| {
        assert_eq!(e, "log");
        lines.push(serde_json::from_str::<Value>(data).unwrap());
        !lines.iter().any(|l| l["text"].as_str().is_some_and(|t| t.contains("ready")))
    });
    assert!(!lines.is_empty());
    // And a line written later arrives as it is written (a subscription, not a re-read).
    let follower = std::thread::spawn(move || {
        let mut got = false;
        read_sse(port, "GET", "/v1/plugins/echo/logs?follow=true&n=1", Some(TOKEN), b"", |e, d| {
            got = e == "log" && d.contains("written later");
            !got
        });
        got
    });
    eventually("the line arrives live", || {
        http(port, "POST", "/v1/plugins/echo/call/log", Some(TOKEN), b"\"written later\"");
        follower.is_finished()
    });
    assert!(follower.join().unwrap());
}

/// A plugin folder running the echo binary, with extra manifest text.
fn echo_folder(parent: &std::path::Path, name: &str, extra: &str) -> std::path::PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("plugin.toml"),
        format!(
            "name = \"{name}\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"{}\"\n{extra}",
            bin_dir().join("echo").display()
        ),
    )
    .unwrap();
    dir
}

/// Polls a job until it ends; returns its record.
fn wait_job(port: u16, id: u64) -> Value {
    let mut job = Value::Null;
    eventually(&format!("job {id} ends"), || {
        let (code, body) = http(port, "GET", &format!("/v1/jobs/{id}"), Some(TOKEN), b"");
        assert_eq!(code, 200, "{body}");
        job = serde_json::from_str(&body).unwrap();
        ["succeeded", "failed", "cancelled"].contains(&job["state"].as_str().unwrap_or(""))
    });
    job
}

fn start_job(port: u16, source: &std::path::Path, git: bool) -> u64 {
    let src =
        if git { format!("git+file://{}", source.display()) } else { source.display().to_string() };
    let body = serde_json::json!({ "source": src }).to_string();
    let (code, body) = http(port, "POST", "/v1/install", Some(TOKEN), body.as_bytes());
    assert_eq!(code, 202, "{body}");
    serde_json::from_str::<Value>(&body).unwrap()["job_id"].as_u64().unwrap()
}

#[test]
fn install_jobs_run_in_the_background_and_can_be_cancelled_and_retried() {
    let (d, port) = start_with_http("");
    let src = tempfile::tempdir().unwrap();
    let installed = d.root.path().join("state/installed");

    // A local git repository, installed through a job while we poll it.
    let repo = echo_folder(src.path(), "from-git", "");
    let git = |args: &[&str]| {
        let st = Command::new("git")
            .args(["-c", "user.email=t@t", "-c", "user.name=t", "-c", "init.defaultBranch=main"])
            .args(args)
            .current_dir(&repo)
            .output()
            .unwrap();
        assert!(st.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&st.stderr));
    };
    git(&["init", "-q"]);
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "plugin"]);
    let id = start_job(port, &repo, true);
    let job = wait_job(port, id);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(job["output"].to_string().contains("git clone"), "{job}");
    eventually("from-git ready", || d.all_ready(&["from-git"]));
    assert_eq!(http(port, "POST", "/v1/plugins/from-git/call/echo", Some(TOKEN), b"7").1, "7");

    // A build step that would take a minute is cancelled: its process group dies and
    // nothing is installed.
    let slow = echo_folder(
        src.path(),
        "slow-build",
        "[build]\ncommand = [\"sh\", \"-c\", \"sleep 61.7\"]\n",
    );
    let id = start_job(port, &slow, false);
    eventually("job running", || {
        let (_, body) = http(port, "GET", &format!("/v1/jobs/{id}"), Some(TOKEN), b"");
        body.contains("\"running\"") && sleeping("61.7")
    });
    let (code, body) = http(port, "POST", &format!("/v1/jobs/{id}/cancel"), Some(TOKEN), b"");
    assert_eq!(code, 200, "{body}");
    let job = wait_job(port, id);
    assert_eq!(job["state"], "cancelled", "{job}");
    eventually("the build's sleep is gone", || !sleeping("61.7"));
    let left: Vec<String> = std::fs::read_dir(installed.join("slow-build"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "nothing half-installed: {left:?}");
    let (code, _) = http(port, "POST", &format!("/v1/jobs/{id}/cancel"), Some(TOKEN), b"");
    assert_eq!(code, 409, "an ended job cannot be cancelled");

    // A failing build, fixed in the source, then retried as a new job.
    let flaky = echo_folder(
        src.path(),
        "flaky",
        "[build]\ncommand = [\"sh\", \"-c\", \"test -f ok || { echo missing ok >&2; exit 1; }\"]\n",
    );
    let id = start_job(port, &flaky, false);
    let job = wait_job(port, id);
    assert_eq!(job["state"], "failed", "{job}");
    assert!(job["error"].as_str().unwrap().contains("missing ok"), "{job}");
    assert_eq!(job["error_kind"], "failed", "the kind of failure, typed: {job}");
    std::fs::write(flaky.join("ok"), "").unwrap();
    let (code, body) = http(port, "POST", &format!("/v1/jobs/{id}/retry"), Some(TOKEN), b"");
    assert_eq!(code, 202, "{body}");
    let retry = serde_json::from_str::<Value>(&body).unwrap()["job_id"].as_u64().unwrap();
    let job = wait_job(port, retry);
    assert_eq!((job["state"].as_str(), job["retry_of"].as_u64()), (Some("succeeded"), Some(id)));
    eventually("flaky ready", || d.all_ready(&["flaky"]));

    // Every job is listed and counted; a bad body is a 400.
    let (_, body) = http(port, "GET", "/v1/jobs", Some(TOKEN), b"");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap().as_array().unwrap().len(), 4);
    let (_, text) = http(port, "GET", "/metrics", Some(TOKEN), b"");
    assert!(text.contains("plugd_jobs{state=\"succeeded\"} 2"), "{text}");
    assert!(text.contains("plugd_jobs{state=\"cancelled\"} 1"), "{text}");
    let (code, body) = http(port, "POST", "/v1/install", Some(TOKEN), b"{\"src\":1}");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("source"), "{body}");

    // plugctl install goes through a job too and shows its progress (plain lines off a TTY).
    let built = echo_folder(
        src.path(),
        "built",
        "[build]\ncommand = [\"sh\", \"-c\", \"echo compiling\"]\n",
    );
    let out = d.ctl(&["install", built.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("install job 5: running") || err.contains("install job 5: queued"),
        "{err}"
    );
    assert!(err.contains("  compiling") && err.contains("install job 5: succeeded"), "{err}");

    // plugctl sees the same jobs.
    let out = String::from_utf8_lossy(&d.ctl(&["jobs"]).stdout).into_owned();
    assert!(out.contains("cancelled") && out.contains("git+file://"), "{out}");
    let out = String::from_utf8_lossy(&d.ctl(&["jobs", "1"]).stdout).into_owned();
    assert!(out.starts_with("job 1 succeeded") && out.contains("$ git clone"), "{out}");

    // A restart keeps the records.
    let _d = d.restart();
    let (code, body) = http(port, "GET", "/v1/jobs", Some(TOKEN), b"");
    assert_eq!(code, 200, "{body}");
    let kept = serde_json::from_str::<Value>(&body).unwrap();
    let states: Vec<&str> =
        kept.as_array().unwrap().iter().filter_map(|j| j["state"].as_str()).collect();
    assert_eq!(states, ["succeeded", "cancelled", "failed", "succeeded", "succeeded"]);

    // Updates and uninstalls run as jobs too.
    let d = _d;
    eventually("back after the restart", || d.all_ready(&["from-git", "flaky", "built"]));
    let (code, body) = http(port, "POST", "/v1/plugins/nope/update", Some(TOKEN), b"");
    assert_eq!(code, 404, "{body}");
    let (code, body) =
        http(port, "POST", "/v1/plugins/flaky/update", Some(TOKEN), b"{\"version\": 7}");
    assert_eq!(code, 400, "{body}");
    let pid = d.pid("flaky");
    // A dry run answers the plan at once and changes nothing.
    let (code, body) = http(
        port,
        "POST",
        "/v1/plugins/flaky/update?dry_run=true",
        Some(TOKEN),
        b"{\"version\": \"1.0.0\"}",
    );
    assert_eq!(code, 200, "{body}");
    let plan: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (plan["name"].as_str(), plan["to"].as_str()),
        (Some("flaky"), Some("1.0.0")),
        "{plan}"
    );
    assert_eq!(d.pid("flaky"), pid, "a dry run changes nothing");
    let (code, body) =
        http(port, "POST", "/v1/plugins/flaky/update", Some(TOKEN), b"{\"version\": \"1.0.0\"}");
    assert_eq!(code, 202, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["job_id"].as_u64().unwrap();
    let job = wait_job(port, id);
    assert_eq!(
        (job["state"].as_str(), job["work"]["kind"].as_str()),
        (Some("succeeded"), Some("update")),
        "{job}"
    );
    // The job's output starts with the plan it applied.
    let first = job["output"][0].as_str().unwrap_or_default();
    assert!(first.starts_with("flaky ") && first.ends_with("-> 1.0.0"), "{job}");
    assert_ne!(d.pid("flaky"), pid, "hot-swapped to a new instance");
    let (code, body) =
        http(port, "POST", "/v1/plugins/flaky/uninstall", Some(TOKEN), b"{\"purge\": true}");
    assert_eq!(code, 202, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["job_id"].as_u64().unwrap();
    assert_eq!(wait_job(port, id)["state"], "succeeded");
    assert!(!d.root.path().join("state/installed/flaky").exists());
    assert!(d.status().iter().all(|p| p["name"] != "flaky"));
}

/// True if a `sleep ARG` process is running.
fn sleeping(arg: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .map(|c| c == format!("sleep\0{arg}\0").as_bytes())
            .unwrap_or(false)
    })
}

/// A client that uploads failing archives in a loop cannot grow plugd's state without
/// bound: past the limit the oldest ended jobs are forgotten, and with them the uploads
/// they kept for a retry.
#[test]
fn failed_uploads_and_old_jobs_are_forgotten_past_the_limit() {
    let (d, port) = start_with_http("");
    let keep = plugd_install::jobs::KEEP_ENDED;
    // The gzip magic, then nothing an archive has: each install fails at once.
    let junk = [0x1f, 0x8b, 8, 0, 1, 2, 3, 4];
    let upload = || {
        let (code, body) = http(port, "POST", "/v1/install", Some(TOKEN), &junk);
        assert_eq!(code, 202, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()["job_id"].as_u64().unwrap()
    };
    let listed = || -> Vec<Value> {
        let (code, body) = http(port, "GET", "/v1/jobs", Some(TOKEN), b"");
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v.as_array().cloned().unwrap_or_else(|| v["jobs"].as_array().cloned().unwrap_or_default())
    };
    for _ in 0..keep + 5 {
        upload();
    }
    eventually("every job ended", || {
        listed().iter().all(|j| j["state"] != "queued" && j["state"] != "running")
    });
    // The next job finds them all ended: it keeps the newest `keep` of them.
    let last = upload();
    assert_eq!(wait_job(port, last)["state"], "failed");
    let jobs = listed();
    assert_eq!(jobs.len(), keep + 1, "{} jobs kept", jobs.len());
    let (code, _) = http(port, "GET", "/v1/jobs/1", Some(TOKEN), b"");
    assert_eq!(code, 404, "the oldest job is forgotten");
    // Each kept job still has its upload (for a retry); the forgotten ones' are gone.
    let uploads = std::fs::read_dir(d.root.path().join("state/uploads")).unwrap().count();
    assert_eq!(uploads, keep + 1);
}

#[test]
fn validate_checks_a_folder_or_an_uploaded_archive_without_installing() {
    let (d, port) = start_with_http("");
    let src = tempfile::tempdir().unwrap();
    let good = echo_folder(src.path(), "good", "");
    let body = serde_json::json!({ "path": good }).to_string();
    let (code, _) = http(port, "POST", "/v1/validate", None, body.as_bytes());
    assert_eq!(code, 401, "it reads server paths: token required");
    let (code, text) = http(port, "POST", "/v1/validate", Some(TOKEN), body.as_bytes());
    assert_eq!(code, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!((v["valid"].as_bool(), v["name"].as_str()), (Some(true), Some("good")));

    let bad = src.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(
        bad.join("plugin.toml"),
        "name = \"bad\"\nversion = \"one\"\napi_version = \"^1\"\nentrypoint = \"x\"\n",
    )
    .unwrap();
    let body = serde_json::json!({ "path": bad }).to_string();
    let (code, text) = http(port, "POST", "/v1/validate", Some(TOKEN), body.as_bytes());
    assert_eq!(code, 422, "{text}");
    assert!(text.contains("`version`"), "{text}");

    // The same folder as an uploaded .tar.gz.
    let archive = src.path().join("good.tar.gz");
    let st = Command::new("tar")
        .arg("czf")
        .arg(&archive)
        .arg("-C")
        .arg(src.path())
        .arg("good")
        .status()
        .unwrap();
    assert!(st.success());
    let bytes = std::fs::read(&archive).unwrap();
    let (code, text) = http(port, "POST", "/v1/validate", Some(TOKEN), &bytes);
    assert_eq!(code, 200, "{text}");
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["name"], "good");
    assert!(!d.root.path().join("state/installed/good").exists(), "validating installs nothing");
}

#[test]
fn a_job_cut_short_by_a_crash_of_plugd_is_failed_not_running_and_leaves_nothing() {
    let (d, port) = start_with_http("");
    let src = tempfile::tempdir().unwrap();
    let slow = echo_folder(
        src.path(),
        "cut-short",
        "[build]\ncommand = [\"sh\", \"-c\", \"sleep 62.3\"]\n",
    );
    let id = start_job(port, &slow, false);
    eventually("the build is running", || sleeping("62.3"));
    let mut d = d;
    d.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = d.child.wait();
    let d = d.restart_after_kill();
    // The orphaned build step is not ours to wait for; kill it so the test leaves nothing.
    let _ = Command::new("pkill").args(["-f", "sleep 62.3"]).status();
    let (code, body) = http(port, "GET", &format!("/v1/jobs/{id}"), Some(TOKEN), b"");
    assert_eq!(code, 200, "{body}");
    let job: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (job["state"].as_str(), job["error"].as_str()),
        (Some("failed"), Some("interrupted by restart"))
    );
    let left: Vec<String> = std::fs::read_dir(d.root.path().join("state/installed"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten().flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "the half-made copy was cleared at start: {left:?}");
    let (code, _) = http(port, "POST", &format!("/v1/jobs/{id}/cancel"), Some(TOKEN), b"");
    assert_eq!(code, 409, "it has ended");
}

#[test]
fn no_http_call_fails_across_in_place_upgrades() {
    let (d, port) = start_with_http("");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let caller = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (code, body) = http(
                    port,
                    "POST",
                    "/v1/plugins/echo/call/echo",
                    Some(TOKEN),
                    i.to_string().as_bytes(),
                );
                if code == 200 && body.trim() == i.to_string() {
                    ok += 1;
                } else {
                    failed.push(format!("call {i}: {code} {body}"));
                }
                i += 1;
            }
            (ok, failed)
        })
    };
    let generation = || {
        let (code, _) = http(port, "GET", "/v1/plugins", Some(TOKEN), b"");
        (code == 200).then(|| d.json(&["info"])["generation"].as_u64()).flatten()
    };
    // Calls answered by the current generation (its counters start at 0 after an upgrade).
    let answered = || d.plugin("echo")["calls_ok"].as_u64().unwrap_or(0);
    for next in 1..=2u64 {
        let before = answered();
        eventually("calls are being made", || answered() >= before + 5);
        d.signal(nix::sys::signal::Signal::SIGUSR2);
        eventually("the next generation answers", || generation() == Some(next));
    }
    eventually("calls go on after the last upgrade", || answered() >= 5);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = caller.join().unwrap();
    assert!(failed.is_empty(), "HTTP calls failed across the upgrades: {failed:?}");
    assert!(ok > 5, "too few calls across the upgrades: {ok}");
}

#[test]
fn a_plugin_name_in_a_path_cannot_reach_other_folders() {
    let (_d, port) = start_with_http("");
    for path in ["/v1/plugins/..%2F..%2Fetc/versions", "/v1/plugins/..%2F..%2Fx/logs"] {
        let (code, body) = http(port, "GET", path, Some(TOKEN), b"");
        assert_eq!(code, 400, "{path}: {body}");
        assert!(body.contains("is not a valid plugin name"), "{path}: {body}");
    }
    let (code, body) = http(port, "POST", "/v1/plugins/..%2F..%2Fx/uninstall", Some(TOKEN), b"{}");
    assert_eq!(code, 400, "{body}");
}

#[test]
fn an_install_body_with_unknown_fields_is_refused() {
    let (_d, port) = start_with_http("");
    let (code, body) =
        http(port, "POST", "/v1/install", Some(TOKEN), br#"{"source": "/nowhere", "forse": true}"#);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("unknown field `forse`"), "{body}");
}

#[test]
fn hostile_http_clients_are_cut_off_and_reads_need_the_token() {
    let (_d, port) = start_with_http("max_body = \"64KiB\"\n");
    // Reads need the token.
    let (code, body) = http(port, "GET", "/v1/plugins", None, b"");
    assert_eq!(code, 401, "{body}");
    let (code, _) = http(port, "GET", "/metrics", None, b"");
    assert_eq!(code, 401);
    // The token is checked before the body is read: a big body without it is a 401.
    let (code, body) = http(port, "POST", "/v1/install", None, &vec![b'x'; 2 << 20]);
    assert_eq!(code, 401, "{body}");

    let raw = |request: &'static str| {
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
            s.write_all(request.as_bytes()).unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        })
    };
    // Headers that never end are cut off; a body that never completes gets a 408.
    let slow_headers = raw("GET /v1/plugins HTTP/1.1\r\nHost: x\r\nX-Slow: ");
    let auth: &'static str = Box::leak(
        format!(
            "POST /v1/plugins/echo/call/echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100\r\n\r\n{{\"a\":"
        )
        .into_boxed_str(),
    );
    let slow_body = raw(auth);
    let cut = slow_headers.join().unwrap();
    assert!(!cut.contains(" 200 "), "headers that never end got an answer: {cut}");
    let timed_out = slow_body.join().unwrap();
    assert!(timed_out.starts_with("HTTP/1.1 408"), "{timed_out}");
    assert!(timed_out.contains("did not arrive within 10 s"), "{timed_out}");
}

#[test]
fn public_reads_open_gets_only() {
    let (_d, port) = start_with_http("public_reads = true\n");
    let (code, _) = http(port, "GET", "/v1/plugins", None, b"");
    assert_eq!(code, 200);
    let (code, _) = http(port, "POST", "/v1/plugins/echo/call/echo", None, b"1");
    assert_eq!(code, 401);
}
