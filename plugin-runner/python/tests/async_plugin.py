"""A plugin used by test_serve.py: async handlers and hooks, served on asyncio."""

import asyncio

from plugd_plugin import Plugin, PluginError, method, serve


class Concurrent(Plugin):
    async def on_load(self, config):
        await asyncio.sleep(0)
        if config.get("fail"):
            raise RuntimeError("no exchange to connect to")
        self.gate = asyncio.Event()
        self.events = ["loaded"]

    async def on_start(self):
        self.events.append("started")

    async def on_stop(self):
        self.events.append("stopped")

    async def restore_state(self, state):
        await asyncio.sleep(0.05)
        self.events.append("restored " + state.decode())

    @method()
    def seen(self, _):
        return self.events

    def on_shutdown(self):
        return ",".join(self.events).encode()

    @method()
    async def wait_gate(self, _):
        """Answers only once open_gate ran: served one at a time, this would never end."""
        await self.gate.wait()
        return "through"

    @method()
    def open_gate(self, _):
        """A plain handler, run on the loop."""
        self.gate.set()
        return "opened"

    @method()
    async def order(self, qty):
        fill = await self.host.acall("send_order", {"qty": qty})
        return {"fill": fill}

    @method()
    async def sleep_forever(self, _):
        self.events.append("slept")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.events.append("cancelled")
            raise

    @method()
    async def refuse(self, _):
        raise PluginError("market closed")

    @method()
    async def ticks(self, n):
        for i in range(n):
            await asyncio.sleep(0)
            yield i


serve(Concurrent())
