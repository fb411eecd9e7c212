//! tick-strategy: a toy mean-reversion strategy that keeps a position.
//!
//! `on_tick` compares the mid price with an exponential moving average and
//! buys below it, sells above it, within a position limit from `[config]`.
//! The position survives a restart-by-update through the state handover.

use plugd_examples::{Order, Side, Tick};
use plugin_runner::{LoadContext, Methods, Plugin};
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
    fn on_tick(&mut self, tick: Tick) -> Result<Order, String> {
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
            self.position += 1;
            Order::Limit { side: Side::Buy, qty: 1, price: tick.bid }
        } else if edge > self.config.threshold && self.position > -self.config.max_position {
            self.position -= 1;
            Order::Limit { side: Side::Sell, qty: 1, price: tick.ask }
        } else {
            Order::Hold
        };
        Ok(order)
    }
}

impl Plugin for Strategy {
    fn methods(m: &mut Methods<Self>) {
        m.typed("on_tick", Strategy::on_tick);
        // The same decision, then the order placed with the host (its `send_order`, whose
        // answer is an order id) before replying: one host call per tick.
        m.with_ctx("on_tick_order", |s: &mut Strategy, ctx, tick: Tick| -> Result<Order, String> {
            let order = s.on_tick(tick)?;
            let _id: u64 = ctx.call("send_order", &order).map_err(|e| e.to_string())?;
            Ok(order)
        });
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
