//! End to end: load, call, crash, restart, fail, stop — with real plugin processes.

mod kit;

use std::time::{Duration, Instant};

use kit::*;
use plugd_examples::{Order, Tick};
use supervisor::{Deadline, ErrorCode, ExitReason, Payload, PayloadCodec, State, SupervisorError};

fn tick(n: u64) -> Tick {
    Tick {
        symbol: "BTC-USD".into(),
        bid: 100.0 + n as f64 * 0.01,
        ask: 100.02 + n as f64 * 0.01,
        ts: n,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_call_unload() {
    let sup = supervisor();
    let echo = sup.load(example("echo")).await.unwrap();
    let st = echo.status();
    assert_eq!((st.state, st.version.as_str(), st.restarts), (State::Ready, "1.0.0", 0));
    let pid = st.pid.unwrap();
    assert!(alive(pid));

    let back: String = echo.call("echo", "hello").await.unwrap();
    assert_eq!(back, "hello");
    let config: String = echo.call("config", &()).await.unwrap();
    assert_eq!(config, r#"{"greeting":"hello"}"#, "[config] reaches on_load as JSON");
    let name: Option<String> = echo.call("env", "PLUGD_PLUGIN_NAME").await.unwrap();
    assert_eq!(name.as_deref(), Some("echo"));
    let home: Option<String> = echo.call("env", "HOME").await.unwrap();
    assert_eq!(home, None, "the host environment is not leaked to plugins");
    // In its own pid namespace the plugin is pid 2 (its init is 1); the host sees `pid`.
    let plugin_pid: u32 = echo.call("pid", &()).await.unwrap();
    assert_eq!(plugin_pid, 2);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:")).unwrap();
    assert_eq!(nspid.split_whitespace().collect::<Vec<_>>(), [pid.to_string().as_str(), "2"]);

    let () = echo.call("log", "from the plugin").await.unwrap();
    eventually("plugin output captured", || {
        let logs = echo.logs(20);
        logs.iter().any(|l| l.text == "from the plugin")
            && logs.iter().any(|l| l.text == "stdout: from the plugin")
    })
    .await;

    let st = sup.unload("echo").await.unwrap();
    assert_eq!(st.state, State::Stopped);
    assert_eq!(st.last_exit, Some(ExitReason::Stopped { forced: false }));
    assert!(!alive(pid), "unload leaves no process");
    assert!(sup.get("echo").is_none());
    let err = echo.call::<_, String>("echo", "late").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Unavailable);
    let err = sup.unload("echo").await.unwrap_err();
    assert!(matches!(err, SupervisorError::UnknownPlugin { .. }), "{err}");
}

/// The host library builds no venvs: without a `prepare` hook, a Python plugin whose venv
/// was never built fails to start with a message naming the fix; with the installer's
/// venv builder it starts and answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_without_a_venv_builder_says_how_to_run_a_python_plugin() {
    let state = tempfile::tempdir().unwrap();
    let config = |prepare| supervisor::SupervisorConfig {
        bin_dirs: vec![bin_dir()],
        state_dir: state.path().to_path_buf(),
        prepare,
        ..Default::default()
    };
    let bare = supervisor::Supervisor::new(config(None)).unwrap();
    let err = bare.load(example("py-signal")).await.unwrap_err().to_string();
    assert!(err.contains("py-signal") && err.contains("virtualenv"), "{err}");
    assert!(err.contains("plugd_install::python::Venvs"), "the message names the fix: {err}");
    bare.shutdown().await;

    let built = std::sync::Arc::new(plugd_install::python::Venvs);
    let sup = supervisor::Supervisor::new(config(Some(built))).unwrap();
    let h = sup.load(example("py-signal")).await.unwrap();
    assert_eq!(h.status().state, State::Ready);
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_and_raw_calls_to_the_strategy() {
    let sup = supervisor();
    let strat = sup.load(example("tick-strategy")).await.unwrap();
    for n in 0..50 {
        let _: Order = strat.call("on_tick", &tick(n)).await.unwrap();
    }
    // A sharp drop below the moving average must buy.
    let dip = Tick { symbol: "BTC-USD".into(), bid: 90.0, ask: 90.02, ts: 99 };
    let order: Order = strat.call("on_tick", &dip).await.unwrap();
    assert!(
        matches!(order, Order::Limit { side: plugd_examples::Side::Buy, qty: 1, .. }),
        "{order:?}"
    );

    // Raw JSON in, JSON out (what tooling and other languages use).
    let json = br#"{"symbol":"ETH-USD","bid":10.0,"ask":10.01,"ts":1}"#.to_vec();
    let reply = strat
        .call_raw(
            "on_tick",
            Payload::raw(PayloadCodec::Json, json),
            Deadline::after(Duration::from_secs(2)),
        )
        .await
        .unwrap();
    assert_eq!(reply.codec, PayloadCodec::Json);
    let text = String::from_utf8(reply.data).unwrap();
    assert!(text == "\"Hold\"" || text.contains("Limit"), "{text}");

    // Bad input is the caller's error, not a dead plugin.
    let crossed = Tick { symbol: "X".into(), bid: 10.0, ask: 9.0, ts: 1 };
    let err = strat.call::<_, Order>("on_tick", &crossed).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Failed);
    assert!(err.message.contains("crossed"), "{err}");
    let err = strat.call::<_, Order>("on_tick", "not a tick").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::BadPayload);
    let err = strat.call::<_, Order>("no_such_method", &()).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::UnknownMethod);
    assert!(err.message.contains("on_tick"), "lists the methods it has: {err}");
    let st = strat.status();
    assert_eq!((st.state, st.restarts), (State::Ready, 0));
    assert!(st.calls_ok >= 51 && st.calls_err == 3, "{st:?}");
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_calls_in_flight_are_all_answered() {
    let sup = supervisor();
    let echo = sup.load(example("echo")).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..1000u64 {
        let echo = echo.clone();
        tasks.push(tokio::spawn(async move {
            let back: u64 =
                echo.call_with("echo", &i, Deadline::after(Duration::from_secs(20))).await.unwrap();
            assert_eq!(back, i, "each reply goes to its own caller");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(echo.status().calls_ok, 1000);
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_plugin_is_restarted_and_serves_again() {
    let sup = supervisor();
    let dir = tempfile::tempdir().unwrap();
    let spec = plugin(&dir, "crasher", "crasher", "[restart]\nbackoff = \"10ms\"\n");
    let c = sup.load(spec).await.unwrap();
    let pid = c.status().pid.unwrap();
    let err = c.call::<_, ()>("crash", "segv").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::PluginExited, "{err}");
    eventually("restarted", || {
        // One snapshot: two reads could pair a stale state with a fresh pid.
        let st = c.status();
        st.state == State::Ready && st.pid.is_some() && st.pid != Some(pid)
    })
    .await;
    let st = c.status();
    assert_eq!(st.restarts, 1);
    assert!(
        matches!(st.last_exit, Some(ExitReason::Signaled { signal: 11, .. })),
        "{:?}",
        st.last_exit
    );
    assert_eq!(st.last_exit.unwrap().to_string(), "crashed(SIGSEGV)");
    assert!(!alive(pid));
    let pong: String = c.call("ping", &()).await.unwrap();
    assert_eq!(pong, "pong");

    // exit(3) is classified as an exit code, not a signal.
    let _ = c.call::<_, ()>("crash", "exit").await;
    eventually("restarted again", || {
        let st = c.status();
        st.restarts == 2 && st.state == State::Ready
    })
    .await;
    assert_eq!(c.status().last_exit, Some(ExitReason::Exited { code: 3 }));
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_an_error_reply_not_a_dead_plugin() {
    let sup = supervisor();
    let c = sup.load(example("crasher")).await.unwrap();
    let pid = c.status().pid;
    let err = c.call::<_, ()>("panic", "boom").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Panicked);
    assert!(err.message.contains("boom"), "{err}");
    let pong: String = c.call("ping", &()).await.unwrap();
    assert_eq!(pong, "pong");
    assert_eq!(c.status().pid, pid);
    assert_eq!(c.status().restarts, 0);
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_turns_failed_while_a_neighbour_keeps_answering() {
    let sup = supervisor();
    let echo = sup.load(example("echo")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = plugin(
        &dir,
        "looper",
        "crasher",
        "[restart]\npolicy = \"always\"\nmax_restarts = 3\nwithin = \"60s\"\nbackoff = \"10ms\"\n",
    );
    let c = sup.load(spec).await.unwrap();
    let mut crashes = 0;
    let mut echoes = 0u64;
    let give_up = Instant::now() + Duration::from_secs(30);
    while c.status().state != State::Failed {
        assert!(Instant::now() < give_up, "never reached Failed: {:?}", c.status());
        if c.status().state == State::Ready && c.call::<_, ()>("crash", "abort").await.is_err() {
            crashes += 1;
        }
        let back: u64 =
            echo.call("echo", &echoes).await.expect("the neighbour must keep answering");
        assert_eq!(back, echoes);
        echoes += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let st = c.status();
    assert_eq!(crashes, 4, "3 restarts allowed, the 4th crash gives up");
    assert_eq!(st.restarts, 3);
    assert_eq!(st.pid, None);
    assert_eq!(st.last_exit.unwrap().to_string(), "crashed(SIGABRT)");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(c.status().state, State::Failed, "a failed plugin stays down");
    let err = c.call::<_, String>("ping", &()).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Unavailable);
    assert!(err.message.contains("failed") && err.message.contains("SIGABRT"), "{err}");
    assert_eq!(echo.status().state, State::Ready);
    assert_eq!(echo.status().restarts, 0);

    // Started by hand, it serves again with a fresh intensity budget.
    sup.start("looper").await.unwrap();
    let pong: String = c.call("ping", &()).await.unwrap();
    assert_eq!(pong, "pong");
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_fail_the_call_not_the_plugin() {
    let sup = supervisor();
    let slow = sup.load(example("slow")).await.unwrap();
    let err = slow
        .call_with::<_, u64>("slow", &500u64, Deadline::after(Duration::from_millis(50)))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::DeadlineExceeded);
    // The late reply is dropped; the next call gets its own answer.
    let ms: u64 = slow.call("slow", &1u64).await.unwrap();
    assert_eq!(ms, 1);
    assert_eq!(slow.status().restarts, 0);
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_to_a_stopped_plugin_fail_fast_and_start_brings_it_back() {
    let sup = supervisor();
    let echo = sup.load(example("echo")).await.unwrap();
    let pid = echo.status().pid.unwrap();
    let st = sup.stop("echo").await.unwrap();
    assert_eq!(st.state, State::Stopped);
    assert!(!alive(pid));
    let t0 = Instant::now();
    let err = echo.call::<_, String>("echo", "x").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Unavailable);
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "fails fast rather than waiting for the deadline"
    );
    assert!(err.message.contains("stopped"), "{err}");
    sup.start("echo").await.unwrap();
    let back: String = echo.call("echo", "again").await.unwrap();
    assert_eq!(back, "again");
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_is_handed_to_the_next_instance() {
    let sup = supervisor();
    let strat = sup.load(example("tick-strategy")).await.unwrap();
    let _: Order = strat.call("on_tick", &tick(0)).await.unwrap();
    let dip = Tick { symbol: "BTC-USD".into(), bid: 90.0, ask: 90.02, ts: 1 };
    let _: Order = strat.call("on_tick", &dip).await.unwrap();
    let before: i64 = strat.call("position", &()).await.unwrap();
    assert_eq!(before, 1);
    let old = strat.status().pid;
    sup.restart("tick-strategy").await.unwrap();
    assert_ne!(strat.status().pid, old);
    let after: i64 = strat.call("position", &()).await.unwrap();
    assert_eq!(after, before, "on_shutdown's State blob reached the new instance");
    // Protocol 2 has one way for it (PROTOCOL.md 5.7): Notify "plugd.state" after Ready,
    // which the SDK hands to restore_state — not Welcome.state, which on_load would see.
    let lines: Vec<String> = strat.logs(100).into_iter().map(|l| l.text).collect();
    assert!(lines.iter().any(|l| l.contains("position 1 handed over")), "{lines:#?}");
    assert!(!lines.iter().any(|l| l.contains("restored position")), "{lines:#?}");
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_failures_say_why() {
    let sup = supervisor();
    let dir = tempfile::tempdir().unwrap();

    let spec = plugin(&dir, "bad-load", "crasher", "[config]\nfail_on_load = true\n");
    let err = sup.load(spec).await.unwrap_err().to_string();
    assert!(err.contains("bad-load") && err.contains("failed to start"), "{err}");
    assert!(
        err.contains("load failed: fail_on_load is set in [config]"),
        "shows the plugin's own words: {err}"
    );
    assert!(sup.get("bad-load").is_none(), "a plugin whose first start fails is not kept");

    // A bare entrypoint that is nowhere to be found.
    let folder = dir.path().join("ghost");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join("plugin.toml"),
        "name = \"ghost\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"no-such-binary\"\n",
    )
    .unwrap();
    let spec = supervisor::PluginSpec::from_manifest(&folder).unwrap();
    let err = sup.load(spec).await.unwrap_err().to_string();
    assert!(
        err.contains("ghost") && err.contains("no-such-binary") && err.contains("not found"),
        "{err}"
    );
    assert!(err.contains("plugin.toml"), "names the manifest: {err}");

    // A command that is not a plugd plugin at all: exits before Hello.
    let folder = dir.path().join("not-a-plugin");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join("plugin.toml"),
        "name = \"not-a-plugin\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = [\"/bin/sh\", \"-c\", \"echo not a plugin >&2; exit 7\"]\n",
    )
    .unwrap();
    let spec = supervisor::PluginSpec::from_manifest(&folder).unwrap();
    let err = sup.load(spec).await.unwrap_err().to_string();
    assert!(err.contains("exited(7)") && err.contains("not a plugin"), "{err}");

    // Loading the same name twice.
    sup.load(example("echo")).await.unwrap();
    let err = sup.load(example("echo")).await.unwrap_err();
    assert!(matches!(err, SupervisorError::AlreadyLoaded { .. }), "{err}");
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_with_mistakes_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let write = |text: &str| {
        std::fs::write(dir.path().join("plugin.toml"), text).unwrap();
        supervisor::PluginSpec::from_manifest(dir.path()).unwrap_err().to_string()
    };
    let base = "name = \"p\"\nversion = \"1.0.0\"\nentrypoint = \"p\"\n";
    let e = write(&format!("{base}api_version = \"^2\"\n"));
    assert!(
        e.contains("plugin.toml") && e.contains("`api_version`") && e.contains("plugin API 1.0.0"),
        "{e}"
    );
    let e = write(&format!("{base}api_version = \"^1\"\n[timeouts]\ncall = \"soon\"\n"));
    assert!(e.contains("`timeouts.call`"), "{e}");
    let e = write(&format!("{base}api_version = \"^1\"\n[limits]\nmemory = \"12 potatoes\"\n"));
    assert!(e.contains("`limits.memory`") && e.contains("potatoes"), "{e}");
    let e = write(&format!("{base}api_version = \"^1\"\nentrypoint2 = 1\n"));
    assert!(e.contains("unknown field `entrypoint2`"), "{e}");
    let e =
        write("name = \"p\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"bin/p\"\n");
    assert!(e.contains("`entrypoint`") && e.contains("does not exist"), "{e}");
    let e = write("this is = not toml");
    assert!(e.contains("plugin.toml") && e.contains("line 1"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_supervisor_kills_its_plugins() {
    let sup = supervisor();
    let echo = sup.load(example("echo")).await.unwrap();
    let pid = echo.status().pid.unwrap();
    drop(sup);
    eventually("plugin killed after the supervisor was dropped", || !alive(pid)).await;
}

/// Runs `f` on a plain OS thread (as a host's engine thread would) and awaits its result.
async fn on_engine_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_calls_from_an_engine_thread_mix_with_async_ones() {
    blocking_and_async_calls_mix("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_and_async_calls_mix_on_a_seqpacket_socket_too() {
    blocking_and_async_calls_mix("transport = \"seqpacket\"\n").await;
}

async fn blocking_and_async_calls_mix(transport: &str) {
    let sup = supervisor();
    // No heartbeats: a reply left unseen by both sides would stay stuck (and fail the call
    // at its deadline) instead of being picked up by the next Pong.
    let dir = tempfile::tempdir().unwrap();
    let manifest = format!("{transport}[timeouts]\nheartbeat = \"0s\"\n");
    let echo = sup.load(plugin(&dir, "echo", "echo", &manifest)).await.unwrap();
    // Two engine threads call blockingly while 200 async calls are in flight on the same
    // plugin: every caller gets its own answer, whichever side read it from the socket.
    let mut threads = Vec::new();
    for t in 0..2u64 {
        let echo = echo.clone();
        threads.push(std::thread::spawn(move || {
            for i in 0..2000u64 {
                let n = (t << 32) | i;
                let back: u64 = echo
                    .call_blocking("echo", &n, Deadline::after(Duration::from_secs(20)))
                    .unwrap();
                assert_eq!(back, n);
            }
        }));
    }
    let mut tasks = Vec::new();
    for i in 0..100u64 {
        let echo = echo.clone();
        tasks.push(tokio::spawn(async move {
            for j in 0..40u64 {
                let n = (9 << 32) | (i << 8) | j;
                let back: u64 = echo
                    .call_with("echo", &n, Deadline::after(Duration::from_secs(20)))
                    .await
                    .unwrap();
                assert_eq!(back, n);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(echo.status().calls_ok, 8000);
    // Heartbeats still work while engine threads own the socket in turns.
    let after: String = echo.call_with("echo", "still here", Deadline::Default).await.unwrap();
    assert_eq!(after, "still here");
    assert_eq!(echo.status().restarts, 0);
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_calls_meet_deadlines_crashes_and_stopped_plugins() {
    let sup = supervisor();
    let slow = sup.load(example("slow")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = sup
        .load(plugin(&dir, "crasher", "crasher", "[restart]\nbackoff = \"10ms\"\n"))
        .await
        .unwrap();
    let (s, cr) = (slow.clone(), c.clone());
    let (late, next, crash) = on_engine_thread(move || {
        let late = s
            .call_blocking::<_, u64>("slow", &300u64, Deadline::after(Duration::from_millis(50)))
            .unwrap_err();
        // The late reply is dropped; the next call gets its own answer.
        let next: u64 = s.call_blocking("slow", &1u64, Deadline::Default).unwrap();
        // Waiting for a reply sleeps in the kernel: a 400 ms wait must not cost 400 ms of CPU.
        let cpu = || {
            nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
                .map(Duration::from)
                .unwrap()
        };
        let before = cpu();
        let waited: u64 =
            s.call_blocking("slow", &400u64, Deadline::after(Duration::from_secs(20))).unwrap();
        let spent = cpu() - before;
        assert_eq!(waited, 400);
        assert!(
            spent < Duration::from_millis(200),
            "the caller spun while it waited: {spent:?} of CPU"
        );
        let crash = cr.call_blocking::<_, ()>("crash", "segv", Deadline::Default).unwrap_err();
        (late, next, crash)
    })
    .await;
    assert_eq!(late.code, ErrorCode::DeadlineExceeded, "{late}");
    assert_eq!(next, 1);
    assert_eq!(crash.code, ErrorCode::PluginExited, "{crash}");
    eventually("crasher restarted", || {
        let st = c.status();
        st.restarts == 1 && st.state == State::Ready
    })
    .await;
    let cr = c.clone();
    let pong: String =
        on_engine_thread(move || cr.call_blocking("ping", &(), Deadline::Default).unwrap()).await;
    assert_eq!(pong, "pong");
    assert_eq!(slow.status().restarts, 0);
    sup.stop("slow").await.unwrap();
    let s = slow.clone();
    let err = on_engine_thread(move || {
        s.call_blocking::<_, u64>("slow", &1u64, Deadline::Default).unwrap_err()
    })
    .await;
    assert_eq!(err.code, ErrorCode::Unavailable, "{err}");
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_larger_than_the_socket_buffer_go_through_both_call_paths() {
    big_payloads("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_larger_than_a_record_go_through_a_seqpacket_socket_in_pieces() {
    big_payloads("transport = \"seqpacket\"\n").await;
}

async fn big_payloads(transport: &str) {
    // 8 MiB each way: the socket takes a few hundred KiB at a time, so the writer has to wait
    // for room (the actor's write watch; for a blocking call, the actor finishes its write).
    // On a seqpacket socket both sides also cut it into records of at most 64 KiB.
    let sup = supervisor();
    let dir = tempfile::tempdir().unwrap();
    let echo = sup.load(plugin(&dir, "echo", "echo", transport)).await.unwrap();
    let big: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    let raw = Payload::raw(PayloadCodec::Bincode, plugin_proto::codec::encode(&big).unwrap());
    let deadline = Deadline::after(Duration::from_secs(30));
    let back = echo.call_raw("echo", raw.clone(), deadline).await.unwrap();
    assert_eq!(back.decode::<Vec<u8>>().unwrap(), big);
    let e = echo.clone();
    let back = on_engine_thread(move || e.call_raw_blocking("echo", raw, deadline).unwrap()).await;
    assert_eq!(back.decode::<Vec<u8>>().unwrap(), big);
    // Both together, twice over.
    let (a, e) = (echo.clone(), echo.clone());
    let b2 = big.clone();
    let blocking = std::thread::spawn(move || {
        for _ in 0..2 {
            let r: Vec<u8> = e.call_blocking("echo", &b2, deadline).unwrap();
            assert_eq!(r.len(), b2.len());
        }
    });
    for _ in 0..2 {
        let r: Vec<u8> = a.call_with("echo", &big, deadline).await.unwrap();
        assert_eq!(r, big);
    }
    blocking.join().unwrap();
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_mode_keeps_every_call_path_and_the_heartbeat_working() {
    let sup = supervisor();
    let dir = tempfile::tempdir().unwrap();
    // Short heartbeats: a plugin whose pongs nobody read would be declared hung quickly.
    let beat = "[timeouts]\nheartbeat = \"100ms\"\n[restart]\nbackoff = \"10ms\"\n";
    let echo = sup.load(plugin(&dir, "echo", "echo", beat)).await.unwrap();
    let pid = echo.status().pid;
    echo.set_engine_mode(true);
    let e = echo.clone();
    let sum = on_engine_thread(move || {
        let mut sum = 0u64;
        for i in 0..2000u64 {
            let back: u64 =
                e.call_blocking("echo", &i, Deadline::after(Duration::from_secs(10))).unwrap();
            sum += back;
        }
        sum
    })
    .await;
    assert_eq!(sum, (0..2000u64).sum::<u64>());
    // Async calls are still answered (read on the tick), and an idle second passes without a
    // missed heartbeat: pongs are read on the tick too.
    for i in 0..50u64 {
        let back: u64 =
            echo.call_with("echo", &i, Deadline::after(Duration::from_secs(10))).await.unwrap();
        assert_eq!(back, i);
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!((echo.status().pid, echo.status().restarts), (pid, 0), "not declared hung");
    // Off again: the runtime watches the socket, as before.
    echo.set_engine_mode(false);
    let back: String = echo.call("echo", "back to normal").await.unwrap();
    assert_eq!(back, "back to normal");
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_refused_while_handed_over_names_the_state_that_refused_it() {
    let sup = supervisor();
    let echo = sup.load(example("echo")).await.unwrap();
    let frozen = sup.freeze().await;
    assert!(frozen.iter().all(|(_, r)| r.is_ok()), "handed over");
    let err = echo.call::<_, String>("echo", "late").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Unavailable);
    assert!(err.message.contains("state: draining"), "not the Ready it was: {}", err.message);
    // The frozen process is ours to end.
    for (_, f) in frozen {
        let f = f.unwrap();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(f.instance.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_claims_out_of_memory_is_reported_by_what_the_kernel_saw() {
    let dir = tempfile::tempdir().unwrap();
    let sup = supervisor();
    let spec = plugin(&dir, "liar", "crasher", "[restart]\npolicy = \"never\"\n");
    let c = sup.load(spec).await.unwrap();
    // It prints an allocator's words (a caught panic), then exits 3 on its own.
    let _ = c
        .call::<_, ()>("panic", "memory allocation of 1099511627776 bytes failed: out of memory")
        .await;
    eventually("the claim is in its output", || {
        c.logs(50).iter().any(|l| l.text.contains("out of memory"))
    })
    .await;
    let _ = c.call::<_, ()>("crash", "exit").await;
    eventually("ended", || c.status().last_exit.is_some()).await;
    assert_eq!(c.status().last_exit, Some(ExitReason::Exited { code: 3 }), "not a memory limit");
}
