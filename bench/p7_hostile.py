"""p7: root's calls and another uid's events while a hostile uid holds its cap and a storm runs.

In a private mount namespace of the benchmark's own (its only mounts are the
storm's), on the shipped system-bus policy:

- the *victim*, uid 1001, has one ``mounts ""`` subscription (``bench.mount_watcher``);
- *root* (``bench.caller``, in its own process) calls ``ListSubscriptions`` every
  ``CALL_EVERY`` seconds for as long as each storm lasts (a fixed rate, not back to
  back: both phases get the same number of samples and the same load from the
  caller, so the quiet figure is not taken on a machine the caller itself keeps busier);
- a *storm*: real tmpfs mounts at a fixed rate (``RATE``/s), each on a fresh
  directory, so every ``attached`` event names its mount point and its latency is
  arrival at the victim minus the return of ``mount(2)`` (both CLOCK_MONOTONIC);
- phase ``quiet``: no attacker. Phase ``attacked``: uid 1000 holds its cap of
  ``mounts ""`` subscriptions (``subscriptions_per_uid``, 16,384 as shipped; 4,096
  in the quick run) on the same namespace, and is stopped (SIGSTOP: it reads
  nothing), then the same storms run again.

Figures (ms): root's call p50/p99 and the victim's event p50/p99 in each phase;
the targets are p99 <= 50 ms under attack and <= 3x the quiet figure of the same run.
``WQD_BENCH_P7_DUMP=FILE`` appends, per storm, ``[phase, storm, [[mount, mount(2)
returned, received or null], ...]]`` (CLOCK_MONOTONIC seconds) as a JSON line: which
events were the worst, and when, to set against a trace of the daemon.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from bench.harness import PYTHON, REPO, Helper, Rig, Result, percentile, replay_config

RATE = 200.0  # mounts per second
MOUNTS, MOUNTS_QUICK = 600, 200  # per storm
STORMS, STORMS_QUICK = 3, 1  # per phase
CAP, CAP_QUICK = 16384, 4096
CALL_EVERY = 0.002  # seconds between the starts of root's calls

STORM = r"""
import ctypes, json, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
base, n, rate, tag = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
times = {}
points = [f"{base}/{tag}-{i}" for i in range(n)]
for p in points:
    os.mkdir(p)
start = time.perf_counter()
for i, p in enumerate(points):
    delay = start + i / rate - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
    if libc.mount(b"wqd-p7", p.encode(), b"tmpfs", 0, b"size=16k") != 0:
        raise OSError(ctypes.get_errno(), "mount " + p)
    times[p] = time.perf_counter()
print(json.dumps(times), flush=True)
"""
UNMOUNT = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for p in sys.argv[1:]:
    libc.umount2(p.encode(), 2)  # MNT_DETACH
    os.rmdir(p)
"""


def fanotify_mounts() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mounts, other uids)"
    try:
        from wqd.kernel.errors import KernelError
        from wqd.sources.mount_backends import probe_fanotify

        probe_fanotify()
    except KernelError as exc:
        return f"no fanotify mount events here (Linux >= 6.15): {exc}"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"cannot probe fanotify: {exc}"
    return None


def as_uid(holder: int, uid: int, script: str, *args: str) -> list[str]:
    # by path: entering the mount namespace leaves the process in its root directory
    return ["nsenter", f"--mount=/proc/{holder}/ns/mnt", "setpriv", f"--reuid={uid}", f"--regid={uid}",
            "--clear-groups", PYTHON, str(REPO / "bench" / script), *args]


async def watcher(rig: Rig, holder: int, uid: int, count: int = 1, connections: int = 1) -> tuple[Helper, dict]:
    proc = subprocess.Popen(as_uid(holder, uid, "mount_watcher.py", rig.address, str(count), str(connections)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    rig.procs.append(proc)
    helper = Helper(proc)
    ready = await asyncio.wait_for(helper.read(), 300)
    helper.unique_name = ready["name"]
    return helper, ready


async def storm(holder: int, base: str, n: int, tag: str) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        "nsenter", f"--mount=/proc/{holder}/ns/mnt", PYTHON, "-c", STORM, base, str(n), str(RATE), tag,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"storm failed: {err.decode()}")
    return json.loads(out)


async def unmount(holder: int, points) -> None:
    proc = await asyncio.create_subprocess_exec(
        "nsenter", f"--mount=/proc/{holder}/ns/mnt", PYTHON, "-c", UNMOUNT, *points,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    await proc.communicate()


async def arrivals(victim: Helper, mounted: dict[str, float], timeout: float) -> tuple[dict[str, float], int]:
    """Arrival times of the ``attached`` events of *mounted*, waiting up to *timeout* s for all."""
    got: dict[str, float] = {}
    lost = 0
    deadline = time.monotonic() + timeout
    while True:
        victim.request(op="dump")
        out = await victim.read()
        lost += out["lost"]
        for t, action, point in out["events"]:
            if action == "attached" and point in mounted:
                got.setdefault(point, t)
        if len(got) >= len(mounted) or time.monotonic() > deadline:
            return got, lost
        await asyncio.sleep(0.05)


async def run(directory: Path, quick: bool) -> Result:
    why = fanotify_mounts()
    if why:
        return Result(values={k: None for k in KEYS}, details={"unavailable": why})
    cap = CAP_QUICK if quick else CAP
    n = MOUNTS_QUICK if quick else MOUNTS
    storms = STORMS_QUICK if quick else STORMS
    base = tempfile.mkdtemp(prefix="wqd-p7-", dir="/tmp")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "wqd-p7-base", base], check=True)
    subprocess.run(["mount", "--make-private", base], check=True)
    holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "3600"])
    attacker: Helper | None = None
    try:
        for _ in range(200):
            if os.readlink(f"/proc/{holder.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"):
                break
            await asyncio.sleep(0.01)
        async with Rig(directory) as rig:
            fifo = rig.fifo()
            await rig.start_wqd(replay_config(fifo, f"""
                [daemon]
                subscriptions_per_uid = {cap}
                [mounts]
                backend = "fanotify"
            """))
            caller = await rig.start_helper("bench.caller")
            victim, _ = await watcher(rig, holder.pid, 1001)
            phases: dict[str, dict] = {}
            for phase in ("quiet", "attacked"):
                if phase == "attacked":
                    t0 = time.monotonic()
                    attacker, made = await watcher(rig, holder.pid, 1000, cap + 1, cap // 4096 + 1)
                    os.kill(attacker.proc.pid, signal.SIGSTOP)
                    subscribed_s = time.monotonic() - t0
                calls_ms, latencies_ms, missing, lost, runs = [], [], 0, 0, []
                for k in range(storms):
                    caller.request(op="until_stop", every=CALL_EVERY)
                    await asyncio.sleep(0.05)
                    mounted = await storm(holder.pid, base, n, f"{phase}{k}")
                    got, lost_now = await arrivals(victim, mounted, 60)
                    caller.request(op="stop")
                    calls = [ms for _begun, ms in (await caller.read())["calls"]]
                    lat = [(got[p] - t) * 1000 for p, t in mounted.items() if p in got]
                    dump_to = os.environ.get("WQD_BENCH_P7_DUMP")  # FILE: each mount's times, a JSON line a storm
                    if dump_to:
                        with open(dump_to, "a") as dump:
                            times = [[i, t, got.get(p)] for i, (p, t) in enumerate(mounted.items())]
                            dump.write(json.dumps([phase, k, times]) + "\n")
                    worst = sorted(((ms, i) for i, ms in enumerate(lat)), reverse=True)[:5]
                    calls_ms += calls
                    latencies_ms += lat
                    missing += len(mounted) - len(got)
                    lost += lost_now
                    runs.append({"mounts": len(mounted), "received": len(got), "lost": lost_now,
                                 "calls": len(calls), "call_max_ms": max(calls, default=0.0),
                                 "event_max_ms": max(lat, default=0.0),
                                 "worst_events": [[i, round(ms, 1)] for ms, i in worst]})  # [mount number, ms]
                    await unmount(holder.pid, mounted)
                    await asyncio.sleep(0.2)
                    victim.request(op="dump")  # the detach events: not measured
                    await victim.read()
                phases[phase] = {"calls_ms": calls_ms, "latencies_ms": latencies_ms, "missing": missing,
                                 "lost": lost, "runs": runs}
                if phase == "attacked":
                    phases[phase].update(attacker_subscriptions=made["made"], attacker_refused=made["errors"],
                                         attacker_subscribe_s=round(subscribed_s, 1))
            if attacker is not None:
                os.kill(attacker.proc.pid, signal.SIGCONT)
    finally:
        if attacker is not None and attacker.proc.poll() is None:
            os.kill(attacker.proc.pid, signal.SIGCONT)
        holder.kill()
        holder.wait()
        subprocess.run(["umount", "-R", "-l", base], capture_output=True)
        os.rmdir(base)
    quiet, attacked = phases["quiet"], phases["attacked"]
    figures = {}
    for name, ph in phases.items():
        figures[name] = {"call_p50_ms": percentile(ph["calls_ms"], 50), "call_p99_ms": percentile(ph["calls_ms"], 99),
                         "event_p50_ms": percentile(ph["latencies_ms"], 50),
                         "event_p99_ms": percentile(ph["latencies_ms"], 99)}
    q, a = figures["quiet"], figures["attacked"]
    return Result(
        values={"p7_call_p99_ms_attacked": a["call_p99_ms"], "p7_event_p99_ms_attacked": a["event_p99_ms"],
                "p7_call_p99_ratio": a["call_p99_ms"] / max(q["call_p99_ms"], 1e-9),
                "p7_event_p99_ratio": a["event_p99_ms"] / max(q["event_p99_ms"], 1e-9),
                "p7_call_p99_ms_quiet": q["call_p99_ms"], "p7_event_p99_ms_quiet": q["event_p99_ms"]},
        details={"cap": cap, "mounts_per_storm": n, "rate_per_s": RATE, "storms_per_phase": storms,
                 "call_every_s": CALL_EVERY,
                 **{f"{name}_{k}": v for name, fig in figures.items() for k, v in fig.items()},
                 **{f"{name}_{k}": v for name, ph in phases.items() for k, v in ph.items()
                    if k not in ("calls_ms", "latencies_ms")}},
        series={"latency": {"p7 victim's mount events, quiet": quiet["latencies_ms"],
                            "p7 victim's mount events, hostile uid at its cap": attacked["latencies_ms"],
                            "p7 root's ListSubscriptions, quiet": quiet["calls_ms"],
                            "p7 root's ListSubscriptions, hostile uid at its cap": attacked["calls_ms"]}},
    )


KEYS = ("p7_call_p99_ms_attacked", "p7_event_p99_ms_attacked", "p7_call_p99_ratio", "p7_event_p99_ratio")
