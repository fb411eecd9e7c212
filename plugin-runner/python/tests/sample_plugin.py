"""A plugin used by test_serve.py: every feature of the SDK in a few lines."""

import enum
import logging
from dataclasses import dataclass
from typing import Annotated

from plugd_plugin import Plugin, PluginError, method, schema, serve

POINT = schema.Struct(("x", schema.I32), ("y", schema.I32))


class Side(enum.Enum):
    Buy = 0
    Sell = 1


@dataclass
class Order:
    side: Side
    qty: Annotated[int, schema.U32]
    price: float | None


class Sample(Plugin):
    exports = ("shout",)

    def shout(self, text):
        return text.upper()

    def on_load(self, config):
        self.greeting = config.get("greeting", "hello")
        self.count = 0

    def restore_state(self, state):
        self.count = int(state.decode())

    def on_shutdown(self):
        return str(self.count).encode()

    @method
    def keyed(self, query: str, *, cfg: dict | None = None) -> str:
        """Uses the caller's per-call cfg: its key is not part of the input."""
        key = (cfg or {}).get("key")
        return "%s with %s" % (query, "a key of %d chars" % len(key) if key else "no key")

    @method()
    def greet(self, who):
        self.count += 1
        logging.info("greeting %s", who)
        return "%s %s" % (self.greeting, who)

    @method("add", args=POINT, returns=schema.I64)
    def add(self, p):
        return p["x"] + p["y"]

    @method()
    def fail(self, _):
        raise PluginError("as asked")

    @method()
    def order(self, qty):
        # A call to the host while serving a call (protocol 2).
        return self.host.call("send_order", {"qty": qty})

    @method()
    def relay(self, arg):
        return self.host.call_plugin(arg["plugin"], arg["method"], arg["arg"])

    @method()
    def boom(self, _):
        return 1 / 0

    @method
    def bumped(self, n: int) -> int:
        """Bare @method; also the target of a Notify named "bumped"."""
        self.count += n
        return self.count

    @method
    def flip(self, order: Order) -> Order:
        """Typed by hints alone: bincode and JSON, dataclass and enum in and out."""
        assert isinstance(order, Order) and isinstance(order.side, Side)
        other = Side.Sell if order.side is Side.Buy else Side.Buy
        return Order(other, order.qty * 2, None)

    @method()
    def count_to(self, n):
        for i in range(n):
            yield i
        return "done"


serve(Sample())
