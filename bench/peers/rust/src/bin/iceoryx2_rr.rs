//! Peer: iceoryx2's request-response (zero-copy shared memory, the fastest Rust IPC we know
//! of), one request in flight. The plugin is this binary re-executed with `--plugin NAME`.
//!
//! iceoryx2 carries fixed-size `#[repr(C)]` values only, so the Tick and Quote travel as
//! plain structs with the symbol in a byte array; the plugin's work is the same `answer`.
//! Neither side blocks: both poll, and yield the CPU every 16 looks (as plugd's
//! `spin-then-futex` does), so the pinned run, with both on one CPU, makes progress.

use iceoryx2::prelude::*;
use plugd_peers::{answer, report, samples, tick, Tick};

/// A Tick as iceoryx2 carries it.
#[derive(Debug, Clone, Copy, Default, ZeroCopySend)]
#[repr(C)]
struct TickMsg {
    symbol: [u8; 16],
    bid: f64,
    ask: f64,
    ts: u64,
}

/// A Quote as iceoryx2 carries it.
#[derive(Debug, Clone, Copy, Default, ZeroCopySend)]
#[repr(C)]
struct QuoteMsg {
    symbol: [u8; 16],
    mid: f64,
    ts: u64,
    ok: bool,
}

/// The ts that tells the plugin to stop.
const STOP: u64 = u64::MAX;

fn symbol(s: &str) -> [u8; 16] {
    let mut b = [0u8; 16];
    let n = s.len().min(16);
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
    b
}

fn to_msg(t: &Tick) -> TickMsg {
    TickMsg { symbol: symbol(&t.symbol), bid: t.bid, ask: t.ask, ts: t.ts }
}

fn from_msg(m: &TickMsg) -> Tick {
    let len = m.symbol.iter().position(|&c| c == 0).unwrap_or(16);
    Tick {
        symbol: String::from_utf8_lossy(&m.symbol[..len]).into_owned(),
        bid: m.bid,
        ask: m.ask,
        ts: m.ts,
    }
}

/// Spins on `look` until it yields a value, yielding the CPU every 16 looks.
fn poll<T>(mut look: impl FnMut() -> Option<T>) -> T {
    let mut n = 0u32;
    loop {
        if let Some(v) = look() {
            return v;
        }
        n = n.wrapping_add(1);
        if n % 16 == 0 {
            std::thread::yield_now();
        }
        std::hint::spin_loop();
    }
}

fn main() -> Result<(), Box<dyn core::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let plugin = args.get(1).map(String::as_str) == Some("--plugin");
    let name = if plugin { args[2].clone() } else { format!("plugd-peers/rr-{}", std::process::id()) };
    let node = NodeBuilder::new().create::<ipc::Service>()?;
    let service = node
        .service_builder(&name.as_str().try_into()?)
        .request_response::<TickMsg, QuoteMsg>()
        .open_or_create()?;
    if plugin {
        let server = service.server_builder().create()?;
        loop {
            let request = poll(|| server.receive().ok().flatten());
            let t = *request;
            if t.ts == STOP {
                return Ok(());
            }
            let q = answer(&from_msg(&t));
            let reply = QuoteMsg { symbol: symbol(&q.symbol), mid: q.mid, ts: q.ts, ok: q.ok };
            request.loan_uninit()?.write_payload(reply).send()?;
        }
    }
    let client = service.client_builder().create()?;
    let mut child =
        std::process::Command::new(std::env::current_exe()?).arg("--plugin").arg(&name).spawn()?;
    // Wait until the plugin's server is there (a request before it would go unanswered).
    while service.dynamic_config().number_of_servers() == 0 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let (warmup, n) = samples();
    let mut ns = Vec::with_capacity(n);
    for i in 0..(warmup + n) as u64 {
        let t0 = std::time::Instant::now();
        let pending = client.send_copy(to_msg(&tick(i)))?;
        let q = poll(|| pending.receive().ok().flatten());
        assert_eq!(q.ts, i);
        if i >= warmup as u64 {
            ns.push(t0.elapsed().as_nanos() as u64);
        }
    }
    let _ = client.send_copy(TickMsg { ts: STOP, ..TickMsg::default() })?;
    let _ = child.wait();
    report("iceoryx2-request-response", ns);
    Ok(())
}
