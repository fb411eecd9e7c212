//! tick-strategy: a toy mean-reversion strategy that keeps a position.
//!
//! `on_tick` compares the mid price with an exponential moving average and
//! buys below it, sells above it, within a position limit from `[config]`.
//! `on_tick_order` also places the order with the host and trades on its fill.
//! The position survives a restart-by-update through the state handover.

use plugd_examples::{Fill, Order, PlaceOrder, Side, Tick};
use plugin_runner::{Ctx, LoadContext, Methods, Plugin};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(default)]
struct Config {
    max_position: i64,
    threshold: f64,
    alpha: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self { max_position: 10, threshold: 0.0005, alpha: 0.05 }
    }
}

#[derive(Default)]
struct Strategy {
    config: Config,
    position: i64,
    ema: Option<f64>,
}

impl Strategy {
    /// The decision for `tick` (the position moves only when the order fills).
    fn decide(&mut self, tick: Tick) -> Result<Order, String> {
        if !(tick.bid > 0.0 && tick.ask >= tick.bid) {
            return Err(format!(
                "crossed or empty book for {}: bid {} ask {}",
                tick.symbol, tick.bid, tick.ask
            ));
        }
        let mid = (tick.bid + tick.ask) / 2.0;
        let ema = self.ema.map_or(mid, |e| e + self.config.alpha * (mid - e));
        self.ema = Some(ema);
        let edge = (mid - ema) / ema;
        let order = if edge < -self.config.threshold && self.position < self.config.max_position {
            Order::Limit { side: Side::Buy, qty: 1, price: tick.bid }
        } else if edge > self.config.threshold && self.position > -self.config.max_position {
            Order::Limit { side: Side::Sell, qty: 1, price: tick.ask }
        } else {
            Order::Hold
        };
        Ok(order)
    }

    /// Decides and takes the order as filled (no exchange: the benchmarks' `on_tick`).
    fn on_tick(&mut self, tick: Tick) -> Result<Order, String> {
        let order = self.decide(tick)?;
        match order {
            Order::Limit { side: Side::Buy, qty, .. } => self.position += qty,
            Order::Limit { side: Side::Sell, qty, .. } => self.position -= qty,
            Order::Hold => {}
        }
        Ok(order)
    }

    /// Decides, places the order with the host (`send_order`: the tick-engine routes it to
    /// the paper-exchange adapter) and moves the position by what was filled — the fill is
    /// seen within this same call. One host call per tick, `Hold` included.
    fn on_tick_order(&mut self, ctx: &mut Ctx<'_>, tick: Tick) -> Result<Order, String> {
        let order = self.decide(tick)?;
        let fill: Fill = ctx.call("send_order", &order).map_err(|e| e.to_string())?;
        self.position += fill.qty;
        Ok(order)
    }
}

impl Plugin for Strategy {
    fn methods(m: &mut Methods<Self>) {
        m.typed("on_tick", Strategy::on_tick);
        m.with_ctx("on_tick_order", Strategy::on_tick_order);
        // The same, with the order placed straight with the paper-exchange plugin through
        // plugd (`plugd.call`; the manifest must allow "paper-exchange.send_order").
        m.with_ctx(
            "on_tick_adapter",
            |s: &mut Strategy, ctx, tick: Tick| -> Result<Order, String> {
                let order = s.decide(tick)?;
                let account = std::env::var("PLUGD_PLUGIN_NAME").unwrap_or_default();
                let place = PlaceOrder { account, order: order.clone() };
                let fill: Fill = ctx
                    .call_plugin("paper-exchange", "send_order", &place)
                    .map_err(|e| e.to_string())?;
                s.position += fill.qty;
                Ok(order)
            },
        );
        m.typed("position", |s: &mut Strategy, _: ()| -> Result<i64, String> { Ok(s.position) });
        m.typed("version", |_, _: ()| -> Result<String, String> {
            std::env::var("PLUGD_PLUGIN_VERSION").map_err(|e| e.to_string())
        });
    }

    fn on_load(&mut self, ctx: &LoadContext) -> Result<(), String> {
        self.config = ctx.config()?;
        if let Some(blob) = ctx.state() {
            let bytes: [u8; 8] = blob.try_into().map_err(|_| "bad state blob".to_string())?;
            self.position = i64::from_le_bytes(bytes);
            tracing::info!("restored position {}", self.position);
        }
        Ok(())
    }

    fn on_shutdown(&mut self) -> Option<Vec<u8>> {
        Some(self.position.to_le_bytes().to_vec())
    }

    fn restore_state(&mut self, blob: &[u8]) {
        if let Ok(bytes) = <[u8; 8]>::try_from(blob) {
            self.position = i64::from_le_bytes(bytes);
            tracing::info!("position {} handed over by the previous version", self.position);
        }
    }
}

fn main() {
    plugin_runner::serve(Strategy::default())
}
