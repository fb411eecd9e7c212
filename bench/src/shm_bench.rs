//! `plugd-bench --shm N`: on_tick over `transport = "shm"` beside its baselines, in one run.
//!
//! - the raw shared-memory floor: two processes spinning on one cache line each way
//!   (this binary re-executed with `--raw-shm-child`; no framing, no serde), pinned to
//!   CPU 0 and CPU 1;
//! - the ring floor: the same ping-pong through plugd's own rings (`plugin_proto::shm`),
//!   with frames the size of an on_tick call and its reply, and nothing else of plugd;
//! - the raw socketpair floor, pinned to one CPU and unpinned (as the other tables);
//! - plugd: `call_blocking("on_tick")` from an engine thread to the tick-strategy plugin in
//!   its full default jail, with `transport = "shm"` and each wait strategy: `spin` with the
//!   caller and the plugin on different CPUs, `spin-then-futex` and `futex` on one CPU and
//!   unpinned; and the socket in engine mode, pinned, for comparison.
//!
//! Every row is a ratio to the floor it is compared with, measured in the same run.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use plugd_examples::{Order, Tick};
use supervisor::Deadline;

use crate::extra::{pin_to_cpu0, temp_plugin};
use crate::{stats, with_ratio, Stats};

/// Two cache lines in a memfd: the parent's counter at 0, the child's at 64.
struct Lines {
    base: *mut u8,
}

impl Lines {
    fn map(fd: &OwnedFd) -> Result<Lines> {
        // SAFETY: a fresh shared mapping of a 4 KiB memfd we hold; checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        anyhow::ensure!(base != libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        Ok(Lines { base: base.cast() })
    }

    fn line(&self, off: usize) -> &AtomicU64 {
        // SAFETY: offsets 0 and 64 of a page-aligned 4 KiB mapping; only atomics touch them.
        unsafe { &*self.base.add(off).cast::<AtomicU64>() }
    }
}

fn pin(cpu: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

/// The raw child: on CPU 1, answers every number the parent writes at line 0 by writing it
/// at line 64, spinning; ends when the parent writes u64::MAX.
pub fn raw_child() -> ! {
    let _ = pin(1);
    // SAFETY: the parent passed a memfd as fd 3 for this child alone.
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    let Ok(lines) = Lines::map(&fd) else { std::process::exit(1) };
    let mut seen = 0;
    loop {
        let v = lines.line(0).load(Ordering::Acquire);
        if v == u64::MAX {
            std::process::exit(0);
        }
        if v != seen {
            seen = v;
            lines.line(64).store(v, Ordering::Release);
        }
        std::hint::spin_loop();
    }
}

/// The raw shared-memory floor: a spin ping-pong on two cache lines between this process
/// (CPU 0) and a child (CPU 1).
fn raw_shm_floor(warmup: usize, samples: usize) -> Result<Stats> {
    // SAFETY: a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"plugd-bench".as_ptr(), 0) };
    anyhow::ensure!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: memfd_create just returned it to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a valid descriptor.
    anyhow::ensure!(unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) } == 0, "ftruncate");
    let lines = Lines::map(&fd)?;
    let raw = fd.as_raw_fd();
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("--raw-shm-child");
    // SAFETY: dup2 is async-signal-safe and the closure captures only an integer.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::dup2(raw, 3)?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("spawn the raw shm child")?;
    pin(0)?;
    let mut ns = Vec::with_capacity(samples);
    for i in 1..=(warmup + samples) as u64 {
        let t0 = Instant::now();
        lines.line(0).store(i, Ordering::Release);
        while lines.line(64).load(Ordering::Acquire) != i {
            std::hint::spin_loop();
        }
        if i as usize > warmup {
            ns.push(t0.elapsed().as_nanos() as u64);
        }
    }
    lines.line(0).store(u64::MAX, Ordering::Release);
    child.wait()?;
    Ok(stats("raw shm spin ping-pong, CPU 0 ↔ CPU 1", 8, ns))
}

/// The ring child: on CPU 1, answers every frame on the calls ring of the mapping at fd 3
/// with a frame of `reply` bytes on the replies ring, spinning; ends at a 1-byte frame.
pub fn ring_child(reply: usize) -> ! {
    use plugin_proto::shm::{Mapping, WaitStrategy, Woken};
    let _ = pin(1);
    // SAFETY: the parent passed a memfd as fd 3 for this child alone.
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    let Ok(map) = Mapping::open(&fd) else { std::process::exit(1) };
    let map = std::sync::Arc::new(map);
    let (mut calls, mut replies) = (map.calls().consumer(), map.replies().producer());
    let mut answer = (reply as u32).to_le_bytes().to_vec();
    answer.resize(4 + reply, 7);
    let mut body = Vec::new();
    loop {
        match calls.wait(WaitStrategy::Spin, None, Duration::from_secs(1)) {
            Ok(Woken::Ring) => {}
            Ok(_) => continue,
            Err(_) => std::process::exit(2),
        }
        match calls.pop_into(1 << 20, &mut body) {
            Ok(true) if body.len() == 1 => std::process::exit(0),
            Ok(true) => {
                if !matches!(replies.push(&answer), Ok(true)) {
                    std::process::exit(3);
                }
            }
            Ok(false) => {}
            Err(_) => std::process::exit(2),
        }
    }
}

/// The ring floor: plugd's own shm rings (plugin_proto::shm, `spin`) between this process
/// (CPU 0) and a child (CPU 1), carrying frames of an on_tick call's and reply's sizes,
/// with no codec, call table or dispatch: what the rings cost over the raw line.
fn ring_floor(warmup: usize, samples: usize) -> Result<Stats> {
    use plugin_proto::shm::{Mapping, WaitStrategy, Woken, DEFAULT_RING};
    use plugin_proto::{Call, Message, Payload, Reply};
    let tick = Tick { symbol: "BTC-USD".into(), bid: 100.0, ask: 100.02, ts: 123_456 };
    let order = Order::Limit { side: plugd_examples::Side::Buy, qty: 1, price: 100.02 };
    let mut call = Vec::new();
    let msg = Message::Call(Call {
        id: 123_456,
        method: "on_tick".into(),
        deadline_us: 5_000_000,
        payload: Payload::bincode(&tick)?,
    });
    plugin_proto::frame::encode_frame(&msg, &mut call)?;
    let mut reply = Vec::new();
    let msg = Message::Reply(Reply { id: 123_456, result: Ok(Payload::bincode(&order)?) });
    plugin_proto::frame::encode_frame(&msg, &mut reply)?;
    let (map, fd) = Mapping::create(DEFAULT_RING)?;
    let map = std::sync::Arc::new(map);
    let raw = fd.as_raw_fd();
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("--ring-shm-child").arg((reply.len() - 4).to_string());
    // SAFETY: dup2 and fcntl are async-signal-safe and the closure captures an integer.
    unsafe {
        cmd.pre_exec(move || {
            // The memfd is close-on-exec; dup2 onto another number clears that, but when it
            // already is fd 3 dup2 does nothing, so the flag is cleared by hand.
            if raw == 3 {
                nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))?;
            } else {
                nix::unistd::dup2(raw, 3)?;
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("spawn the ring shm child")?;
    pin(0)?;
    let (mut calls, mut replies) = (map.calls().producer(), map.replies().consumer());
    let mut body = Vec::new();
    let mut ns = Vec::with_capacity(samples);
    for i in 0..warmup + samples {
        let t0 = Instant::now();
        anyhow::ensure!(calls.push(&call)?, "the calls ring is full");
        loop {
            if replies.wait(WaitStrategy::Spin, None, Duration::from_secs(5))? == Woken::Ring
                && replies.pop_into(1 << 20, &mut body)?
            {
                break;
            }
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("the ring child ended: {status}");
            }
        }
        if i >= warmup {
            ns.push(t0.elapsed().as_nanos() as u64);
        }
    }
    calls.push(&[1, 0, 0, 0, 0])?;
    child.wait()?;
    let name = format!(
        "plugd's rings alone ({} B call, {} B reply), CPU 0 ↔ CPU 1",
        call.len() - 4,
        reply.len() - 4
    );
    Ok(stats(&name, call.len(), ns))
}

/// Who makes the calls in an on_tick row.
#[derive(Clone, Copy, PartialEq)]
enum Caller {
    /// `call_blocking` from this thread, the plugin in engine mode.
    Engine,
    /// `call_with` from a task on a current-thread runtime (this thread).
    CurrentThread,
    /// `call_with` from a task on a multi-thread runtime with two workers.
    MultiThread,
}

/// on_tick to tick-strategy from `who`, on `transport` (`shm` waiting per `wait`, or a
/// socket); this thread (and with an async caller, its runtime) pinned to `caller`, the
/// plugin to `plugin_cpu`, if any.
#[allow(clippy::too_many_arguments)]
fn on_tick_shm(
    warmup: usize,
    samples: usize,
    wait: &str,
    caller: Option<usize>,
    plugin_cpu: Option<usize>,
    transport: &str,
    who: Caller,
    host_call: bool,
) -> Result<Stats> {
    // An async caller's runtime is built pinned, so its threads stay on that CPU too.
    if who != Caller::Engine {
        if let Some(cpu) = caller {
            pin(cpu)?;
        }
    }
    let rt = match who {
        Caller::CurrentThread => {
            tokio::runtime::Builder::new_current_thread().enable_all().build()?
        }
        _ => tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?,
    };
    let dir = tempfile::tempdir()?;
    let sup = rt.block_on(async { crate::extra::supervisor() })?;
    // With a host call: on_tick_order, which places its order with send_order (answered
    // here with a fill) before it answers.
    let method = if host_call { "on_tick_order" } else { "on_tick" };
    if host_call {
        let orders = std::sync::Arc::new(AtomicU64::new(0));
        sup.host_method(
            "send_order",
            move |_: &supervisor::HostCall<'_>, order: Order| -> Result<_, String> {
                Ok(crate::extra::paper_fill(&order, orders.fetch_add(1, Ordering::Relaxed)))
            },
        );
    }
    let mut config = format!("transport = \"{transport}\"\n");
    if transport == "shm" {
        config.push_str(&format!("[shm]\nwait = \"{wait}\"\n"));
    }
    config.push_str("[config]\nmax_position = 10\n");
    if let Some(cpu) = plugin_cpu {
        config.push_str(&format!("[limits]\ncpus = [{cpu}]\n"));
    }
    let spec = temp_plugin(dir.path(), "strat", "tick-strategy", &config)?;
    let strat = rt.block_on(sup.load(spec))?;
    if transport == "shm" {
        // The runner says plugd.shm before Ready: by now calls go through the rings.
        let taken = strat.logs(100).iter().any(|l| l.text.contains("go through shared memory"));
        anyhow::ensure!(taken, "the plugin did not take the shared memory: {:?}", strat.logs(20));
    }
    let deadline = Deadline::After(Duration::from_secs(5));
    let tick = |i: usize| Tick { symbol: "BTC-USD".into(), bid: 100.0, ask: 100.02, ts: i as u64 };
    let mut ns = Vec::with_capacity(samples);
    if who == Caller::Engine {
        strat.set_engine_mode(true);
        if let Some(cpu) = caller {
            pin(cpu)?;
        }
        for i in 0..warmup + samples {
            let tick = tick(i);
            let t0 = Instant::now();
            let _: Order = strat.call_blocking(method, &tick, deadline)?;
            if i >= warmup {
                ns.push(t0.elapsed().as_nanos() as u64);
            }
        }
    } else {
        rt.block_on(async {
            for i in 0..warmup + samples {
                let tick = tick(i);
                let t0 = Instant::now();
                let _: Order = strat.call_with(method, &tick, deadline).await?;
                if i >= warmup {
                    ns.push(t0.elapsed().as_nanos() as u64);
                }
            }
            anyhow::Ok(())
        })?;
    }
    let rings = strat.status().ring_calls;
    rt.block_on(sup.shutdown());
    drop(rt);
    // Only what this function pinned is undone (a run under `taskset` stays where it is).
    if caller.is_some() {
        unpin()?;
    }
    if transport == "shm" {
        anyhow::ensure!(rings >= samples as u64, "only {rings} calls went through the rings");
    }
    Ok(stats(&row_name(wait, caller, plugin_cpu, transport, who, host_call), 25, ns))
}

/// The table's name for an on_tick row.
fn row_name(
    wait: &str,
    caller: Option<usize>,
    plugin_cpu: Option<usize>,
    transport: &str,
    who: Caller,
    host_call: bool,
) -> String {
    let place = match (caller, plugin_cpu) {
        (Some(a), Some(b)) if a != b => format!("CPU {a} ↔ CPU {b}"),
        (Some(a), Some(_)) => format!("pinned to CPU {a}"),
        _ => "unpinned".to_string(),
    };
    let how = match who {
        Caller::Engine => "",
        Caller::CurrentThread => "async current-thread, ",
        Caller::MultiThread => "async multi-thread, ",
    };
    let what = if host_call { "on_tick + 1 host call" } else { "on_tick" };
    if transport == "shm" {
        format!("plugd {what}, {how}shm {wait}, {place}")
    } else if who == Caller::Engine {
        format!("plugd {what}, socket (engine mode), {place}")
    } else {
        format!("plugd {what}, {how}socket, {place}")
    }
}

fn unpin() -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    for cpu in 0..crate::extra::online_cpus() {
        let _ = set.set(cpu);
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

/// plugd's shm rows for `bench/peers/run.sh` (`--peers-mode`): on_tick with
/// `spin-then-futex`, from an engine thread and from an async task, placed wherever the
/// caller of the bench put it (pinned by `taskset`, or not).
pub fn peer_rows(warmup: usize, n: usize) -> Result<Vec<(&'static str, Stats)>> {
    let wait = "spin-then-futex";
    Ok(vec![
        (
            "plugd-on_tick-shm-engine",
            on_tick_shm(warmup, n, wait, None, None, "shm", Caller::Engine, false)?,
        ),
        (
            "plugd-on_tick-shm-async",
            on_tick_shm(warmup, n, wait, None, None, "shm", Caller::MultiThread, false)?,
        ),
    ])
}

/// Runs the table: `n` samples a row; `only`: just the plugd rows whose name contains it
/// (`spin`, `futex`, `socket`, `unpinned`, …), beside all the floors.
pub fn run(n: usize, only: Option<&str>) -> Result<()> {
    let warmup = n / 10;
    let shm_floor = raw_shm_floor(warmup, n)?;
    let ring_floor = ring_floor(warmup, n)?;
    unpin()?;
    let unpinned_floor = crate::raw_floor(64, warmup, n)?;
    pin_to_cpu0()?;
    let pinned_floor = crate::raw_floor(64, warmup, n)?;
    unpin()?;
    let two = crate::extra::online_cpus() > 1;
    /// One on_tick row to measure: wait strategy, caller CPU, plugin CPU, transport, who
    /// calls, the floor it is compared with, and whether the tick calls the host (then
    /// it makes two round trips to the floor's one: compare it with the socket's row).
    struct Row<'a>(&'a str, Option<usize>, Option<usize>, &'a str, Caller, &'a Stats, bool);
    let mut plan = Vec::new();
    let engine = Caller::Engine;
    if two {
        plan.push(Row("spin", Some(0), Some(1), "shm", engine, &shm_floor, false));
    }
    for wait in ["spin-then-futex", "futex"] {
        plan.push(Row(wait, Some(0), Some(0), "shm", engine, &pinned_floor, false));
        plan.push(Row(wait, None, None, "shm", engine, &unpinned_floor, false));
    }
    plan.push(Row("", Some(0), Some(0), "stream", engine, &pinned_floor, false));
    // The async path (#18 item 6): everything on CPU 0, against the pinned socket floor.
    for who in [Caller::CurrentThread, Caller::MultiThread] {
        plan.push(Row("spin-then-futex", Some(0), Some(0), "shm", who, &pinned_floor, false));
        plan.push(Row("", Some(0), Some(0), "stream", who, &pinned_floor, false));
    }
    // A tick that places an order with the host (ctx.call inside on_tick), from an engine
    // thread: on protocol 4 the host call and its answer go through the rings too.
    if two {
        plan.push(Row("spin", Some(0), Some(1), "shm", engine, &shm_floor, true));
    }
    let wait = "spin-then-futex";
    plan.push(Row(wait, None, None, "shm", engine, &unpinned_floor, true));
    plan.push(Row(wait, Some(0), Some(0), "shm", engine, &pinned_floor, true));
    plan.push(Row("", Some(0), Some(0), "stream", engine, &pinned_floor, true));
    let mut rows: Vec<(Stats, &Stats)> = Vec::new();
    for Row(wait, caller, plugin, transport, who, floor, host_call) in plan {
        let name = row_name(wait, caller, plugin, transport, who, host_call);
        if only.is_none_or(|o| name.contains(o)) {
            let row = on_tick_shm(warmup, n, wait, caller, plugin, transport, who, host_call)?;
            rows.push((row, floor));
        }
    }
    let show = |s: &Stats, against: &str| {
        println!(
            "{:<52} p50 {:>7.2} µs  p99 {:>7.2} µs  p99.9 {:>7.2} µs{}",
            s.name,
            s.p50_us,
            s.p99_us,
            s.p999_us,
            s.ratio_p50
                .map(|r| format!(
                    "  ×{against} p50 {r:.2} p99.9 {:.2}",
                    s.ratio_p999.unwrap_or(1.0)
                ))
                .unwrap_or_default()
        )
    };
    show(&shm_floor, "");
    show(&with_ratio(ring_floor, &shm_floor), "raw shm");
    show(&pinned_floor, "");
    show(&unpinned_floor, "");
    for (row, floor) in rows {
        let against = if std::ptr::eq(floor, &shm_floor) {
            "raw shm"
        } else if std::ptr::eq(floor, &pinned_floor) {
            "pinned socket"
        } else {
            "socket"
        };
        show(&with_ratio(row, floor), against);
    }
    if only.is_none_or(|o| o.contains("pipelined")) {
        pipelined(n)?;
    }
    Ok(())
}

/// Pipelined echo calls (64 B) with 1, 16 and 256 in flight from a multi-thread runtime,
/// unpinned: over the socket and over shm (`spin-then-futex`), beside the raw pipelined
/// socketpair of the same run.
fn pipelined(n: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let ks = [1, 16, 256];
    let total = n.max(256 * 16);
    let socket = rt.block_on(crate::extra::pipelined_with(&ks, total, ""))?;
    let shm = "transport = \"shm\"\n[shm]\nwait = \"spin-then-futex\"\n";
    let ring = rt.block_on(crate::extra::pipelined_with(&ks, total, shm))?;
    println!(
        "{:<24} {:>12} {:>14} {:>14} {:>12} {:>12}",
        "pipelined echo, in flight",
        "raw msg/s",
        "socket calls/s",
        "shm calls/s",
        "shm/raw",
        "shm/socket"
    );
    for (s, r) in socket.iter().zip(&ring) {
        println!(
            "{:<24} {:>12.0} {:>14.0} {:>14.0} {:>12.2} {:>12.2}",
            s.k,
            r.raw_per_s,
            s.plugd_per_s,
            r.plugd_per_s,
            r.plugd_per_s / r.raw_per_s,
            r.plugd_per_s / s.plugd_per_s
        );
    }
    Ok(())
}
