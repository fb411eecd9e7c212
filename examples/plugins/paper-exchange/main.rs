//! paper-exchange: an exchange adapter that fills every limit order in full at its price,
//! on paper, and keeps each account's position — the end of the tick-engine's pipeline
//! (strategy → `ctx.call("send_order")` → engine → this plugin's `send_order` → fill).

use std::collections::BTreeMap;

use plugd_examples::{Fill, Order, PlaceOrder, Side};
use plugin_runner::{Methods, Plugin};

#[derive(Default)]
struct Exchange {
    next_id: u64,
    positions: BTreeMap<String, i64>,
}

impl Exchange {
    fn send_order(&mut self, place: PlaceOrder) -> Result<Fill, String> {
        let Order::Limit { side, qty, price } = place.order else {
            return Ok(Fill { order_id: 0, qty: 0, price: 0.0 });
        };
        if qty <= 0 || !price.is_finite() || price <= 0.0 {
            return Err(format!(
                "order of {}: qty {qty} at {price} is not a limit order",
                place.account
            ));
        }
        self.next_id += 1;
        let qty = if side == Side::Buy { qty } else { -qty };
        *self.positions.entry(place.account).or_default() += qty;
        Ok(Fill { order_id: self.next_id, qty, price })
    }
}

impl Plugin for Exchange {
    fn methods(m: &mut Methods<Self>) {
        m.typed("send_order", Exchange::send_order);
        m.typed("positions", |e: &mut Exchange, _: ()| -> Result<BTreeMap<String, i64>, String> {
            Ok(e.positions.clone())
        });
        m.typed("orders", |e: &mut Exchange, _: ()| -> Result<u64, String> { Ok(e.next_id) });
    }
}

fn main() {
    plugin_runner::serve(Exchange::default())
}
