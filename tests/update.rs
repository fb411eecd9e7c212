//! End to end: hot update — a new version starts beside the old one, routing switches,
//! the old one drains and hands over its state; no call is lost, duplicated or refused.

mod kit;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kit::*;
use plugd_examples::{Order, Tick};
use supervisor::{Deadline, PluginSpec, SupervisorError};

/// A folder `dir/<tag>` holding a manifest for plugin `name` at `version`, running example `bin`.
fn version(
    dir: &tempfile::TempDir,
    tag: &str,
    name: &str,
    bin: &str,
    version: &str,
    rest: &str,
) -> PluginSpec {
    let folder = dir.path().join(tag);
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join("plugin.toml"),
        format!(
            "name = \"{name}\"\nversion = \"{version}\"\napi_version = \"^1\"\nentrypoint = \"{}\"\n{rest}",
            bin_dir().join(bin).display()
        ),
    )
    .unwrap();
    PluginSpec::from_manifest(&folder).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_updates_under_load_lose_no_call() {
    updates_under_load_lose_no_call("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_updates_under_load_lose_no_call_over_shared_memory() {
    // Each new instance gets a fresh mapping; calls in the old one's rings finish there.
    let st = updates_under_load_lose_no_call("transport = \"shm\"\n").await;
    assert_eq!(st.transport.as_deref(), Some("shm (spin-then-futex)"), "{st:?}");
    assert!(st.ring_calls > 0, "{st:?}");
}

/// Twenty hot updates while four async callers and an engine thread call; `transport` goes
/// into both versions' manifests. Returns the plugin's status from just before the shutdown.
async fn updates_under_load_lose_no_call(transport: &str) -> supervisor::PluginStatus {
    let sup = Arc::new(supervisor());
    let dir = tempfile::tempdir().unwrap();
    // No heartbeats: a reply that neither the actor nor the engine thread looks at would
    // stay stuck (and surface as a failed call) instead of being swept up by the next Pong.
    let quiet = format!("{transport}[timeouts]\nheartbeat = \"0s\"\n");
    let v1 = version(&dir, "v1", "echo", "echo", "1.0.0", &quiet);
    let v2 = version(&dir, "v2", "echo", "echo", "2.0.0", &quiet);
    let echo = sup.load(v1.clone()).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let swapping = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for t in 0..4u64 {
        let (echo, stop, swapping) = (echo.clone(), stop.clone(), swapping.clone());
        callers.push(tokio::spawn(async move {
            let (mut steady, mut during, mut versions, mut failed) =
                (Vec::new(), Vec::new(), [0u64; 2], Vec::new());
            let mut n = t << 40;
            while !stop.load(Ordering::Relaxed) {
                let in_swap = swapping.load(Ordering::Relaxed);
                let t0 = Instant::now();
                let r: Result<(u64, String), _> =
                    echo.call_with("tagged", &n, Deadline::after(Duration::from_secs(10))).await;
                let lat = t0.elapsed();
                match r {
                    Ok((back, v)) if back == n && (v == "1.0.0" || v == "2.0.0") => {
                        versions[(v == "2.0.0") as usize] += 1;
                        if in_swap {
                            during.push(lat)
                        } else {
                            steady.push(lat)
                        }
                    }
                    other => failed.push(format!("call {n}: {other:?}")),
                }
                n += 1;
            }
            (steady, during, versions, failed)
        }));
    }
    // And one engine thread calling blockingly (it reads the socket itself).
    let engine = {
        let (echo, stop) = (echo.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut versions, mut failed) = ([0u64; 2], Vec::new());
            let mut n = 7u64 << 40;
            while !stop.load(Ordering::Relaxed) {
                let r: Result<(u64, String), _> =
                    echo.call_blocking("tagged", &n, Deadline::after(Duration::from_secs(10)));
                match r {
                    Ok((back, v)) if back == n && (v == "1.0.0" || v == "2.0.0") => {
                        versions[(v == "2.0.0") as usize] += 1
                    }
                    other => failed.push(format!("blocking call {n}: {other:?}")),
                }
                n += 1;
            }
            (versions, failed)
        })
    };
    // Every caller is under way before the first swap.
    eventually("the callers are calling", || echo.status().calls_ok >= 100).await;
    let t0 = Instant::now();
    for i in 0..20 {
        let spec = if i % 2 == 0 { v2.clone() } else { v1.clone() };
        let want = spec.manifest.version.to_string();
        swapping.store(true, Ordering::Relaxed);
        let st = sup.update(spec).await.expect("update");
        swapping.store(false, Ordering::Relaxed);
        assert_eq!(st.version, want);
        assert_eq!(st.updating_to, None);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let elapsed = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (mut steady, mut during, mut versions, mut failed) =
        (Vec::new(), Vec::new(), [0u64; 2], Vec::new());
    for c in callers {
        let (s, d, v, f) = c.await.unwrap();
        steady.extend(s);
        during.extend(d);
        versions[0] += v[0];
        versions[1] += v[1];
        failed.extend(f);
    }
    let (engine_versions, engine_failed) = engine.join().unwrap();
    failed.extend(engine_failed);
    assert!(
        engine_versions[0] > 0 && engine_versions[1] > 0,
        "blocking calls reached both versions: {engine_versions:?}"
    );
    assert!(
        failed.is_empty(),
        "{} calls lost or failed, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(versions[0] > 0 && versions[1] > 0, "both versions answered: {versions:?}");
    let total = (versions[0] + versions[1]) as f64;
    steady.sort();
    during.sort();
    let p99 =
        |v: &Vec<Duration>| v.get((v.len() as f64 * 0.99) as usize).copied().unwrap_or_default();
    eprintln!(
        "hot update under load: {} calls in {:.2?} with 20 swaps ({:.0} calls/s), 0 lost; steady p99 {:?}, \
         during swaps p99 {:?}, worst during swaps {:?} (worst steady {:?})",
        total,
        elapsed,
        total / elapsed.as_secs_f64(),
        p99(&steady),
        p99(&during),
        during.last().copied().unwrap_or_default(),
        steady.last().copied().unwrap_or_default(),
    );
    assert_eq!(echo.status().version, "1.0.0", "the last update went back to v1");
    assert_eq!(echo.status().restarts, 0, "an update is not a restart");
    let last = echo.status();
    sup.shutdown().await;
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_strategy_keeps_its_position_across_an_update() {
    let sup = supervisor();
    let dir = tempfile::tempdir().unwrap();
    let config = "[config]\nmax_position = 10\nthreshold = 0.0005\nalpha = 0.05\n";
    let v1 = version(&dir, "v1", "tick-strategy", "tick-strategy", "1.2.0", config);
    let v2 = version(&dir, "v2", "tick-strategy", "tick-strategy", "1.3.0", config);
    let s = sup.load(v1).await.unwrap();
    let _: Order = s
        .call("on_tick", &Tick { symbol: "X".into(), bid: 100.0, ask: 100.02, ts: 0 })
        .await
        .unwrap();
    let _: Order = s
        .call("on_tick", &Tick { symbol: "X".into(), bid: 90.0, ask: 90.02, ts: 1 })
        .await
        .unwrap();
    let before: i64 = s.call("position", &()).await.unwrap();
    assert_eq!(before, 1);
    let old_pid = s.status().pid;
    sup.update(v2).await.unwrap();
    assert_ne!(s.status().pid, old_pid, "a new process serves");
    let v: String = s.call("version", &()).await.unwrap();
    assert_eq!(v, "1.3.0");
    let after: i64 = s.call("position", &()).await.unwrap();
    assert_eq!(
        after,
        before,
        "the position was handed over before the first call: {:?}",
        s.logs(30)
    );
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_new_version_leaves_the_old_one_serving() {
    let sup = supervisor();
    let dir = tempfile::tempdir().unwrap();
    let v1 = version(&dir, "v1", "echo", "echo", "1.0.0", "");
    let echo = sup.load(v1).await.unwrap();
    let pid = echo.status().pid;
    let broken = [
        (
            "load",
            version(
                &dir,
                "bad-load",
                "echo",
                "crasher",
                "2.0.0",
                "[config]\nfail_on_load = true\n",
            ),
            "load failed: fail_on_load is set",
        ),
        (
            "garbage",
            version(
                &dir,
                "bad-proto",
                "echo",
                "garbage",
                "2.0.1",
                "[env]\nGARBAGE_MODE = \"noise\"\n",
            ),
            "protocol violation",
        ),
        (
            "timeout",
            version(
                &dir,
                "bad-start",
                "echo",
                "hang",
                "2.0.2",
                "[timeouts]\nstart = \"300ms\"\n[config]\nhang_on = \"start\"\n",
            ),
            "startup timeout",
        ),
    ];
    for (what, spec, why) in broken {
        let err = sup.update(spec).await.unwrap_err();
        assert!(matches!(err, SupervisorError::UpdateFailed { .. }), "{what}: {err}");
        let text = err.to_string();
        assert!(text.contains("keeps serving") && text.contains(why), "{what}: {text}");
        let st = echo.status();
        assert_eq!(
            (st.pid, st.version.as_str(), st.updating_to.as_deref()),
            (pid, "1.0.0", None),
            "{what}"
        );
        let back: String = echo.call("echo", "still here").await.unwrap();
        assert_eq!(back, "still here");
    }
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_that_dies_before_the_hand_over_fails_the_update_and_the_old_one_comes_back()
{
    let sup = Arc::new(supervisor());
    let dir = tempfile::tempdir().unwrap();
    let restart = "[restart]\nbackoff = \"10ms\"\n";
    let v1 = version(&dir, "v1", "svc", "slow", "1.0.0", restart);
    // Ready at once, dead 300 ms later: while the old instance still drains a long call.
    let v2 = version(
        &dir,
        "v2",
        "svc",
        "crasher",
        "2.0.0",
        &format!("{restart}[config]\ndie_after_ms = 300\nmode = \"abort\"\n"),
    );
    let svc = sup.load(v1).await.unwrap();
    let in_flight = {
        let svc = svc.clone();
        tokio::spawn(async move {
            svc.call_with::<_, u64>("slow", &1500u64, Deadline::after(Duration::from_secs(10)))
                .await
        })
    };
    // The long call has reached the old instance (it logs as it starts) before the update.
    eventually("the old instance has the long call", || {
        svc.logs(100).iter().any(|l| l.text.contains("answering in 1500 ms"))
    })
    .await;
    let err = sup.update(v2).await.unwrap_err().to_string();
    assert!(err.contains("new instance") && err.contains("SIGABRT"), "{err}");
    assert_eq!(in_flight.await.unwrap().unwrap(), 1500, "the old instance finished its call");
    // The old version serves again (restarted by its policy), and says so.
    eventually("v1 back", || {
        let st = svc.status();
        st.state == supervisor::State::Ready
            && st.version == "1.0.0"
            && st.updating_to.is_none()
            && st.restarts >= 1
    })
    .await;
    let ms: u64 = svc.call("slow", &1u64).await.unwrap();
    assert_eq!(ms, 1);
    sup.shutdown().await;
}
