//! End to end: plugins that send garbage, hang, or refuse to die — and a neighbour that keeps serving.

mod kit;

use std::time::{Duration, Instant};

use kit::*;
use supervisor::{ErrorCode, ExitReason, State, SupervisorError};

/// Asserts the echo neighbour answers right now.
async fn neighbour_answers(echo: &supervisor::PluginHandle) {
    let back: String =
        echo.call("echo", "still here").await.expect("neighbour must keep answering");
    assert_eq!(back, "still here");
}

fn garbage(dir: &tempfile::TempDir, mode: &str) -> supervisor::PluginSpec {
    plugin(
        dir,
        &format!("garbage-{mode}"),
        "garbage",
        &format!("[restart]\npolicy = \"never\"\n[env]\nGARBAGE_MODE = \"{mode}\"\n"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_before_the_handshake_is_a_protocol_violation() {
    let sup = supervisor();
    let echo = sup.load(example("echo")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (mode, expect) in [("noise", "malformed frame"), ("oversized", "exceeds the limit")] {
        let err = sup.load(garbage(&dir, mode)).await.unwrap_err();
        match &err {
            SupervisorError::StartFailed {
                reason: ExitReason::ProtocolViolation { detail },
                ..
            } => {
                assert!(detail.contains(expect), "{mode}: {detail}")
            }
            other => panic!("{mode}: expected a protocol violation, got {other}"),
        }
        neighbour_answers(&echo).await;
    }
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_ready_kills_only_that_plugin() {
    let sup = supervisor();
    let echo = sup.load(example("echo")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();

    let g = sup.load(garbage(&dir, "after-ready")).await.unwrap();
    let pid = g.status().pid.unwrap();
    let err = g.call::<_, ()>("anything", &()).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::PluginExited, "{err}");
    assert!(err.message.contains("protocol violation"), "{err}");
    eventually("garbage plugin classified", || g.status().state == State::Exited).await;
    assert!(!alive(pid));
    let st = g.status();
    assert_eq!(st.restarts, 0, "policy never: not restarted");
    assert!(
        matches!(st.last_exit, Some(ExitReason::ProtocolViolation { .. })),
        "{:?}",
        st.last_exit
    );
    neighbour_answers(&echo).await;

    // A Hello with the magic as four raw bytes gets a Reject that says what the magic is.
    let raw = sup.load_stopped(garbage(&dir, "raw-magic")).await.unwrap();
    assert!(sup.start("garbage-raw-magic").await.is_err(), "a malformed Hello never gets Ready");
    eventually("the plugin printed the Reject it got", || {
        raw.logs(50)
            .iter()
            .any(|l| l.text.contains("got Reject") && l.text.contains("fc 50 4c 47 44"))
    })
    .await;
    let reason = raw.status().last_exit.unwrap().to_string();
    assert!(reason.contains("not a valid Hello"), "{reason}");

    // A plugin that sends a supervisor-only message.
    let w = sup.load(garbage(&dir, "wrong-way")).await.unwrap();
    eventually("wrong-way plugin classified", || w.status().state == State::Exited).await;
    let reason = w.status().last_exit.unwrap().to_string();
    assert!(reason.contains("protocol violation") && reason.contains("Shutdown"), "{reason}");
    neighbour_answers(&echo).await;

    // A plugin that offered only protocol 1 (it was spoken to in 1) and calls the host.
    let v1 = sup.load(garbage(&dir, "call-on-v1")).await.unwrap();
    eventually("v1 caller classified", || v1.status().state == State::Exited).await;
    let reason = v1.status().last_exit.unwrap().to_string();
    assert!(
        reason.contains("protocol violation") && reason.contains("need protocol 2"),
        "{reason}"
    );
    neighbour_answers(&echo).await;
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_longer_than_the_seqpacket_limit_is_a_protocol_violation() {
    // The frame inside is well formed; the transport's rule (records of at most 64 KiB, so
    // a reader never loses a record's tail) is what it breaks. Both call paths notice.
    let sup = supervisor();
    let dir = tempfile::tempdir().unwrap();
    for blocking in [false, true] {
        let name = format!("big-record-{blocking}");
        let spec = plugin(
            &dir,
            &name,
            "garbage",
            "transport = \"seqpacket\"\n[restart]\npolicy = \"never\"\n[env]\nGARBAGE_MODE = \"big-record\"\n",
        );
        let g = sup.load(spec).await.unwrap();
        let pid = g.status().pid.unwrap();
        let err = if blocking {
            let h = g.clone();
            std::thread::spawn(move || {
                h.call_blocking::<_, ()>("anything", &(), supervisor::Deadline::Default)
            })
            .join()
            .unwrap()
            .unwrap_err()
        } else {
            g.call::<_, ()>("anything", &()).await.unwrap_err()
        };
        assert_eq!(err.code, ErrorCode::PluginExited, "{err}");
        assert!(err.message.contains("protocol violation"), "{err}");
        eventually("big-record plugin classified", || g.status().state == State::Exited).await;
        assert!(!alive(pid));
        let reason = g.status().last_exit.unwrap();
        assert!(matches!(reason, ExitReason::ProtocolViolation { .. }), "{reason}");
        let text = reason.to_string();
        assert!(text.contains("-byte record") && text.contains("at most 65536"), "{text}");
    }
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_plugin_is_detected_and_replaced() {
    let sup = supervisor();
    let echo = sup.load(example("echo")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = plugin(
        &dir,
        "hang",
        "hang",
        "[timeouts]\nheartbeat = \"100ms\"\nmissed_heartbeats = 3\nshutdown = \"300ms\"\nkill = \"300ms\"\n[restart]\nbackoff = \"10ms\"\n[config]\nhang_on = \"call\"\n",
    );
    let h = sup.load(spec).await.unwrap();
    let pid = h.status().pid.unwrap();
    // The call has no deadline of its own worth waiting for; heartbeats find the hang.
    let err = h
        .call_with::<_, ()>("hang", &(), supervisor::Deadline::after(Duration::from_secs(60)))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::PluginExited, "{err}");
    assert!(err.message.contains("hung"), "{err}");
    eventually("replaced", || {
        // One snapshot: two reads could pair a stale state with a fresh pid.
        let st = h.status();
        st.state == State::Ready && st.pid.is_some() && st.pid != Some(pid)
    })
    .await;
    assert!(!alive(pid), "the hung process was killed");
    let st = h.status();
    assert_eq!(st.restarts, 1);
    let reason = st.last_exit.unwrap().to_string();
    assert!(reason.starts_with("hung: no answer to 3 heartbeats"), "{reason}");
    let pong: String = h.call("ping", &()).await.unwrap();
    assert_eq!(pong, "pong");
    neighbour_answers(&echo).await;
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_deadlines_in_a_row_mean_hung() {
    let sup = supervisor();
    let dir = tempfile::tempdir().unwrap();
    // Heartbeats off: only the deadline rule can catch it.
    let spec = plugin(
        &dir,
        "slowpoke",
        "slow",
        "[timeouts]\nheartbeat = \"0s\"\nmissed_deadlines = 2\nshutdown = \"200ms\"\n[restart]\npolicy = \"never\"\n",
    );
    let s = sup.load(spec).await.unwrap();
    for _ in 0..2 {
        let err = s
            .call_with::<_, u64>(
                "slow",
                &5000u64,
                supervisor::Deadline::after(Duration::from_millis(50)),
            )
            .await
            .unwrap_err();
        assert!(matches!(err.code, ErrorCode::DeadlineExceeded | ErrorCode::Unavailable), "{err}");
    }
    eventually("declared hung", || s.status().state == State::Exited).await;
    let reason = s.status().last_exit.unwrap().to_string();
    assert_eq!(reason, "hung: 2 calls in a row missed their deadline");
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_never_gets_ready_times_out() {
    let sup = supervisor();
    let dir = tempfile::tempdir().unwrap();
    let spec = plugin(
        &dir,
        "sleepy",
        "hang",
        "[timeouts]\nstart = \"300ms\"\n[config]\nhang_on = \"start\"\n",
    );
    let err = sup.load(spec).await.unwrap_err();
    match &err {
        SupervisorError::StartFailed {
            reason: ExitReason::StartupTimeout { after_ms: 300 },
            ..
        } => {}
        other => panic!("expected a startup timeout, got {other}"),
    }
    assert!(err.to_string().contains("startup timeout (not ready after 300 ms)"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_plugin_that_ignores_shutdown_and_sigterm_escalates_to_sigkill() {
    let sup = supervisor();
    let dir = tempfile::tempdir().unwrap();
    let spec = plugin(
        &dir,
        "stubborn",
        "hang",
        "[timeouts]\nshutdown = \"300ms\"\nkill = \"300ms\"\n[config]\nhang_on = \"call\"\n",
    );
    let h = sup.load(spec).await.unwrap();
    let pid = h.status().pid.unwrap();
    let t0 = Instant::now();
    let st = sup.unload("stubborn").await.unwrap();
    let took = t0.elapsed();
    assert_eq!(st.last_exit, Some(ExitReason::Stopped { forced: true }));
    assert!(!alive(pid));
    // Generous margin: only here to prove the stop is bounded by grace + kill, not by the plugin.
    assert!(took < Duration::from_secs(10), "stop took {took:?}");
    let logs: Vec<String> = h.logs(20).into_iter().map(|l| l.text).collect();
    assert!(logs.iter().any(|l| l.contains("sending SIGTERM")), "{logs:?}");
    assert!(logs.iter().any(|l| l.contains("sending SIGKILL")), "{logs:?}");
}

/// A plugin that calls the host over and over and never reads an answer must not make
/// plugd's memory grow without bound: past the bound it is a protocol violation, and the
/// neighbour keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_never_reads_its_host_calls_answers_is_cut_off() {
    let sup = supervisor();
    let echo = sup.load(example("echo")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let g = sup.load(garbage(&dir, "host-flood")).await.unwrap();
    let pid = g.status().pid.unwrap();
    // Generous: a debug build serves a hundred thousand plugd.status calls before the bound.
    let give_up = Instant::now() + Duration::from_secs(120);
    while g.status().state != State::Exited {
        assert!(Instant::now() < give_up, "still {:?}", g.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!alive(pid));
    let reason = g.status().last_exit.unwrap();
    assert!(matches!(reason, ExitReason::ProtocolViolation { .. }), "{reason}");
    assert!(reason.to_string().contains("without reading the answers"), "{reason}");
    neighbour_answers(&echo).await;
    sup.shutdown().await;
}
