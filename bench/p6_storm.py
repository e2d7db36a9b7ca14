"""p6: ``ListSubscriptions`` round trips while 10,000 events are being delivered.

One connection subscribes and receives the storm (10,000 records through the
replay FIFO); a second connection in its own process (``bench.caller``), owning
one subscription, calls ``ListSubscriptions`` back to back for as long as the
storm lasts. References, same run: the same calls on the idle daemon, and
during storms of the same size sent by the raw dbus-fast sender to the same
receiver, alternating with wqd's (the bus and the receiver are as busy, wqd is
not): what the storm costs the calls wherever it comes from. (The calls include the calls made in the 50 ms before the storm.)
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
        path = await watch(receiver, "keys", str(SERIAL))
        caller = await rig.start_helper("bench.caller")
        raw = await rig.start_raw_emitter()
        caller.request(op="calls", count=200 if quick else 1000)
        idle = [ms for _, ms in (await caller.read())["calls"]]
        records = key_records(SERIAL, EVENTS)
        storms: dict[str, list] = {"wqd": [], "raw": []}
        runs: dict[str, list] = {"wqd": [], "raw": []}
        starts = {
            "wqd": lambda: write_all(fifo, records),  # wqd delivers the storm
            "raw": lambda: raw.send([(receiver.unique_name, path)], EVENTS),  # the bus carries one, wqd idles
        }
        for _ in range(STORMS_QUICK if quick else STORMS):
            for kind, start in starts.items():
                done = tally.expect(EVENTS)
                caller.request(op="until_stop")
                await asyncio.sleep(0.05)  # the caller is calling when the storm starts
                t0 = time.perf_counter()
                started = start()
                if started is not None:
                    await started
                await asyncio.wait_for(done, 120)
                if kind == "raw":
                    await raw.read()
                caller.request(op="stop")
                calls = (await caller.read())["calls"]
                during = [ms for begun, ms in calls if t0 <= begun <= tally.last_at]
                storms[kind] += during
                runs[kind].append({"delivered": tally.count, "lost": tally.lost, "seconds": tally.last_at - t0,
                                   "calls": len(during), "max_ms": max(during, default=0.0)})
    storm, bus_storm = storms["wqd"], storms["raw"]
    return Result(
        values={"p6_call_p99_ms_under_storm": percentile(storm, 99),
                "p6_call_p99_ms_under_bus_storm": percentile(bus_storm, 99)},
        details={"events_per_storm": EVENTS, "storms": runs["wqd"], "calls_during_storms": len(storm),
                 "storm_p50_ms": percentile(storm, 50), "storm_max_ms": max(storm),
                 "idle_p50_ms": percentile(idle, 50), "idle_p99_ms": percentile(idle, 99),
                 "bus_storm_p50_ms": percentile(bus_storm, 50), "bus_storm_p99_ms": percentile(bus_storm, 99),
                 "bus_storms": runs["raw"]},
        series={"latency": {"p6 ListSubscriptions, wqd delivering a storm": storm,
                            "p6 ListSubscriptions, raw sender storm on the bus": bus_storm,
                            "p6 ListSubscriptions, idle": idle}},
    )
