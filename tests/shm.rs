//! End to end: `transport = "shm"`. Engine-thread and async calls go through the
//! shared-memory rings of real plugin processes in their jails; a plugin
//! that breaks its rings is killed and restarted with a fresh mapping; an SDK that does not
//! read shared memory gets every call on the socket, and plugd says so.

mod kit;

use std::time::Duration;

use kit::*;
use supervisor::{Deadline, ErrorCode, State};

fn shm_manifest(wait: &str) -> String {
    format!("transport = \"shm\"\n[shm]\nwait = \"{wait}\"\nring = \"16KiB\"\n[restart]\nbackoff = \"10ms\"\n")
}

fn said(h: &supervisor::PluginHandle, what: &str) -> bool {
    h.logs(200).iter().any(|l| l.text.contains(what))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_thread_calls_go_through_the_rings_with_every_wait_strategy() {
    let sup = supervisor();
    let dir = tempfile::tempdir().unwrap();
    for wait in ["spin", "spin-then-futex", "futex"] {
        let name = format!("echo-{wait}");
        let echo = sup.load(plugin(&dir, &name, "echo", &shm_manifest(wait))).await.unwrap();
        eventually("shm taken", || said(&echo, "go through shared memory")).await;
        assert!(said(&echo, &format!("(wait: {wait})")), "{:?}", echo.logs(50));
        let h = echo.clone();
        let sizes = tokio::task::spawn_blocking(move || {
            let mut sizes = Vec::new();
            for i in 0..2000u64 {
                // Around the ring's wrap, and one frame larger than half the ring (16 KiB):
                // that one goes by the socket.
                let len = if i == 1000 { 9000 } else { (i as usize * 7) % 700 };
                let text = "x".repeat(len);
                let back: String = h
                    .call_blocking("echo", &text, Deadline::after(Duration::from_secs(20)))
                    .unwrap();
                assert_eq!(back.len(), len);
                sizes.push(len);
            }
            #[derive(serde::Serialize)]
            struct Pair {
                a: f64,
                b: f64,
            }
            let sum: f64 =
                h.call_blocking("add", &Pair { a: 1.5, b: 2.0 }, Deadline::Default).unwrap();
            assert_eq!(sum, 3.5);
            sizes.len()
        })
        .await
        .unwrap();
        assert_eq!(sizes, 2000);
        // An async call beside the engine thread's goes through the rings too.
        let back: String = echo.call("echo", "async").await.unwrap();
        assert_eq!(back, "async");
        let st = echo.status();
        assert_eq!((st.restarts, st.calls_ok), (0, 2002), "{st:?}");
        // Every call but the oversized one went through the rings.
        assert_eq!(st.ring_calls, 2001, "{st:?}");
        assert_eq!(st.transport.as_deref(), Some(&*format!("shm ({wait})")));
    }
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_calls_go_through_the_rings_many_in_flight_and_a_slow_one_is_nudged() {
    let sup = supervisor();
    let dir = tempfile::tempdir().unwrap();
    for wait in ["spin-then-futex", "futex"] {
        let name = format!("echo-{wait}");
        let echo = sup.load(plugin(&dir, &name, "echo", &shm_manifest(wait))).await.unwrap();
        eventually("shm taken", || said(&echo, "go through shared memory")).await;
        // 32 callers with 50 calls each, all in flight together: replies one caller reads
        // from the ring reach the others.
        let callers: Vec<_> = (0..32u64)
            .map(|c| {
                let echo = echo.clone();
                tokio::spawn(async move {
                    for i in 0..50u64 {
                        let text = format!("{c}-{i}-{}", "y".repeat((c * 50 + i) as usize % 300));
                        let back: String = echo.call("echo", &text).await.unwrap();
                        assert_eq!(back, text);
                    }
                })
            })
            .collect();
        for c in callers {
            c.await.unwrap();
        }
        // A call slower than any spin: its caller waits on the socket for the plugin's
        // nudge, and meanwhile engine-thread calls take replies from the same ring.
        let slow = {
            let echo = echo.clone();
            tokio::spawn(async move { echo.call::<_, u64>("nap", &40u64).await })
        };
        let h = echo.clone();
        tokio::task::spawn_blocking(move || {
            for i in 0..200u64 {
                let back: u64 = h.call_blocking("nap", &0u64, Deadline::Default).unwrap();
                assert_eq!(back, 0, "call {i}");
            }
        })
        .await
        .unwrap();
        assert_eq!(slow.await.unwrap().unwrap(), 40);
        let alone: u64 = echo.call("nap", &30u64).await.unwrap();
        assert_eq!(alone, 30);
        let st = echo.status();
        assert_eq!((st.restarts, st.calls_ok, st.calls_err), (0, 1802, 0), "{st:?}");
        assert_eq!(st.ring_calls, 1802, "{st:?}");
    }
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_breaks_its_rings_is_killed_and_comes_back_with_a_fresh_mapping() {
    let sup = supervisor();
    let dir = tempfile::tempdir().unwrap();
    let echo =
        sup.load(plugin(&dir, "echo", "echo", &shm_manifest("spin-then-futex"))).await.unwrap();
    eventually("shm taken", || said(&echo, "go through shared memory")).await;
    let pid = echo.status().pid.unwrap();
    let h = echo.clone();
    let err = tokio::task::spawn_blocking(move || {
        h.call_blocking::<_, ()>("shm_scribble", &2000u64, Deadline::after(Duration::from_secs(20)))
    })
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::PluginExited, "{err}");
    assert!(err.message.contains("protocol violation"), "{err}");
    eventually("restarted", || {
        let st = echo.status();
        st.state == State::Ready && st.pid.is_some_and(|p| p != pid)
    })
    .await;
    assert!(!alive(pid), "the hostile instance is gone");
    let last = echo.status().last_exit.map(|e| e.to_string()).unwrap_or_default();
    assert!(last.contains("protocol"), "{last}");
    // The next instance has a mapping of its own, and serves through it.
    let h = echo.clone();
    let back: String = tokio::task::spawn_blocking(move || {
        h.call_blocking("echo", "again", Deadline::after(Duration::from_secs(20)))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(back, "again");
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_dies_mid_call_fails_the_call_not_hangs_it() {
    let sup = supervisor();
    let dir = tempfile::tempdir().unwrap();
    let crasher =
        sup.load(plugin(&dir, "crasher", "crasher", &shm_manifest("futex"))).await.unwrap();
    eventually("shm taken", || said(&crasher, "go through shared memory")).await;
    let pid = crasher.status().pid;
    let h = crasher.clone();
    let err = tokio::task::spawn_blocking(move || {
        h.call_blocking::<_, ()>("crash", &"segv", Deadline::after(Duration::from_secs(60)))
    })
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::PluginExited, "{err}");
    // An async call through the rings fails the same way once the next instance dies
    // under it (with `futex` it waits on the socket at once, not on the ring).
    eventually("restarted", || {
        let st = crasher.status();
        st.state == State::Ready && st.pid != pid && st.transport.as_deref() == Some("shm (futex)")
    })
    .await;
    let call =
        crasher.call_with::<_, ()>("crash", &"segv", Deadline::after(Duration::from_secs(60)));
    let err = call.await.unwrap_err();
    assert_eq!(err.code, ErrorCode::PluginExited, "{err}");
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_without_shared_memory_is_served_by_the_socket_and_told_so() {
    let state = tempfile::tempdir().unwrap();
    let sup = supervisor::Supervisor::new(supervisor::SupervisorConfig {
        bin_dirs: vec![bin_dir()],
        state_dir: state.path().to_path_buf(),
        prepare: Some(std::sync::Arc::new(plugd_install::python::Venvs)),
        ..Default::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("pyecho");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join("plugin.toml"),
        "name = \"pyecho\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"main.py\"\ntransport = \"shm\"\n",
    )
    .unwrap();
    std::fs::write(
        folder.join("main.py"),
        "from plugd_plugin import Plugin, method, serve\n\nclass P(Plugin):\n    @method\n    def echo(self, x: str) -> str:\n        return x\n\nserve(P())\n",
    )
    .unwrap();
    let py = sup.load(supervisor::PluginSpec::from_manifest(&folder).unwrap()).await.unwrap();
    eventually("told", || said(&py, "does not read shared memory")).await;
    let h = py.clone();
    let back: String = tokio::task::spawn_blocking(move || {
        h.call_blocking("echo", "by the socket", Deadline::after(Duration::from_secs(20)))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(back, "by the socket");
    let st = py.status();
    assert_eq!(st.ring_calls, 0);
    assert!(
        st.transport.as_deref().is_some_and(|t| t.starts_with("stream (shm asked for")),
        "{st:?}"
    );
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_cannot_shrink_its_mapping_under_plugd() {
    // Were the memfd not sealed, plugd's next look at the rings would be a SIGBUS that
    // ends this whole test process.
    let sup = supervisor();
    let dir = tempfile::tempdir().unwrap();
    let echo =
        sup.load(plugin(&dir, "echo", "echo", &shm_manifest("spin-then-futex"))).await.unwrap();
    eventually("shm taken", || said(&echo, "go through shared memory")).await;
    let err = echo.call::<_, ()>("shm_truncate", &()).await.unwrap_err();
    assert!(err.message.contains("Operation not permitted"), "{err}");
    for i in 0..100u64 {
        let back: u64 = echo.call("nap", &0u64).await.unwrap();
        assert_eq!(back, 0, "call {i}");
    }
    let h = echo.clone();
    let back: String = tokio::task::spawn_blocking(move || {
        h.call_blocking("echo", "still mapped", Deadline::Default)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(back, "still mapped");
    assert!(echo.status().ring_calls >= 102);
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_in_a_live_mapping_kill_only_that_plugin_and_never_misread() {
    // A hostile plugin writes random bytes over its side of the mapping while plugd
    // waits for its reply, 30 times: every outcome is an error that names the plugin (or,
    // if the bytes missed what plugd reads, the right answer), never a panic or a wrong
    // answer, and the plugin serves again afterwards.
    let sup = supervisor();
    let dir = tempfile::tempdir().unwrap();
    // Every round may cost an instance: more restarts than the default intensity allows.
    let manifest = shm_manifest("spin-then-futex") + "max_restarts = 100\nbackoff_max = \"20ms\"\n";
    let echo = sup.load(plugin(&dir, "echo", "echo", &manifest)).await.unwrap();
    let mut violations = 0;
    for seed in 1..=30u64 {
        eventually("ready with its rings", || {
            let st = echo.status();
            st.state == State::Ready && st.transport.as_deref() == Some("shm (spin-then-futex)")
        })
        .await;
        let pid = echo.status().pid;
        let h = echo.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            h.call_blocking::<_, ()>(
                "shm_fuzz",
                &(seed * 7919, 20u64),
                Deadline::after(Duration::from_secs(5)),
            )
        })
        .await
        .unwrap();
        eprintln!("seed {seed}: {outcome:?}");
        match outcome {
            Ok(()) => {}
            Err(e) if e.code == ErrorCode::PluginExited => {
                assert!(e.message.contains("echo"), "{e}");
                violations += 1;
                // The next call goes to the instance that replaces it.
                eventually("restarted", || echo.status().pid.is_some_and(|p| Some(p) != pid)).await;
            }
            Err(e) => assert_eq!(e.code, ErrorCode::DeadlineExceeded, "seed {seed}: {e}"),
        }
        let h = echo.clone();
        let back: String = tokio::task::spawn_blocking(move || {
            h.call_blocking(
                "echo",
                &format!("after {seed}"),
                Deadline::after(Duration::from_secs(20)),
            )
        })
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("seed {seed}: the next call failed: {e}"));
        assert_eq!(back, format!("after {seed}"));
    }
    assert!(violations > 0, "no round was seen as a violation");
    let last = echo.status().last_exit.map(|e| e.to_string()).unwrap_or_default();
    assert!(last.contains("protocol"), "{last}");
    sup.shutdown().await;
}

/// A handler that calls the host in the middle of a ring call (on_tick placing its order)
/// must not wait for the actor: in engine mode the actor reads the socket only on its
/// tick, milliseconds apart. On protocol 4 the plugin puts its host call on the replies
/// ring, the engine thread waiting there serves it itself and answers on the calls ring;
/// a host call or an answer too big for the ring goes by the socket (and the doorbell).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_thread_on_the_rings_serves_the_plugins_host_call_itself() {
    use std::sync::{Arc, Mutex};
    let sup = supervisor();
    let served_on = Arc::new(Mutex::new(Vec::new()));
    {
        let served_on = served_on.clone();
        sup.host_method(
            "send_order",
            move |_: &supervisor::HostCall<'_>, symbol: String| -> Result<String, String> {
                served_on.lock().unwrap().push((std::thread::current().id(), symbol.len()));
                Ok(format!("filled {symbol}"))
            },
        );
    }
    let dir = tempfile::tempdir().unwrap();
    // Each wait strategy: the plugin's wait for the host's answer follows it too.
    for wait in ["spin", "spin-then-futex", "futex"] {
        served_on.lock().unwrap().clear();
        let name = format!("echo-{wait}");
        let echo = sup.load(plugin(&dir, &name, "echo", &shm_manifest(wait))).await.unwrap();
        eventually("shm taken", || said(&echo, "go through shared memory")).await;
        echo.set_engine_mode(true);
        let h = echo.clone();
        let (engine_id, answers) = tokio::task::spawn_blocking(move || {
            // 50 small orders, then 2 whose symbol is over half the ring (16 KiB): those
            // and their answers go by the socket.
            let answers: Vec<String> = (0..52)
                .map(|i| {
                    let symbol = if i < 50 { format!("T{i}") } else { "S".repeat(9000) };
                    let arg = ("send_order".to_string(), symbol);
                    h.call_blocking("host", &arg, Deadline::after(Duration::from_secs(10))).unwrap()
                })
                .collect();
            (std::thread::current().id(), answers)
        })
        .await
        .unwrap();
        assert_eq!(answers.first().map(String::as_str), Some("filled T0"));
        assert_eq!(answers[49], "filled T49");
        assert_eq!(answers[51].len(), "filled ".len() + 9000, "{wait}");
        let served = served_on.lock().unwrap().clone();
        assert_eq!(served.len(), 52, "{wait}");
        // Every ring host call is served on the engine thread: the actor never reads the
        // replies ring of an engine-mode plugin.
        let inline = served[..50].iter().filter(|(t, _)| *t == engine_id).count();
        assert_eq!(inline, 50, "{wait}: only {inline} of 50 ring host calls on the engine thread");
        let st = echo.status();
        assert!(st.ring_calls >= 50, "{st:?}");
        assert_eq!(st.ring_host_calls, 50, "{wait}: {st:?}");
        sup.unload(&name).await.unwrap();
    }
    sup.shutdown().await;
}

/// An async caller's ring call whose handler calls the host: the host call on the replies
/// ring reaches the actor (from the caller's look at the ring, or from the plugin's nudge
/// on the socket when the caller waits there, as with `futex`), and its answer goes back on
/// the calls ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_callers_ring_call_gets_its_host_call_answered_through_the_rings() {
    let sup = supervisor();
    sup.host_method(
        "send_order",
        |_: &supervisor::HostCall<'_>, symbol: String| -> Result<String, String> {
            Ok(format!("filled {symbol}"))
        },
    );
    let dir = tempfile::tempdir().unwrap();
    for wait in ["spin", "spin-then-futex", "futex"] {
        let name = format!("echo-{wait}");
        let echo = sup.load(plugin(&dir, &name, "echo", &shm_manifest(wait))).await.unwrap();
        eventually("shm taken", || said(&echo, "go through shared memory")).await;
        for i in 0..40 {
            let arg = ("send_order".to_string(), format!("A{i}"));
            let back: String = echo
                .call_with("host", &arg, Deadline::after(Duration::from_secs(10)))
                .await
                .unwrap();
            assert_eq!(back, format!("filled A{i}"), "{wait}");
        }
        let st = echo.status();
        assert!(st.ring_calls >= 40, "{st:?}");
        assert_eq!(st.ring_host_calls, 40, "{wait}: {st:?}");
        sup.unload(&name).await.unwrap();
    }
    sup.shutdown().await;
}

/// A hostile plugin on protocol 4 that puts calls to the host on the replies ring without
/// end (never reading an answer) cannot hold the engine thread waiting for its reply: the
/// thread serves them, but the call still ends at its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_ring_host_calls_cannot_hold_an_engine_call_past_its_deadline() {
    let sup = supervisor();
    // A host method slower than the plugin's flood: a frame always waits in the ring.
    sup.host_method("slow", |_: &supervisor::HostCall<'_>, _: ()| -> Result<(), String> {
        std::thread::sleep(Duration::from_millis(2));
        Ok(())
    });
    let dir = tempfile::tempdir().unwrap();
    let manifest = shm_manifest("spin-then-futex");
    let echo = sup.load(plugin(&dir, "flood", "echo", &manifest)).await.unwrap();
    eventually("shm taken", || said(&echo, "go through shared memory")).await;
    echo.set_engine_mode(true);
    let h = echo.clone();
    let call = tokio::task::spawn_blocking(move || {
        // The flood would go on for ever; the call's deadline is 300 ms.
        let arg = ("slow".to_string(), u64::MAX);
        h.call_blocking::<_, u64>(
            "shm_host_flood",
            &arg,
            Deadline::after(Duration::from_millis(300)),
        )
    });
    // Only a guard against a hang: the call ends at its deadline, long before this.
    let err = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("the engine call is still held by the flood")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::DeadlineExceeded, "{err}");
    assert!(echo.status().ring_host_calls > 0, "the flood reached plugd: {:?}", echo.status());
    sup.shutdown().await;
}
