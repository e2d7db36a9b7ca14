"""p3: added latency of a device event: uevent written -> ``DeviceChanged`` received.

A loop device of our own (``losetup`` on a small file) is told ``change``
through its ``/sys/block/loopN/uevent``, one event at a time. The same uevent is
received twice here: as ``DeviceChanged`` from wqd (``Watch("devices", "block")``)
and by a plain pyudev netlink monitor from the same source the daemon's backend
uses (``udev`` after systemd-udevd, else ``kernel``). Both arrival times are taken
first thing in their callbacks, on this process's one event loop; the added
latency is wqd's arrival minus pyudev's, per event. Events of other devices are
ignored (matched on devpath).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import time
from pathlib import Path

from dbus_fast import Message, MessageType

from bench.harness import IFACE, MANAGER, Rig, Result, get_property, percentile, watch

SPACING_S = 0.005  # between events, so each is measured on its own
TIMEOUT_S = 3.0


class LoopDevice:
    def __init__(self, directory: Path) -> None:
        self.backing = directory / "p3-loop.img"
        self.node = ""
        self.error = ""

    def __enter__(self) -> LoopDevice:
        try:
            with self.backing.open("wb") as f:
                f.truncate(1 << 20)
            self.node = subprocess.run(["losetup", "-f", "--show", str(self.backing)], check=True,
                                       capture_output=True, text=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError) as exc:
            self.error = f"cannot set up a loop device: {getattr(exc, 'stderr', '') or exc}"
        return self

    def __exit__(self, *exc) -> None:
        if self.node:
            subprocess.run(["losetup", "-d", self.node], capture_output=True)

    @property
    def name(self) -> str:
        return os.path.basename(self.node)

    @property
    def devpath(self) -> str:
        return f"/devices/virtual/block/{self.name}"


def unavailable(reason: str) -> Result:
    return Result(values={"p3_added_latency_p50_ms": None, "p3_added_latency_p99_ms": None},
                  details={"unavailable": reason})


async def run(directory: Path, quick: bool) -> Result:
    if importlib.util.find_spec("wqd.sources.devices") is None:
        return unavailable("the devices source (wqd/sources/devices.py) is not in this tree yet")
    try:
        import pyudev
    except ImportError as exc:
        return unavailable(f"pyudev is missing: {exc}")
    count = 50 if quick else 500
    with LoopDevice(directory) as loop:
        if not loop.node:
            return unavailable(loop.error)
        async with Rig(directory) as rig:
            daemon = await rig.start_wqd("")
            client = await rig.connect()
            backend = (await get_property(client, MANAGER, IFACE, "Sources")).get("devices", "")
            if not backend:
                return unavailable("the devices source is unavailable here: "
                                   + " | ".join(l for l in daemon.log_text().splitlines() if "devices" in l)[:500])
            await watch(client, "devices", "block")
            monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev" if backend == "udev" else "kernel")
            monitor.filter_by("block")
            monitor.start()
            try:
                out = await _measure(client, monitor, loop, count)
            finally:
                asyncio.get_running_loop().remove_reader(monitor.fileno())
                del monitor  # libudev closes the socket when the monitor is released
    wqd_ms, udev_ms, added = out["wqd_ms"], out["pyudev_ms"], out["added_ms"]
    return Result(
        values={"p3_added_latency_p50_ms": percentile(added, 50), "p3_added_latency_p99_ms": percentile(added, 99)},
        details={"backend": backend, "pyudev_source": "udev" if backend == "udev" else "kernel", "events": count,
                 "measured": len(added), "missed": out["missed"], "wqd_p50_ms": percentile(wqd_ms, 50),
                 "wqd_p99_ms": percentile(wqd_ms, 99), "pyudev_p50_ms": percentile(udev_ms, 50),
                 "pyudev_p99_ms": percentile(udev_ms, 99)},
        series={"latency": {"p3 uevent -> DeviceChanged (wqd)": wqd_ms, "p3 uevent -> pyudev monitor": udev_ms,
                            "p3 added by wqd": added}},
    )


async def _measure(client, monitor, loop: LoopDevice, count: int) -> dict:
    ev_loop = asyncio.get_running_loop()
    state: dict = {}

    def on_signal(msg: Message):
        now = time.perf_counter()
        if msg.message_type == MessageType.SIGNAL and msg.member == "DeviceChanged" and msg.body[1] == loop.devpath:
            fut = state.get("wqd")
            if fut is not None and not fut.done():
                fut.set_result(now)
        return None

    def on_uevent():
        now = time.perf_counter()
        while (device := monitor.poll(0)) is not None:
            if device.device_path == loop.devpath:
                fut = state.get("pyudev")
                if fut is not None and not fut.done():
                    fut.set_result(now)

    client.add_message_handler(on_signal)
    ev_loop.add_reader(monitor.fileno(), on_uevent)
    uevent = Path(f"/sys/block/{loop.name}/uevent")
    wqd_ms, udev_ms, added, missed = [], [], [], 0
    for _ in range(count):
        state["wqd"], state["pyudev"] = ev_loop.create_future(), ev_loop.create_future()
        t0 = time.perf_counter()
        uevent.write_text("change")
        done, _ = await asyncio.wait([state["wqd"], state["pyudev"]], timeout=TIMEOUT_S)
        if len(done) < 2:
            missed += 1
        else:
            w, u = state["wqd"].result(), state["pyudev"].result()
            wqd_ms.append((w - t0) * 1000)
            udev_ms.append((u - t0) * 1000)
            added.append((w - u) * 1000)
        await asyncio.sleep(SPACING_S)
    client.remove_message_handler(on_signal)
    return {"wqd_ms": wqd_ms, "pyudev_ms": udev_ms, "added_ms": added, "missed": missed}
