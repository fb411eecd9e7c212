//! End to end: plugd costs no CPU while it waits. Alone in its test binary, so the CPU
//! time it reads for this process is plugd's alone (cargo runs test binaries one at a time).

mod kit;

use std::time::Duration;

use kit::*;

/// CPU time this process has used, user and system (from /proc/self/stat, in clock ticks).
fn own_cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// A plugin that stops reading its socket while plugd has more queued for it than the
/// socket holds: plugd waits for room to write (it does not spin on it), and the stop
/// sequence still ends the plugin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_stops_reading_its_socket_costs_no_cpu_and_still_stops() {
    let sup = supervisor();
    let echo = sup.load(example("echo")).await.unwrap();
    let pid = echo.status().pid.unwrap();
    // The plugin naps in a handler (it reads nothing meanwhile) while 16 MiB of calls
    // queue up behind the nap.
    let napping = {
        let h = echo.clone();
        tokio::spawn(async move { h.call::<_, u64>("nap", &60_000u64).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let big = "x".repeat(1 << 20);
    let queued: Vec<_> = (0..16)
        .map(|_| {
            let (h, big) = (echo.clone(), big.clone());
            tokio::spawn(async move { h.call::<_, String>("echo", &big).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Over two seconds of waiting, plugd (this process) uses well under a CPU's worth.
    let ticks_per_s = 100; // USER_HZ
    let before = own_cpu_ticks();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = own_cpu_ticks() - before;
    assert!(used < ticks_per_s, "plugd spun while the plugin did not read: {used} ticks in 2 s");
    // And the stop sequence (Shutdown cannot even be written) still ends it: a guard
    // against a hang, far past the grace.
    tokio::time::timeout(Duration::from_secs(60), sup.unload("echo"))
        .await
        .expect("the stop sequence was starved")
        .unwrap();
    assert!(!alive(pid));
    for q in queued {
        assert!(q.await.unwrap().is_err());
    }
    assert!(napping.await.unwrap().is_err());
    sup.shutdown().await;
}
