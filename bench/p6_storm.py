"""p6: ``ListSubscriptions`` round trips while 10,000 events are being delivered.

One connection subscribes and receives the storm (10,000 records through the
replay FIFO); a second connection in its own process (``bench.caller``), owning
one subscription, calls ``ListSubscriptions`` back to back for as long as the
storm lasts. The same calls on the idle daemon, before the storm, are the
reference. (The calls include the calls made in the 50 ms before the storm.)
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bench.harness import Rig, Result, Tally, key_records, percentile, replay_config, watch, write_all

SERIAL = 616161
EVENTS = 10_000
STORMS = 10  # storms of EVENTS each, for enough calls to read a p99 from
STORMS_QUICK = 3


async def run(directory: Path, quick: bool) -> Result:
    async with Rig(directory) as rig:
        fifo = rig.fifo()
        await rig.start_wqd(replay_config(fifo))
        receiver = await rig.connect()
        tally = Tally()
        tally.attach(receiver)
        await watch(receiver, "keys", str(SERIAL))
        caller = await rig.start_helper("bench.caller")
        caller.request(op="calls", count=200 if quick else 1000)
        idle = [ms for _, ms in (await caller.read())["calls"]]
        records = key_records(SERIAL, EVENTS)
        storm: list[float] = []
        runs = []
        for _ in range(STORMS_QUICK if quick else STORMS):
            done = tally.expect(EVENTS)
            caller.request(op="until_stop")
            await asyncio.sleep(0.05)  # the caller is calling when the storm starts
            t0 = time.perf_counter()
            await write_all(fifo, records)
            await asyncio.wait_for(done, 120)
            caller.request(op="stop")
            calls = (await caller.read())["calls"]
            during = [ms for start, ms in calls if t0 <= start <= tally.last_at]
            storm += during
            runs.append({"delivered": tally.count, "lost": tally.lost, "seconds": tally.last_at - t0,
                         "calls": len(during), "max_ms": max(during, default=0.0)})
    values = {"p6_call_p99_ms_under_storm": percentile(storm, 99)}
    return Result(
        values=values,
        details={"events_per_storm": EVENTS, "storms": runs, "calls_during_storms": len(storm),
                 "storm_p50_ms": percentile(storm, 50),
                 "storm_max_ms": max(storm), "idle_p50_ms": percentile(idle, 50), "idle_p99_ms": percentile(idle, 99)},
        series={"latency": {"p6 ListSubscriptions, storm": storm, "p6 ListSubscriptions, idle": idle}},
    )
