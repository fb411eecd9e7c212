//! plugd-bench: the cost of a plugin call, as a ratio to the physical floor.
//!
//! In one run, on one machine, it measures
//!
//! 1. the floor: a raw blocking ping-pong of N bytes over a Unix socketpair
//!    between this process and a child process (this binary re-executed with
//!    `--raw-child`): no framing, no serde, no async runtime;
//! 2. plugd: `PluginHandle::call` through the supervisor to a real plugin
//!    process and back — `on_tick` on the tick-strategy example (typed,
//!    bincode) and `echo` with N-byte payloads — on a tokio multi-thread
//!    runtime, as a host would run it; and `on_tick` on py-strategy, the
//!    same strategy written with the Python SDK;
//!
//! and prints p50/p90/p99/p99.9/max of each with its ratio to the floor of
//! the same message size. It then measures spawn→Ready of a plugin with the
//! fewest layers (the jail's namespaces only) and with the full default jail, as a ratio
//! (`--spawn-only N` runs just that). `--json FILE` writes every figure for scripts.
//!
//! Build everything first (the bench finds the plugins next to itself):
//! `cargo build --release --workspace && target/release/plugd-bench`.

mod extra;
mod plugctl_cost;
mod proc_cost;
mod shm_bench;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use plugd_examples::{Order, Tick};
use serde::Serialize;
use supervisor::{Deadline, Payload, PluginSpec, Supervisor, SupervisorConfig};

#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    name: String,
    bytes: usize,
    samples: usize,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    /// Ratios to the floor of the same size, per percentile (absent for the floor itself).
    ratio_p50: Option<f64>,
    ratio_p99: Option<f64>,
    ratio_p999: Option<f64>,
}

pub fn stats(name: &str, bytes: usize, mut ns: Vec<u64>) -> Stats {
    ns.sort_unstable();
    let at = |p: f64| ns[((ns.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0;
    Stats {
        name: name.into(),
        bytes,
        samples: ns.len(),
        p50_us: at(0.5),
        p90_us: at(0.9),
        p99_us: at(0.99),
        p999_us: at(0.999),
        max_us: at(1.0),
        ratio_p50: None,
        ratio_p99: None,
        ratio_p999: None,
    }
}

pub fn with_ratio(mut s: Stats, floor: &Stats) -> Stats {
    s.ratio_p50 = Some(s.p50_us / floor.p50_us);
    s.ratio_p99 = Some(s.p99_us / floor.p99_us);
    s.ratio_p999 = Some(s.p999_us / floor.p999_us);
    s
}

/// The raw child: echo fixed-size messages on fd 3 until EOF.
fn raw_child(size: usize) -> ! {
    // SAFETY: the parent passed a socketpair end as fd 3 for this child alone.
    let mut sock = unsafe { UnixStream::from_raw_fd(3) };
    let mut buf = vec![0u8; size];
    while sock.read_exact(&mut buf).is_ok() {
        if sock.write_all(&buf).is_err() {
            break;
        }
    }
    std::process::exit(0)
}

/// Starts the raw echo child (this binary with `--raw-child`) on a fresh socketpair.
pub fn spawn_raw_child(size: usize) -> Result<(UnixStream, std::process::Child)> {
    let (ours, theirs) = UnixStream::pair()?;
    let theirs = OwnedFd::from(theirs);
    let fd = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["--raw-child", &size.to_string()]);
    // SAFETY: dup2 is async-signal-safe and the closure captures only an integer.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::dup2(fd, 3)?;
            Ok(())
        });
    }
    let child = cmd.spawn().context("spawn the raw ping-pong child")?;
    Ok((ours, child))
}

fn raw_floor(size: usize, warmup: usize, samples: usize) -> Result<Stats> {
    let (mut ours, mut child) = spawn_raw_child(size)?;
    let msg = vec![7u8; size];
    let mut back = vec![0u8; size];
    let mut ns = Vec::with_capacity(samples);
    for i in 0..warmup + samples {
        let t0 = Instant::now();
        ours.write_all(&msg)?;
        ours.read_exact(&mut back)?;
        if i >= warmup {
            ns.push(t0.elapsed().as_nanos() as u64);
        }
    }
    drop(ours);
    child.wait()?;
    Ok(stats(&format!("raw socketpair {size} B"), size, ns))
}

pub fn bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable has no directory")?.to_path_buf();
    if !dir.join("tick-strategy").exists() || !dir.join("echo").exists() {
        bail!(
            "the example plugins are not built next to {}; run `cargo build --release --workspace` first",
            exe.display()
        );
    }
    Ok(dir)
}

fn plugins_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/plugins"))
}

async fn plugd_runs(warmup: usize, samples: usize, sizes: &[usize]) -> Result<Vec<Stats>> {
    let sup = Supervisor::new(SupervisorConfig {
        bin_dirs: vec![bin_dir()?],
        prepare: Some(std::sync::Arc::new(plugd_install::python::Venvs)),
        ..Default::default()
    })?;
    let strat = sup.load(PluginSpec::from_manifest(plugins_dir().join("tick-strategy"))?).await?;
    let echo = sup.load(PluginSpec::from_manifest(plugins_dir().join("echo"))?).await?;
    let mut out = Vec::new();

    let ns = time_on_tick(&strat, "on_tick", warmup, samples).await?;
    let deadline = Deadline::after(Duration::from_secs(5));
    let tick_bytes =
        plugin_proto::codec::encode(&Tick { symbol: "BTC-USD".into(), bid: 1.0, ask: 1.0, ts: 1 })?
            .len();
    out.push(stats("plugd on_tick (typed)", tick_bytes, ns));

    // The same call to the same strategy written in Python (py-strategy, bincode schemas).
    let py = sup.load(PluginSpec::from_manifest(plugins_dir().join("py-strategy"))?).await?;
    let ns = time_on_tick(&py, "on_tick", warmup, samples).await?;
    out.push(stats("plugd on_tick, Python plugin", tick_bytes, ns));

    // A tick with one host call (send_order, answered here with a fill) on this async path:
    // the Rust strategy, the Python one with a plain def, and with an async def on asyncio.
    let orders = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    sup.host_method(
        "send_order",
        move |_: &supervisor::HostCall<'_>, order: Order| -> Result<_, String> {
            Ok(extra::paper_fill(&order, orders.fetch_add(1, std::sync::atomic::Ordering::Relaxed)))
        },
    );
    let ns = time_on_tick(&strat, "on_tick_order", warmup, samples).await?;
    out.push(stats("plugd on_tick + 1 host call", tick_bytes, ns));
    let ns = time_on_tick(&py, "on_tick_order", warmup, samples).await?;
    out.push(stats("plugd on_tick + 1 host call, Python def", tick_bytes, ns));
    sup.unload("py-strategy").await?;
    let mut spec = PluginSpec::from_manifest(plugins_dir().join("py-strategy"))?;
    spec.manifest.env.insert("PY_STRATEGY_ASYNC".into(), "1".into());
    let py_async = sup.load(spec).await?;
    let ns = time_on_tick(&py_async, "on_tick_order", warmup, samples).await?;
    out.push(stats("plugd on_tick + 1 host call, Python async def", tick_bytes, ns));

    for &size in sizes {
        let data = vec![7u8; size];
        let mut ns = Vec::with_capacity(samples);
        for i in 0..warmup + samples {
            let payload = Payload::raw(supervisor::PayloadCodec::Bincode, data.clone());
            let t0 = Instant::now();
            let _ = echo.call_raw("echo", payload, deadline).await?;
            if i >= warmup {
                ns.push(t0.elapsed().as_nanos() as u64);
            }
        }
        out.push(stats(&format!("plugd echo {size} B"), size, ns));
    }
    sup.shutdown().await;
    Ok(out)
}

/// Round trips of `method` (`on_tick` or a variant; async, typed) after `warmup` untimed
/// ones, in ns.
async fn time_on_tick(
    strat: &supervisor::PluginHandle,
    method: &str,
    warmup: usize,
    samples: usize,
) -> Result<Vec<u64>> {
    let deadline = Deadline::after(Duration::from_secs(5));
    let mut ns = Vec::with_capacity(samples);
    for i in 0..warmup + samples {
        let tick = Tick { symbol: "BTC-USD".into(), bid: 100.0, ask: 100.02, ts: i as u64 };
        let t0 = Instant::now();
        let _: Order = strat.call_with(method, &tick, deadline).await?;
        if i >= warmup {
            ns.push(t0.elapsed().as_nanos() as u64);
        }
    }
    Ok(ns)
}

/// spawn→Ready of the echo plugin, `n` times, with the manifest's `[sandbox]` section `sandbox`.
async fn spawn_to_ready(n: usize, label: &str, sandbox: &str) -> Result<Stats> {
    let dir = std::env::temp_dir().join(format!("plugd-bench-{}-{label}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let exe = bin_dir()?.join("echo");
    std::fs::write(
        dir.join("plugin.toml"),
        format!("name = \"echo\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"{}\"\n[sandbox]\n{sandbox}\n", exe.display()),
    )?;
    let sup = Supervisor::new(SupervisorConfig {
        bin_dirs: vec![bin_dir()?],
        prepare: Some(std::sync::Arc::new(plugd_install::python::Venvs)),
        ..Default::default()
    })?;
    let mut ns = Vec::with_capacity(n);
    for _ in 0..n {
        let spec = PluginSpec::from_manifest(&dir)?;
        let t0 = Instant::now();
        sup.load(spec).await?;
        ns.push(t0.elapsed().as_nanos() as u64);
        sup.unload("echo").await?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(stats(&format!("spawn→Ready, {label}"), 0, ns))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--raw-child") {
        raw_child(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(64));
    }
    if args.first().map(String::as_str) == Some("--raw-shm-child") {
        shm_bench::raw_child();
    }
    if args.first().map(String::as_str) == Some("--ring-shm-child") {
        shm_bench::ring_child(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(64));
    }
    // transport = "shm" against the raw shm and socket floors (`--shm N [ROWS]`, N samples
    // a row; ROWS, if given, keeps only the plugd rows whose name contains it).
    if args.first().map(String::as_str) == Some("--shm") {
        let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
        shm_bench::run(n, args.get(2).map(String::as_str))?;
        return Ok(());
    }
    // plugd's /proc reads against sysinfo's, for one plugin's memory and CPU.
    if args.first().map(String::as_str) == Some("--proc-usage") {
        let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2000);
        proc_cost::run(n)?;
        return Ok(());
    }
    // Only the pipelined throughput (`--pipelined-only N`: N calls per depth), for
    // comparing builds of the write path.
    if args.first().map(String::as_str) == Some("--pipelined-only") {
        let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(200_000);
        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        for p in rt.block_on(extra::pipelined(&[1, 16, 256], n))? {
            println!(
                "pipelined {:>4} in flight: raw {:>8.0} msg/s  plugd {:>8.0} calls/s  ratio {:.2}",
                p.k, p.raw_per_s, p.plugd_per_s, p.ratio
            );
        }
        return Ok(());
    }
    // Only the pinned current-thread on_tick loop, for profiling the hot path with perf.
    if args.first().map(String::as_str) == Some("--pinned-only") {
        let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(200_000);
        extra::pin_to_cpu0()?;
        let floor = raw_floor(64, 1000, n)?;
        // `--pinned-only N interleaved`: floor and engine mode in alternating blocks.
        if args.get(2).map(String::as_str) == Some("interleaved") {
            use extra::Pinned::{Echo, OnTick, OnTickAdapter, OnTickHostCall};
            let all = [
                (OnTick, false),
                (OnTick, true),
                (OnTickHostCall, true),
                (OnTickAdapter, true),
                (Echo(64), true),
                (Echo(4096), true),
            ];
            for (what, seqpacket) in all {
                let (floor, through) =
                    extra::interleaved(what, seqpacket, true, 1000, n, n / 1000)?;
                let through = with_ratio(through, &floor);
                for s in [&floor, &through] {
                    println!(
                        "{:<50} p50 {:>6.1} µs  p99 {:>6.1} µs  p99.9 {:>6.1} µs  ×floor p50 {:.2} p99.9 {:.2}",
                        s.name,
                        s.p50_us,
                        s.p99_us,
                        s.p999_us,
                        s.ratio_p50.unwrap_or(1.0),
                        s.ratio_p999.unwrap_or(1.0)
                    );
                }
            }
            return Ok(());
        }
        // `--pinned-only N engine`: the floor and engine mode alone (one process to profile).
        let only_engine = args.get(2).map(String::as_str) == Some("engine");
        let mut all = vec![floor.clone()];
        if !only_engine {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            all.push(with_ratio(rt.block_on(extra::on_tick_pinned(1000, n))?, &floor));
            drop(rt);
            all.push(with_ratio(extra::on_tick_blocking(1000, n, true)?, &floor));
        }
        all.push(with_ratio(
            extra::on_tick_blocking_with(1000, n, true, true, true, false)?,
            &floor,
        ));
        if !only_engine {
            all.push(with_ratio(
                extra::on_tick_blocking_with(1000, n, true, true, false, false)?,
                &floor,
            ));
        }
        for s in &all {
            println!(
                "{:<40} p50 {:>6.1} µs  p99 {:>6.1} µs  p99.9 {:>6.1} µs  ×floor p50 {:.2}",
                s.name,
                s.p50_us,
                s.p99_us,
                s.p999_us,
                s.ratio_p50.unwrap_or(1.0)
            );
        }
        return Ok(());
    }
    // Only the async-path rows of on_tick and of a tick with one host call (Rust, Python
    // def, Python async def) beside the 64 B floor: `--host-calls-only N`.
    if args.first().map(String::as_str) == Some("--host-calls-only") {
        let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(20_000);
        let floor = raw_floor(64, n / 10, n)?;
        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let rows = rt.block_on(plugd_runs(n / 10, n, &[]))?;
        for s in
            std::iter::once(floor.clone()).chain(rows.into_iter().map(|s| with_ratio(s, &floor)))
        {
            println!(
                "{:<46} p50 {:>7.1} µs  p99 {:>7.1} µs  p99.9 {:>7.1} µs  ×floor p50 {:.2} p99.9 {:.2}",
                s.name,
                s.p50_us,
                s.p99_us,
                s.p999_us,
                s.ratio_p50.unwrap_or(1.0),
                s.ratio_p999.unwrap_or(1.0)
            );
        }
        return Ok(());
    }
    // The peers script (bench/peers/run.sh) runs this beside each peer: RESULT lines only.
    // spawn→Ready only (the jail's start-up cost): fewest layers vs the full default jail.
    if args.first().map(String::as_str) == Some("--spawn-only") {
        let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100);
        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let fewest = extra::SANDBOX_OFF.trim_start_matches("[sandbox]\n");
        let bare = rt.block_on(spawn_to_ready(n, "fewest layers", fewest))?;
        let full = rt.block_on(spawn_to_ready(n, "full jail", "syscalls = \"default\""))?;
        let full = with_ratio(full, &bare);
        for s in [&bare, &full] {
            println!(
                "{:<32} p50 {:>8.1} us  p99 {:>8.1} us  ({} starts){}",
                s.name,
                s.p50_us,
                s.p99_us,
                s.samples,
                s.ratio_p50
                    .map(|r| format!("  {r:.2}x the fewest-layers start"))
                    .unwrap_or_default()
            );
        }
        return Ok(());
    }
    if args.first().map(String::as_str) == Some("--peers-mode") {
        let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
        let warmup = n / 10;
        let show = |name: &str, s: &Stats| {
            println!("RESULT {name} {:.1} {:.1} {:.1} {}", s.p50_us, s.p99_us, s.p999_us, s.samples)
        };
        show("raw-socketpair-64B", &raw_floor(64, warmup, n)?);
        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        show("plugd-on_tick-async", &rt.block_on(extra::on_tick_async(warmup, n, false))?);
        drop(rt);
        show("plugd-on_tick-blocking", &extra::on_tick_blocking(warmup, n, false)?);
        let engine = extra::on_tick_blocking_with(warmup, n, false, true, true, false)?;
        show("plugd-on_tick-blocking-engine-mode", &engine);
        let records = extra::on_tick_blocking_with(warmup, n, false, true, true, true)?;
        show("plugd-on_tick-blocking-engine-mode-seqpacket", &records);
        for (name, row) in shm_bench::peer_rows(warmup, n)? {
            show(name, &row);
        }
        return Ok(());
    }
    let quick = args.iter().any(|a| a == "--quick");
    let json =
        args.iter().position(|a| a == "--json").and_then(|i| args.get(i + 1)).map(PathBuf::from);
    let (warmup, samples) = if quick { (1_000, 5_000) } else { (10_000, 100_000) };
    let sizes = [64usize, 4096];

    let mut floors = Vec::new();
    for &size in &sizes {
        floors.push(raw_floor(size, warmup, samples)?);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let plugd = rt.block_on(plugd_runs(warmup, samples, &sizes))?;
    let floor_for = |bytes: usize| {
        floors.iter().min_by_key(|f| f.bytes.abs_diff(bytes)).cloned().expect("two floors measured")
    };
    let mut plugd: Vec<Stats> =
        plugd.into_iter().map(|s| with_ratio(s.clone(), &floor_for(s.bytes))).collect();
    plugd.push(with_ratio(extra::on_tick_blocking(warmup, samples, false)?, &floor_for(25)));
    // The latency-minded setup unpinned: engine mode on a seqpacket socket (the 4 KiB one
    // through echo; its interleaved floor is not used, see below).
    let fast = extra::on_tick_blocking_with(warmup, samples, false, true, true, true)?;
    plugd.push(with_ratio(fast, &floor_for(25)));
    let (_, fast) = extra::interleaved(extra::Pinned::Echo(4096), true, false, 0, samples, 1)?;
    plugd.push(with_ratio(fast, &floor_for(4096)));
    let spawns = if quick { 10 } else { 100 };
    let bare = rt.block_on(spawn_to_ready(
        spawns,
        "fewest layers (jail namespaces only: host fs, host net, no filters)",
        extra::SANDBOX_OFF.trim_start_matches("[sandbox]\n"),
    ))?;
    let full = rt.block_on(spawn_to_ready(
        spawns,
        "full jail (default manifest)",
        "syscalls = \"default\"",
    ))?;
    let full = with_ratio(full, &bare);
    let (pipe_total, fan_samples, scale_n, idle) = if quick {
        (20_000, 2_000, 50, Duration::from_secs(2))
    } else {
        (200_000, 20_000, 200, Duration::from_secs(10))
    };
    let pipelined = rt.block_on(extra::pipelined(&[1, 16, 256], pipe_total))?;
    let (single, fan) = rt.block_on(extra::fan_out(8, warmup.min(1000), fan_samples))?;
    let fan = with_ratio(fan, &single);
    let scale = rt.block_on(extra::scale(scale_n, idle))?;
    let crash = rt.block_on(extra::crash_to_ready(if quick { 10 } else { 100 }))?;
    let (swap_steady, swap_during) = rt.block_on(extra::hot_swap(20))?;
    let ctl = plugctl_cost::measure(scale_n, if quick { 20 } else { 100 })?;
    drop(rt);
    // The blocking call in engine mode beside its floor, in alternating blocks (see
    // `extra::interleaved`), on both transports, 64 B-class and 4 KiB.
    // Pinned only: unpinned, where the scheduler leaves the two long-lived pairs decides
    // each side's cost (same vCPU ~8 µs, the other one ~50 µs), and alternating blocks
    // cannot make that even.
    let interleave = |pinned: bool| -> Result<Vec<Stats>> {
        use extra::Pinned::{Echo, OnTick, OnTickAdapter, OnTickHostCall};
        let mut out = Vec::new();
        for what in [OnTick, OnTickHostCall, OnTickAdapter, Echo(4096)] {
            for seqpacket in [false, true] {
                let blocks = (samples / 1000).max(1);
                let (floor, through) =
                    extra::interleaved(what, seqpacket, pinned, warmup, samples, blocks)?;
                let through = with_ratio(through, &floor);
                out.push(floor);
                out.push(through);
            }
        }
        Ok(out)
    };
    // Pinned last: from here on this thread and everything it starts run on CPU 0.
    extra::pin_to_cpu0()?;
    let mixed_pinned = interleave(true)?;
    let floor_pinned = raw_floor(64, warmup, samples)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let tick_pinned =
        with_ratio(rt.block_on(extra::on_tick_pinned(warmup, samples))?, &floor_pinned);
    drop(rt);
    // The same, with the host on a current-thread runtime: no cross-thread wake-ups at all.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut tick_pinned_ct =
        with_ratio(rt.block_on(extra::on_tick_pinned(warmup, samples))?, &floor_pinned);
    tick_pinned_ct.name = "plugd on_tick, pinned, current-thread".into();
    drop(rt);
    let tick_pinned_blocking =
        with_ratio(extra::on_tick_blocking(warmup, samples, true)?, &floor_pinned);
    let tick_pinned_engine = with_ratio(
        extra::on_tick_blocking_with(warmup, samples, true, true, true, false)?,
        &floor_pinned,
    );

    println!("plugd-bench: {} samples each after {} warm-up, one run", samples, warmup);
    println!(
        "{:<38} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9}   {:>16}",
        "", "bytes", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "max µs", "×floor p50/p99/p99.9"
    );
    let mut floor_pinned = floor_pinned;
    floor_pinned.name = "raw 64 B, pinned".into();
    for s in floors.iter().chain(plugd.iter()).chain([
        &floor_pinned,
        &tick_pinned,
        &tick_pinned_ct,
        &tick_pinned_blocking,
        &tick_pinned_engine,
    ]) {
        let ratio = match (s.ratio_p50, s.ratio_p99, s.ratio_p999) {
            (Some(a), Some(b), Some(c)) => format!("{a:.2} / {b:.2} / {c:.2}"),
            _ => "floor".into(),
        };
        println!(
            "{:<38} {:>6} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}   {:>16}",
            s.name, s.bytes, s.p50_us, s.p90_us, s.p99_us, s.p999_us, s.max_us, ratio
        );
    }
    println!();
    println!("pinned: engine-mode blocking calls and their floor, in alternating blocks of 1 000:");
    for s in &mixed_pinned {
        let ratio = match (s.ratio_p50, s.ratio_p99, s.ratio_p999) {
            (Some(a), Some(b), Some(c)) => format!("{a:.2} / {b:.2} / {c:.2}"),
            _ => "floor".into(),
        };
        println!(
            "{:<58} {:>6} {:>9.1} {:>9.1} {:>9.1} {:>9.1}   {:>16}",
            s.name, s.bytes, s.p50_us, s.p99_us, s.p999_us, s.max_us, ratio
        );
    }
    println!();
    println!("{:<32} {:>9} {:>9} {:>9}   {:>16}", "", "p50 ms", "p99 ms", "max ms", "×off p50/p99");
    for s in [&bare, &full] {
        let ratio = match (s.ratio_p50, s.ratio_p99) {
            (Some(a), Some(b)) => format!("{a:.2} / {b:.2}"),
            _ => "baseline".into(),
        };
        println!(
            "{:<32} {:>9.2} {:>9.2} {:>9.2}   {:>16}",
            s.name,
            s.p50_us / 1000.0,
            s.p99_us / 1000.0,
            s.max_us / 1000.0,
            ratio
        );
    }
    println!();
    println!(
        "{:<24} {:>14} {:>14} {:>8}",
        "pipelined, in flight", "raw msg/s", "plugd calls/s", "ratio"
    );
    for p in &pipelined {
        println!("{:<24} {:>14.0} {:>14.0} {:>8.2}", p.k, p.raw_per_s, p.plugd_per_s, p.ratio);
    }
    println!();
    println!(
        "fan-out of one tick to 8 strategies: p50 {:.1} µs, p99 {:.1} µs; one strategy alone p50 {:.1} µs ({:.2}× at p50)",
        fan.p50_us,
        fan.p99_us,
        single.p50_us,
        fan.ratio_p50.unwrap_or(0.0)
    );
    println!(
        "{} idle plugins: started in {:.0} ms, stopped in {:.0} ms, supervisor +{:.0} KiB RSS per plugin, {:.2} % of one CPU idle (supervisor + plugins, over {} s)",
        scale.plugins, scale.start_all_ms, scale.stop_all_ms, scale.supervisor_rss_kib_per_plugin, scale.idle_cpu_percent, scale.idle_secs
    );
    println!(
        "crash → Ready again: p50 {:.2} ms, p99 {:.2} ms (backoff taken off)",
        crash.p50_us / 1000.0,
        crash.p99_us / 1000.0
    );
    println!(
        "hot swap under load (20 swaps): p99 {:.2} ms between swaps, p99 {:.2} ms and worst {:.2} ms during swaps, 0 calls lost",
        swap_steady.p99_us / 1000.0,
        swap_during.p99_us / 1000.0,
        swap_during.max_us / 1000.0
    );
    println!(
        "plugctl against plugd with {} plugins (whole command, start to exit): call p50 {:.1} ms, status p50 {:.1} ms; starting /bin/true p50 {:.1} ms ({:.1}× / {:.1}× that)",
        ctl.plugins,
        ctl.call.p50_us / 1000.0,
        ctl.status.p50_us / 1000.0,
        ctl.spawn_floor.p50_us / 1000.0,
        ctl.call.ratio_p50.unwrap_or(0.0),
        ctl.status.ratio_p50.unwrap_or(0.0)
    );
    if let Some(path) = json {
        let machine = serde_json::json!({
            // The machine's, not this (by now pinned) thread's.
            "cpus": extra::online_cpus(),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "cpu_model": std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default().lines()
                .find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).unwrap_or("").trim(),
        });
        let doc = serde_json::json!({
            "quick": quick, "machine": machine, "floor": floors, "plugd": plugd,
            "spawn": [bare, full],
            "pinned": [floor_pinned, tick_pinned, tick_pinned_ct, tick_pinned_blocking, tick_pinned_engine],
            "pinned_interleaved": mixed_pinned,
            "pipelined": pipelined,
            "fan_out": { "single": single, "eight": fan },
            "scale": scale,
            "crash_to_ready": crash,
            "hot_swap": { "steady": swap_steady, "during": swap_during },
            "date": std::process::Command::new("date").arg("-u").arg("+%Y-%m-%dT%H:%M:%SZ").output().ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()),
            "plugctl": ctl,
            "commit": std::process::Command::new("git").args(["rev-parse", "HEAD"]).output().ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()),
        });
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}
