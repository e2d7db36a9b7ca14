"""The devices source without systemd-udevd: backend ``uevent`` (the kernel's raw uevents).

Real uevents only: ``change`` written to ``/sys/devices/virtual/mem/null/uevent``
and loop devices of the test's own (``LOOP_CTL_ADD``/``LOOP_CTL_REMOVE``).
Counts are taken on the test's own devpaths, so stray uevents of the host do not
matter.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess

import pytest
from dbus_fast import Variant

from support import IFACE, MANAGER, PYTHON, SUB_IFACE, ForeignClient
from udev import NULL_DEVPATH, LoopDevice, config, device_signals, lost_total, start, storm, trigger

pytestmark = [pytest.mark.asyncio, pytest.mark.root, pytest.mark.bus]


async def test_backend_is_uevent_without_udevd(no_udevd, system_bus, wqd_factory, client_factory):
    _daemon, client = await start(system_bus, wqd_factory, client_factory, config())
    assert (await client.get(MANAGER, IFACE, "Sources"))["devices"] == "uevent"


async def test_exact_count_of_real_uevents(no_udevd, system_bus, wqd_factory, client_factory):
    _daemon, client = await start(system_bus, wqd_factory, client_factory, config())
    path = await client.watch("devices", "mem")
    n = 25
    trigger(NULL_DEVPATH, "change", n)
    await client.wait_for(lambda: len(device_signals(client, path, NULL_DEVPATH)) >= n)
    got = device_signals(client, path, NULL_DEVPATH)
    assert len(got) == n
    for action, devpath, props in got:
        assert action == "change" and props["ACTION"] == "change" and props["SUBSYSTEM"] == "mem"
        assert props["DEVNAME"] == "/dev/null" and props["DEVPATH"] == NULL_DEVPATH and "WQD_SYNTHETIC" not in props
    seqnums = [int(p["SEQNUM"]) for _a, _d, p in got]
    assert seqnums == sorted(seqnums) and len(set(seqnums)) == n
    # the subscription's counters agree with what arrived
    assert await client.get(path, SUB_IFACE, "Delivered") == len(device_signals(client, path))
    assert await client.get(path, SUB_IFACE, "Lost") == 0


async def test_loop_device_add_and_remove(no_udevd, system_bus, wqd_factory, client_factory):
    _daemon, client = await start(system_bus, wqd_factory, client_factory, config())
    path = await client.watch("devices", "block")
    with LoopDevice() as loop:
        await client.wait_for(lambda: device_signals(client, path, loop.devpath))
        devpath = loop.devpath
    await client.wait_for(lambda: [s for s in device_signals(client, path, devpath) if s[0] == "remove"])
    actions = [s[0] for s in device_signals(client, path, devpath)]
    assert actions[0] == "add" and actions[-1] == "remove"
    add = device_signals(client, path, devpath)[0][2]
    assert add["DEVTYPE"] == "disk" and add["DEVNAME"] == f"/dev/{devpath.rsplit('/', 1)[1]}"


async def test_subsystem_filter_actions_and_properties(no_udevd, system_bus, wqd_factory, client_factory):
    _daemon, client = await start(system_bus, wqd_factory, client_factory, config())
    block = await client.watch("devices", "block")
    mem = await client.watch("devices", "mem")
    everything = await client.watch("devices", "")
    removals = await client.watch("devices", "block", {"actions": Variant("as", ["remove"]),
                                                      "properties": Variant("as", ["DEVNAME", "SUBSYSTEM", "NOPE"])})
    trigger(NULL_DEVPATH, "change", 3)
    with LoopDevice() as loop:
        devpath = loop.devpath
    await client.wait_for(lambda: device_signals(client, removals, devpath)
                          and len(device_signals(client, mem, NULL_DEVPATH)) >= 3
                          and len(device_signals(client, everything, NULL_DEVPATH)) >= 3)
    await client.wait_for(lambda: len(device_signals(client, everything, devpath)) >= 2)
    assert not device_signals(client, block, NULL_DEVPATH) and not device_signals(client, mem, devpath)
    assert [s[0] for s in device_signals(client, block, devpath)] == ["add", "remove"]
    assert [s[0] for s in device_signals(client, everything, devpath)] == ["add", "remove"]
    assert len(device_signals(client, mem, NULL_DEVPATH)) == 3
    (only,) = device_signals(client, removals, devpath)
    assert only == ["remove", devpath, {"DEVNAME": f"/dev/{devpath.rsplit('/', 1)[1]}", "SUBSYSTEM": "block"}]


async def test_initial_snapshot_then_live(no_udevd, system_bus, wqd_factory, client_factory):
    _daemon, client = await start(system_bus, wqd_factory, client_factory, config())
    with LoopDevice() as loop:
        first = await client.watch("devices", "block")  # the table is made here
        path = await client.watch("devices", "block", {"initial": Variant("b", True)})
        trigger(loop.devpath, "change")
        # both subscriptions get the change, in no particular order between them
        await client.wait_for(lambda: all([s for s in device_signals(client, p, loop.devpath) if s[0] == "change"]
                                          for p in (path, first)))
        mine = device_signals(client, path, loop.devpath)
        assert mine[0][0] == "add" and mine[0][2]["WQD_SYNTHETIC"] == "initial" and "SEQNUM" not in mine[0][2]
        assert mine[0][2]["DEVNAME"] == loop.node and mine[0][2]["ACTION"] == "add"
        signals = device_signals(client, path)
        live = [i for i, s in enumerate(signals) if "WQD_SYNTHETIC" not in s[2]]
        snapshot = [i for i, s in enumerate(signals) if s[2].get("WQD_SYNTHETIC") == "initial"]
        assert snapshot and max(snapshot) < min(live)  # the whole snapshot first
        assert all(s[0] == "add" and s[2]["SUBSYSTEM"] == "block" for s in signals[:len(snapshot)])
        # the first subscription (no "initial") got only the live event
        assert [s[0] for s in device_signals(client, first, loop.devpath)] == ["change"]
        # a snapshot counts as delivered
        assert await client.get(path, SUB_IFACE, "Delivered") == len(signals)
        # "initial" with an "actions" filter: only what the filter lets through
        adds_only = await client.watch("devices", "block", {"initial": Variant("b", True),
                                                             "actions": Variant("as", ["remove"])})
        trigger(loop.devpath, "change")
        devpath = loop.devpath
    await client.wait_for(lambda: device_signals(client, adds_only, devpath))
    assert [s[0] for s in device_signals(client, adds_only, devpath)] == ["remove"]


@pytest.mark.parametrize("options", [
    {"actions": Variant("as", ["explode"])},
    {"actions": Variant("as", [])},
    {"actions": Variant("s", "add")},
    {"properties": Variant("as", ["A=B"])},
    {"initial": Variant("s", "yes")},
    {"changes": Variant("as", ["linked"])},
])
async def test_bad_options(no_udevd, system_bus, wqd_factory, client_factory, options):
    _daemon, client = await start(system_bus, wqd_factory, client_factory, config())
    with pytest.raises(Exception) as info:
        await client.watch("devices", "mem", options)
    assert info.value.name == "io.wqd.WatchQueue1.Error.InvalidArgument"
    for target in ("../block", "a/b", "x" * 65, "-usb"):
        with pytest.raises(Exception) as info:
            await client.watch("devices", target)
        assert info.value.name == "io.wqd.WatchQueue1.Error.InvalidArgument"


async def test_enobufs_lost_then_resync(no_udevd, system_bus, wqd_factory, client_factory):
    """A real overflow: the daemon is stopped (SIGSTOP) while uevents pour into a tiny buffer."""
    daemon, client = await start(system_bus, wqd_factory, client_factory, config("uevent", "receive_buffer = 1024"))
    with LoopDevice() as gone:
        path = await client.watch("devices", "block")
        trigger(gone.devpath, "change")
        await client.wait_for(lambda: device_signals(client, path, gone.devpath))
        n = 300
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            trigger(gone.devpath, "change", n)
            gone_devpath = gone.devpath
            gone.remove()  # its "remove" cannot fit either
            with LoopDevice() as new:
                os.kill(daemon.proc.pid, signal.SIGCONT)
                await client.wait_for(lambda: [s for s in device_signals(client, path, gone_devpath)
                                               if s[0] == "remove"] and device_signals(client, path, new.devpath))
                lost = lost_total(client, path)
                assert lost >= 1
                removed = [s for s in device_signals(client, path, gone_devpath) if s[0] == "remove"]
                added = device_signals(client, path, new.devpath)
                assert removed[0][2]["WQD_SYNTHETIC"] == "resync" and added[0][2]["WQD_SYNTHETIC"] == "resync"
                assert added[0][0] == "add"
                # every change written is either delivered or counted as lost (the kernel's drop
                # counter also counts the dropped remove and add, and any stray uevent of the host)
                changes = [s for s in device_signals(client, path, gone_devpath)
                           if s[0] == "change" and "WQD_SYNTHETIC" not in s[2]]
                assert len(changes) - 1 + lost >= n
                print(f"overflow: {n} changes written, {len(changes) - 1} delivered, Lost({lost})")
                assert await client.get(path, SUB_IFACE, "Lost") == lost
                assert await client.get(path, SUB_IFACE, "Delivered") == len(device_signals(client, path))
                # the signals came in order: Lost before the resync's events
                members = [m for m, body in client.signals[path]]
                assert members.index("Lost") < next(i for i, (m, b) in enumerate(client.signals[path])
                                                    if m == "DeviceChanged" and b[2].get("WQD_SYNTHETIC"))
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
    assert "enlarged" in daemon.log_text()


async def test_storm_calls_answered_and_exact_accounting(no_udevd, system_bus, wqd_factory, client_factory):
    await storm(system_bus, wqd_factory, client_factory, config(), 10_000)


async def test_eavesdropper_gets_nothing(no_udevd, system_bus, wqd_factory, client_factory):
    _daemon, client = await start(system_bus, wqd_factory, client_factory, config())
    spy = ForeignClient(system_bus.address, 1000)
    try:
        for rule in ("type='signal'", "type='signal',eavesdrop='true'", "eavesdrop='true'"):
            await spy.request("match", rule=rule)  # the bus may refuse eavesdropping: fine either way
        spy_path = (await spy.request("watch", source="devices", target="block"))["result"][0]
        path = await client.watch("devices", "mem")
        trigger(NULL_DEVPATH, "change", 5)
        await client.wait_for(lambda: len(device_signals(client, path, NULL_DEVPATH)) >= 5)
        seen = (await spy.request("signals", min=1, wait=1.0))["result"]
        assert not [s for s in seen if s[0] != spy_path and s[0].startswith("/io/wqd")]
        assert not [s for s in seen if s[1] == "DeviceChanged"]
    finally:
        spy.close()


async def test_wqctl_watch_devices(no_udevd, system_bus, wqd_factory, client_factory):
    daemon, _client = await start(system_bus, wqd_factory, client_factory, config())
    with LoopDevice() as loop:
        devpath, node = loop.devpath, loop.node
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "wqd.cli.wqctl", "--address", daemon.address, "watch", "devices", "block", "--initial",
            "--json", "--properties", "DEVNAME,WQD_SYNTHETIC", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        records = []
        try:
            while not any(r.get("devpath") == loop.devpath and r["properties"].get("WQD_SYNTHETIC") != "initial"
                          for r in records):
                line = await asyncio.wait_for(proc.stdout.readline(), 10)
                assert line, (await proc.stderr.read()).decode()
                records.append(json.loads(line))
                if any(r.get("devpath") == loop.devpath for r in records) and len(records) < 10_000:
                    trigger(loop.devpath, "change")
        finally:
            proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(proc.wait(), 10) == 0
            await proc.stderr.read()
    mine = [r for r in records if r.get("devpath") == devpath]
    assert mine[0] == {"signal": "DeviceChanged", "subscription": mine[0]["subscription"], "action": "add",
                       "devpath": devpath, "properties": {"DEVNAME": node, "WQD_SYNTHETIC": "initial"}}
    assert mine[-1]["action"] == "change" and mine[-1]["properties"] == {"DEVNAME": node}
    # text output, counted
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "wqd.cli.wqctl", "--address", daemon.address, "watch", "devices", "mem", "--count", "2",
        "--actions", "change", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = await asyncio.wait_for(proc.stderr.readline(), 10)  # "# watching ...": subscribed
    assert b"watching devices 'mem'" in line
    trigger(NULL_DEVPATH, "change", 2)
    out, _err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0
    lines = out.decode().splitlines()
    assert len(lines) == 2 and all(l.startswith(f"DeviceChanged action=change devpath=") for l in lines)
    assert any(f"devpath={NULL_DEVPATH} " in l and "DEVNAME=/dev/null" in l for l in lines)


UNPRIVILEGED = """
import asyncio, json
from wqd.config import Config
from wqd.peer import PeerCredentials
from wqd.sources.devices import open_source

class Sink:
    congested = False
    def __init__(self):
        self.events, self.got = [], asyncio.Event()
    def dispatch(self, event):
        self.events.append(event)
        self.got.set()
    def on_relief(self, callback):
        callback()

class Sub:
    number = 1
    def __init__(self, target):
        self.target = target

async def main():
    source, sink = open_source(Config()), Sink()
    await source.start(sink)
    source.attach(Sub(await source.resolve(PeerCredentials(":1.1", 1000), "mem", {})))
    print(json.dumps({"backend": source.backend, "buffer": source.monitor.buffer}), flush=True)
    null = lambda: [e.action for e in sink.events if e.devpath == "/devices/virtual/mem/null"]
    while len(null()) < 3:
        sink.got.clear()
        await asyncio.wait_for(sink.got.wait(), 10)
    print(json.dumps(null()), flush=True)
    await source.stop()

asyncio.run(main())
"""


async def test_ordinary_user_instance(no_udevd):
    """An instance without privileges (the user unit) reads uevents too; its receive
    buffer is what SO_RCVBUF may give (net.core.rmem_max), not the 128 MiB asked."""
    from support import REPO

    proc = await asyncio.create_subprocess_exec(
        "setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", PYTHON, "-c", UNPRIVILEGED,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert first, (await proc.stderr.read()).decode()
        info = json.loads(first)
        with open("/proc/sys/net/core/rmem_max") as f:
            assert info["backend"] == "uevent" and 0 < info["buffer"] <= int(f.read())
        trigger(NULL_DEVPATH, "change", 3)
        assert json.loads(await asyncio.wait_for(proc.stdout.readline(), 20)) == ["change"] * 3
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await proc.stderr.read()
