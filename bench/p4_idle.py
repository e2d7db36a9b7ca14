"""p4: the daemon's own wakeups while it has subscriptions and nothing happens.

For each backend configuration, the daemon is started, subscribed to every
source that backend serves, left to settle, then its context switches
(voluntary + involuntary, summed over its threads, ``/proc/PID/task/*/status``)
are counted over several windows. Every switch is a wakeup. The whole run is in
a private mount namespace (``unshare``), so other processes' mounts are not
events here; the figure is still the quietest window, as host events that do
reach it (uevents) can only add wakeups, while the daemon's own timers show in
every window.
Event-driven backends should show 0; ``proc-keys`` polls by design (``keys.
poll_interval``, 1 s here).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.harness import IFACE, MANAGER, PYTHON, REPO, Rig, Result, get_property, median, replay_config, watch

POLL_INTERVAL = 1.0
INNER = "WQD_BENCH_P4_INNER"  # set in the private-namespace child


def _keyring() -> str:
    """A keyring of our own for the polling backend to watch (unlinked afterwards)."""
    out = subprocess.run(["keyctl", "newring", "wqd-bench-p4", "@u"], check=True, capture_output=True, text=True)
    return out.stdout.strip()


class Ext4Mount:
    """A small ext4 filesystem of our own, loop-mounted, for ``fs-errors`` to watch."""

    def __init__(self, directory: Path) -> None:
        self.image = directory / "fs-errors.img"
        self.point = directory / "fs-errors-mnt"
        self.mounted = False
        self.error = ""

    def __enter__(self) -> Ext4Mount:
        try:
            self.point.mkdir(parents=True, exist_ok=True)
            with self.image.open("wb") as f:
                f.truncate(8 << 20)
            subprocess.run(["mkfs.ext4", "-q", "-F", str(self.image)], check=True, capture_output=True)
            subprocess.run(["mount", "-o", "loop", str(self.image), str(self.point)], check=True, capture_output=True)
            self.mounted = True
        except (OSError, subprocess.CalledProcessError) as exc:
            self.error = f"cannot loop-mount an ext4 image: {getattr(exc, 'stderr', '') or exc}"
        return self

    def __exit__(self, *exc) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.point)], capture_output=True)


async def _measure(rig: Rig, name: str, config: str, watches: dict[str, tuple[str, dict]],
                   windows: int, seconds: float) -> dict:
    daemon = await rig.start_wqd(config, name=name)
    client = await rig.connect()
    backends = await get_property(client, MANAGER, IFACE, "Sources")
    watched, refused = [], {}
    for source, (target, options) in watches.items():
        if not backends.get(source):
            refused[source] = "unavailable here"
            continue
        try:
            await watch(client, source, target, options)
            watched.append(f"{source}/{backends[source]}")
        except RuntimeError as exc:
            refused[source] = str(exc)
    await asyncio.sleep(1.0)  # settle: replies sent, start-up work done
    rates = []
    for _ in range(windows):
        before = daemon.status()
        await asyncio.sleep(seconds)
        after = daemon.status()
        switches = sum(after[k] - before[k] for k in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"))
        rates.append(switches / seconds)
    daemon.stop()
    return {"label": "+".join(watched), "wakeups_per_s": min(rates), "windows_per_s": rates,
            "median_per_s": median(rates), "not_watched": refused}


async def run(directory: Path, quick: bool) -> Result:
    """In a mount namespace of its own when ``unshare`` works: the host's mounts (other
    processes, other tests) then cannot wake the mounts source, which watches the
    namespace of its caller, here ours."""
    if os.environ.get(INNER) is None and shutil.which("unshare"):
        argv = ["unshare", "--mount", "--propagation", "private", PYTHON, "-m", "bench.p4_idle", str(directory)]
        proc = await asyncio.create_subprocess_exec(*argv, *(["--quick"] if quick else []), cwd=REPO,
                                                    env={**os.environ, INNER: "1"}, stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        if proc.returncode == 0:
            data = json.loads(out)
            data["details"]["mount_namespace"] = "private (unshare)"
            return Result(values=data["values"], details=data["details"])
        print(f"bench: p4 in a private mount namespace failed ({proc.returncode}); in the host's", file=sys.stderr)
    result = await _run_here(directory, quick)
    result.details["mount_namespace"] = "private (unshare)" if os.environ.get(INNER) else "the host's"
    return result


async def _run_here(directory: Path, quick: bool) -> Result:
    windows, seconds = (5, 1.0) if quick else (8, 2.0)
    keyring = _keyring()
    try:
        with Ext4Mount(directory) as ext4:
            runs = await _run_all(directory, keyring, ext4, windows, seconds)
    finally:
        subprocess.run(["keyctl", "unlink", keyring, "@u"], capture_output=True)
    return Result(
        values={"p4_idle_wakeups_per_s": {r["label"]: r["wakeups_per_s"] for r in runs if r["label"]}},
        details={"windows": windows, "window_seconds": seconds, "proc_keys_poll_interval_s": POLL_INTERVAL,
                 "runs": runs},
    )


async def _run_all(directory: Path, keyring: str, ext4: Ext4Mount, windows: int, seconds: float) -> list[dict]:
    async with Rig(directory) as rig:
        fifo = rig.fifo()
        fs_errors = {"fs-errors": (str(ext4.point), {})} if ext4.mounted else {}
        event_driven = await _measure(rig, "event-driven", replay_config(fifo), {
            "keys": ("424242", {}), "devices": ("", {}), "mounts": ("", {}), **fs_errors,
        }, windows, seconds)
        if not ext4.mounted:
            event_driven["not_watched"]["fs-errors"] = ext4.error
        mountinfo = await _measure(rig, "mountinfo", replay_config(fifo, '[mounts]\nbackend = "mountinfo"\n'),
                                   {"mounts": ("", {})}, windows, seconds)
        polling = await _measure(rig, "proc-keys", f'[keys]\nbackend = "proc-keys"\npoll_interval = {POLL_INTERVAL}\n',
                                 {"keys": (keyring, {})}, windows, seconds)
    return [event_driven, mountinfo, polling]


if __name__ == "__main__":  # the child run in a private mount namespace (see run)
    res = asyncio.run(_run_here(Path(sys.argv[1]), "--quick" in sys.argv[2:]))
    print(json.dumps({"values": res.values, "details": res.details}))
