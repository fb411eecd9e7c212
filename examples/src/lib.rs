//! Types shared by the tick-engine host and the tick-strategy plugin.
//!
//! In a real deployment these would live in the trading platform's API crate;
//! both sides of the process boundary depend on them, and plugd carries them
//! as bincode payloads.

use serde::{Deserialize, Serialize};

/// One market update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tick {
    /// Instrument.
    pub symbol: String,
    /// Best bid.
    pub bid: f64,
    /// Best ask.
    pub ask: f64,
    /// Exchange timestamp, nanoseconds.
    pub ts: u64,
}

/// Which way to trade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Side {
    /// Buy.
    Buy,
    /// Sell.
    Sell,
}

/// A strategy's decision for one tick.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Order {
    /// Do nothing.
    Hold,
    /// Trade `qty` at `price`.
    Limit {
        /// Buy or sell.
        side: Side,
        /// Quantity.
        qty: i64,
        /// Limit price.
        price: f64,
    },
}
