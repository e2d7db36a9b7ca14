"""p5: memory per subscription and start-up time.

``p5_bytes_per_subscription``: the daemon's RSS (``VmRSS``) with no subscription,
then with 10,000 (distinct keys on the replay backend, one connection), the
growth divided by the count. ``p5_start_to_ready_s``: ``exec`` of the daemon to
its name being owned on the bus (``NameOwnerChanged``), median of 5 starts,
with the default configuration (backends probed as in production), after one
unmeasured start (bytecode written, page cache warm, as on an installed system).
``p5_start_floor_s`` is the same for ``bench.minimal_service`` (import asyncio and
dbus-fast, connect, request the name) measured interleaved: the floor any Python
dbus-fast service pays on this machine.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.harness import PYTHON, Rig, Result, median, replay_config, watch

SUBSCRIPTIONS = 10_000
STARTS = 5
FIRST_SERIAL = 1_000_000


async def run(directory: Path, quick: bool) -> Result:
    count = 2_000 if quick else SUBSCRIPTIONS
    async with Rig(directory) as rig:
        await rig.start_wqd("", name="warm-up")  # not counted: writes the bytecode, warms the page cache
        rig.daemons.pop().stop()
        floor_argv = [PYTHON, "-m", "bench.minimal_service", rig.address]
        (await rig.start_service(floor_argv, directory / "floor-warm-up.log")).stop()
        starts, floors = [], []
        for i in range(STARTS):  # interleaved, so both see the same machine
            daemon = await rig.start_wqd("", name=f"start{i}")
            starts.append(daemon.ready_s)
            daemon.stop()
            floor = await rig.start_service(floor_argv, directory / f"floor{i}.log")
            floors.append(floor.ready_s)
            floor.stop()
        fifo = rig.fifo()
        daemon = await rig.start_wqd(replay_config(fifo, f"""
            [daemon]
            subscriptions_per_peer = {count + 10}
            """), name="footprint")
        client = await rig.connect()
        await asyncio.sleep(0.2)
        before = daemon.status()["rss_bytes"]
        serials = range(FIRST_SERIAL, FIRST_SERIAL + count)
        for chunk in range(0, count, 100):  # the bus allows 128 pending calls per connection
            await asyncio.gather(*(watch(client, "keys", str(s)) for s in serials[chunk:chunk + 100]))
        await asyncio.sleep(0.2)
        after = daemon.status()["rss_bytes"]
    per_sub = (after - before) / count
    return Result(
        values={"p5_bytes_per_subscription": per_sub, "p5_start_to_ready_s": median(starts),
                "p5_start_floor_s": median(floors)},
        details={"subscriptions": count, "rss_before_bytes": before, "rss_after_bytes": after,
                 "start_to_ready_s": starts, "floor_start_to_ready_s": floors},
    )
