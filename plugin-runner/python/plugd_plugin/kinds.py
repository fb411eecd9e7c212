"""Base classes for the kinds of plugin users know, served by name with no ``serve()`` call.

A class named by a manifest (``entrypoint: plugin.HedgeV2`` in plugin.yaml, ``class_path`` in
plugin.json, ``entrypoint = "plugin:HedgeV2"`` in plugin.toml) is run by
``python -m plugd_plugin.launch``: its public methods are callable by their names. These bases
give the shapes a trading platform's plugins have::

    class HedgeV2(StrategyPlugin):
        def on_tick(self, ctx):                 # ctx.tick: the market data of this tick
            fill = ctx.send_order({"side": "Buy", "qty": 1})   # the host's send_order
            return {"placed": fill}
"""

from __future__ import annotations

from typing import Any

from . import Host, Plugin


class Context:
    """What :meth:`StrategyPlugin.on_tick` gets: the tick and the way to the host."""

    def __init__(self, data: Any, host: Host) -> None:
        #: The call's argument: the market data of this tick.
        self.tick = data
        self.host = host

    def send_order(self, order: Any) -> Any:
        """Places ``order`` with the host (its ``send_order`` method); the host's answer."""
        return self.host.call("send_order", order)

    async def asend_order(self, order: Any) -> Any:
        """:meth:`send_order` for ``async def on_tick``."""
        return await self.host.acall("send_order", order)

    def call(self, method: str, arg: Any = None) -> Any:
        """Calls any method of the host."""
        return self.host.call(method, arg)

    def call_plugin(self, plugin: str, method: str, arg: Any = None) -> Any:
        """Calls another plugin through plugd (the manifest's ``[calls] allow`` must list it)."""
        return self.host.call_plugin(plugin, method, arg)

    def log(self, message: str, level: str = "info", **fields: Any) -> None:
        """Logs a line with fields into this plugin's log."""
        self.host.log(message, level, **fields)


class _Kind(Plugin):
    #: Every public method of the subclass is callable by its name.
    expose_public = True
    #: Methods whose argument is wrapped in a :class:`Context`.
    context_methods: tuple[str, ...] = ()


class StrategyPlugin(_Kind):
    """A trading strategy: ``on_tick(ctx)`` for every tick."""

    context_methods = ("on_tick",)

    def on_tick(self, ctx: Context) -> Any:
        """Decides on one tick (``ctx.tick``); may place orders with ``ctx.send_order``."""
        raise NotImplementedError("%s does not define on_tick" % type(self).__name__)


class SignalPlugin(_Kind):
    """A signal: ``compute(market)`` answers a value."""

    def compute(self, market: Any) -> Any:
        """The signal for ``market``."""
        raise NotImplementedError("%s does not define compute" % type(self).__name__)


class AdapterPlugin(_Kind):
    """An exchange or data adapter: ``send_order(order)`` answers a fill."""

    def send_order(self, order: Any) -> Any:
        """Places ``order``; its fill."""
        raise NotImplementedError("%s does not define send_order" % type(self).__name__)


class EnginePlugin(_Kind):
    """An execution or pricing engine: its public methods are its API."""


class UtilityPlugin(_Kind):
    """Anything else: its public methods are its API."""
