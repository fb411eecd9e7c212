"""py-signal: a moving-average crossover signal in Python, JSON in and out.

`update` takes {"price": p} and answers the current signal; `history` streams
the last N signals one Chunk at a time.
"""

from collections import deque

from plugd_plugin import Plugin, PluginError, method, serve


class Crossover(Plugin):
    def on_load(self, config):
        self.fast = deque(maxlen=config.get("fast", 5))
        self.slow = deque(maxlen=config.get("slow", 20))
        self.signals = deque(maxlen=1000)

    @method()
    def update(self, arg):
        try:
            price = float(arg["price"])
        except (TypeError, KeyError, ValueError):
            raise PluginError('update takes {"price": <number>}') from None
        self.fast.append(price)
        self.slow.append(price)
        fast = sum(self.fast) / len(self.fast)
        slow = sum(self.slow) / len(self.slow)
        signal = "up" if fast > slow else "down" if fast < slow else "flat"
        self.signals.append(signal)
        return {"signal": signal, "fast": fast, "slow": slow}

    @method()
    def history(self, n):
        n = int(n or 10)
        for s in list(self.signals)[-n:]:
            yield s
        return len(self.signals)


serve(Crossover())
