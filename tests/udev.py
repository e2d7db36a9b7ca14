"""Test helpers for the devices source: a real systemd-udevd, loop devices, real uevents.

- ``Udevd``: Debian's ``/lib/systemd/systemd-udevd`` run standalone as a child
  process, ready when it says ``READY=1`` on a notify socket of ours (no sleep
  loop), stopped with SIGTERM. It processes real uevents of this machine while it
  runs. If it created ``/run/udev``, that goes again afterwards, so the next
  daemon does not find a stale control socket or database.
- ``LoopDevice``: a loop device of our own, made with ``LOOP_CTL_ADD`` (a block
  ``add`` uevent) and removed with ``LOOP_CTL_REMOVE`` (``remove``), numbered
  away from the ones ``losetup -f`` hands out; ``attach``/``detach`` a backing file
  with ``losetup`` (``change``).
- ``trigger(devpath, action)``: a synthetic uevent through ``/sys/DEVPATH/uevent``.

The fixtures ``udevd`` (udevd running, started here unless one already runs) and
``no_udevd`` (skip if a udevd not started by us runs) are imported by the test
modules that need them.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from dbus_fast import Variant

from support import IFACE, MANAGER, PYTHON, SUB_IFACE, terminate
from wqd.sources.devices_monitor import udevd_running

UDEVD = "/lib/systemd/systemd-udevd"
RUN_UDEV = Path("/run/udev")
LOOP_CONTROL = "/dev/loop-control"
LOOP_CTL_ADD = 0x4C80  # include/uapi/linux/loop.h
LOOP_CTL_REMOVE = 0x4C81  # include/uapi/linux/loop.h
NULL_DEVPATH = "/devices/virtual/mem/null"


class Udevd:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.proc: subprocess.Popen | None = None
        self.external = False
        self.made_run_udev = False

    def start(self, timeout: float = 20.0) -> Udevd:
        if udevd_running():
            self.external = True  # someone else's: use it, leave it alone
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        self.made_run_udev = not RUN_UDEV.exists()
        notify_path = self.directory / "notify"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            notify.bind(str(notify_path))
            notify.settimeout(timeout)
            with (self.directory / "udevd.log").open("w") as log:
                self.proc = subprocess.Popen([UDEVD], env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            while True:
                try:
                    message = notify.recv(4096)
                except TimeoutError:
                    self.stop()
                    raise RuntimeError(f"systemd-udevd did not get ready: {self.log_text()}") from None
                if b"READY=1" in message.split(b"\n"):
                    break
        finally:
            notify.close()
        return self

    def log_text(self) -> str:
        try:
            return (self.directory / "udevd.log").read_text()
        except OSError:
            return ""

    def settle(self, timeout: int = 30) -> None:
        """Wait until udevd has processed every queued uevent."""
        subprocess.run(["udevadm", "settle", f"--timeout={timeout}"], check=False, capture_output=True)

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
        self.proc = None
        if self.made_run_udev:
            shutil.rmtree(RUN_UDEV, ignore_errors=True)
            self.made_run_udev = False


def trigger(devpath: str, action: str = "change", times: int = 1) -> None:
    with open(f"/sys{devpath}/uevent", "w") as f:
        for _ in range(times):
            f.write(action)
            f.flush()


class LoopDevice:
    """A loop device of the test's own: ``add`` on enter, ``remove`` on exit."""

    def __init__(self) -> None:
        self.number = -1
        self.backing: str | None = None

    def __enter__(self) -> LoopDevice:
        with open(LOOP_CONTROL, "rb", buffering=0) as control:
            for _ in range(100):
                n = random.randrange(400, 4000)
                try:
                    self.number = fcntl.ioctl(control, LOOP_CTL_ADD, n)
                    break
                except OSError as exc:
                    if exc.errno != errno.EEXIST:
                        raise
            else:
                raise RuntimeError("no free loop device number")
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        if self.number < 0:
            return
        self.detach()
        with open(LOOP_CONTROL, "rb", buffering=0) as control:
            for _ in range(50):
                try:
                    fcntl.ioctl(control, LOOP_CTL_REMOVE, self.number)
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:  # udevd may still hold it open for a moment
                        raise
                    os.sched_yield()
                    subprocess.run(["udevadm", "settle", "--timeout=5"], capture_output=True)
        self.number = -1

    @property
    def name(self) -> str:
        return f"loop{self.number}"

    @property
    def node(self) -> str:
        return f"/dev/{self.name}"

    @property
    def devpath(self) -> str:
        return f"/devices/virtual/block/{self.name}"

    def attach(self, backing: str) -> None:
        subprocess.run(["losetup", self.node, backing], check=True, capture_output=True)
        self.backing = backing

    def detach(self) -> None:
        if self.backing is not None:
            subprocess.run(["losetup", "-d", self.node], check=False, capture_output=True)
            self.backing = None


def ext4_image(path: Path, label: str, uuid: str, size: int = 8 << 20) -> str:
    with path.open("wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, "-U", uuid, str(path)], check=True, capture_output=True)
    return str(path)


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("uevents, loop devices and udevd need root")


@pytest.fixture
def udevd(tmp_path):
    _need_root()
    if not os.path.exists(UDEVD):
        pytest.skip(f"{UDEVD} is not installed (Debian package udev)")
    daemon = Udevd(tmp_path / "udevd").start()
    yield daemon
    daemon.stop()


@pytest.fixture
def no_udevd():
    _need_root()
    if udevd_running():
        pytest.skip("a systemd-udevd not started by these tests is running")
    yield


# -- the devices tests' daemon, signals and uevent storm (test_devices*.py) ----------
UEVENT_CONFIG = """
[devices]
backend = "{backend}"
{extra}
"""



def config(backend: str = "auto", extra: str = "") -> str:
    return UEVENT_CONFIG.format(backend=backend, extra=extra)



def device_signals(client, path: str, devpath: str | None = None) -> list:
    return [body for member, body in client.signals[path]
            if member == "DeviceChanged" and (devpath is None or body[1] == devpath)]



def lost_total(client, path: str) -> int:
    return sum(body[0] for member, body in client.signals[path] if member == "Lost")



async def start(system_bus, wqd_factory, client_factory, cfg: str):
    daemon = await wqd_factory(system_bus, config=cfg)
    client = await client_factory(system_bus.address)
    return daemon, client


STORM_WRITER = """
import sys
n = int(sys.argv[1])
with open("/sys/devices/virtual/mem/null/uevent", "w") as f:
    for _ in range(n):
        f.write("change")
        f.flush()
"""



async def storm(system_bus, wqd_factory, client_factory, cfg: str, n: int) -> None:
    """*n* uevents while another client calls ListSubscriptions in a loop: every call
    answered, and per subscriber every uevent delivered or counted in Lost, exactly."""
    _daemon, watcher = await start(system_bus, wqd_factory, client_factory, cfg)
    caller = await client_factory(system_bus.address)
    path = await watcher.watch("devices", "mem")
    other = await watcher.watch("devices", "", {"properties": Variant("as", ["SEQNUM"])})
    await caller.watch("keys", "@u")
    started = time.monotonic()
    writer = await asyncio.create_subprocess_exec(PYTHON, "-c", STORM_WRITER, str(n))
    latencies = []

    def accounted(sub: str) -> int:
        return len(device_signals(watcher, sub, NULL_DEVPATH)) + lost_total(watcher, sub)

    async def call_loop():
        while writer.returncode is None or accounted(path) < n or accounted(other) < n:
            t0 = time.monotonic()
            reply = await asyncio.wait_for(caller.call(MANAGER, IFACE, "ListSubscriptions"), 10)
            latencies.append(time.monotonic() - t0)
            assert len(reply.body[0]) == 1
            await asyncio.sleep(0.005)

    calls = asyncio.ensure_future(call_loop())
    try:
        assert await writer.wait() == 0
        await asyncio.wait_for(calls, 90)
    finally:
        calls.cancel()
    assert len(latencies) > 10 and max(latencies) < 5.0
    for sub in (path, other):
        null = device_signals(watcher, sub, NULL_DEVPATH)
        lost = lost_total(watcher, sub)
        assert await watcher.get(sub, SUB_IFACE, "Delivered") == len(device_signals(watcher, sub))
        assert await watcher.get(sub, SUB_IFACE, "Lost") == lost
        assert len(null) <= n and len(null) + lost >= n
    # nothing was lost at all (back-pressure keeps uevents in the kernel): exactly n each
    assert accounted(path) == n and accounted(other) == n
    print(f"storm: {n} uevents in {time.monotonic() - started:.1f} s; ListSubscriptions max "
          f"{max(latencies) * 1000:.1f} ms over {len(latencies)} calls; lost {lost_total(watcher, path)}")
