"""How long the daemon's garbage collections stop its loop with many subscriptions.

``python -m bench.gc_pause [--subscriptions N] [--untuned]``: the daemon (replay keys
backend, everything else as configured by default) under a wrapper that times
every collection with ``gc.callbacks`` (wall clock, ``perf_counter``) and writes
each one of 1 ms or more to a file; a root client makes N subscriptions (distinct
keys, 4 connections: a peer may hold 4,096), then Closes a quarter and makes them
again (the churn a hostile uid can cause at will). Prints the collections of each
generation: count, worst and total ms, and the load. ``--untuned`` replaces
``wqd.daemon.tune_gc`` by a no-op: the interpreter's defaults, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path

from bench.harness import PYTHON, Rig, replay_config, watch
from wqd.bus.names import BUS_NAME, SUBSCRIPTION_INTERFACE

FIRST_SERIAL = 2_000_000
PER_CONNECTION = 4000

WRAPPER = r"""
import gc, os, sys, time
log, untuned = sys.argv[1], sys.argv[2] == "untuned"
fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
started = [0.0]
def timer(phase, info):
    if phase == "start":
        started[0] = time.perf_counter()
    else:
        ms = (time.perf_counter() - started[0]) * 1000
        if ms >= 1.0:
            os.write(fd, f"{info['generation']} {ms:.2f} {info['collected']}\n".encode())
gc.callbacks.append(timer)
import wqd.daemon
if untuned:
    wqd.daemon.tune_gc = lambda: None
sys.argv = ["wqd", *sys.argv[3:]]
sys.exit(wqd.daemon.main())
"""


async def measure(subscriptions: int, untuned: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="wqd-gc-") as tmp:
        directory = Path(tmp)
        gclog = directory / "gc.log"
        async with Rig(directory) as rig:
            fifo = rig.fifo()
            conf = directory / "wqd.conf"
            conf.write_text(replay_config(fifo, f"[daemon]\nsubscriptions_total = {subscriptions + 100}\n"))
            await rig.start_service([PYTHON, "-c", WRAPPER, str(gclog), "untuned" if untuned else "tuned",
                                     "--address", rig.address, "--config", str(conf), "--log-level", "warning"],
                                    directory / "wqd.log")
            gclog.write_text("")  # start-up's collections are not what this measures
            clients = [await rig.connect() for _ in range((subscriptions + PER_CONNECTION - 1) // PER_CONNECTION)]
            paths: list[tuple] = []

            async def make(client, serials):
                for chunk in range(0, len(serials), 100):  # the bus allows 128 pending calls per connection
                    got = await asyncio.gather(*(watch(client, "keys", str(s)) for s in serials[chunk:chunk + 100]))
                    paths.extend((client, p) for p in got)

            serials = list(range(FIRST_SERIAL, FIRST_SERIAL + subscriptions))
            await asyncio.gather(*(make(c, serials[i * PER_CONNECTION:(i + 1) * PER_CONNECTION])
                                   for i, c in enumerate(clients)))
            built = gclog.read_text()
            churn = paths[: len(paths) // 4]
            for chunk in range(0, len(churn), 100):
                await asyncio.gather(*(c.call(_close(p)) for c, p in churn[chunk:chunk + 100]))
            by_client: dict = {}
            for c, _p in churn:
                by_client[c] = by_client.get(c, 0) + 1
            again = FIRST_SERIAL + subscriptions
            for c, n in by_client.items():
                await make(c, list(range(again, again + n)))
                again += n
            await asyncio.sleep(0.5)
            text = gclog.read_text()
    return {"subscriptions": subscriptions, "tuned": not untuned, "load": os.getloadavg(),
            "build_up": _summary(built), "with_churn": _summary(text)}


def _close(path: str):
    from dbus_fast import Message

    return Message(destination=BUS_NAME, path=path, interface=SUBSCRIPTION_INTERFACE, member="Close")


def _summary(text: str) -> dict:
    out: dict = {}
    for line in text.splitlines():
        gen, ms, _collected = line.split()
        entry = out.setdefault(f"gen{gen}", {"count": 0, "worst_ms": 0.0, "total_ms": 0.0})
        entry["count"] += 1
        entry["worst_ms"] = max(entry["worst_ms"], float(ms))
        entry["total_ms"] = round(entry["total_ms"] + float(ms), 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.gc_pause")
    p.add_argument("--subscriptions", type=int, default=16384)
    p.add_argument("--untuned", action="store_true")
    args = p.parse_args()
    print(json.dumps(asyncio.run(measure(args.subscriptions, args.untuned))))


if __name__ == "__main__":
    main()
