"""Peer: Python multiprocessing.Pipe request/reply, what Python plugin hosts use.

The same exchange as plugd's on_tick: {symbol, bid, ask, ts} -> {symbol, mid, ts, ok},
pickled by Pipe. Prints one RESULT line (µs): name p50 p99 p99.9 samples.
"""

import multiprocessing as mp
import sys
import time


def plugin(conn):
    while True:
        tick = conn.recv()
        if tick is None:
            return
        conn.send({"symbol": tick["symbol"], "mid": (tick["bid"] + tick["ask"]) / 2,
                   "ts": tick["ts"], "ok": True})


def main():
    samples = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    warmup = samples // 10
    host, child = mp.Pipe()
    p = mp.Process(target=plugin, args=(child,))
    p.start()
    lat = []
    for i in range(warmup + samples):
        t0 = time.perf_counter_ns()
        host.send({"symbol": "BTC-USD", "bid": 100.0, "ask": 100.02, "ts": i})
        reply = host.recv()
        t1 = time.perf_counter_ns()
        assert reply["ts"] == i and reply["ok"]
        if i >= warmup:
            lat.append(t1 - t0)
    host.send(None)
    p.join()
    lat.sort()
    at = lambda q: lat[round((len(lat) - 1) * q)] / 1000
    print("RESULT python-multiprocessing-pipe %.1f %.1f %.1f %d" % (at(0.5), at(0.99), at(0.999), len(lat)))


if __name__ == "__main__":
    main()
