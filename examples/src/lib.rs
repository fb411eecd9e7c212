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

/// An order a strategy placed, as the engine hands it to the exchange adapter: whose it is
/// (the strategy plugin's name, which the engine knows from the host call) and what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlaceOrder {
    /// The account: the strategy that placed it.
    pub account: String,
    /// The order.
    pub order: Order,
}

/// The exchange's answer to an order: what was filled, at what price.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fill {
    /// The exchange's id of the order (0 for `Hold`, which is not an order).
    pub order_id: u64,
    /// Quantity filled, positive bought, negative sold (0: nothing).
    pub qty: i64,
    /// Price of the fill.
    pub price: f64,
}
