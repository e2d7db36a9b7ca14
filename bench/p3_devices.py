"""p3: added latency of a device event: uevent written -> ``DeviceChanged`` received.

A loop device of our own (``losetup`` on a small file) is told ``change``
through its ``/sys/block/loopN/uevent``, one event at a time. The same uevent is
received twice here: as ``DeviceChanged`` from wqd (``Watch("devices", "block")``)
and by a plain pyudev netlink monitor from the same source the daemon's backend
uses (``udev`` after systemd-udevd, else ``kernel``). Both arrival times are taken
first thing in their callbacks, on this process's one event loop; the added
latency is wqd's arrival minus pyudev's, per event. Events of other devices are
ignored (matched on devpath). In alternate blocks of events the daemon is
replaced by ``bench.minimal_bridge`` (a pyudev monitor sending one dbus-fast
signal per uevent, nothing else, in its own process like the daemon), measured
the same way: the floor any Python uevent -> D-Bus bridge pays here.
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
TIMEOUT_S = 1.0  # a uevent not seen by then was lost (e.g. a storm elsewhere overflowed a socket)


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
    blocks, per_block = (2, 25) if quick else (5, 100)
    with LoopDevice(directory) as loop:
        if not loop.node:
            return unavailable(loop.error)
        async with Rig(directory) as rig:
            client = await rig.connect()
            wqd: dict = {"forwarder_ms": [], "pyudev_ms": [], "added_ms": [], "missed": 0}
            bridge: dict = {"forwarder_ms": [], "pyudev_ms": [], "added_ms": [], "missed": 0}
            backend = ""
            for block in range(blocks):
                # Only one forwarder runs at a time: on two cores a second one waking for every
                # uevent would slow the other down.
                daemon = await rig.start_wqd("", name=f"wqd{block}")
                backend = (await get_property(client, MANAGER, IFACE, "Sources")).get("devices", "")
                if not backend:
                    return unavailable("the devices source is unavailable here: " + " | ".join(
                        line for line in daemon.log_text().splitlines() if "devices" in line)[:500])
                source = "udev" if backend == "udev" else "kernel"
                await watch(client, "devices", "block")
                await _measure(client, pyudev, source, loop, per_block, "DeviceChanged", wqd)
                daemon.stop()
                helper = await rig.start_helper("bench.minimal_bridge", source, loop.devpath)
                helper.request(dest=client.unique_name)
                await helper.read()
                await _measure(client, pyudev, source, loop, per_block, "BridgeChanged", bridge)
                helper.proc.stdin.close()
                helper.proc.wait(10)
    added = wqd["added_ms"]
    return Result(
        values={"p3_added_latency_p50_ms": percentile(added, 50), "p3_added_latency_p99_ms": percentile(added, 99),
                "p3_bridge_added_latency_p50_ms": percentile(bridge["added_ms"], 50)},
        details={"backend": backend, "pyudev_source": source, "events": blocks * per_block,
                 "measured": len(added), "missed": wqd["missed"],
                 "wqd_p50_ms": percentile(wqd["forwarder_ms"], 50), "wqd_p99_ms": percentile(wqd["forwarder_ms"], 99),
                 "pyudev_p50_ms": percentile(wqd["pyudev_ms"], 50), "pyudev_p99_ms": percentile(wqd["pyudev_ms"], 99),
                 "minimal_bridge_added_p50_ms": percentile(bridge["added_ms"], 50),
                 "minimal_bridge_added_p99_ms": percentile(bridge["added_ms"], 99),
                 "minimal_bridge_missed": bridge["missed"]},
        series={"latency": {"p3 uevent -> DeviceChanged (wqd)": wqd["forwarder_ms"],
                            "p3 uevent -> pyudev monitor": wqd["pyudev_ms"], "p3 added by wqd": added,
                            "p3 added by a minimal bridge": bridge["added_ms"]}},
    )


async def _measure(client, pyudev, source: str, loop: LoopDevice, count: int, member: str, out: dict) -> None:
    """*count* uevents; per event the forwarder's signal *member* and a pyudev monitor here, timed."""
    ev_loop = asyncio.get_running_loop()
    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=source)
    monitor.filter_by("block")
    monitor.start()
    state: dict = {}

    def on_signal(msg: Message):
        now = time.perf_counter()
        if msg.message_type == MessageType.SIGNAL and msg.member == member and msg.body[1] == loop.devpath:
            fut = state.get("forwarder")
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
    try:
        for _ in range(count):
            state["forwarder"], state["pyudev"] = ev_loop.create_future(), ev_loop.create_future()
            t0 = time.perf_counter()
            uevent.write_text("change")
            done, _ = await asyncio.wait([state["forwarder"], state["pyudev"]], timeout=TIMEOUT_S)
            if len(done) < 2:
                out["missed"] += 1
            else:
                f, u = state["forwarder"].result(), state["pyudev"].result()
                out["forwarder_ms"].append((f - t0) * 1000)
                out["pyudev_ms"].append((u - t0) * 1000)
                out["added_ms"].append((f - u) * 1000)
            await asyncio.sleep(SPACING_S)
    finally:
        client.remove_message_handler(on_signal)
        ev_loop.remove_reader(monitor.fileno())
        del monitor  # libudev closes the socket when the monitor is released
