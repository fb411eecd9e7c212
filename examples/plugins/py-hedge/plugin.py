"""HedgeV2: a strategy as a trading platform writes it — a class, named by plugin.yaml.

plugd runs it with ``python -m plugd_plugin.launch plugin:HedgeV2``: there is no main.py and
no ``serve()`` call here. ``on_tick(ctx)`` gets the tick as ``ctx.tick`` and places its
hedge with the host through ``ctx.send_order``.
"""

from plugd_plugin import StrategyPlugin


class HedgeV2(StrategyPlugin):
    def __init__(self, config=None):
        self.ratio = (config or {}).get("hedge_ratio", 1.0)
        self.exposure = 0.0
        self.hedged = 0.0

    async def on_load(self):
        # A platform's hooks are often async and take no argument: both are fine.
        self.loaded = True

    def on_tick(self, ctx):
        """Hedges the tick's exposure by the configured ratio; answers what it did."""
        self.exposure += ctx.tick.get("exposure", 0.0)
        want = round(self.exposure * self.ratio - self.hedged, 6)
        if want == 0:
            return {"hedge": 0}
        fill = ctx.send_order({"side": "Sell" if want > 0 else "Buy", "qty": abs(want)})
        self.hedged += want
        return {"hedge": want, "fill": fill}

    def position(self):
        """Exposure and hedge so far (a method with no argument)."""
        return {"exposure": self.exposure, "hedged": self.hedged, "loaded": self.loaded}
