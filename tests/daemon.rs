//! End to end: the plugd daemon and plugctl, with real processes and real signals.
//!
//! These are the supervisor package's integration tests (so CARGO_BIN_EXE_plugd and
//! _plugctl exist); the example plugins are found next to them, built by the same
//! `cargo test --workspace`.

mod kit;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use kit::daemon::*;

#[test]
fn plugctl_drives_a_running_daemon() {
    let d = Plugd::start(|dir| {
        add_plugin(dir, "echo", "echo", "");
        add_plugin(dir, "tick-strategy", "tick-strategy", "");
        add_plugin(dir, "crasher", "crasher", "");
    });
    eventually("all ready", || d.all_ready(&["echo", "tick-strategy", "crasher"]));
    let st = d.status();
    for p in &st {
        for key in ["name", "version", "kind", "state", "pid", "restarts", "last_exit"] {
            assert!(p.get(key).is_some(), "status --json lacks {key}: {p}");
        }
    }
    let table = String::from_utf8(d.ctl(&["status"]).stdout).unwrap();
    assert!(
        table.starts_with("NAME") && table.contains("tick-strategy") && table.contains("ready"),
        "{table}"
    );

    // call: JSON in, JSON out; errors exit 1 with the reason.
    let out = d.ctl(&["call", "echo", "echo", r#"{"x":[1,2]}"#]);
    assert!(out.status.success());
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        serde_json::json!({"x":[1,2]})
    );
    let out = d.ctl(&["call", "echo", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown method"));
    // A Rust plugin's described method (schemars): shown with its schemas, checked by plugd.
    let shown = d.json(&["show", "echo"]);
    let methods = shown[0]["methods"].as_array().cloned().unwrap_or_default();
    let add = methods.iter().find(|m| m["name"] == "add").unwrap_or_else(|| panic!("{shown}"));
    assert_eq!(add["description"], "Adds two numbers.");
    assert_eq!(add["input"]["type"], "object", "{add}");
    assert_eq!(add["input"]["properties"]["a"]["type"], "number", "{add}");
    assert_eq!(add["input"]["required"], serde_json::json!(["a", "b"]), "{add}");
    assert_eq!(add["output"]["type"], "number", "{add}");
    let echo = methods.iter().find(|m| m["name"] == "echo").unwrap();
    assert_eq!(echo["description"], "Answers with its argument, unchanged.");
    let out = d.ctl(&["call", "echo", "add", r#"{"a":1,"b":2.5}"#]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3.5", "{out:?}");
    let out = d.ctl(&["call", "echo", "add", r#"{"a":1,"b":"x"}"#]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the input of add does not match its schema: $.b: expected number"),
        "{err}"
    );
    // A per-call cfg reaches a Rust plugin's handler (`ctx.cfg`); without one it gets None.
    let out = d.ctl(&["call", "echo", "cfg_len", r#""api_key""#, "--cfg", r#"{"api_key":"abcd"}"#]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "4", "{out:?}");
    let out = d.ctl(&["call", "echo", "cfg_len", r#""api_key""#]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "null", "{out:?}");
    let out = d.ctl(&["call", "ghost", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no plugin named ghost"));
    let out = d.ctl(&["call", "echo", "echo", "{not json"]);
    assert_eq!(out.status.code(), Some(1));
    let out = d.ctl(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");

    // stop / start / restart.
    let pid = d.pid("echo");
    assert!(d.ctl(&["stop", "echo"]).status.success());
    assert_eq!(d.plugin("echo")["state"], "stopped");
    assert!(!alive(pid));
    assert!(d.ctl(&["start", "echo"]).status.success());
    let pid2 = d.pid("echo");
    assert!(pid2 != 0 && pid2 != pid);
    assert!(d.ctl(&["restart", "echo"]).status.success());
    assert_ne!(d.pid("echo"), pid2);

    // logs.
    let logs = String::from_utf8(d.ctl(&["logs", "echo", "-n", "5"]).stdout).unwrap();
    assert!(logs.contains("ready (pid"), "{logs}");
    // Times as a person reads them: local time by default, UTC on request, raw in --json.
    let utc = String::from_utf8(d.ctl(&["logs", "echo", "-n", "1", "--utc"]).stdout).unwrap();
    let stamp = utc.split(' ').take(2).collect::<Vec<_>>().join(" ");
    assert_eq!(stamp.len(), "2026-12-02 07:08:04.123".len(), "{utc}");
    assert!(
        stamp.starts_with("20") && stamp.as_bytes()[10] == b' ' && stamp.contains(':'),
        "{utc}"
    );
    let raw = d.json(&["logs", "echo", "-n", "1"]);
    assert!(raw["ts_ms"].as_u64().is_some() || raw.to_string().contains("ts_ms"), "{raw}");

    // reload names a broken folder and exits 1.
    let broken = d.plugins().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("plugin.toml"), "name = \"broken\"\n").unwrap();
    let out = d.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("broken"));
    std::fs::remove_dir_all(&broken).unwrap();
    assert!(d.ctl(&["reload"]).status.success());

    // disable survives a daemon restart.
    let crasher = d.pid("crasher");
    assert!(d.ctl(&["disable", "crasher"]).status.success());
    assert!(!alive(crasher));
    let d = d.restart();
    eventually("ready again", || d.all_ready(&["echo", "tick-strategy"]));
    assert_eq!(d.plugin("crasher")["state"], "disabled");
    assert_eq!(d.plugin("crasher")["enabled"], false);
    assert!(d.ctl(&["enable", "crasher"]).status.success());
    assert_eq!(d.plugin("crasher")["state"], "ready");

    // SIGTERM: everything stops, exit 0.
    let pids: Vec<u64> = d.status().iter().filter_map(|p| p["pid"].as_u64()).collect();
    assert_eq!(pids.len(), 3);
    let mut d = d;
    d.signal(Signal::SIGTERM);
    let status = d.child.wait().unwrap();
    assert!(status.success(), "{status}");
    for pid in pids {
        assert!(!alive(pid), "plugin {pid} outlived plugd");
    }
    assert!(!d.socket.exists(), "the control socket is removed on exit");
}

#[test]
fn sighup_applies_only_the_difference() {
    let d = Plugd::start(|dir| {
        add_plugin(dir, "echo", "echo", "");
        add_plugin(dir, "tick-strategy", "tick-strategy", "");
        add_plugin(dir, "slow", "slow", "");
    });
    eventually("all ready", || d.all_ready(&["echo", "tick-strategy", "slow"]));
    let (echo, strat) = (d.pid("echo"), d.pid("tick-strategy"));
    // Change echo's manifest, remove slow, add crasher.
    let manifest = d.plugins().join("echo/plugin.toml");
    let text = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("greeting = \"hello\"", "greeting = \"bonjour\"");
    std::fs::write(&manifest, text).unwrap();
    std::fs::remove_dir_all(d.plugins().join("slow")).unwrap();
    add_plugin(&d.plugins(), "crasher", "crasher", "");
    d.signal(Signal::SIGHUP);
    eventually("reload applied", || {
        let st = d.status();
        st.iter().any(|p| p["name"] == "crasher" && p["state"] == "ready")
            && !st.iter().any(|p| p["name"] == "slow")
    });
    eventually("echo replaced", || d.pid("echo") != echo && d.pid("echo") != 0);
    assert_eq!(d.pid("tick-strategy"), strat, "an unchanged plugin keeps its process");
    let out = d.ctl(&["call", "echo", "config"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("bonjour"),
        "the new manifest is in force"
    );
    // plugctl reload does the same and reports the difference.
    let report = d.json(&["reload"]);
    assert_eq!(report["added"], serde_json::json!([]));
    assert_eq!(report["unchanged"].as_array().unwrap().len(), 3);
}

#[test]
fn sigkill_of_plugd_leaves_no_plugin_alive() {
    let mut d = Plugd::start(|dir| {
        add_plugin(dir, "echo", "echo", "");
        // garbage ignores a closed socket and sleeps: only the parent-death signal ends it.
        add_plugin(dir, "garbage", "garbage", "");
    });
    eventually("all ready", || d.all_ready(&["echo", "garbage"]));
    let pids: Vec<u64> = d.status().iter().filter_map(|p| p["pid"].as_u64()).collect();
    assert_eq!(pids.len(), 2);
    d.signal(Signal::SIGKILL);
    let _ = d.child.wait();
    eventually("no plugin survives plugd", || pids.iter().all(|&p| !alive(p)));
}

#[test]
fn systemd_notify_sequence_over_a_real_datagram_socket() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("plugins")).unwrap();
    add_plugin(&root.path().join("plugins"), "echo", "echo", "");
    let notify_path = root.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let d = Plugd::start_with(
        root,
        &[("NOTIFY_SOCKET", notify_path.display().to_string()), ("WATCHDOG_USEC", "200000".into())],
    );
    let next = || {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    // Skip watchdog pings while looking for a given message.
    let expect = |key: &str| -> String {
        loop {
            let m = next();
            if m.contains(key) {
                return m;
            }
            assert!(m == "WATCHDOG=1", "unexpected notification {m:?} while waiting for {key}");
        }
    };
    let ready = expect("READY=1");
    assert!(ready.contains("STATUS=1 plugins: 1 ready, 0 failed, 0 disabled"), "{ready}");
    assert!(ready.contains(&format!("MAINPID={}", d.child.id())), "{ready}");
    assert_eq!(expect("WATCHDOG=1"), "WATCHDOG=1");
    d.signal(Signal::SIGHUP);
    let reloading = expect("RELOADING=1");
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .expect("MONOTONIC_USEC")
        .parse()
        .unwrap();
    assert!(usec > 0);
    expect("READY=1");
    d.signal(Signal::SIGTERM);
    expect("STOPPING=1");
}

#[test]
fn the_control_socket_shrugs_off_garbage_and_strangers() {
    let d = Plugd::start(|dir| add_plugin(dir, "echo", "echo", ""));
    eventually("ready", || d.all_ready(&["echo"]));
    let echo = d.pid("echo");
    let mode = std::fs::metadata(&d.socket)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap();
    assert_eq!(mode, 0o600);

    // Garbage, an oversized line, and a client that hangs up mid-request.
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    s.write_all(b"\x00\xffnot json at all\n").unwrap();
    let mut line = String::new();
    BufReader::new(s.try_clone().unwrap()).read_line(&mut line).unwrap();
    let reply: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(reply["ok"], false, "{line}");
    assert_eq!(reply["error"]["kind"], "bad_request", "{line}");
    assert!(reply["error"]["message"].as_str().unwrap().contains("bad request"), "{line}");
    // Each failure says what kind it is, so clients branch on the kind, not the text.
    let mut conn = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    let kind = |conn: &mut std::os::unix::net::UnixStream, req: &str| {
        let r = ask_on(conn, req);
        assert_eq!(r["ok"], false, "{req}: {r}");
        r["error"]["kind"].as_str().unwrap().to_string()
    };
    assert_eq!(kind(&mut conn, r#"{"cmd":"stop","name":"nope"}"#), "not_found");
    assert_eq!(kind(&mut conn, r#"{"cmd":"stop","name":"../etc"}"#), "bad_request");
    assert_eq!(kind(&mut conn, r#"{"cmd":"job","id":999}"#), "not_found");
    let call = r#"{"cmd":"call","name":"echo","method":"echo","json":"{nope"}"#;
    assert_eq!(kind(&mut conn, call), "bad_request");
    let call = r#"{"cmd":"call","name":"echo","method":"no_such_method","json":"1"}"#;
    assert_eq!(kind(&mut conn, call), "plugin");
    drop(conn);
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    let _ = s.write_all(&vec![b'x'; 2 << 20]);
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    s.write_all(br#"{"cmd":"sta"#).unwrap();
    drop(s);
    assert_eq!(d.pid("echo"), echo, "the daemon and its plugins are undisturbed");

    // Another uid: refused by the socket's mode, and by the peer check when the mode is opened up.
    // A copy of plugctl they can run (the checkout may sit in a folder only root can enter).
    let plugctl = d.root.path().join("plugctl");
    std::fs::copy(plugd_bin("plugctl"), &plugctl).unwrap();
    let as_nobody = |d: &Plugd| {
        let mut cmd = Command::new(&plugctl);
        cmd.arg("--socket").arg(&d.socket).arg("status").uid(65534).gid(65534);
        kit::retry_busy(|| cmd.output()).unwrap()
    };
    // The socket's folders must be traversable for the stranger to reach the socket at all.
    for dir in [d.root.path(), &d.root.path().join("run")] {
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let out = as_nobody(&d);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    std::fs::set_permissions(&d.socket, std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .unwrap();
    let out = as_nobody(&d);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("uid 65534 may not control"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn plugctl_without_a_daemon_exits_3_and_names_the_socket() {
    let out = Command::new(plugd_bin("plugctl"))
        .args(["--socket", "/nonexistent/plugd.sock", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/plugd.sock"));
}

#[test]
fn validate_checks_a_folder_without_a_daemon() {
    let out = Command::new(plugd_bin("plugctl"))
        .arg("validate")
        .arg(examples().join("echo"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok: echo 1.0.0"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("plugin.toml"),
        "name = \"x\"\nversion = \"1\"\napi_version = \"^1\"\nentrypoint = \"x\"\n",
    )
    .unwrap();
    let out = Command::new(plugd_bin("plugctl")).arg("validate").arg(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`version`"));

    // `requires`, checked as plugd would against the plugins its config names.
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    add_plugin(&plugins, "echo", "feed", ""); // feed 1.0.0
    let config = root.path().join("plugd.toml");
    std::fs::write(
        &config,
        format!(
            "plugin_dirs = [\"{}\"]\nstate_dir = \"{}\"\n",
            plugins.display(),
            root.path().join("state").display()
        ),
    )
    .unwrap();
    let needy = tempfile::tempdir().unwrap();
    let manifest = |req: &str| {
        format!(
            "name = \"needy\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"{}\"\nrequires = [\"{req}\"]\n",
            bin_dir().join("echo").display()
        )
    };
    let validate = || {
        Command::new(plugd_bin("plugctl"))
            .arg("validate")
            .arg(needy.path())
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    };
    std::fs::write(needy.path().join("plugin.toml"), manifest("feed ^2")).unwrap();
    let out = validate();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("requires feed ^2, but feed 1.0.0"), "{err}");
    std::fs::write(needy.path().join("plugin.toml"), manifest("feed ^1")).unwrap();
    let out = validate();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("requires: feed ^1 (all present)"));
}

fn info(d: &Plugd) -> Value {
    d.json(&["info"])
}

/// A copy of plugd in the test's folder, so the test may replace "the installed binary".
fn plugd_copy(root: &Path) -> PathBuf {
    let exe = root.join("plugd");
    std::fs::copy(plugd_bin("plugd"), &exe).unwrap();
    exe
}

#[test]
fn sigusr2_upgrades_in_place_without_restarting_plugins_or_losing_calls() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("plugins")).unwrap();
    add_plugin(&root.path().join("plugins"), "echo", "echo", "");
    // garbage ignores a closed socket: only the parent-death signal can end it (checked below).
    add_plugin(&root.path().join("plugins"), "garbage", "garbage", "");
    // Its shared mapping is handed over too: calls keep going through its rings.
    add_plugin(&root.path().join("plugins"), "echo", "fast", "transport = \"shm\"\n");
    let exe = plugd_copy(root.path());
    let mut d = Plugd::start_exe(&exe, root, &[]);
    eventually("all ready", || d.all_ready(&["echo", "garbage", "fast"]));
    let ring_calls = |d: &Plugd, n: u32| {
        for i in 0..n {
            let out = d.ctl(&["call", "fast", "echo", &format!("\"r{i}\"")]);
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("r{i}"));
        }
        let fast = d.plugin("fast");
        assert_eq!(fast["transport"], "shm (spin-then-futex)", "{fast}");
        fast["ring_calls"].as_u64().unwrap_or(0)
    };
    assert_eq!(ring_calls(&d, 3), 3);
    let before = info(&d);
    assert_eq!(before["generation"], 0);
    let pids: Vec<u64> = d.status().iter().map(|p| p["pid"].as_u64().unwrap()).collect();

    // Calls in a loop, from another thread, across the upgrade.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let caller = {
        let (stop, socket) = (stop.clone(), d.socket.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = Command::new(plugd_bin("plugctl"))
                    .arg("--socket")
                    .arg(&socket)
                    .args(["call", "echo", "echo", &i.to_string()])
                    .output()
                    .unwrap();
                if out.status.success()
                    && String::from_utf8_lossy(&out.stdout).trim() == i.to_string()
                {
                    ok += 1;
                } else {
                    failed.push(format!("call {i}: {}", String::from_utf8_lossy(&out.stderr)));
                }
                i += 1;
            }
            (ok, failed)
        })
    };
    let calls = |d: &Plugd| d.plugin("echo")["calls_ok"].as_u64().unwrap_or(0);
    eventually("the caller is calling", || calls(&d) >= 5);
    d.signal(Signal::SIGUSR2);
    eventually("the new generation answers", || {
        d.ctl(&["info"]).status.success() && info(&d)["generation"] == 1
    });
    // Calls go on in the new generation (its counters start at 0).
    eventually("the caller is calling the new plugd", || calls(&d) >= 5);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = caller.join().unwrap();
    assert!(failed.is_empty(), "calls lost across the upgrade: {failed:?}");
    assert!(ok > 5, "too few calls made across the upgrade: {ok}");

    let after = info(&d);
    assert_eq!(
        after["pid"], before["pid"],
        "exec in place keeps plugd's pid (systemd's MAINPID stays valid)"
    );
    let now: Vec<u64> = d.status().iter().map(|p| p["pid"].as_u64().unwrap_or(0)).collect();
    assert_eq!(now, pids, "no plugin was restarted");
    assert!(d.status().iter().all(|p| p["state"] == "ready" && p["restarts"] == 0));
    let out = d.ctl(&["call", "echo", "echo", "\"still\""]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "still");
    // The new plugd's counters start at 0: every call since went through the rings.
    assert_eq!(ring_calls(&d, 4), 4);

    // The parent-death signal still binds the plugins to the re-executed plugd.
    d.signal(Signal::SIGKILL);
    let _ = d.child.wait();
    eventually("no plugin survives the upgraded plugd", || pids.iter().all(|&p| !alive(p)));
}

#[test]
fn three_upgrades_in_a_row_keep_every_plugin_and_a_stopped_one_stays_stopped() {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    add_plugin(&plugins, "echo", "echo", "");
    add_plugin(&plugins, "echo", "parked", "");
    // Calls echo through plugd (protocol 2): its negotiated version must survive each handover,
    // or its host call would be taken for a protocol violation and it would be killed.
    add_plugin(&plugins, "echo", "strat", "[calls]\nallow = [\"echo.echo\"]\n");
    let exe = plugd_copy(root.path());
    let d = Plugd::start_exe(&exe, root, &[]);
    eventually("ready", || d.all_ready(&["echo", "parked", "strat"]));
    assert!(d.ctl(&["stop", "parked"]).status.success());
    let mut names = vec!["echo".to_string(), "strat".to_string()];
    for generation in 1..=3u64 {
        // A plugin started by this generation, before the next upgrade; over shared memory,
        // so its mapping is handed over once more at every later upgrade.
        let name = format!("echo-gen{generation}");
        add_plugin(&d.plugins(), "echo", &name, "transport = \"shm\"\n");
        assert!(d.ctl(&["reload"]).status.success());
        eventually("the new plugin is ready", || d.all_ready(&[name.as_str()]));
        names.push(name);
        let pids: Vec<(String, u64)> = names.iter().map(|n| (n.clone(), d.pid(n))).collect();
        d.signal(Signal::SIGUSR2);
        eventually("the next generation answers", || {
            d.ctl(&["info"]).status.success() && info(&d)["generation"] == generation
        });
        // Give a wrongly delivered parent-death signal time to land.
        std::thread::sleep(Duration::from_millis(300));
        for (n, pid) in &pids {
            let p = d.plugin(n);
            assert_eq!(
                p["pid"].as_u64(),
                Some(*pid),
                "generation {generation}: {n} kept its pid: {p}"
            );
            assert_eq!(p["state"], "ready", "generation {generation}: {p}");
            assert_eq!(p["restarts"], 0, "generation {generation}: {p}");
            assert!(alive(*pid));
        }
        let relayed =
            d.ctl(&["call", "strat", "relay", &format!("[\"echo\",\"echo\",\"g{generation}\"]")]);
        assert_eq!(
            String::from_utf8_lossy(&relayed.stdout).trim(),
            format!("g{generation}"),
            "generation {generation}: an adopted plugin still calls through plugd: {}",
            String::from_utf8_lossy(&relayed.stderr)
        );
        let parked = d.plugin("parked");
        assert_eq!(
            parked["state"], "stopped",
            "generation {generation}: the operator's stop holds: {parked}"
        );
        // Every shm plugin still answers through its rings in the new generation.
        for n in names.iter().filter(|n| n.starts_with("echo-gen")) {
            let out = d.ctl(&["call", n, "echo", "\"ring\""]);
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ring", "{n}");
            let p = d.plugin(n);
            assert_eq!(p["transport"], "shm (spin-then-futex)", "generation {generation}: {p}");
            assert!(p["ring_calls"].as_u64() >= Some(1), "generation {generation}: {p}");
        }
    }
    let out = d.ctl(&["call", "echo-gen1", "echo", "7"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "7");
}

/// One request on an open control connection, and its reply line.
fn ask_on(conn: &mut std::os::unix::net::UnixStream, request: &str) -> Value {
    use std::io::Write;
    conn.write_all(format!("{request}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(conn.try_clone().unwrap()).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

#[test]
fn an_open_control_connection_is_served_on_across_an_upgrade() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("plugins")).unwrap();
    add_plugin(&root.path().join("plugins"), "echo", "echo", "");
    let exe = plugd_copy(root.path());
    let d = Plugd::start_exe(&exe, root, &[]);
    eventually("ready", || d.all_ready(&["echo"]));
    let mut conn = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    let r = ask_on(&mut conn, r#"{"cmd":"info"}"#);
    assert_eq!(r["data"]["generation"], 0, "{r}");
    // Half a request is on the wire when the upgrade starts; the rest comes after.
    use std::io::Write;
    conn.write_all(br#"{"cmd":"ca"#).unwrap();
    d.signal(Signal::SIGUSR2);
    eventually("the next generation answers", || {
        d.ctl(&["info"]).status.success() && info(&d)["generation"] == 1
    });
    let r = ask_on(&mut conn, r#"ll","name":"echo","method":"echo","json":"{\"x\":1}"}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["data"], serde_json::json!({"x": 1}));
    let r = ask_on(&mut conn, r#"{"cmd":"info"}"#);
    assert_eq!(r["data"]["generation"], 1, "the same connection, served by the new plugd: {r}");
}

#[test]
fn idle_control_connections_neither_block_the_daemon_nor_stay_forever() {
    let d = Plugd::start(|dir| add_plugin(dir, "echo", "echo", ""));
    eventually("ready", || d.all_ready(&["echo"]));
    let idle: Vec<_> =
        (0..64).map(|_| std::os::unix::net::UnixStream::connect(&d.socket).unwrap()).collect();
    // One more: refused at once, with the reason, while the daemon goes on.
    eventually("the 65th connection is refused", || {
        let out = d.ctl(&["info"]);
        out.status.code() == Some(1)
            && String::from_utf8_lossy(&out.stderr).contains("the most it takes at once")
    });
    d.signal(Signal::SIGHUP);
    let log = d.root.path().join("plugd.log");
    eventually("SIGHUP is handled meanwhile", || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("SIGHUP: reloading")
    });
    // The idle ones are told and closed, and plugctl is served again.
    let mut first = BufReader::new(idle[0].try_clone().unwrap());
    let mut line = String::new();
    first.read_line(&mut line).unwrap();
    assert!(line.contains("idle for 10 s; closing the connection"), "{line}");
    eventually("served again", || d.ctl(&["info"]).status.success());
    drop(idle);
}

#[test]
fn a_broken_new_binary_leaves_the_old_plugd_running() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("plugins")).unwrap();
    add_plugin(&root.path().join("plugins"), "echo", "echo", "");
    let exe = plugd_copy(root.path());
    let d = Plugd::start_exe(&exe, root, &[]);
    eventually("ready", || d.all_ready(&["echo"]));
    let pid = d.pid("echo");
    // "Install" a broken build over the binary (a rename, as package managers do).
    let broken = d.root.path().join("plugd.new");
    std::fs::write(&broken, "#!/bin/sh\necho this build is broken >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&broken, &exe).unwrap();
    d.signal(Signal::SIGUSR2);
    let log = d.root.path().join("plugd.log");
    eventually("the failed upgrade is reported", || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("not upgrading")
    });
    assert!(std::fs::read_to_string(&log).unwrap().contains("this build is broken"));
    assert_eq!(info(&d)["generation"], 0);
    assert_eq!(d.pid("echo"), pid);
    let out = d.ctl(&["call", "echo", "echo", "1"]);
    assert!(out.status.success());
}

#[test]
fn operator_defaults_apply_to_every_plugin() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("plugins")).unwrap();
    add_plugin(&root.path().join("plugins"), "echo", "echo", "");
    add_plugin(&root.path().join("plugins"), "bigfile", "bigfile", "");
    std::fs::write(
        root.path().join("extra.toml"),
        "[defaults]\nlimits = { open_files = 64, file_size = \"2MiB\" }\n",
    )
    .unwrap();
    let d = Plugd::start_with(root, &[]);
    eventually("ready", || d.all_ready(&["echo", "bigfile"]));
    let layers = |name: &str| d.plugin(name)["sandbox"][0].as_str().unwrap_or_default().to_string();
    assert_eq!(
        layers("echo"),
        "rlimits(core=0,nofile,fsize)",
        "defaults reach a plugin that sets no limits"
    );
    // bigfile sets its own file_size (1MiB): it keeps it, and gets the default open_files.
    assert_eq!(layers("bigfile"), "rlimits(core=0,nofile,fsize)");
    let out = d.ctl(&["call", "bigfile", "write", "4194304"]);
    assert_eq!(out.status.code(), Some(1));
    eventually("bigfile stopped at its own 1 MiB", || {
        d.plugin("bigfile")["last_exit"] == "file size limit (1048576 bytes)"
    });
}

#[test]
fn plugctl_update_hot_swaps_to_the_folder_contents() {
    let d = Plugd::start(|dir| add_plugin(dir, "tick-strategy", "tick-strategy", ""));
    eventually("ready", || d.all_ready(&["tick-strategy"]));
    let tick = |bid: f64| format!(r#"{{"symbol":"X","bid":{bid},"ask":{},"ts":1}}"#, bid + 0.02);
    assert!(d.ctl(&["call", "tick-strategy", "on_tick", &tick(100.0)]).status.success());
    assert!(d.ctl(&["call", "tick-strategy", "on_tick", &tick(90.0)]).status.success());
    let pos = |d: &Plugd| {
        String::from_utf8(d.ctl(&["call", "tick-strategy", "position"]).stdout).unwrap()
    };
    assert_eq!(pos(&d).trim(), "1");
    let old = d.pid("tick-strategy");
    let layers_before = d.plugin("tick-strategy")["sandbox"].clone();
    let manifest = d.plugins().join("tick-strategy/plugin.toml");
    let text = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("version = \"1.2.0\"", "version = \"1.3.0\"");
    std::fs::write(&manifest, text).unwrap();
    let st = d.json(&["update", "tick-strategy"]);
    assert_eq!(st[0]["version"], "1.3.0");
    assert_eq!(st[0]["restarts"], 0);
    assert_ne!(d.pid("tick-strategy"), old);
    assert_eq!(pos(&d).trim(), "1", "the position survives the update");
    assert_eq!(
        d.plugin("tick-strategy")["sandbox"],
        layers_before,
        "the new instance shows every layer, the SDK's voluntary ones too"
    );
    // A new version that cannot start: the running one keeps serving, and plugctl says why.
    let text = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("version = \"1.3.0\"", "version = \"1.4.0\"")
        .lines()
        .map(|l| if l.starts_with("entrypoint") { "entrypoint = \"no-such-binary\"" } else { l })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&manifest, text).unwrap();
    let out = d.ctl(&["update", "tick-strategy"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("keeps serving"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.plugin("tick-strategy")["version"], "1.3.0");
    assert_eq!(pos(&d).trim(), "1");
}

/// A plugin source folder for `greeter` at `version` (the echo binary, copied in as bin/greeter).
fn greeter_source(dir: &Path, version: &str) -> PathBuf {
    let src = dir.join(format!("greeter-{version}"));
    std::fs::create_dir_all(src.join("bin")).unwrap();
    std::fs::copy(bin_dir().join("echo"), src.join("bin/greeter")).unwrap();
    std::fs::write(
        src.join("plugin.toml"),
        format!("name = \"greeter\"\nversion = \"{version}\"\napi_version = \"^1\"\nentrypoint = \"bin/greeter\"\n"),
    )
    .unwrap();
    src
}

#[test]
fn install_versions_update_rollback_uninstall() {
    let d = Plugd::start(|dir| add_plugin(dir, "echo", "echo", ""));
    eventually("ready", || d.all_ready(&["echo"]));
    let src = tempfile::tempdir().unwrap();
    let (v1, v2) = (greeter_source(src.path(), "1.0.0"), greeter_source(src.path(), "2.0.0"));
    let installed = d.root.path().join("state/installed/greeter");

    // A broken folder is refused before anything is copied.
    let bad = src.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(
        bad.join("plugin.toml"),
        "name = \"greeter\"\nversion = \"x\"\napi_version = \"^1\"\nentrypoint = \"bin/g\"\n",
    )
    .unwrap();
    let out = d.ctl(&["install", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`version`"));
    assert!(!installed.exists(), "nothing half-installed");

    // First install: copied, current, started.
    let st = d.json(&["install", v1.to_str().unwrap()]);
    assert_eq!(
        (st[0]["version"].as_str(), st[0]["state"].as_str()),
        (Some("1.0.0"), Some("ready"))
    );
    assert!(installed.join("1.0.0/bin/greeter").is_file());
    let out = d.ctl(&["install", v1.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already installed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(d.ctl(&["install", "--force", v1.to_str().unwrap()]).status.success());

    // A second version is installed beside the running one, which keeps running.
    let pid = d.pid("greeter");
    assert!(d.ctl(&["install", v2.to_str().unwrap()]).status.success());
    assert_eq!(d.plugin("greeter")["version"], "1.0.0");
    assert_eq!(d.pid("greeter"), pid);
    let versions = d.json(&["versions", "greeter"]);
    assert_eq!(
        versions,
        serde_json::json!([{"version":"1.0.0","current":true},{"version":"2.0.0","current":false}])
    );

    // update NAME VERSION hot-swaps; rollback goes back.
    let st = d.json(&["update", "greeter", "2.0.0"]);
    assert_eq!(st[0]["version"], "2.0.0");
    assert_ne!(d.pid("greeter"), pid);
    let st = d.json(&["rollback", "greeter"]);
    assert_eq!(st[0]["version"], "1.0.0");
    let out = d.ctl(&["call", "greeter", "echo", "\"hi\""]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hi");

    // The current version survives a daemon restart.
    let d = d.restart();
    eventually("greeter back", || d.all_ready(&["echo", "greeter"]));
    assert_eq!(d.plugin("greeter")["version"], "1.0.0");

    // Uninstall: one version, then the whole plugin with its state.
    let out = d.ctl(&["uninstall", "greeter", "--version", "1.0.0"]);
    assert_eq!(out.status.code(), Some(1), "the current version cannot be removed alone");
    let out = d.ctl(&["uninstall", "greeter", "--version", "2.0.0"]);
    assert!(out.status.success());
    // What is left, as `versions` prints it (not raw JSON).
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1.0.0  (current)");
    assert!(!installed.join("2.0.0").exists());
    let state = d.root.path().join("state/plugins/greeter");
    assert!(state.exists());
    let gpid = d.pid("greeter");
    assert!(d.ctl(&["uninstall", "greeter", "--purge"]).status.success());
    assert!(!installed.exists() && !state.exists());
    assert!(!alive(gpid));
    assert!(d.status().iter().all(|p| p["name"] != "greeter"));
    assert_eq!(d.plugin("echo")["state"], "ready", "nothing else touched");
}

#[test]
fn install_from_a_tar_gz_and_from_a_git_repository() {
    let d = Plugd::start(|_| {});
    let src = tempfile::tempdir().unwrap();
    let folder = greeter_source(src.path(), "1.0.0");

    // A .tar.gz with the plugin in a subfolder, as release archives usually are.
    let archive = src.path().join("greeter-1.0.0.tar.gz");
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&archive).unwrap(),
        flate2::Compression::fast(),
    );
    let mut tar = tar::Builder::new(gz);
    tar.append_dir_all("greeter-1.0.0", &folder).unwrap();
    tar.into_inner().unwrap().finish().unwrap();
    let st = d.json(&["install", archive.to_str().unwrap()]);
    assert_eq!((st[0]["name"].as_str(), st[0]["state"].as_str()), (Some("greeter"), Some("ready")));
    assert!(d.ctl(&["uninstall", "greeter"]).status.success());

    // A git repository (file:// here; https works the same through the git binary).
    let repo = src.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let v2 = greeter_source(src.path(), "2.0.0");
    for entry in ["plugin.toml", "bin"] {
        Command::new("cp").arg("-r").arg(v2.join(entry)).arg(&repo).status().unwrap();
    }
    let git = |args: &[&str]| git_in(&repo, args);
    git(&["init", "-q"]);
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "greeter 2.0.0"]);
    git(&["tag", "v2"]);
    let url = format!("git+file://{}#v2", repo.display());
    let st = d.json(&["install", &url]);
    assert_eq!(st[0]["version"], "2.0.0");
    let installed = d.root.path().join("state/installed/greeter/2.0.0");
    assert!(installed.join("bin/greeter").is_file() && !installed.join(".git").exists());
    let out = d.ctl(&["install", "git+file:///nonexistent/repo"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("git clone"));
    // Nothing is left behind by fetches.
    let leftovers: Vec<_> = std::fs::read_dir(d.root.path().join("state/installed"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn update_checks_requires_and_dry_run_shows_the_change() {
    let d = Plugd::start(|dir| {
        add_plugin(dir, "echo", "feed", "");
        add_plugin(dir, "echo", "strat", "requires = [\"feed ^1\"]\n");
    });
    eventually("ready", || d.all_ready(&["feed", "strat"]));
    let manifest = d.plugins().join("feed/plugin.toml");
    let text = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("version = \"1.0.0\"", "version = \"2.0.0\"")
        + "[limits]\nopen_files = 64\n";
    std::fs::write(&manifest, text).unwrap();

    let plan = d.json(&["update", "feed", "--dry-run"]);
    assert_eq!((plan["from"].as_str(), plan["to"].as_str()), (Some("1.0.0"), Some("2.0.0")));
    assert!(
        plan["changes"]["limits"]["to"].as_str().unwrap().contains("open_files: Some(64)"),
        "{plan}"
    );
    let problem = plan["problems"][0].as_str().unwrap();
    assert!(problem.contains("would break strat") && problem.contains("feed ^1"), "{problem}");
    assert_eq!(d.plugin("feed")["version"], "1.0.0", "a dry run changes nothing");

    let out = d.ctl(&["update", "feed"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("would break strat") && err.contains("--force"), "{err}");
    assert_eq!(d.plugin("feed")["version"], "1.0.0");
    let st = d.json(&["update", "feed", "--force"]);
    assert_eq!(st[0]["version"], "2.0.0");
}

/// SIGKILL at an exact point of an install (a fault point, not a lucky sleep): before the
/// version folder is renamed into place, the next plugd shows the old state and leaves
/// nothing behind; after it, the new one, current and running.
#[test]
fn sigkill_during_an_install_leaves_the_old_state_or_the_new_one() {
    for (point, lands) in [("install.copied", false), ("install.placed", true)] {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("plugins")).unwrap();
        let (env, reached) = fault_env(root.path(), point);
        let mut d = Plugd::start_with(root, &env);
        let src = tempfile::tempdir().unwrap();
        let folder = greeter_source(src.path(), "1.0.0");
        std::fs::create_dir_all(folder.join("data")).unwrap();
        for i in 0..300 {
            std::fs::write(folder.join("data").join(format!("{i}.txt")), "some data\n").unwrap();
        }
        let installer = install_in_background(&d, &folder);
        eventually(&format!("plugd stops at {point}"), || reached.exists());
        d.signal(Signal::SIGKILL);
        let _ = d.child.wait();
        let _ = installer.join();
        let d = d.restart_after_kill();
        let installed = d.root.path().join("state/installed");
        let leftovers: Vec<String> =
            walk_names(&installed).into_iter().filter(|n| n.starts_with('.')).collect();
        assert!(leftovers.is_empty(), "{point}: half-done files remain: {leftovers:?}");
        let version = installed.join("greeter/1.0.0");
        if lands {
            // The new state: complete, current, and running.
            assert_eq!(std::fs::read_dir(version.join("data")).unwrap().count(), 300);
            assert_eq!(
                std::fs::read_link(installed.join("greeter/current")).unwrap(),
                Path::new("1.0.0")
            );
            eventually("installed plugin runs", || d.all_ready(&["greeter"]));
        } else {
            // The old state: nothing installed, and installing again works.
            assert!(!version.exists(), "{point}: a version appeared");
            assert!(d.status().iter().all(|p| p["name"] != "greeter"));
            let out = d.ctl(&["install", folder.to_str().unwrap()]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            eventually("installed plugin runs", || d.all_ready(&["greeter"]));
        }
    }
}

/// An install cut by an in-place upgrade (SIGUSR2 while the version folder is being copied):
/// the next plugd reports the job failed, not running, and leaves nothing half-done.
#[test]
fn an_install_cut_by_an_upgrade_is_reported_failed_and_leaves_nothing() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("plugins")).unwrap();
    let (env, reached) = fault_env(root.path(), "install.copied");
    let exe = plugd_copy(root.path());
    let d = Plugd::start_exe(&exe, root, &env);
    let src = tempfile::tempdir().unwrap();
    let folder = greeter_source(src.path(), "1.0.0");
    let installer = install_in_background(&d, &folder);
    eventually("the install is mid-copy", || reached.exists());
    d.signal(Signal::SIGUSR2);
    eventually("the next generation answers", || {
        d.ctl(&["info"]).status.success() && info(&d)["generation"] == 1
    });
    let _ = installer.join();
    let jobs = d.json(&["jobs"]);
    let job = &jobs.as_array().unwrap()[0];
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"], "interrupted by restart", "{job}");
    let installed = d.root.path().join("state/installed");
    let leftovers: Vec<String> =
        walk_names(&installed).into_iter().filter(|n| n.starts_with('.')).collect();
    assert!(leftovers.is_empty(), "half-done files remain: {leftovers:?}");
    assert!(!installed.join("greeter/1.0.0").exists());
    assert!(d.status().iter().all(|p| p["name"] != "greeter"));
}

/// The environment that makes plugd stop for good at fault point `point`, and the marker
/// file it writes when it gets there.
fn fault_env(root: &Path, point: &str) -> ([(&'static str, String); 2], PathBuf) {
    let reached = root.join("fault-reached");
    let env = [
        ("PLUGD_FAULT", point.to_string()),
        ("PLUGD_FAULT_REACHED", reached.display().to_string()),
    ];
    (env, reached)
}

/// `plugctl install FOLDER` on a thread of its own (it waits while plugd is stopped at a
/// fault point, or gets its answer from the next plugd).
fn install_in_background(
    d: &Plugd,
    folder: &Path,
) -> std::thread::JoinHandle<std::io::Result<std::process::Output>> {
    let (socket, folder) = (d.socket.clone(), folder.to_path_buf());
    std::thread::spawn(move || {
        Command::new(plugd_bin("plugctl"))
            .arg("--socket")
            .arg(&socket)
            .arg("install")
            .arg(&folder)
            .output()
    })
}

fn walk_names(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        out.push(e.file_name().to_string_lossy().into_owned());
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) && e.file_name() != "data" {
            out.extend(walk_names(&e.path()));
        }
    }
    out
}

#[test]
fn install_runs_the_build_step_and_a_failed_build_installs_nothing() {
    let d = Plugd::start(|_| {});
    let src = tempfile::tempdir().unwrap();
    let make = |tag: &str, build: &str| {
        let dir = src.path().join(tag);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(bin_dir().join("echo"), dir.join("payload")).unwrap();
        std::fs::write(
            dir.join("plugin.toml"),
            format!("name = \"built\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"bin/built\"\n[build]\ncommand = {build}\n"),
        )
        .unwrap();
        dir
    };
    let broken =
        make("broken", r#"["sh", "-c", "echo 'error[E0308]: mismatched types' >&2; exit 2"]"#);
    let out = d.ctl(&["install", broken.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("build command") && err.contains("mismatched types"), "{err}");
    assert!(
        !d.root.path().join("state/installed/built").exists(),
        "a failed first install leaves no folder behind"
    );

    let good = make(
        "good",
        r#"["sh", "-c", "mkdir -p bin && cp payload bin/built && chmod +x bin/built"]"#,
    );
    let st = d.json(&["install", good.to_str().unwrap()]);
    assert_eq!(st[0]["state"], "ready");
    assert!(!good.join("bin").exists(), "the build ran in the installed copy, not in the source");

    // Installed, but it cannot start: the install fails, saying so and why.
    let bad_load = src.path().join("bad-load");
    std::fs::create_dir_all(bad_load.join("bin")).unwrap();
    std::fs::copy(bin_dir().join("crasher"), bad_load.join("bin/crasher")).unwrap();
    std::fs::write(
        bad_load.join("plugin.toml"),
        "name = \"bad-load\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"bin/crasher\"\n[restart]\npolicy = \"never\"\n[config]\nfail_on_load = true\n",
    )
    .unwrap();
    let out = d.ctl(&["install", bad_load.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("installed bad-load 1.0.0, but it failed to start"), "{err}");
    assert!(err.contains("fail_on_load is set"), "the plugin's own reason: {err}");
}

/// A build script that tries every way out of the build jail it can think of and writes
/// what it saw into `report` (in its own folder, the only one it may write).
const HOSTILE_BUILD: &str = r#"
r=report
echo "uid $(id -u)" >> $r
grep CapEff /proc/self/status >> $r
if cat /etc/shadow > /dev/null 2>&1; then echo "shadow READ" >> $r; else echo "shadow denied" >> $r; fi
if touch ../escaped 2> /dev/null; then echo "parent WRITTEN" >> $r; else echo "parent denied" >> $r; fi
if test -e "$SOCKET"; then echo "socket VISIBLE" >> $r; else echo "socket absent" >> $r; fi
echo "interfaces $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ' ')" >> $r
echo "processes $(ls -d /proc/[0-9]* | wc -l)" >> $r
setsid sh -c 'sleep 313.7' > /dev/null 2>&1 < /dev/null &
mkdir -p bin && cp payload bin/built && chmod +x bin/built
cp /bin/sh bin/suid-sh && chmod 4755 bin/suid-sh
"#;

#[test]
fn a_hostile_build_runs_as_the_plugins_uid_in_a_jail_and_leaves_nothing_behind() {
    if !nix::unistd::geteuid().is_root() {
        return; // builds are jailed only when plugd is root (the job output says so)
    }
    let d = Plugd::start(|_| {});
    let src = tempfile::tempdir().unwrap();
    let dir = src.path().join("hostile");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(bin_dir().join("echo"), dir.join("payload")).unwrap();
    std::fs::write(
        dir.join("build.sh"),
        HOSTILE_BUILD.replace("$SOCKET", &d.socket.display().to_string()),
    )
    .unwrap();
    std::fs::write(
        dir.join("plugin.toml"),
        "name = \"hostile\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"bin/built\"\n[build]\ncommand = [\"sh\", \"build.sh\"]\n",
    )
    .unwrap();
    let st = d.json(&["install", dir.to_str().unwrap()]);
    assert_eq!(st[0]["state"], "ready", "{st}");
    let installed = d.root.path().join("state/installed/hostile/1.0.0");
    let report = std::fs::read_to_string(installed.join("report")).unwrap();
    let uid: u32 = report.lines().find_map(|l| l.strip_prefix("uid ")).unwrap().parse().unwrap();
    assert!((61184..=65519).contains(&uid), "the build ran as uid {uid}:\n{report}");
    let layers = st[0]["sandbox"].to_string();
    assert!(layers.contains(&format!("user(uid {uid})")), "the plugin's own uid: {layers}");
    for line in [
        "CapEff:\t0000000000000000",
        "shadow denied",
        "parent denied",
        "socket absent",
        "interfaces lo ",
    ] {
        assert!(
            report.lines().any(|l| l.trim_end() == line.trim_end()),
            "{line:?} missing:\n{report}"
        );
    }
    // Its own pid namespace: its init, the shell, the pipeline; none of the host's.
    let procs: usize =
        report.lines().find_map(|l| l.strip_prefix("processes ")).unwrap().parse().unwrap();
    assert!(procs <= 8, "the build saw {procs} processes:\n{report}");
    assert!(!installed.parent().unwrap().join("escaped").exists());

    // Nothing it started outlives it, and what it built belongs to root now.
    let leftover = std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("313.7"))
    });
    assert!(!leftover, "a process the build started in the background is still running");
    use std::os::unix::fs::MetadataExt;
    let suid = std::fs::metadata(installed.join("bin/suid-sh")).unwrap();
    assert_eq!(suid.uid(), 0);
    assert_eq!(suid.mode() & 0o7000, 0, "the setuid bit was cleared: {:o}", suid.mode());
    assert_eq!(std::fs::metadata(installed.join("report")).unwrap().uid(), 0);

    // The job output says how the build ran.
    let jobs = d.json(&["jobs"]);
    let text = jobs.to_string();
    assert!(
        text.contains(&format!("install steps run jailed: user(uid {uid}) no-capabilities namespaces(pid,mount,ipc,uts,net)")),
        "{text}"
    );

    // A build that leaves a way out (a symlink to a host file) installs nothing.
    let leak = src.path().join("leak");
    std::fs::create_dir_all(&leak).unwrap();
    std::fs::copy(bin_dir().join("echo"), leak.join("built")).unwrap();
    std::fs::write(
        leak.join("plugin.toml"),
        "name = \"leak\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"built\"\n[build]\ncommand = [\"ln\", \"-s\", \"/etc/shadow\", \"notes.txt\"]\n",
    )
    .unwrap();
    let out = d.ctl(&["install", leak.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pointing at /etc/shadow, outside the plugin's folder"), "{err}");
    assert!(!d.root.path().join("state/installed/leak/1.0.0").exists());
}

#[test]
fn as_an_ordinary_user_plugd_jails_plugins_in_a_user_namespace() {
    if !nix::unistd::geteuid().is_root() {
        return; // the test switches to another user; the library tests cover this case as is
    }
    let d = Plugd::start_as_user(65534, &["escapist", "echo"]);
    eventually("ready", || d.all_ready(&["escapist", "echo"]));
    let st = d.plugin("escapist");
    let layers = st["sandbox"].to_string();
    for want in [
        "userns(plugd's uid 65534 as 0 inside)",
        "no-capabilities",
        "namespaces(user,pid,mount,ipc,uts,net)",
        "root(minimal, pivot_root)",
        "exec(entrypoint only)",
    ] {
        assert!(layers.contains(want), "{want} missing: {layers}");
    }
    let missing = st["sandbox_unavailable"].to_string();
    assert!(
        missing.contains("user: plugd is not root, so the plugin has no uid of its own"),
        "{missing}"
    );
    assert!(!missing.contains("jail:"), "{missing}");

    let call = |method: &str, arg: &str| {
        let out = d.ctl(&["call", "escapist", method, arg]);
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    };
    // Uid 0 inside, with no capability at all.
    let who = call("whoami", "null");
    assert!(
        who.contains("CapEff:\t0000000000000000") || who.contains("CapEff:\\t0000000000000000"),
        "{who}"
    );
    // plugd, its socket and its config are not in the plugin's world.
    let plugd = d.child.id();
    assert!(call("kill", &format!("[{plugd}, 9]")).contains("No such process"));
    assert!(alive(plugd as u64));
    let sock = d.socket.display().to_string();
    assert!(call("control", &format!("[{sock:?}, \"{{}}\"]")).contains("No such file"));
    let config = d.root.path().join("plugd.toml").display().to_string();
    assert!(!call("read", &format!("{config:?}")).contains("plugin_dirs"));
    assert!(call("exec_sh", "null").contains("Permission denied"));
    // Nothing outlives a stop: no process is left in the plugin's pid namespace.
    let ns = std::fs::read_link(format!("/proc/{}/ns/pid", d.pid("escapist"))).unwrap();
    let in_ns = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read_link(e.path().join("ns/pid")).is_ok_and(|l| l == ns))
            .count()
    };
    assert!(call("double_fork", "null").contains("forked"));
    assert!(in_ns() >= 3, "init, plugin and the orphan");
    assert!(d.ctl(&["stop", "escapist"]).status.success());
    eventually("the double-forked orphan is gone", || in_ns() == 0);
    // The echo plugin works as it does under root.
    let out = d.ctl(&["call", "echo", "echo", "[1,2]"]);
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap(), serde_json::json!([1, 2]));

    // A build runs in a user namespace too.
    let src = d.root.path().join("src/built");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(d.root.path().join("bin/echo"), src.join("payload")).unwrap();
    std::fs::write(
        src.join("plugin.toml"),
        "name = \"built\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"bin/built\"\n[build]\ncommand = [\"sh\", \"-c\", \"id -u > report; mkdir -p bin && cp payload bin/built\"]\n",
    )
    .unwrap();
    Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(d.root.path().join("src"))
        .status()
        .unwrap();
    let st = d.json(&["install", src.to_str().unwrap()]);
    assert_eq!(st[0]["state"], "ready", "{st}");
    let report = d.root.path().join("state/installed/built/1.0.0/report");
    assert_eq!(
        std::fs::read_to_string(report).unwrap().trim(),
        "0",
        "uid 0 inside its user namespace"
    );
    let jobs = d.json(&["jobs"]).to_string();
    assert!(jobs.contains("install steps run jailed: userns(plugd's uid 65534 as 0 inside) no-capabilities namespaces(user,pid,mount,ipc,uts,net)"), "{jobs}");
}

#[test]
fn names_that_climb_out_of_the_state_folder_are_refused_everywhere() {
    let d = Plugd::start(|_| {});
    // A folder two levels above the installed plugins, and a victim beside the state folder.
    let victim = d.root.path().join("victim");
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::write(victim.join("keep"), "precious").unwrap();
    for args in [
        vec!["uninstall", "../../victim"],
        vec!["uninstall", "../victim", "--purge"],
        vec!["versions", "../../victim"],
        vec!["rollback", "x/../../victim"],
        vec!["stop", "ECHO"],
    ] {
        let out = d.ctl(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("is not a valid plugin name"), "{args:?}: {err}");
    }
    let out = d.ctl(&["uninstall", "echo", "--version", "../../../victim"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a version"));
    // git sources cannot smuggle options or command transports.
    let marker = d.root.path().join("pwned");
    for source in [
        format!("git+--upload-pack=touch {}", marker.display()),
        format!("git+file:///x#--upload-pack=touch {}", marker.display()),
        format!("git+ext::sh -c touch% {}", marker.display()),
    ] {
        let out = d.ctl(&["install", &source]);
        assert_eq!(out.status.code(), Some(1), "{source}");
    }
    assert!(!marker.exists(), "a git source ran a command");
    assert_eq!(std::fs::read_to_string(victim.join("keep")).unwrap(), "precious");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn a_plugin_cannot_bloat_forge_or_flood_plugds_log() {
    let d = Plugd::start(|dir| add_plugin(dir, "logbomb", "logbomb", ""));
    eventually("ready", || d.all_ready(&["logbomb"]));
    let plugd = d.child.id();
    let before = rss_kib(plugd);
    // 40 frames of 8 MiB: cut to one line's worth each, the ring bounded in bytes.
    assert!(d.ctl(&["call", "logbomb", "big", "[40, 8]"]).status.success());
    let out = d.ctl(&["logs", "logbomb", "-n", "5"]);
    assert!(out.stdout.len() < 64 << 10, "logs -n 5 printed {} bytes", out.stdout.len());
    let grown = rss_kib(plugd).saturating_sub(before);
    eprintln!("plugd RSS grew by {grown} KiB after 320 MiB of log frames");
    assert!(grown < 100 << 10, "plugd grew by {grown} KiB");

    // A line with newlines or escapes cannot pass for one of plugd's.
    assert!(d.ctl(&["call", "logbomb", "forge", "null"]).status.success());
    let log = d.root.path().join("plugd.log");
    eventually("the forged lines are logged", || {
        std::fs::read_to_string(&log).unwrap_or_default().matches("(forged)").count() >= 3
    });
    let text = std::fs::read_to_string(&log).unwrap();
    for line in text.lines().filter(|l| l.contains("(forged)")) {
        assert!(!line.starts_with("2026-12-02T00:00:00"), "a forged line: {line}");
        assert!(line.contains("plugin=\"logbomb\"") || line.contains("logbomb"), "{line}");
        assert!(!line.contains('\x1b') && !line.contains('\r'), "{line:?}");
    }

    // A flood is cut down to the rate limit in plugd's log, and counted.
    assert!(d.ctl(&["call", "logbomb", "flood", "20000"]).status.success());
    eventually("the drops are counted", || {
        d.plugin("logbomb")["log_lines_dropped"].as_u64().unwrap_or(0) > 0
    });
    eventually("and said", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("lines/s: the rest of this second is kept")
    });
    let written = std::fs::read_to_string(&log).unwrap().matches("flood line").count();
    assert!(written < 20000, "every flood line reached plugd's log ({written})");
}

#[test]
fn install_from_an_http_url() {
    let d = Plugd::start(|_| {});
    let src = tempfile::tempdir().unwrap();
    let folder = greeter_source(src.path(), "3.0.0");
    let mut bytes = Vec::new();
    {
        let gz = flate2::write::GzEncoder::new(&mut bytes, flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        tar.append_dir_all("greeter", &folder).unwrap();
        tar.into_inner().unwrap().finish().unwrap();
    }
    // A one-file HTTP server on loopback, for two requests (one good path, one missing).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        for _ in 0..2 {
            let (mut conn, _) = listener.accept().unwrap();
            let mut req = [0u8; 4096];
            let n = conn.read(&mut req).unwrap();
            let good = String::from_utf8_lossy(&req[..n]).starts_with("GET /greeter-3.0.0.tar.gz ");
            if good {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    bytes.len()
                );
                conn.write_all(head.as_bytes()).unwrap();
                conn.write_all(&bytes).unwrap();
            } else {
                conn.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .unwrap();
            }
        }
    });
    let st = d.json(&["install", &format!("http://127.0.0.1:{port}/greeter-3.0.0.tar.gz")]);
    assert_eq!(
        (st[0]["version"].as_str(), st[0]["state"].as_str()),
        (Some("3.0.0"), Some("ready"))
    );
    let out = d.ctl(&["install", &format!("http://127.0.0.1:{port}/missing.tar.gz")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("404"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.join().unwrap();
}

#[test]
fn install_from_a_zip_and_refuse_unmet_requires() {
    let d = Plugd::start(|dir| add_plugin(dir, "echo", "echo", ""));
    eventually("ready", || d.all_ready(&["echo"]));
    let src = tempfile::tempdir().unwrap();
    let folder = greeter_source(src.path(), "1.0.0");
    let archive = src.path().join("greeter.zip");
    {
        use std::io::Write;
        let mut z = zip::ZipWriter::new(std::fs::File::create(&archive).unwrap());
        let opts = zip::write::SimpleFileOptions::default().unix_permissions(0o755);
        z.start_file("greeter/plugin.toml", opts).unwrap();
        z.write_all(&std::fs::read(folder.join("plugin.toml")).unwrap()).unwrap();
        z.start_file("greeter/bin/greeter", opts).unwrap();
        z.write_all(&std::fs::read(folder.join("bin/greeter")).unwrap()).unwrap();
        z.finish().unwrap();
    }
    let st = d.json(&["install", archive.to_str().unwrap()]);
    assert_eq!(st[0]["state"], "ready");

    // A plugin whose requires are not met is refused before anything is copied.
    let needy = src.path().join("needy");
    std::fs::create_dir_all(needy.join("bin")).unwrap();
    std::fs::copy(bin_dir().join("echo"), needy.join("bin/needy")).unwrap();
    std::fs::write(
        needy.join("plugin.toml"),
        "name = \"needy\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"bin/needy\"\nrequires = [\"echo ^2\", \"price-feed\"]\n",
    )
    .unwrap();
    let out = d.ctl(&["install", needy.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("requires echo ^2, but 1.0.0 is installed") && err.contains("price-feed"),
        "{err}"
    );
    assert!(!d.root.path().join("state/installed/needy").exists());
}

#[test]
fn a_reload_refuses_an_edit_that_would_break_a_running_dependent() {
    let d = Plugd::start(|dir| {
        add_plugin(dir, "echo", "base", "");
        add_plugin(dir, "echo", "user", "requires = [\"base ^1\"]");
    });
    eventually("ready", || d.all_ready(&["base", "user"]));
    let (base, user) = (d.pid("base"), d.pid("user"));
    let set = |name: &str, from: &str, to: &str| {
        let path = d.plugins().join(name).join("plugin.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{text}");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    };
    set("base", "version = \"1.0.0\"", "version = \"2.0.0\"");
    let report = d.json(&["reload"]);
    let problems = report["problems"].to_string();
    assert!(problems.contains("would break user") && problems.contains("--force"), "{report}");
    assert_eq!((d.pid("base"), d.pid("user")), (base, user), "nothing restarted");
    assert_eq!(d.plugin("base")["version"], "1.0.0");
    assert!(d.all_ready(&["base", "user"]));
    // Once the dependent asks for the new version, the next reload applies both edits.
    set("user", "base ^1", "base ^2");
    let report = d.json(&["reload"]);
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
    eventually("both moved", || {
        d.plugin("base")["version"] == "2.0.0" && d.all_ready(&["base", "user"])
    });
}

/// A plugin that reaches the control socket (here: one run as root on the host's file
/// system, the widest a manifest can ask for) is refused by its pid namespace, not its uid.
#[test]
fn the_control_socket_refuses_plugin_processes() {
    if !nix::unistd::geteuid().is_root() {
        return; // without root there is no jail, and plugins run as plugd's uid (reported)
    }
    let d = Plugd::start(|dir| {
        add_plugin(
            dir,
            "escapist",
            "escapist",
            "[sandbox]\nuser = \"root\"\nfilesystem = \"host\"\n",
        );
    });
    let socket = d.socket.canonicalize().unwrap().display().to_string();
    let arg = serde_json::to_string(&(socket, r#"{"cmd":"stop","name":"escapist"}"#)).unwrap();
    let out = d.ctl(&["call", "escapist", "control", &arg]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        answer.contains("permission denied") && answer.contains("another pid namespace"),
        "{answer}"
    );
    let status = d.ctl(&["status", "--json"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("\"ready\""), "the plugin did not stop itself: {text}");
    // status flags a plugin that runs as root.
    let human = String::from_utf8_lossy(&d.ctl(&["status", "escapist"]).stdout).into_owned();
    assert!(human.contains("user(root: no uid isolation)"), "{human}");
}

/// After an in-place upgrade the descriptors plugd adopted (control listener, plugins'
/// sockets and pidfds) are close-on-exec again, and a plugin started afterwards holds
/// only its own descriptors.
#[test]
fn descriptors_adopted_across_an_upgrade_do_not_leak() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("plugins")).unwrap();
    add_plugin(&root.path().join("plugins"), "echo", "echo", "");
    let exe = plugd_copy(root.path());
    let d = Plugd::start_exe(&exe, root, &[]);
    eventually("ready", || d.all_ready(&["echo"]));
    d.signal(Signal::SIGUSR2);
    eventually("the new generation answers", || {
        d.ctl(&["info"]).status.success() && info(&d)["generation"] == 1
    });
    // What an upgrade hands over: the control listener and each plugin's socket and pidfd
    // (other descriptors, such as ones the test runner itself leaks into plugd, are not ours).
    let pid = d.child.id();
    let mut checked = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap().flatten() {
        let fd: i32 = entry.file_name().to_string_lossy().parse().unwrap();
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap_or_default();
        let target = target.display().to_string();
        if !(target.starts_with("socket:") || target == "anon_inode:[pidfd]") {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(entry.path()) else { continue };
        let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap().trim();
        let flags = u32::from_str_radix(flags, 8).unwrap();
        assert_ne!(flags & libc::O_CLOEXEC as u32, 0, "fd {fd} ({target}) of plugd");
        checked += 1;
    }
    assert!(checked >= 3, "the listener, echo's socket and pidfd were looked at");
    add_plugin(&d.plugins(), "escapist", "escapist", "");
    d.signal(Signal::SIGHUP);
    eventually("escapist ready", || d.all_ready(&["echo", "escapist"]));
    let out = d.ctl(&["call", "escapist", "fds", "null"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fds: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    let sockets = fds.iter().filter(|f| f.contains("socket:")).count();
    let distinct: std::collections::BTreeSet<&str> =
        fds.iter().filter_map(|f| f.split_once('=')).map(|x| x.1).collect();
    // /dev/null, two pipes, its socket (the SDK may hold copies) and the folder it lists.
    assert!(distinct.len() <= 5, "{fds:?}");
    assert!(sockets >= 1, "{fds:?}");
}

/// Runs git in `repo` with a throwaway identity; its stdout, trimmed (the test fails if git does).
fn git_in(repo: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.email=t@example.invalid", "-c", "user.name=t"])
        .args(["-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(repo)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A `.tar.gz` of `folder` (as its top folder) at `to`.
fn tar_gz(folder: &Path, to: &Path) {
    let file = std::fs::File::create(to).unwrap();
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.append_dir_all(folder.file_name().unwrap(), folder).unwrap();
    tar.into_inner().unwrap().finish().unwrap();
}

#[test]
fn with_required_signatures_only_archives_signed_by_a_trusted_key_install() {
    use minisign::KeyPair;
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("plugins")).unwrap();
    let KeyPair { pk, sk } = KeyPair::generate_unencrypted_keypair().unwrap();
    std::fs::write(root.path().join("trusted.pub"), pk.to_box().unwrap().to_string()).unwrap();
    let stranger = KeyPair::generate_unencrypted_keypair().unwrap();
    std::fs::write(
        root.path().join("extra.toml"),
        "[install]\ntrusted_keys = [\"trusted.pub\"]\nrequire_signatures = true\n",
    )
    .unwrap();
    let d = Plugd::start_with(root, &[]);
    let src = tempfile::tempdir().unwrap();
    let folder = greeter_source(src.path(), "1.0.0");
    let archive = src.path().join("greeter-1.0.0.tar.gz");
    tar_gz(&folder, &archive);
    let sign = |with: &minisign::SecretKey| {
        let data = std::fs::read(&archive).unwrap();
        let sig = minisign::sign(
            Some(&pk),
            with,
            std::io::Cursor::new(data),
            Some("greeter 1.0.0 by the plugin team"),
            None,
        );
        sig.map(|s| s.to_string()).unwrap_or_default()
    };
    let sig_path = src.path().join("greeter-1.0.0.tar.gz.minisig");
    let install = |d: &Plugd, what: &Path| {
        let out = d.ctl(&["install", what.to_str().unwrap()]);
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };

    // Unsigned: refused, naming the setting.
    let (code, err) = install(&d, &archive);
    assert_eq!(code, Some(1));
    assert!(err.contains("has no signature") && err.contains("require_signatures"), "{err}");
    // A folder cannot carry a signature: refused too.
    let (code, err) = install(&d, &folder);
    assert_eq!(code, Some(1));
    assert!(err.contains("a folder carries no signature"), "{err}");
    // A git repository: its tree is signed in .plugd/tree.minisig.
    let repo = src.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    for entry in ["plugin.toml", "bin"] {
        Command::new("cp").arg("-r").arg(folder.join(entry)).arg(&repo).status().unwrap();
    }
    let git = |args: &[&str]| git_in(&repo, args);
    git(&["init", "-q"]);
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "greeter"]);
    git(&["tag", "unsigned"]);
    let url = |tag: &str| format!("git+file://{}#{tag}", repo.display());
    let out = d.ctl(&["install", &url("unsigned")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no .plugd/tree.minisig"));
    let tree = git(&["rev-parse", "HEAD^{tree}"]);
    let tree_sig = minisign::sign(
        Some(&pk),
        &sk,
        std::io::Cursor::new(format!("{tree}\n").into_bytes()),
        Some("greeter tree"),
        None,
    )
    .unwrap()
    .to_string();
    std::fs::create_dir_all(repo.join(".plugd")).unwrap();
    std::fs::write(repo.join(".plugd/tree.minisig"), &tree_sig).unwrap();
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "signed"]);
    git(&["tag", "signed"]);
    // A change after signing: refused.
    std::fs::write(repo.join("extra.txt"), "slipped in").unwrap();
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "changed"]);
    git(&["tag", "changed"]);
    let out = d.ctl(&["install", &url("changed")]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not verify the tree"), "{err}");
    // Signed by a key plugd does not trust: refused.
    std::fs::write(&sig_path, {
        let data = std::fs::read(&archive).unwrap();
        minisign::sign(Some(&stranger.pk), &stranger.sk, std::io::Cursor::new(data), None, None)
            .unwrap()
            .to_string()
    })
    .unwrap();
    let (code, err) = install(&d, &archive);
    assert_eq!(code, Some(1));
    assert!(err.contains("does not verify with any key"), "{err}");
    // Signed by the trusted key, then changed: refused.
    std::fs::write(&sig_path, sign(&sk)).unwrap();
    let mut bytes = std::fs::read(&archive).unwrap();
    bytes.push(0);
    let tampered = src.path().join("tampered.tar.gz");
    std::fs::write(&tampered, &bytes).unwrap();
    std::fs::copy(&sig_path, src.path().join("tampered.tar.gz.minisig")).unwrap();
    let (code, err) = install(&d, &tampered);
    assert_eq!(code, Some(1));
    assert!(err.contains("does not verify"), "{err}");
    assert!(!d.root.path().join("state/installed/greeter").exists(), "nothing of it was installed");
    // Signed by the trusted key: installed, and the job says by whom.
    let (code, err) = install(&d, &archive);
    assert_eq!(code, Some(0), "{err}");
    eventually("ready", || d.all_ready(&["greeter"]));
    let jobs = d.json(&["jobs"]).to_string();
    assert!(
        jobs.contains("signature verified, signed by")
            && jobs.contains("greeter 1.0.0 by the plugin team"),
        "{jobs}"
    );
    // plugctl validate says who signed an archive (keys from plugd.toml), and refuses a
    // changed one.
    let config = d.root.path().join("plugd.toml");
    let out = Command::new(plugd_bin("plugctl"))
        .args(["validate", archive.to_str().unwrap(), "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("signature: signed by") && text.contains("trusted.pub"), "{text}");
    let out = Command::new(plugd_bin("plugctl"))
        .args([
            "--json",
            "validate",
            archive.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["signature"].as_str().unwrap_or("").starts_with("signed by"), "{v}");
    let out = Command::new(plugd_bin("plugctl"))
        .args(["validate", tampered.to_str().unwrap(), "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not verify"));
    // The signed tag installs as well (the same version again, forced).
    let out = d.ctl(&["install", &url("signed"), "--force"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(d.json(&["jobs"]).to_string().contains("greeter tree"));
}

#[test]
fn a_pinned_entrypoint_that_changed_is_refused_not_run() {
    let d = Plugd::start(|_| {});
    let dir = d.plugins().join("pinned");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(bin_dir().join("echo"), dir.join("echo")).unwrap();
    let hash = supervisor::spawn::sha256_of(&dir.join("echo")).unwrap();
    let manifest = |pin: &str| {
        format!("name = \"pinned\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"echo\"\nentrypoint_sha256 = \"{pin}\"\n[restart]\npolicy = \"never\"\n")
    };
    std::fs::write(dir.join("plugin.toml"), manifest(&hash)).unwrap();
    assert!(d.ctl(&["reload"]).status.success());
    eventually("the pinned plugin runs", || d.all_ready(&["pinned"]));
    // The binary is swapped for another one: the next start refuses it and says why.
    std::fs::copy(bin_dir().join("crasher"), dir.join("echo.new")).unwrap();
    std::fs::rename(dir.join("echo.new"), dir.join("echo")).unwrap();
    let out = d.ctl(&["restart", "pinned"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pins entrypoint_sha256") && err.contains(&hash), "{err}");
    assert_ne!(d.plugin("pinned")["state"], "ready");
    // A pin that is not a SHA-256 is a manifest error.
    std::fs::write(dir.join("plugin.toml"), manifest("abc")).unwrap();
    let out = d.ctl(&["reload"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("entrypoint_sha256"));
}

#[test]
fn logs_follow_misses_no_line_of_a_burst() {
    let d = Plugd::start(|dir| add_plugin(dir, "logbomb", "logbomb", ""));
    eventually("ready", || d.all_ready(&["logbomb"]));
    let out_file = d.root.path().join("follow.txt");
    let mut follower = Command::new(plugd_bin("plugctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["logs", "logbomb", "-f", "-n", "1"])
        .stdout(std::fs::File::create(&out_file).unwrap())
        .spawn()
        .unwrap();
    eventually("the follower printed its first line", || {
        std::fs::metadata(&out_file).is_ok_and(|m| m.len() > 0)
    });
    // 600 lines within one poll interval, far more than -n 1, many in the same millisecond.
    assert!(d.ctl(&["call", "logbomb", "flood", "600"]).status.success());
    eventually("the follower printed every line", || {
        std::fs::read_to_string(&out_file).unwrap_or_default().matches("flood line ").count() >= 600
    });
    let _ = follower.kill();
    let _ = follower.wait();
    let text = std::fs::read_to_string(&out_file).unwrap();
    for i in [0, 1, 299, 599] {
        assert!(text.contains(&format!("flood line {i}\n")), "line {i} missing");
    }
    assert_eq!(text.matches("flood line ").count(), 600, "each line once");
}

/// Reloads, hot updates and restarts from several clients at once run one at a time:
/// each succeeds, and the plugin list ends as it began — each plugin once, ready.
#[test]
fn concurrent_reloads_updates_and_restarts_leave_one_consistent_plugin_list() {
    let d = Plugd::start(|dir| {
        add_plugin(dir, "echo", "echo", "");
        add_plugin(dir, "echo", "twin", "");
    });
    eventually("ready", || d.all_ready(&["echo", "twin"]));
    std::thread::scope(|s| {
        for client in 0..4 {
            let d = &d;
            s.spawn(move || {
                for round in 0..4 {
                    let args: &[&str] = match (client + round) % 3 {
                        0 => &["reload"],
                        1 => &["update", "echo"],
                        _ => &["restart", "twin"],
                    };
                    let out = d.ctl(args);
                    assert!(
                        out.status.success(),
                        "{args:?}: {}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            });
        }
    });
    let mut names: Vec<String> =
        d.status().iter().map(|p| p["name"].as_str().unwrap().to_string()).collect();
    names.sort();
    assert_eq!(names, ["echo", "twin"]);
    assert!(d.all_ready(&["echo", "twin"]), "{:?}", d.status());
    let out = d.ctl(&["call", "echo", "echo", "7"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "7");
}

#[test]
fn a_plugin_json_folder_is_served_shown_as_written_and_a_folder_without_a_manifest_reported() {
    let d = Plugd::start(|plugins| {
        // A home console's plugin.json: an id, a name for people, its own keys.
        let dir = plugins.join("greeter");
        std::fs::create_dir_all(&dir).unwrap();
        let manifest = serde_json::json!({
            "id": "greeter", "name": "Greeter Deluxe", "version": "1.2.0", "type": "internal",
            "runtime": "native", "entrypoint": bin_dir().join("echo").display().to_string(),
            "homepage": "https://example.invalid/greeter"
        });
        std::fs::write(dir.join("plugin.json"), manifest.to_string()).unwrap();
        // A folder that is no plugin at all.
        std::fs::create_dir_all(plugins.join("notes")).unwrap();
    });
    eventually("the plugin.json plugin is ready", || d.all_ready(&["greeter"]));
    let back = d.json(&["call", "greeter", "echo", "\"hi\""]);
    assert_eq!(back, serde_json::json!("hi"));
    let show = d.ctl(&["show", "greeter"]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(show.status.success(), "{}", String::from_utf8_lossy(&show.stderr));
    assert!(text.contains("display_name: Greeter Deluxe"), "{text}");
    assert!(text.contains("homepage: https://example.invalid/greeter"), "{text}");
    assert!(text.contains("type: internal"), "a type plugd has no kind for is kept: {text}");
    // The folder with no manifest is reported, naming it, on a reload.
    let out = d.ctl(&["reload"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("notes") && said.contains("no plugin.toml, plugin.yaml or plugin.json"),
        "{said}"
    );
}

#[test]
fn a_reload_removes_the_virtualenv_of_a_plugin_whose_folder_is_gone() {
    let d = Plugd::start(|plugins| {
        add_plugin(plugins, "echo", "leaving", "");
        add_plugin(plugins, "echo", "staying", "");
    });
    eventually("both ready", || d.all_ready(&["leaving", "staying"]));
    // Their venvs, as a Python plugin's would be (the kind of folder a reload cleans up).
    let venvs = d.root.path().join("state/plugins/.venv");
    for name in ["leaving", "staying"] {
        std::fs::create_dir_all(venvs.join(name).join("1.0.0/bin")).unwrap();
    }
    std::fs::remove_dir_all(d.root.path().join("plugins/leaving")).unwrap();
    let report = d.json(&["reload"]);
    assert_eq!(report["removed"], serde_json::json!(["leaving"]), "{report}");
    assert_eq!(report["venvs_removed"], serde_json::json!(["leaving"]), "{report}");
    assert!(!venvs.join("leaving").exists());
    assert!(venvs.join("staying/1.0.0").is_dir(), "a plugin still here keeps its venv");
}

#[test]
fn instances_of_one_plugin_run_as_processes_of_their_own_with_their_own_config() {
    let d = Plugd::start(|plugins| {
        let dir = plugins.join("hedge");
        std::fs::create_dir_all(&dir).unwrap();
        let manifest = format!(
            "name = \"hedge\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"{}\"\n[config]\ndesk = \"eu\"\nsymbol = \"BTC\"\n\n[[instances]]\nname = \"hedge-btc\"\n\n[[instances]]\nname = \"hedge-eth\"\nconfig = {{ symbol = \"ETH\" }}\n",
            bin_dir().join("echo").display()
        );
        std::fs::write(dir.join("plugin.toml"), manifest).unwrap();
    });
    eventually("both instances ready", || d.all_ready(&["hedge-btc", "hedge-eth"]));
    assert!(d.plugin("hedge").is_null(), "the plugin itself runs only as its instances");
    let (btc, eth) = (d.pid("hedge-btc"), d.pid("hedge-eth"));
    assert!(btc != 0 && eth != 0 && btc != eth, "a process each");
    let config = |name: &str| -> Value {
        let text = d.json(&["call", name, "config", "null"]);
        serde_json::from_str(text.as_str().unwrap()).unwrap()
    };
    assert_eq!(config("hedge-btc"), serde_json::json!({"desk": "eu", "symbol": "BTC"}));
    assert_eq!(config("hedge-eth"), serde_json::json!({"desk": "eu", "symbol": "ETH"}));
    // Each has its own restarts: one stopped, the other serves on.
    let out = d.ctl(&["stop", "hedge-btc"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(d.plugin("hedge-eth")["state"], "ready");
    assert_eq!(d.pid("hedge-eth"), eth);
}

#[test]
fn install_dry_run_shows_the_plan_and_the_dependencies_and_installs_nothing() {
    let d = Plugd::start(|_| {});
    let src = tempfile::tempdir().unwrap();
    let dir = src.path().join("needs-requests");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("plugin.toml"),
        "name = \"needs-requests\"\nversion = \"0.3.0\"\napi_version = \"^1\"\nentrypoint = \"main.py\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("main.py"), "").unwrap();
    std::fs::write(dir.join("requirements.txt"), "requests>=2.31\nidna==3.7\n").unwrap();
    let out = d.ctl(&["install", "--dry-run", dir.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.starts_with("needs-requests (not running) -> 0.3.0"), "{text}");
    assert!(text.contains("+ requests>=2.31") && text.contains("+ idna==3.7"), "{text}");
    assert!(!d.root.path().join("state/installed/needs-requests").exists(), "nothing installed");
    assert!(d.plugin("needs-requests").is_null());
    // An archive and a git source are fetched into a scratch folder for the preview, and
    // the scratch folder is gone after.
    let archive = src.path().join("needs-requests-0.3.0.tar.gz");
    tar_gz(&dir, &archive);
    let repo = src.path().join("repo");
    Command::new("cp").arg("-r").arg(&dir).arg(&repo).status().unwrap();
    let git = |args: &[&str]| git_in(&repo, args);
    git(&["init", "-q"]);
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "0.3.0"]);
    let url = format!("git+file://{}", repo.display());
    for source in [archive.to_str().unwrap(), url.as_str()] {
        let out = d.ctl(&["install", "--dry-run", source]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{source}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(text.starts_with("needs-requests (not running) -> 0.3.0"), "{source}: {text}");
        assert!(text.contains("+ requests>=2.31"), "{source}: {text}");
    }
    let installed = d.root.path().join("state/installed");
    let left: Vec<_> = std::fs::read_dir(&installed)
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "no plugin and no scratch folder left: {left:?}");
    assert!(d.plugin("needs-requests").is_null());
    // A source that is not there is named.
    let out = d.ctl(&["install", "--dry-run", "/nonexistent/archive.tar.gz"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/archive.tar.gz"));
}

#[test]
fn plugd_toml_instances_run_a_plugin_under_the_names_it_gives() {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    add_plugin(&plugins, "echo", "strat", "");
    // A trading platform's list of strategies: name, plugin, config.
    std::fs::write(
        root.path().join("extra.toml"),
        "[[instances]]\nname = \"strat-fast\"\nplugin = \"strat\"\nconfig = { greeting = \"fast\" }\n\n[[instances]]\nname = \"strat-slow\"\nplugin = \"strat\"\nconfig = { greeting = \"slow\" }\n\n[[instances]]\nname = \"orphan\"\nplugin = \"no-such-plugin\"\n",
    )
    .unwrap();
    let d = Plugd::start_with(root, &[]);
    eventually("both instances ready", || d.all_ready(&["strat-fast", "strat-slow"]));
    assert!(d.plugin("strat").is_null(), "the plugin runs as its instances only");
    let config = |name: &str| -> Value {
        let text = d.json(&["call", name, "config", "null"]);
        serde_json::from_str(text.as_str().unwrap()).unwrap()
    };
    assert_eq!(config("strat-fast")["greeting"], "fast");
    assert_eq!(config("strat-slow")["greeting"], "slow");
    let report = d.json(&["reload"]);
    let problems = report["problems"].to_string();
    assert!(problems.contains("instance orphan names plugin no-such-plugin"), "{report}");
}

#[test]
fn a_single_file_plugin_is_discovered_and_served_by_plugd() {
    let d = Plugd::start(|plugins| {
        std::fs::write(
            plugins.join("greeter_plugin.py"),
            "class Greeter:\n    def greet(self, who):\n        return 'hello ' + who\n",
        )
        .unwrap();
    });
    eventually("the single-file plugin is ready", || d.all_ready(&["greeter"]));
    assert_eq!(d.json(&["call", "greeter", "greet", "\"ann\""]), serde_json::json!("hello ann"));
    let st = d.plugin("greeter");
    assert!(st["manifest"].as_str().unwrap().ends_with("greeter_plugin.py"), "{st}");
    // Its file removed: the reload unloads it and drops its staged copy.
    let staged = d.root.path().join("state/single/greeter");
    assert!(staged.join("greeter_plugin.py").is_file());
    std::fs::remove_file(d.root.path().join("plugins/greeter_plugin.py")).unwrap();
    let report = d.json(&["reload"]);
    assert_eq!(report["removed"], serde_json::json!(["greeter"]), "{report}");
    assert!(!staged.exists(), "the staged copy is gone too");
}
