//! tick-engine: a small trading host that delegates `on_tick` to strategy plugins.
//!
//! It loads every `kind = "strategy"` plugin in a folder and the first
//! `kind = "adapter"` one (the bundled `paper-exchange`), feeds the strategies a
//! synthetic tick stream (`on_tick_order`), and routes the orders they place
//! during a tick (`ctx.call("send_order", &order)`, a host method of this engine)
//! to the adapter, whose fill the strategy sees before it answers the tick. Once a
//! second it prints each strategy's decisions, call latency and live status —
//! including the bundled `crasher`, which aborts every few hundred ticks and is
//! restarted by the supervisor while the others keep trading. At the end it prints
//! each strategy's position beside the exchange's book of it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use plugd_examples::{Fill, Order, PlaceOrder, Tick};
use supervisor::{
    CallError, Deadline, ErrorCode, HostRequest, PluginHandle, PluginKind, PluginSpec, Supervisor,
    SupervisorConfig,
};

struct Args {
    plugins: PathBuf,
    ticks: u64,
    rate: u64,
    /// Extra plugin folders to load and keep running without feeding them ticks.
    extra: Vec<PathBuf>,
    /// Serve the Python strategies' `on_tick_order` with `async def` (on asyncio).
    py_async: bool,
}

fn usage() -> ! {
    eprintln!("usage: tick-engine [--plugins DIR] [--ticks N (0 = run until killed)] [--rate TICKS_PER_SEC] [--extra PLUGIN_DIR]... [--py-async]");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        plugins: default_plugins_dir(),
        ticks: 3000,
        rate: 1000,
        extra: Vec::new(),
        py_async: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--plugins" => args.plugins = PathBuf::from(value()),
            "--ticks" => args.ticks = value().parse().unwrap_or_else(|_| usage()),
            "--rate" => args.rate = value().parse().unwrap_or_else(|_| usage()),
            "--extra" => args.extra.push(PathBuf::from(value())),
            "--py-async" => args.py_async = true,
            _ => usage(),
        }
    }
    args
}

/// `examples/plugins` from the repo root, or found relative to `target/<profile>/tick-engine`.
fn default_plugins_dir() -> PathBuf {
    let here = PathBuf::from("examples/plugins");
    if here.is_dir() {
        return here;
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(|root| root.join("examples/plugins")))
        .unwrap_or(here)
}

/// The strategies in `dir`, and the adapter their orders go to.
fn plugins(dir: &Path) -> Result<(Vec<PluginSpec>, PluginSpec)> {
    let mut specs = Vec::new();
    let mut adapter = None;
    let entries = std::fs::read_dir(dir).with_context(|| {
        format!("cannot read plugin folder {}; pass --plugins DIR", dir.display())
    })?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        // plugin.toml strategies only: the engine sends bincode Ticks to `on_tick_order`,
        // and a class brought with its plugin.yaml (py-hedge) takes `on_tick(ctx)` in JSON.
        if !path.join("plugin.toml").is_file() {
            continue;
        }
        let spec = PluginSpec::from_manifest(&path)?;
        match spec.manifest.kind {
            PluginKind::Strategy => specs.push(spec),
            PluginKind::Adapter if adapter.is_none() => adapter = Some(spec),
            _ => {}
        }
    }
    if specs.is_empty() {
        bail!("no plugin with kind = \"strategy\" in {}", dir.display());
    }
    let Some(adapter) = adapter else {
        bail!(
            "no plugin with kind = \"adapter\" in {}: the engine routes the strategies' orders to one (the bundled paper-exchange)",
            dir.display()
        );
    };
    Ok((specs, adapter))
}

/// Offers the strategies `send_order`: the order goes to the adapter's `send_order`, on
/// the strategy's account, with what is left of the strategy's own deadline; the fill comes
/// back in the codec the strategy used (bincode from Rust, JSON from Python).
fn route_orders(sup: &Supervisor, adapter: PluginHandle) {
    sup.host_method_async("send_order", move |req: HostRequest| {
        let adapter = adapter.clone();
        async move {
            let order: Order = req.payload.decode().map_err(|e| {
                CallError::new(ErrorCode::BadPayload, format!("send_order takes an Order: {e}"))
            })?;
            let deadline = match req.deadline {
                Some(at) => Deadline::At(tokio::time::Instant::from_std(at)),
                None => Deadline::Default,
            };
            let place = PlaceOrder { account: req.plugin, order };
            let fill: Fill = adapter.call_with("send_order", &place, deadline).await?;
            req.payload
                .encode_like(&fill)
                .map_err(|e| CallError::new(ErrorCode::Internal, format!("send_order: {e}")))
        }
    });
}

#[derive(Default)]
struct Window {
    lat_ns: Vec<u64>,
    buys: u64,
    sells: u64,
    errors: BTreeMap<String, u64>,
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = parse_args();
    // The Python strategy needs its venv built: the installer's venv builder does it.
    let sup = Supervisor::new(SupervisorConfig {
        prepare: Some(std::sync::Arc::new(plugd_install::python::Venvs)),
        ..Default::default()
    })?;
    let (strategies, adapter) = plugins(&args.plugins)?;
    let name = adapter.name().to_string();
    let exchange = sup.load(adapter).await.with_context(|| format!("loading adapter {name}"))?;
    println!("plugin {name} pid {}", exchange.status().pid.unwrap_or(0));
    route_orders(&sup, exchange.clone());
    let mut handles = Vec::new();
    for mut spec in strategies {
        if args.py_async && spec.manifest.runtime == supervisor::manifest::Runtime::Python {
            // py-strategy then registers its async def on_tick_order.
            spec.manifest.env.insert("PY_STRATEGY_ASYNC".into(), "1".into());
        }
        let name = spec.name().to_string();
        let h = sup.load(spec).await.with_context(|| format!("loading strategy {name}"))?;
        println!("plugin {name} pid {}", h.status().pid.unwrap_or(0));
        handles.push(h);
    }
    for dir in &args.extra {
        let spec = PluginSpec::from_manifest(dir)?;
        let name = spec.name().to_string();
        let h = sup.load(spec).await.with_context(|| format!("loading plugin {name}"))?;
        println!("plugin {name} pid {}", h.status().pid.unwrap_or(0));
    }
    println!("engine ready: {} strategies, {} ticks at {}/s", handles.len(), args.ticks, args.rate);

    let period = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let mut next = tokio::time::Instant::now();
    let mut report_at = Instant::now() + Duration::from_secs(1);
    let mut windows: Vec<Window> = handles.iter().map(|_| Window::default()).collect();
    let mut mid = 100.0f64;
    let mut tick_no = 0u64;
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        if args.ticks > 0 && tick_no >= args.ticks {
            break;
        }
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep_until(next) => {}
        }
        next += period;
        tick_no += 1;
        mid *= 1.0 + (fastrand::f64() - 0.5) * 0.002;
        let tick = Tick { symbol: "BTC-USD".into(), bid: mid - 0.01, ask: mid + 0.01, ts: tick_no };
        // Fan the tick out to every strategy concurrently.
        let calls: Vec<_> = handles
            .iter()
            .map(|h| {
                let (h, tick) = (h.clone(), tick.clone());
                tokio::spawn(async move {
                    let t0 = Instant::now();
                    let r: Result<Order, _> =
                        h.call_with("on_tick_order", &tick, Deadline::Default).await;
                    (r, t0.elapsed())
                })
            })
            .collect();
        for (call, w) in calls.into_iter().zip(windows.iter_mut()) {
            let (r, lat) = call.await?;
            match r {
                Ok(order) => {
                    w.lat_ns.push(lat.as_nanos() as u64);
                    match order {
                        Order::Limit { side: plugd_examples::Side::Buy, .. } => w.buys += 1,
                        Order::Limit { side: plugd_examples::Side::Sell, .. } => w.sells += 1,
                        Order::Hold => {}
                    }
                }
                Err(e) => *w.errors.entry(e.code.to_string()).or_default() += 1,
            }
        }
        if Instant::now() >= report_at {
            report_at += Duration::from_secs(1);
            report(&handles, &mut windows, tick_no);
        }
    }
    report(&handles, &mut windows, tick_no);
    positions(&handles, &exchange).await;
    println!("stopping: draining and shutting down strategies");
    sup.shutdown().await;
    for s in sup.status() {
        println!("{} still loaded: {:?}", s.name, s.state);
    }
    println!("engine stopped after {tick_no} ticks");
    Ok(())
}

/// Each strategy's own position beside the exchange's book of its account.
async fn positions(handles: &[PluginHandle], exchange: &PluginHandle) {
    let book: BTreeMap<String, i64> = exchange.call("positions", &()).await.unwrap_or_else(|e| {
        println!("cannot read the exchange's positions: {e}");
        BTreeMap::new()
    });
    for h in handles {
        let own = match h.call::<_, i64>("position", &()).await {
            Ok(p) => p.to_string(),
            Err(_) => "-".into(),
        };
        let booked = book.get(h.name()).copied().unwrap_or(0);
        println!("position {:<14} strategy {own:>4} exchange {booked:>4}", h.name());
    }
}

fn report(handles: &[supervisor::PluginHandle], windows: &mut [Window], tick_no: u64) {
    println!("-- tick {tick_no}");
    println!(
        "   {:<14} {:<9} {:>7} {:>8} {:>5} {:>5} {:>9} {:>9}  errors / last exit",
        "strategy", "state", "pid", "restarts", "buys", "sells", "p50 µs", "p99 µs"
    );
    for (h, w) in handles.iter().zip(windows.iter_mut()) {
        let s = h.status();
        w.lat_ns.sort_unstable();
        let errs: Vec<String> = w.errors.iter().map(|(k, v)| format!("{v} {k}")).collect();
        let last = s.last_exit.map(|r| format!(" / {r}")).unwrap_or_default();
        println!(
            "   {:<14} {:<9} {:>7} {:>8} {:>5} {:>5} {:>9.1} {:>9.1}  {}{}",
            s.name,
            s.state.to_string(),
            s.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            s.restarts,
            w.buys,
            w.sells,
            pct(&w.lat_ns, 0.5),
            pct(&w.lat_ns, 0.99),
            if errs.is_empty() { "-".to_string() } else { errs.join(", ") },
            last
        );
        *w = Window::default();
    }
}
