"""p2: one event stream, 100 subscribers on 100 connections.

wqd: every record in the replay FIFO goes to all 100 subscriptions (one key,
watched by 100 connections), so it becomes 100 unicast signals. Baseline: the
raw dbus-fast sender sends the same number of unicast messages, to the same
100 destinations and paths, in the same order (one round per event).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.harness import Rig, Result, Tally, compare_throughput, key_records, replay_config, watch

SERIAL = 515151
SUBSCRIBERS = 100


async def run(directory: Path, quick: bool) -> Result:
    events = 60 if quick else 150
    rounds = 3 if quick else 10
    async with Rig(directory) as rig:
        fifo = rig.fifo()
        daemon = await rig.start_wqd(replay_config(fifo))
        tally = Tally()
        clients = await asyncio.gather(*(rig.connect() for _ in range(SUBSCRIBERS)))
        for c in clients:
            tally.attach(c)
        paths = await asyncio.gather(*(watch(c, "keys", str(SERIAL)) for c in clients))
        dests = [(c.unique_name, p) for c, p in zip(clients, paths)]
        raw = await rig.start_raw_emitter()
        await compare_throughput(raw, dests, 10, key_records(SERIAL, 10), fifo, tally, 1)  # warm-up
        out = await compare_throughput(raw, dests, events, key_records(SERIAL, events), fifo, tally, rounds,
                                       daemon.pid, rig.bus.proc.pid)
    return Result(
        values={"p2_fanout100_ratio": out["ratio"]},
        details={"subscribers": SUBSCRIBERS, "events_per_round": events, "messages_per_round": out["signals_per_round"],
                 "rounds": rounds, "wqd_messages_per_s": out["wqd_rate"], "raw_messages_per_s": out["raw_rate"],
                 "wqd_lost": out["wqd_lost"], "wqd_cpu_us_per_message": out["wqd_cpu_us_per_signal"],
                 "raw_cpu_us_per_message": out["raw_cpu_us_per_signal"],
                 "bus_cpu_us_per_message": out["bus_cpu_us_per_signal"],
                 "raw_runs": out["raw_runs"], "wqd_runs": out["wqd_runs"]},
        series={"throughput": {"p2 100 subscribers": (out["wqd_rate"], out["raw_rate"])}},
    )
