"""p1: replay source -> 1 subscriber, against a raw dbus-fast sender on the same bus.

wqd: kernel-format key records written into the replay FIFO; the daemon parses,
routes, applies policy, queues and emits one unicast ``KeyChanged`` per record.
Baseline: ``bench.raw_emitter`` sends the same signal (same destination, path,
interface and body) in a loop. Both are timed from the trigger to the last
signal received here, in interleaved pairs of rounds; the ratio is the median of
the pairs' ratios. The baseline's rate is the bus ceiling of this run. CPU time
per signal of each sender and of the bus daemon is in the details.
"""

from __future__ import annotations

from pathlib import Path

from bench.harness import Rig, Result, Tally, compare_throughput, key_records, replay_config, watch

SERIAL = 424242


async def run(directory: Path, quick: bool) -> Result:
    n = 3000 if quick else 10000
    rounds = 3 if quick else 10
    async with Rig(directory) as rig:
        fifo = rig.fifo()
        daemon = await rig.start_wqd(replay_config(fifo))
        client = await rig.connect()
        tally = Tally()
        tally.attach(client)
        path = await watch(client, "keys", str(SERIAL))
        raw = await rig.start_raw_emitter()
        records = key_records(SERIAL, n)
        # Warm up both paths (imports, caches, socket buffers) before timing.
        await compare_throughput(raw, [(client.unique_name, path)], 500, key_records(SERIAL, 500), fifo, tally, 1)
        out = await compare_throughput(raw, [(client.unique_name, path)], n, records, fifo, tally, rounds,
                                       daemon.pid, rig.bus.proc.pid)
    return Result(
        values={"p1_throughput_ratio": out["ratio"], "bus_ceiling_signals_per_s": out["raw_rate"]},
        details={"signals_per_round": n, "rounds": rounds, "wqd_signals_per_s": out["wqd_rate"],
                 "raw_signals_per_s": out["raw_rate"], "wqd_lost": out["wqd_lost"],
                 "wqd_cpu_us_per_signal": out["wqd_cpu_us_per_signal"],
                 "raw_cpu_us_per_signal": out["raw_cpu_us_per_signal"],
                 "bus_cpu_us_per_signal": out["bus_cpu_us_per_signal"], "cpu_clock": out["cpu_clock"],
                 "raw_runs": out["raw_runs"], "wqd_runs": out["wqd_runs"]},
        series={"throughput": {"p1 1 subscriber": (out["wqd_rate"], out["raw_rate"])}},
    )
