"""py-strategy: the tick-strategy example, in Python.

Takes the tick-engine's bincode Tick and answers a bincode Order (the schema
below mirrors examples/src/lib.rs), and JSON from plugctl. State (the
position) is handed to the next version on a hot update.
"""

import logging
import os
import struct

from plugd_plugin import Plugin, PluginError, method, schema, serve

TICK = schema.Struct(("symbol", schema.STR), ("bid", schema.F64), ("ask", schema.F64),
                     ("ts", schema.U64))
SIDE = schema.Enum(("Buy", None), ("Sell", None))
ORDER = schema.Enum(("Hold", None), ("Limit", schema.Struct(
    ("side", SIDE), ("qty", schema.I64), ("price", schema.F64))))


class MeanReversion(Plugin):
    def on_load(self, config):
        self.max_position = config.get("max_position", 10)
        self.threshold = config.get("threshold", 0.0005)
        self.alpha = config.get("alpha", 0.05)
        self.position = 0
        self.ema = None

    def restore_state(self, state):
        (self.position,) = struct.unpack("<q", state)
        logging.info("position %d handed over by the previous instance", self.position)

    def on_shutdown(self):
        return struct.pack("<q", self.position)

    def decide(self, tick):
        """The decision for ``tick`` (the position moves only when the order fills)."""
        bid, ask = tick["bid"], tick["ask"]
        if not (bid > 0 and ask >= bid):
            raise PluginError("crossed or empty book for %s: bid %s ask %s"
                              % (tick["symbol"], bid, ask))
        mid = (bid + ask) / 2
        self.ema = mid if self.ema is None else self.ema + self.alpha * (mid - self.ema)
        edge = (mid - self.ema) / self.ema
        if edge < -self.threshold and self.position < self.max_position:
            return {"Limit": {"side": "Buy", "qty": 1, "price": bid}}
        if edge > self.threshold and self.position > -self.max_position:
            return {"Limit": {"side": "Sell", "qty": 1, "price": ask}}
        return "Hold"

    @method("on_tick", args=TICK, returns=ORDER)
    def on_tick(self, tick):
        """Decides and takes the order as filled (no exchange)."""
        order = self.decide(tick)
        if order != "Hold":
            limit = order["Limit"]
            self.position += limit["qty"] if limit["side"] == "Buy" else -limit["qty"]
        return order

    @method("on_tick_order", args=TICK, returns=ORDER)
    def on_tick_order(self, tick):
        """Decides, places the order with the host (``send_order``: the tick-engine routes it
        to the paper-exchange) and moves the position by the fill, in this same call."""
        order = self.decide(tick)
        self.position += self.host.call("send_order", order)["qty"]
        return order

    async def on_tick_order_async(self, tick):
        """:meth:`on_tick_order` as ``async def`` (with ``PY_STRATEGY_ASYNC=1`` in [env]):
        the plugin is then served on asyncio."""
        order = self.decide(tick)
        self.position += (await self.host.acall("send_order", order))["qty"]
        return order

    @method("position", returns=schema.I64)
    def get_position(self, _):
        return self.position

    @method()
    def place(self, order):
        """Places ``order`` with the host (its ``send_order``) and returns the fill."""
        fill = self.host.call("send_order", order)
        self.host.log("order placed", qty=order.get("qty"), fill=fill)
        return fill

    @method()
    def whoami(self, _):
        """This plugin's status, as plugd tells it."""
        return self.host.status()

    @method()
    def place_via(self, arg):
        """Places ``arg["order"]`` with another plugin, through plugd."""
        return self.host.call_plugin(arg["plugin"], arg["method"], arg["order"])


strategy = MeanReversion()
if os.environ.get("PY_STRATEGY_ASYNC") == "1":
    strategy.register("on_tick_order", strategy.on_tick_order_async, args=TICK, returns=ORDER)
    logging.getLogger("py-strategy").warning("on_tick_order is async def: served on asyncio")
serve(strategy)
