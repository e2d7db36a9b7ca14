"""``python -m bench [--quick] [--only p1,p6] [--results DIR] [--name NAME]``.

Runs each benchmark against its baseline in the same run, on private buses it
starts itself, and writes ``<results>/<name>.json`` (``quick`` or ``full``),
``<name>.md`` and ``<name>-*.png``. Exit status 1 if a benchmark could not run
(a missed target is reported, not an error: timings depend on the machine).
Needs root (the daemon owns its name under the shipped system-bus policy; loop
devices, mounts) and dbus-daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from importlib.metadata import version
from pathlib import Path

from bench import report

BENCHMARKS = {
    "p1": "bench.p1_throughput",
    "p2": "bench.p2_fanout",
    "p3": "bench.p3_devices",
    "p4": "bench.p4_idle",
    "p5": "bench.p5_footprint",
    "p6": "bench.p6_storm",
    "p7": "bench.p7_hostile",
}
RESULTS = Path(__file__).resolve().parent / "results"


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _meta(quick: bool) -> dict:
    repo = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "wqd"], cwd=repo, capture_output=True,
                           text=True).stdout.strip()
    dbus = subprocess.run(["dbus-daemon", "--version"], capture_output=True, text=True).stdout.splitlines()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit or "unknown", "wqd_tree_modified": bool(dirty), "quick": quick,
        "machine": f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}",
        "dbus_daemon": dbus[0] if dbus else "?", "dbus_fast": version("dbus-fast"),
        "loadavg_start": _loadavg(),
    }


async def run_all(selected: list[str], quick: bool) -> tuple[dict, dict, dict, dict]:
    values, details, series, errors = {}, {}, {"throughput": {}, "latency": {}}, {}
    for name in selected:
        module = importlib.import_module(BENCHMARKS[name])
        print(f"bench: {name} ({module.__name__}) ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"wqd-bench-{name}-") as tmp:
            try:
                result = await module.run(Path(tmp), quick)
            except Exception:
                errors[name] = traceback.format_exc()
                print(f"bench: {name} failed:\n{errors[name]}", file=sys.stderr, flush=True)
                continue
        values.update(result.values)
        details[name] = {**result.details, "seconds": round(time.monotonic() - t0, 1)}
        for kind, entries in result.series.items():
            series.setdefault(kind, {}).update(entries)
        shown = ", ".join(f"{k}={report._fmt(v)}" for k, v in result.values.items())
        print(f"bench: {name}: {shown} ({details[name]['seconds']} s)", file=sys.stderr, flush=True)
    return values, details, series, errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    p.add_argument("--quick", action="store_true", help="small sizes (CI): well under 5 minutes")
    p.add_argument("--only", metavar="LIST", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--results", metavar="DIR", type=Path, default=RESULTS, help="where to write (bench/results)")
    p.add_argument("--name", help="file name stem (default: quick or full)")
    args = p.parse_args(argv)
    selected = list(BENCHMARKS)
    if args.only:
        selected = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in selected if s not in BENCHMARKS]
        if unknown:
            p.error(f"unknown benchmark(s): {', '.join(unknown)}")
    name = args.name or ("quick" if args.quick else "full")
    meta = _meta(args.quick)
    values, details, series, errors = asyncio.run(run_all(selected, args.quick))
    meta["loadavg_end"] = _loadavg()
    run = {"values": values, "targets": report.verdicts(values), "details": details, "meta": meta, "errors": errors}
    out = report.write(name, run, series, args.results)
    print(f"bench: wrote {out} and {out.with_suffix('.md').name}", file=sys.stderr)
    print(report.markdown(name, run))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
