//! End to end: plugins call the host (protocol version 2) — on the async path, inline on an
//! engine thread, with unknown and panicking methods, and with the caller's deadline
//! passed on.

mod kit;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kit::*;
use supervisor::{Deadline, HostCall};

/// Asks the echo plugin to call the host's `method` with `arg`: the host's answer, or the
/// error the plugin got, as "Code: message" (the plugin fails its own call with it).
async fn via_plugin(echo: &supervisor::PluginHandle, method: &str, arg: &str) -> String {
    let arg = (method.to_string(), arg.to_string());
    match echo.call::<_, String>("host", &arg).await {
        Ok(answer) => answer,
        Err(e) => e.message,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_calls_the_host_and_unknown_or_panicking_methods_answer_in_words() {
    let sup = supervisor();
    sup.host_method("send_order", |c: &HostCall<'_>, symbol: String| -> Result<String, String> {
        Ok(format!("filled {symbol} for {}", c.plugin))
    });
    sup.host_method("boom", |_: &HostCall<'_>, _: String| -> Result<String, String> {
        panic!("the order book is on fire")
    });
    sup.host_method_async("async-boom", |_req: supervisor::HostRequest| async move {
        if _req.plugin == "echo" {
            panic!("the async book is on fire");
        }
        Ok::<_, supervisor::CallError>(supervisor::Payload::empty())
    });
    sup.host_method("refuse", |_: &HostCall<'_>, _: String| -> Result<String, String> {
        Err("market closed".into())
    });
    let echo = sup.load(example("echo")).await.unwrap();
    assert_eq!(via_plugin(&echo, "send_order", "BTC").await, "filled BTC for echo");
    let unknown = via_plugin(&echo, "nope", "").await;
    assert!(
        unknown.starts_with("UnknownMethod") && unknown.contains("send_order"),
        "the error names what the host has: {unknown}"
    );
    let panicked = via_plugin(&echo, "boom", "").await;
    assert!(panicked.starts_with("Panicked") && panicked.contains("on fire"), "{panicked}");
    let panicked = via_plugin(&echo, "async-boom", "").await;
    assert!(panicked.starts_with("Panicked") && panicked.contains("async book"), "{panicked}");
    assert_eq!(via_plugin(&echo, "refuse", "").await, "Failed: market closed");
    // The host and the plugin both carry on after the panic.
    assert_eq!(via_plugin(&echo, "send_order", "ETH").await, "filled ETH for echo");
    assert_eq!(echo.status().restarts, 0);
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_thread_serves_the_plugins_host_call_itself_while_it_waits() {
    let sup = supervisor();
    let served_on = Arc::new(Mutex::new(Vec::new()));
    {
        let served_on = served_on.clone();
        sup.host_method(
            "send_order",
            move |_: &HostCall<'_>, symbol: String| -> Result<String, String> {
                served_on.lock().unwrap().push(std::thread::current().id());
                Ok(format!("filled {symbol}"))
            },
        );
    }
    let echo = sup.load(example("echo")).await.unwrap();
    echo.set_engine_mode(true);
    let engine = {
        let echo = echo.clone();
        std::thread::spawn(move || {
            let me = std::thread::current().id();
            let mut answers = Vec::new();
            for i in 0..50 {
                let arg = ("send_order".to_string(), format!("T{i}"));
                let got: String = echo
                    .call_blocking("host", &arg, Deadline::after(Duration::from_secs(10)))
                    .unwrap();
                answers.push(got);
            }
            (me, answers)
        })
    };
    let (engine_id, answers) = engine.join().unwrap();
    assert_eq!(answers.first().map(String::as_str), Some("filled T0"));
    assert_eq!(answers.last().map(String::as_str), Some("filled T49"));
    let threads = served_on.lock().unwrap().clone();
    assert_eq!(threads.len(), 50);
    assert!(
        threads.iter().all(|t| *t == engine_id),
        "every host call was served inline on the engine thread that waited"
    );
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_call_gets_no_more_time_than_the_call_it_serves() {
    let sup = supervisor();
    let seen = Arc::new(Mutex::new(None));
    {
        let seen = seen.clone();
        sup.host_method("deadline", move |c: &HostCall<'_>, _: String| -> Result<String, String> {
            *seen.lock().unwrap() = Some(c.deadline);
            Ok(String::new())
        });
    }
    let echo = sup.load(example("echo")).await.unwrap();
    let t0 = Instant::now();
    let arg = ("deadline".to_string(), String::new());
    let _: String =
        echo.call_with("host", &arg, Deadline::after(Duration::from_secs(3))).await.unwrap();
    let got = seen.lock().unwrap().take().expect("the handler ran");
    let deadline = got.expect("the plugin passed the call's deadline on");
    assert!(
        deadline <= t0 + Duration::from_secs(3) + Duration::from_millis(50),
        "the host call may not outlive the call it serves ({:?} after it began)",
        deadline - t0
    );
    sup.shutdown().await;
}

/// Asks `from` to call `plugin.method(arg)` through plugd; the answer or the error text.
async fn relay(from: &supervisor::PluginHandle, plugin: &str, method: &str, arg: &str) -> String {
    let arg = (plugin.to_string(), method.to_string(), arg.to_string());
    match from.call::<_, String>("relay", &arg).await {
        Ok(answer) => answer,
        Err(e) => e.message,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_calls_another_through_plugd_only_where_its_manifest_allows() {
    let sup = supervisor();
    let dir = tempfile::tempdir().unwrap();
    let strat = sup
        .load(plugin(&dir, "strat", "echo", "[calls]\nallow = [\"exchange.echo\", \"ghost.*\"]\n"))
        .await
        .unwrap();
    let exchange = sup.load(plugin(&dir, "exchange", "echo", "")).await.unwrap();
    // Allowed: the exchange's echo answers, through plugd.
    assert_eq!(relay(&strat, "exchange", "echo", "buy 1").await, "buy 1");
    // Not listed: refused by plugd, naming the manifest key that would allow it.
    let denied = relay(&strat, "exchange", "pid", "").await;
    assert!(
        denied.starts_with("Denied")
            && denied.contains("\"exchange.pid\"")
            && denied.contains("[calls] allow"),
        "{denied}"
    );
    // Deny by default: the exchange lists nothing.
    let back = relay(&exchange, "strat", "echo", "x").await;
    assert!(back.starts_with("Denied") && back.contains("plugin exchange may not call"), "{back}");
    // Allowed but not loaded.
    let ghost = relay(&strat, "ghost", "x", "").await;
    assert!(
        ghost.starts_with("Unavailable") && ghost.contains("plugin ghost is not loaded"),
        "{ghost}"
    );
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_of_plugin_calls_ends_at_the_deadline_not_in_a_hang() {
    let sup = supervisor();
    let dir = tempfile::tempdir().unwrap();
    let a = sup
        .load(plugin(&dir, "ping-a", "echo", "[calls]\nallow = [\"ping-b.bounce\"]\n"))
        .await
        .unwrap();
    let b = sup
        .load(plugin(&dir, "ping-b", "echo", "[calls]\nallow = [\"ping-a.bounce\"]\n"))
        .await
        .unwrap();
    // a → b → a: a is busy in its own handler, so the second call to it cannot be served
    // before the deadline; every hop has at most what the first call had.
    let t0 = Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        a.call_with::<_, String>("bounce", "ping-b", Deadline::after(Duration::from_millis(500))),
    )
    .await
    .expect("the cycle ended instead of hanging");
    let err = outcome.expect_err("a cycle cannot succeed");
    // The inner calls end a little before the outer one (the SDK keeps a margin), so the
    // failure comes back as a's own answer; at worst the outer call itself runs out.
    assert!(
        err.code == supervisor::ErrorCode::DeadlineExceeded
            || err.message.contains("DeadlineExceeded"),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(30));
    // Both plugins serve again once the cycle has unwound (the calls that were waiting in
    // it end at their deadlines first).
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        let x: Result<String, _> = a.call("echo", "a").await;
        let y: Result<String, _> = b.call("echo", "b").await;
        if x.is_ok() && y.is_ok() {
            break;
        }
        assert!(Instant::now() < give_up, "the plugins did not serve again: {x:?} {y:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (sa, sb) = (a.status(), b.status());
    assert_eq!(
        sa.restarts + sb.restarts,
        0,
        "nothing was killed: {:?} / {:?}",
        sa.last_exit,
        sb.last_exit
    );
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_thread_reaches_another_plugin_through_its_strategys_host_call() {
    let sup = supervisor();
    let dir = tempfile::tempdir().unwrap();
    let strat = sup
        .load(plugin(&dir, "strat", "echo", "[calls]\nallow = [\"exchange.echo\"]\n"))
        .await
        .unwrap();
    let _exchange = sup.load(plugin(&dir, "exchange", "echo", "")).await.unwrap();
    strat.set_engine_mode(true);
    let answers = std::thread::spawn(move || {
        (0..20)
            .map(|i| {
                let arg = ("exchange".to_string(), "echo".to_string(), format!("order {i}"));
                strat
                    .call_blocking::<_, String>(
                        "relay",
                        &arg,
                        Deadline::after(Duration::from_secs(10)),
                    )
                    .unwrap()
            })
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    assert_eq!(answers.len(), 20);
    assert_eq!(answers[7], "order 7", "the async plugd.call ran while the engine thread waited");
    sup.shutdown().await;
}

/// The py-strategy example in a folder of its own, with `extra` appended to its manifest.
fn py_strategy(dir: &tempfile::TempDir, name: &str, extra: &str) -> supervisor::PluginSpec {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/py-strategy");
    let folder = dir.path().join(name);
    std::fs::create_dir_all(&folder).unwrap();
    for file in ["main.py", "requirements.txt"] {
        std::fs::copy(src.join(file), folder.join(file)).unwrap();
    }
    let manifest = std::fs::read_to_string(src.join("plugin.toml")).unwrap();
    let manifest = manifest.replace("name = \"py-strategy\"", &format!("name = \"{name}\""));
    std::fs::write(folder.join("plugin.toml"), format!("{manifest}\n{extra}")).unwrap();
    supervisor::PluginSpec::from_manifest(&folder).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_plugin_calls_the_host_and_another_plugin() {
    let state = tempfile::tempdir().unwrap();
    let sup = supervisor::Supervisor::new(supervisor::SupervisorConfig {
        bin_dirs: vec![bin_dir()],
        state_dir: state.path().to_path_buf(),
        prepare: Some(Arc::new(plugd_install::python::Venvs)),
        ..Default::default()
    })
    .unwrap();
    sup.host_method(
        "send_order",
        |c: &HostCall<'_>, order: serde_json::Value| -> Result<_, String> {
            Ok(serde_json::json!({ "filled": order["qty"], "for": c.plugin }))
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let py = sup
        .load(py_strategy(&dir, "py-strat", "[calls]\nallow = [\"exchange.echo\"]\n"))
        .await
        .unwrap();
    let _exchange = sup.load(plugin(&dir, "exchange", "echo", "")).await.unwrap();
    let json = |v: serde_json::Value| supervisor::Payload::json(&v).unwrap();
    let ten_s = Deadline::after(Duration::from_secs(10));
    let fill = py.call_raw("place", json(serde_json::json!({"qty": 3})), ten_s).await.unwrap();
    let fill: serde_json::Value = fill.decode().unwrap();
    assert_eq!(fill, serde_json::json!({"filled": 3, "for": "py-strat"}));
    // It logged the order with fields (plugd.log), and reads its own status (plugd.status).
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        if let Some(l) = py.logs(50).into_iter().find(|l| l.text == "order placed") {
            break l;
        }
        assert!(Instant::now() < deadline, "no logged order: {:?}", py.logs(50));
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(line.fields.get("qty").map(String::as_str), Some("3"));
    assert_eq!(
        line.fields.get("fill").map(String::as_str),
        Some(r#"{"filled": 3, "for": "py-strat"}"#)
    );
    let me = py.call_raw("whoami", json(serde_json::Value::Null), ten_s).await.unwrap();
    let me: serde_json::Value = me.decode().unwrap();
    assert_eq!(me["name"], "py-strat");
    assert_eq!(me["pid"], serde_json::json!(py.status().pid));
    // Through plugd to a Rust plugin (its echo answers the JSON it got).
    let arg = serde_json::json!({"plugin": "exchange", "method": "echo", "order": {"qty": 5}});
    let back: serde_json::Value =
        py.call_raw("place_via", json(arg), ten_s).await.unwrap().decode().unwrap();
    assert_eq!(back, serde_json::json!({"qty": 5}));
    // Not allowed: the refusal reaches the Python handler, which fails its call with it.
    let arg = serde_json::json!({"plugin": "exchange", "method": "pid", "order": null});
    let err = py.call_raw("place_via", json(arg), ten_s).await.unwrap_err();
    assert!(err.message.contains("DENIED") && err.message.contains("exchange.pid"), "{err}");
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugd_tells_a_plugin_its_own_status_and_keeps_its_log_fields() {
    let sup = supervisor();
    let echo = sup.load(example("echo")).await.unwrap();
    let me: plugin_proto::OwnStatus = echo.call("whoami", &()).await.unwrap();
    assert_eq!((me.name.as_str(), me.state.as_str(), me.restarts), ("echo", "ready", 0));
    assert_eq!(me.pid, echo.status().pid, "the status of the instance that asked");
    assert_eq!(me.sandbox, echo.status().sandbox);
    let old = me.pid;
    sup.restart("echo").await.unwrap();
    let me: plugin_proto::OwnStatus = echo.call("whoami", &()).await.unwrap();
    assert_ne!(me.pid, old);
    assert_eq!((me.restarts, me.pid), (echo.status().restarts, echo.status().pid));

    // A line with fields, sent one way: kept with its fields, values sanitized.
    let fields = vec![("order_id".to_string(), "42".to_string()), ("note".into(), "a\nb".into())];
    echo.call::<_, ()>("log_fields", &("order placed", &fields)).await.unwrap();
    let find = |text: &str| echo.logs(50).into_iter().find(|l| l.text.contains(text));
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        if let Some(l) = find("order placed") {
            break l;
        }
        assert!(Instant::now() < deadline, "the line never reached the log: {:?}", echo.logs(50));
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(line.fields.get("order_id").map(String::as_str), Some("42"));
    assert_eq!(line.fields.get("note").map(String::as_str), Some("a\\nb"), "no forged newline");
    // A key that could forge another field is refused, and the refusal is in the log.
    let bad = vec![("plugin=other".to_string(), "x".to_string())];
    echo.call::<_, ()>("log_fields", &("forged", &bad)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        if let Some(l) = find("notify was dropped") {
            break l;
        }
        assert!(Instant::now() < deadline, "no word of the refused line: {:?}", echo.logs(50));
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(refused.text.contains("field key \"plugin=other\""), "{}", refused.text);
    assert!(find("forged").is_none(), "the refused line is not kept");
    sup.shutdown().await;
}
