//! The request and reply every peer exchanges, and the percentile line they print.

use serde::{Deserialize, Serialize};

/// What the host sends (the same fields as plugd's Tick).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tick {
    /// Instrument.
    pub symbol: String,
    /// Best bid.
    pub bid: f64,
    /// Best ask.
    pub ask: f64,
    /// Sequence / timestamp.
    pub ts: u64,
}

/// What the plugin answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Quote {
    /// Instrument.
    pub symbol: String,
    /// Mid price.
    pub mid: f64,
    /// The tick's ts.
    pub ts: u64,
    /// Always true.
    pub ok: bool,
}

/// The plugin's work.
pub fn answer(t: &Tick) -> Quote {
    Quote { symbol: t.symbol.clone(), mid: (t.bid + t.ask) / 2.0, ts: t.ts, ok: true }
}

/// A tick numbered `i`.
pub fn tick(i: u64) -> Tick {
    Tick { symbol: "BTC-USD".into(), bid: 100.0, ask: 100.02, ts: i }
}

/// Prints `RESULT name p50 p99 p99.9 samples` (µs) from round-trip times in ns.
pub fn report(name: &str, mut ns: Vec<u64>) {
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    println!("RESULT {name} {:.1} {:.1} {:.1} {}", at(0.5), at(0.99), at(0.999), ns.len());
}

/// Samples from the first argument (default 100 000); warm-up is a tenth of that.
pub fn samples() -> (usize, usize) {
    let n = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    (n / 10, n)
}
