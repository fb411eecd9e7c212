//! End to end: the tick-engine demo host trades through a Rust and a Python strategy.
//!
//! Both strategies implement the same mean-reversion rule and see the same ticks, so
//! every call is answered and they make the same decisions: that checks the
//! Python SDK's bincode schemas against the Rust types byte for byte, through plugd.

use std::collections::BTreeMap;
use std::process::Command;

#[test]
fn rust_and_python_strategies_trade_the_same_ticks_alike() {
    let state = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tick-engine"))
        .args(["--ticks", "600", "--rate", "400"])
        .arg("--plugins")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/plugins"))
        .env("PLUGD_STATE_DIR", state.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("engine stopped after 600 ticks"), "{stdout}");
    // strategy -> (buys, sells, windows with errors)
    let mut totals: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for line in stdout.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() >= 9 && (cols[0] == "tick-strategy" || cols[0] == "py-strategy") {
            let t = totals.entry(cols[0].to_string()).or_default();
            t.0 += cols[4].parse::<u64>().unwrap();
            t.1 += cols[5].parse::<u64>().unwrap();
            t.2 += u64::from(!cols[8].starts_with('-'));
        }
    }
    let (rust, py) = (totals["tick-strategy"], totals["py-strategy"]);
    assert!(py.0 + py.1 > 0, "the Python strategy traded: {stdout}");
    assert!(rust.0 + rust.1 > 0, "the Rust strategy traded: {stdout}");
    // Every call of these two is answered (their deadline is the manifest's, seconds): a
    // failed one is a failure of the test, not a reason to skip the comparison.
    assert_eq!((rust.2, py.2), (0, 0), "windows with failed calls: {stdout}");
    assert_eq!((rust.0, rust.1), (py.0, py.1), "same rule, same ticks: {stdout}");
}
