//! End to end: the tick-engine demo host trades through a Rust and a Python strategy, whose
//! orders it routes to the paper-exchange adapter plugin.
//!
//! Both strategies implement the same mean-reversion rule and see the same ticks; during
//! each tick each places its order with the engine (`ctx.call("send_order")`), which
//! routes it to the paper-exchange plugin, and moves its position by the fill it gets
//! back. So every call is answered, they make the same decisions, and the exchange's book
//! of each account equals the strategy's own position: that checks the Python SDK's
//! bincode and JSON against the Rust types, host calls and plugin-to-plugin routing, with
//! the Python strategy's handler a plain `def` and then an `async def` on asyncio.

use std::collections::BTreeMap;
use std::process::Command;

fn run_engine(extra: &[&str]) -> String {
    let state = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tick-engine"))
        .args(["--ticks", "600", "--rate", "400"])
        .arg("--plugins")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/plugins"))
        .args(extra)
        .env("PLUGD_STATE_DIR", state.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("engine stopped after 600 ticks"), "{stdout}");
    let served_async = stderr.contains("on_tick_order is async def");
    assert_eq!(served_async, extra.contains(&"--py-async"), "{extra:?}: {stderr}");
    stdout
}

#[test]
fn rust_and_python_strategies_trade_the_same_ticks_alike_through_the_exchange() {
    for extra in [&[][..], &["--py-async"][..]] {
        let stdout = run_engine(extra);
        // strategy -> (buys, sells, windows with errors)
        let mut totals: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
        // strategy -> (its own position, the exchange's book of it)
        let mut positions: BTreeMap<String, (String, String)> = BTreeMap::new();
        for line in stdout.lines() {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() >= 9 && (cols[0] == "tick-strategy" || cols[0] == "py-strategy") {
                let t = totals.entry(cols[0].to_string()).or_default();
                t.0 += cols[4].parse::<u64>().unwrap();
                t.1 += cols[5].parse::<u64>().unwrap();
                t.2 += u64::from(!cols[8].starts_with('-'));
            }
            if let ["position", name, "strategy", own, "exchange", booked] = cols[..] {
                positions.insert(name.to_string(), (own.to_string(), booked.to_string()));
            }
        }
        let (rust, py) = (totals["tick-strategy"], totals["py-strategy"]);
        assert!(py.0 + py.1 > 0, "{extra:?}: the Python strategy traded: {stdout}");
        assert!(rust.0 + rust.1 > 0, "{extra:?}: the Rust strategy traded: {stdout}");
        // Every call of these two is answered (their deadline is the manifest's): a failed
        // one is a failure of the test, not a reason to skip the comparison.
        assert_eq!((rust.2, py.2), (0, 0), "{extra:?}: windows with failed calls: {stdout}");
        assert_eq!((rust.0, rust.1), (py.0, py.1), "{extra:?}: same rule, same ticks: {stdout}");
        // Each saw its fills: its own position is what the exchange booked for it.
        let (rust_pos, py_pos) = (&positions["tick-strategy"], &positions["py-strategy"]);
        assert_eq!(rust_pos.0, rust_pos.1, "{extra:?}: {stdout}");
        assert_eq!(py_pos.0, py_pos.1, "{extra:?}: {stdout}");
        assert_eq!(rust_pos, py_pos, "{extra:?}: {stdout}");
        let net = rust.0 as i64 - rust.1 as i64;
        assert_eq!(rust_pos.1, net.to_string(), "{extra:?}: the book is buys - sells: {stdout}");
    }
}
