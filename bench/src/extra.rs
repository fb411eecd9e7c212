//! The rest of the suite: pinned runs, pipelined throughput, fan-out, and scale.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use plugd_examples::{Order, Tick};
use serde::Serialize;
use supervisor::{Deadline, Payload, PayloadCodec, PluginSpec, Supervisor, SupervisorConfig};

use crate::{bin_dir, stats, Stats};

/// A plugin folder `dir/name` running example binary `bin`, with extra manifest text.
pub fn temp_plugin(dir: &Path, name: &str, bin: &str, extra: &str) -> Result<PluginSpec> {
    let folder = dir.join(name);
    std::fs::create_dir_all(&folder)?;
    std::fs::write(
        folder.join("plugin.toml"),
        format!(
            "name = \"{name}\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"{}\"\n{extra}",
            bin_dir()?.join(bin).display()
        ),
    )?;
    Ok(PluginSpec::from_manifest(&folder)?)
}

/// The manifest section that turns every layer off that a manifest can (limits stay); as
/// root (no uid of its own) so that it runs from any checkout, a 0700 temp folder included.
pub const SANDBOX_OFF: &str =
    "[sandbox]\nnetwork = \"host\"\nfilesystem = \"host\"\nsyscalls = \"off\"\nexecve = true\nuser = \"root\"\n";

pub fn supervisor() -> Result<Supervisor> {
    Ok(Supervisor::new(SupervisorConfig {
        bin_dirs: vec![bin_dir()?],
        prepare: Some(std::sync::Arc::new(plugd_install::python::Venvs)),
        ..Default::default()
    })?)
}

/// A 2-worker runtime for the supervisor; with `pinned`, its threads run on every CPU but
/// CPU 0 (where the caller and the plugin are), if the machine has more than one.
fn supervisor_runtime(pinned: bool) -> Result<tokio::runtime::Runtime> {
    // The machine's CPUs, not this thread's: the caller is already pinned to CPU 0, and
    // available_parallelism() would count only that one.
    let online = online_cpus();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2).enable_all();
    if pinned && online > 1 {
        builder.on_thread_start(move || {
            let mut set = nix::sched::CpuSet::new();
            for cpu in 1..online {
                let _ = set.set(cpu);
            }
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
        });
    }
    Ok(builder.build()?)
}

/// CPUs online on this machine (whatever the calling thread's affinity).
pub fn online_cpus() -> usize {
    // SAFETY: sysconf only reads a system value; no memory is passed.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(1)
}

/// Pins the calling thread (and every thread or process it starts from now on) to CPU 0.
pub fn pin_to_cpu0() -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(0)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

/// on_tick through the supervisor with the plugin pinned to CPU 0 (the caller must be pinned too).
pub async fn on_tick_pinned(warmup: usize, samples: usize) -> Result<Stats> {
    on_tick_async(warmup, samples, true).await
}

/// on_tick through the supervisor from an async task; with `pinned`, the plugin on CPU 0.
pub async fn on_tick_async(warmup: usize, samples: usize, pinned: bool) -> Result<Stats> {
    let dir = tempfile::tempdir()?;
    let sup = supervisor()?;
    let config = if pinned {
        "[limits]\ncpus = [0]\n[config]\nmax_position = 10\n"
    } else {
        "[config]\nmax_position = 10\n"
    };
    let strat = sup.load(temp_plugin(dir.path(), "strat", "tick-strategy", config)?).await?;
    let mut ns = Vec::with_capacity(samples);
    for i in 0..warmup + samples {
        let tick = Tick { symbol: "BTC-USD".into(), bid: 100.0, ask: 100.02, ts: i as u64 };
        let t0 = Instant::now();
        let _: Order =
            strat.call_with("on_tick", &tick, Deadline::after(Duration::from_secs(5))).await?;
        if i >= warmup {
            ns.push(t0.elapsed().as_nanos() as u64);
        }
    }
    sup.shutdown().await;
    Ok(stats(if pinned { "plugd on_tick, pinned" } else { "plugd on_tick, async" }, 25, ns))
}

/// Throughput with `k` requests in flight: raw pipelined socketpair vs plugd calls.
#[derive(Debug, Clone, Serialize)]
pub struct Pipelined {
    /// Requests in flight.
    pub k: usize,
    /// Raw socketpair messages per second.
    pub raw_per_s: f64,
    /// plugd calls per second.
    pub plugd_per_s: f64,
    /// plugd / raw.
    pub ratio: f64,
}

fn raw_pipelined(k: usize, total: usize) -> Result<f64> {
    let size = 64;
    let (mut ours, mut child) = crate::spawn_raw_child(size)?;
    let batch = vec![7u8; size * k];
    let mut back = vec![0u8; size * k];
    let t0 = Instant::now();
    for _ in 0..total / k {
        ours.write_all(&batch)?;
        ours.read_exact(&mut back)?;
    }
    let rate = (total / k * k) as f64 / t0.elapsed().as_secs_f64();
    drop(ours);
    child.wait()?;
    Ok(rate)
}

/// Pipelined throughput for each `k`.
pub async fn pipelined(ks: &[usize], total: usize) -> Result<Vec<Pipelined>> {
    pipelined_with(ks, total, "").await
}

/// [`pipelined`] with `manifest` added to the echo plugin's manifest (a transport).
pub async fn pipelined_with(ks: &[usize], total: usize, manifest: &str) -> Result<Vec<Pipelined>> {
    let dir = tempfile::tempdir()?;
    let sup = supervisor()?;
    let echo = sup.load(temp_plugin(dir.path(), "echo", "echo", manifest)?).await?;
    let mut out = Vec::new();
    for &k in ks {
        let raw_per_s = raw_pipelined(k, total)?;
        let t0 = Instant::now();
        let per_task = total / k;
        let mut tasks = Vec::new();
        for _ in 0..k {
            let echo = echo.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..per_task {
                    let p = Payload::raw(PayloadCodec::Bincode, vec![7u8; 64]);
                    echo.call_raw("echo", p, Deadline::after(Duration::from_secs(30))).await?;
                }
                Ok::<_, supervisor::CallError>(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let plugd_per_s = (per_task * k) as f64 / t0.elapsed().as_secs_f64();
        out.push(Pipelined { k, raw_per_s, plugd_per_s, ratio: plugd_per_s / raw_per_s });
    }
    sup.shutdown().await;
    Ok(out)
}

/// One tick to `n` strategies at once, time until all replied; and one strategy alone.
pub async fn fan_out(n: usize, warmup: usize, samples: usize) -> Result<(Stats, Stats)> {
    let dir = tempfile::tempdir()?;
    let sup = supervisor()?;
    let mut strats = Vec::new();
    for i in 0..n {
        strats.push(
            sup.load(temp_plugin(dir.path(), &format!("strat-{i}"), "tick-strategy", "")?).await?,
        );
    }
    let deadline = Deadline::after(Duration::from_secs(5));
    let mut single = Vec::with_capacity(samples);
    let mut all = Vec::with_capacity(samples);
    for i in 0..warmup + samples {
        let tick = Tick { symbol: "BTC-USD".into(), bid: 100.0, ask: 100.02, ts: i as u64 };
        let t0 = Instant::now();
        let _: Order = strats[0].call_with("on_tick", &tick, deadline).await?;
        let one = t0.elapsed();
        let t0 = Instant::now();
        let calls: Vec<_> = strats
            .iter()
            .map(|s| {
                let (s, tick) = (s.clone(), tick.clone());
                tokio::spawn(
                    async move { s.call_with::<_, Order>("on_tick", &tick, deadline).await },
                )
            })
            .collect();
        for c in calls {
            c.await??;
        }
        if i >= warmup {
            single.push(one.as_nanos() as u64);
            all.push(t0.elapsed().as_nanos() as u64);
        }
    }
    sup.shutdown().await;
    Ok((stats("single strategy on_tick", 25, single), stats(&format!("fan-out to {n}"), 25, all)))
}

/// What `n` idle plugins cost.
#[derive(Debug, Clone, Serialize)]
pub struct Scale {
    /// Plugins loaded.
    pub plugins: usize,
    /// Time to load them all (one after another), in ms.
    pub start_all_ms: f64,
    /// Time to unload them all, in ms.
    pub stop_all_ms: f64,
    /// Supervisor RSS growth per plugin, in KiB.
    pub supervisor_rss_kib_per_plugin: f64,
    /// CPU used by supervisor + all plugins while idle, as a percent of one CPU.
    pub idle_cpu_percent: f64,
    /// Over how many seconds.
    pub idle_secs: f64,
}

fn rss_kib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .map(|v| v.trim().trim_end_matches("kB").trim().to_string())
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let get = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// Loads `n` echo plugins, measures their idle cost, unloads them.
pub async fn scale(n: usize, idle: Duration) -> Result<Scale> {
    let dir = tempfile::tempdir()?;
    let sup = supervisor()?;
    let before = rss_kib();
    let t0 = Instant::now();
    let mut pids = Vec::new();
    for i in 0..n {
        let h = sup.load(temp_plugin(dir.path(), &format!("echo-{i}"), "echo", "")?).await?;
        pids.push(h.status().pid.unwrap_or(0));
    }
    let start_all_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let rss = (rss_kib() - before) / n as f64;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let me = std::process::id();
    let sum = |pids: &[u32]| cpu_ticks(me) + pids.iter().map(|&p| cpu_ticks(p)).sum::<u64>();
    let c0 = sum(&pids);
    tokio::time::sleep(idle).await;
    let c1 = sum(&pids);
    // SAFETY: sysconf with a constant name has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let idle_cpu_percent = (c1 - c0) as f64 / hz / idle.as_secs_f64() * 100.0;
    let t0 = Instant::now();
    sup.shutdown().await;
    let stop_all_ms = t0.elapsed().as_secs_f64() * 1000.0;
    Ok(Scale {
        plugins: n,
        start_all_ms,
        stop_all_ms,
        supervisor_rss_kib_per_plugin: rss,
        idle_cpu_percent,
        idle_secs: idle.as_secs_f64(),
    })
}

/// on_tick with `PluginHandle::call_blocking` from this (non-runtime) thread: the engine
/// thread writes and reads the socket itself. With `pinned`, this thread and the plugin run
/// on CPU 0 and the supervisor's runtime on the other CPUs (as a latency-minded host would
/// place them); the caller must already be pinned to CPU 0.
pub fn on_tick_blocking(warmup: usize, samples: usize, pinned: bool) -> Result<Stats> {
    on_tick_blocking_with(warmup, samples, pinned, false, true, false)
}

/// [`on_tick_blocking`], optionally with the plugin in engine mode (the runtime off its
/// socket), with or without the default sandbox (to show what its filters cost a call), and
/// on a stream or a seqpacket socket.
pub fn on_tick_blocking_with(
    warmup: usize,
    samples: usize,
    pinned: bool,
    engine: bool,
    sandbox: bool,
    seqpacket: bool,
) -> Result<Stats> {
    let rt = supervisor_runtime(pinned)?;
    let dir = tempfile::tempdir()?;
    let sup = rt.block_on(async { supervisor() })?;
    let mut config = String::from(if seqpacket { "transport = \"seqpacket\"\n" } else { "" });
    config.push_str("[config]\nmax_position = 10\n");
    if pinned {
        config.push_str("[limits]\ncpus = [0]\n");
    }
    if !sandbox {
        config.push_str(SANDBOX_OFF);
    }
    let spec = temp_plugin(dir.path(), "strat", "tick-strategy", &config)?;
    let strat = rt.block_on(sup.load(spec))?;
    strat.set_engine_mode(engine);
    let mut ns = Vec::with_capacity(samples);
    let deadline = Duration::from_secs(5);
    for i in 0..warmup + samples {
        let tick = Tick { symbol: "BTC-USD".into(), bid: 100.0, ask: 100.02, ts: i as u64 };
        let t0 = Instant::now();
        let _: Order = strat.call_blocking("on_tick", &tick, Deadline::After(deadline))?;
        if i >= warmup {
            ns.push(t0.elapsed().as_nanos() as u64);
        }
    }
    rt.block_on(sup.shutdown());
    let mut name = String::from(match (pinned, engine) {
        (true, true) => "plugd on_tick, blocking, pinned, engine mode",
        (true, false) => "plugd on_tick, blocking, pinned",
        (false, true) => "plugd on_tick, blocking, engine mode",
        (false, false) => "plugd on_tick, blocking (engine thread)",
    });
    if !sandbox {
        name.push_str(", sandbox off");
    }
    if seqpacket {
        name.push_str(", seqpacket");
    }
    Ok(stats(&name, 25, ns))
}

/// Crash → Ready again: the crasher plugin exits on command and is restarted with a 1 ms
/// backoff; the time from the failed call to Ready, with the backoff taken off.
pub async fn crash_to_ready(n: usize) -> Result<Stats> {
    let dir = tempfile::tempdir()?;
    let sup = supervisor()?;
    let restart = "[restart]\nbackoff = \"1ms\"\nbackoff_max = \"1ms\"\nmax_restarts = 1000000\nwithin = \"1s\"\n";
    let c = sup.load(temp_plugin(dir.path(), "crasher", "crasher", restart)?).await?;
    let mut ns = Vec::with_capacity(n);
    for _ in 0..n {
        let before = c.status().pid;
        let t0 = Instant::now();
        let _ = c.call::<_, ()>("crash", "exit").await; // fails: the plugin died
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            let st = c.status();
            if st.state == supervisor::State::Ready && st.pid != before {
                break;
            }
            anyhow::ensure!(Instant::now() < give_up, "crasher did not come back: {st:?}");
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        ns.push((t0.elapsed().saturating_sub(Duration::from_millis(1))).as_nanos() as u64);
    }
    sup.shutdown().await;
    Ok(stats("crash → Ready (less 1 ms backoff)", 0, ns))
}

/// Hot swaps under load: one caller calls echo in a loop while `swaps` updates alternate
/// two versions; returns (steady latencies, latencies of calls made during a swap). Any
/// failed call fails the benchmark.
pub async fn hot_swap(swaps: usize) -> Result<(Stats, Stats)> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir()?;
    let sup = supervisor()?;
    let v = |tag: &str, version: &str| -> Result<PluginSpec> {
        let folder = dir.path().join(tag);
        std::fs::create_dir_all(&folder)?;
        std::fs::write(
            folder.join("plugin.toml"),
            format!(
                "name = \"echo\"\nversion = \"{version}\"\napi_version = \"^1\"\nentrypoint = \"{}\"\n",
                bin_dir()?.join("echo").display()
            ),
        )?;
        Ok(PluginSpec::from_manifest(&folder)?)
    };
    let (v1, v2) = (v("v1", "1.0.0")?, v("v2", "2.0.0")?);
    let echo = sup.load(v1.clone()).await?;
    let (stop, swapping) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let caller = {
        let (echo, stop, swapping) = (echo.clone(), stop.clone(), swapping.clone());
        tokio::spawn(async move {
            let (mut steady, mut during) = (Vec::new(), Vec::new());
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let in_swap = swapping.load(Ordering::Relaxed);
                let t0 = Instant::now();
                let back: u64 =
                    echo.call_with("echo", &n, Deadline::after(Duration::from_secs(10))).await?;
                anyhow::ensure!(back == n, "call {n} answered {back}");
                let ns = t0.elapsed().as_nanos() as u64;
                if in_swap || swapping.load(Ordering::Relaxed) {
                    during.push(ns)
                } else {
                    steady.push(ns)
                }
                n += 1;
            }
            Ok::<_, anyhow::Error>((steady, during))
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..swaps {
        swapping.store(true, Ordering::Relaxed);
        sup.update(if i % 2 == 0 { v2.clone() } else { v1.clone() }).await?;
        swapping.store(false, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (steady, during) = caller.await??;
    sup.shutdown().await;
    Ok((stats("calls between swaps", 0, steady), stats("calls during a swap", 0, during)))
}

/// What [`interleaved`] calls through plugd.
#[derive(Debug, Clone, Copy)]
pub enum Pinned {
    /// `on_tick` to the tick-strategy (typed; the floor moves 64 B).
    OnTick,
    /// `echo` of this many bytes (raw payload; the floor moves the same size).
    Echo(usize),
    /// `on_tick_order`: the strategy calls the host's `send_order` once before replying
    /// (the floor is two raw round trips of 64 B back to back).
    OnTickHostCall,
    /// `on_tick_adapter`: the strategy places its order with the paper-exchange plugin
    /// through plugd (`plugd.call`) before replying (the floor is three raw round trips).
    OnTickAdapter,
}

/// The fill of a paper exchange that fills everything: what a bench's `send_order` answers.
pub fn paper_fill(order: &Order, id: u64) -> plugd_examples::Fill {
    let qty = match order {
        Order::Limit { side: plugd_examples::Side::Buy, qty, .. } => *qty,
        Order::Limit { side: plugd_examples::Side::Sell, qty, .. } => -qty,
        Order::Hold => 0,
    };
    plugd_examples::Fill { order_id: id, qty, price: 100.0 }
}

/// The raw floor and plugd's blocking call in engine mode, measured in alternating blocks
/// of `samples / blocks` round trips each, so that both see the same moments of this
/// (noisy, shared) machine: the ratio of the two is what to compare across runs. With
/// `pinned`, the engine thread (this thread, which the caller must already have pinned to
/// CPU 0), the raw child and the plugin run on CPU 0 and the supervisor's runtime on the
/// other CPUs; without, the scheduler places everything.
pub fn interleaved(
    what: Pinned,
    seqpacket: bool,
    pinned: bool,
    warmup: usize,
    samples: usize,
    blocks: usize,
) -> Result<(Stats, Stats)> {
    let rt = supervisor_runtime(pinned)?;
    let dir = tempfile::tempdir()?;
    let sup = rt.block_on(async { supervisor() })?;
    let (bin, size) = match what {
        Pinned::OnTick | Pinned::OnTickHostCall | Pinned::OnTickAdapter => ("tick-strategy", 64),
        Pinned::Echo(n) => ("echo", n),
    };
    let orders = Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let orders = orders.clone();
        sup.host_method(
            "send_order",
            move |_: &supervisor::HostCall<'_>, order: Order| -> Result<_, String> {
                Ok(paper_fill(&order, orders.fetch_add(1, std::sync::atomic::Ordering::Relaxed)))
            },
        );
    }
    let round_trips = match what {
        Pinned::OnTickHostCall => 2,
        Pinned::OnTickAdapter => 3,
        _ => 1,
    };
    let transport = if seqpacket { "transport = \"seqpacket\"\n" } else { "" };
    let cpus = if pinned { "[limits]\ncpus = [0]\n" } else { "" };
    let exchange = if matches!(what, Pinned::OnTickAdapter) {
        let spec = temp_plugin(
            dir.path(),
            "paper-exchange",
            "paper-exchange",
            &format!("{transport}{cpus}"),
        )?;
        Some(rt.block_on(sup.load(spec))?)
    } else {
        None
    };
    let calls = "[calls]\nallow = [\"paper-exchange.send_order\"]\n";
    let config = format!("{transport}{cpus}{calls}[config]\nmax_position = 10\n");
    let plugin = rt.block_on(sup.load(temp_plugin(dir.path(), "p", bin, &config)?))?;
    plugin.set_engine_mode(true);
    let (mut ours, mut child) = crate::spawn_raw_child(size)?;
    let msg = vec![7u8; size];
    let mut back = vec![0u8; size];
    let data = vec![7u8; size];
    let deadline = Deadline::After(Duration::from_secs(5));
    let mut raw_once = || -> Result<u64> {
        let t0 = Instant::now();
        for _ in 0..round_trips {
            ours.write_all(&msg)?;
            ours.read_exact(&mut back)?;
        }
        Ok(t0.elapsed().as_nanos() as u64)
    };
    let mut i = 0u64;
    let mut plugd_once = || -> Result<u64> {
        i += 1;
        Ok(match what {
            Pinned::OnTick => {
                let tick = Tick { symbol: "BTC-USD".into(), bid: 100.0, ask: 100.02, ts: i };
                let t0 = Instant::now();
                let _: Order = plugin.call_blocking("on_tick", &tick, deadline)?;
                t0.elapsed().as_nanos() as u64
            }
            Pinned::OnTickHostCall | Pinned::OnTickAdapter => {
                let tick = Tick { symbol: "BTC-USD".into(), bid: 100.0, ask: 100.02, ts: i };
                let method = if matches!(what, Pinned::OnTickAdapter) {
                    "on_tick_adapter"
                } else {
                    "on_tick_order"
                };
                let t0 = Instant::now();
                let _: Order = plugin.call_blocking(method, &tick, deadline)?;
                t0.elapsed().as_nanos() as u64
            }
            Pinned::Echo(_) => {
                let payload = Payload::raw(PayloadCodec::Bincode, data.clone());
                let t0 = Instant::now();
                let back = plugin.call_raw_blocking("echo", payload, deadline)?;
                anyhow::ensure!(back.data.len() == size, "echo returned {} bytes", back.data.len());
                t0.elapsed().as_nanos() as u64
            }
        })
    };
    for _ in 0..warmup {
        raw_once()?;
        plugd_once()?;
    }
    let per_block = (samples / blocks.max(1)).max(1);
    let (mut floor, mut through) = (Vec::with_capacity(samples), Vec::with_capacity(samples));
    while floor.len() < samples {
        let n = per_block.min(samples - floor.len());
        for _ in 0..n {
            floor.push(raw_once()?);
        }
        for _ in 0..n {
            through.push(plugd_once()?);
        }
    }
    drop(ours);
    child.wait()?;
    anyhow::ensure!(
        exchange.is_none_or(|ex| ex.status().calls_ok > 0),
        "the strategy placed no order with the exchange plugin"
    );
    rt.block_on(sup.shutdown());
    anyhow::ensure!(
        !matches!(what, Pinned::OnTickHostCall)
            || orders.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the strategy placed no order with the host"
    );
    let mut label = match what {
        Pinned::OnTick => "plugd on_tick, blocking, engine mode".to_string(),
        Pinned::OnTickHostCall => "plugd on_tick + 1 host call, blocking, engine mode".to_string(),
        Pinned::OnTickAdapter => {
            "plugd on_tick + order to an adapter plugin via plugd.call, engine mode".to_string()
        }
        Pinned::Echo(n) => format!("plugd echo {n} B, blocking, engine mode"),
    };
    if pinned {
        label.push_str(", pinned");
    }
    if seqpacket {
        label.push_str(", seqpacket");
    }
    let bytes = match what {
        Pinned::OnTick | Pinned::OnTickHostCall | Pinned::OnTickAdapter => 25,
        Pinned::Echo(n) => n,
    };
    Ok((
        stats(
            &format!(
                "raw socketpair {size} B{}{} (interleaved)",
                match round_trips {
                    1 => String::new(),
                    n => format!(", {n} round trips"),
                },
                if pinned { ", pinned" } else { "" }
            ),
            size,
            floor,
        ),
        stats(&label, bytes, through),
    ))
}
