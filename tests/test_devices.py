"""The devices source with a real systemd-udevd: backend ``udev`` (processed events, udev's properties).

``udevd`` (tests/udev.py) starts Debian's systemd-udevd standalone for each test
and stops it afterwards. Counts are taken on the test's own devpaths.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid

import pytest
from dbus_fast import Variant

from support import IFACE, MANAGER, SUB_IFACE, ForeignClient
from udev import NULL_DEVPATH, LoopDevice, Udevd, config, device_signals, ext4_image, lost_total, storm, trigger

pytestmark = [pytest.mark.asyncio, pytest.mark.root, pytest.mark.bus]


async def test_backend_udev_and_exact_count(udevd, system_bus, wqd_factory, client_factory):
    await wqd_factory(system_bus, config=config())
    client = await client_factory(system_bus.address)
    assert (await client.get(MANAGER, IFACE, "Sources"))["devices"] == "udev"
    path = await client.watch("devices", "mem")
    n = 20
    trigger(NULL_DEVPATH, "change", n)
    await client.wait_for(lambda: len(device_signals(client, path, NULL_DEVPATH)) >= n)
    udevd.settle()
    got = device_signals(client, path, NULL_DEVPATH)
    assert len(got) == n
    for action, _devpath, props in got:
        # udev's processed event: USEC_INITIALIZED is udev's, not the kernel's
        assert action == "change" and props["DEVNAME"] == "/dev/null" and "USEC_INITIALIZED" in props
        assert "UDEV_DATABASE_VERSION" not in props
    assert await client.get(path, SUB_IFACE, "Delivered") == len(device_signals(client, path))


async def test_loop_add_remove_with_udev_properties(udevd, system_bus, wqd_factory, client_factory):
    await wqd_factory(system_bus, config=config())
    client = await client_factory(system_bus.address)
    path = await client.watch("devices", "block", {"actions": Variant("as", ["add", "remove"])})
    with LoopDevice() as loop:
        devpath = loop.devpath
        await client.wait_for(lambda: device_signals(client, path, devpath))
    await client.wait_for(lambda: len(device_signals(client, path, devpath)) >= 2)
    (add, remove) = device_signals(client, path, devpath)
    assert add[0] == "add" and remove[0] == "remove"
    assert "USEC_INITIALIZED" in add[2] and add[2]["DEVTYPE"] == "disk"


async def test_filter_is_in_the_kernel(udevd, system_bus, wqd_factory, client_factory):
    """With a tiny receive buffer and the daemon stopped, uevents of subsystems nobody
    watches never reach the socket: no overflow, no Lost (the uevent backend would drop)."""
    daemon = await wqd_factory(system_bus, config=config("udev", "receive_buffer = 1024"))
    client = await client_factory(system_bus.address)
    mem = await client.watch("devices", "mem")
    path = await client.watch("devices", "block")
    await client.call(mem, SUB_IFACE, "Close")  # the filter shrinks to "block" (rebuilt)
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        trigger(NULL_DEVPATH, "change", 200)
        udevd.settle()
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    with LoopDevice() as loop:
        devpath = loop.devpath
        await client.wait_for(lambda: device_signals(client, path, devpath))
    await client.wait_for(lambda: len(device_signals(client, path, devpath)) >= 2)
    assert lost_total(client, path) == 0 and not device_signals(client, path, NULL_DEVPATH)
    assert await client.get(path, SUB_IFACE, "Lost") == 0
    # everything again ("" = no filter), then back to "block" only
    everything = await client.watch("devices", "")
    trigger(NULL_DEVPATH, "change")
    await client.wait_for(lambda: device_signals(client, everything, NULL_DEVPATH))
    await client.call(everything, SUB_IFACE, "Close")
    with LoopDevice() as loop:
        second = loop.devpath
        await client.wait_for(lambda: device_signals(client, path, second))
    assert not device_signals(client, path, NULL_DEVPATH)


async def test_initial_snapshot_has_udev_database_properties(udevd, system_bus, wqd_factory, client_factory, tmp_path):
    await wqd_factory(system_bus, config=config())
    client = await client_factory(system_bus.address)
    fs_uuid = str(uuid.uuid4())
    image = ext4_image(tmp_path / "fs.img", "wqd-initial", fs_uuid)
    with LoopDevice() as loop:
        udevd.settle()
        loop.attach(image)
        udevd.settle()
        path = await client.watch("devices", "block", {"initial": Variant("b", True)})
        await client.wait_for(lambda: device_signals(client, path, loop.devpath))
        (action, _devpath, props) = device_signals(client, path, loop.devpath)[0]
        assert action == "add" and props["WQD_SYNTHETIC"] == "initial"
        assert props["ID_FS_UUID"] == fs_uuid and props["ID_FS_LABEL"] == "wqd-initial"


async def identifying_seen(udevd, system_bus, wqd_factory, client_factory, tmp_path, peers: dict, on_node=None):
    """An ext4 image attached to a fresh loop device, watched by root and by *peers*
    (name -> (uid, groups)); *on_node(path)* runs on the node before the image is
    attached. Returns (root's properties, {name: properties}, the fs uuid, the node)."""
    await wqd_factory(system_bus, config=config())
    root = await client_factory(system_bus.address)
    fs_uuid = str(uuid.uuid4())
    image = ext4_image(tmp_path / "fs.img", "wqd-secret", fs_uuid)
    with LoopDevice() as loop:
        udevd.settle()
        st = os.stat(loop.node)
        assert st.st_mode & 0o007 == 0, oct(st.st_mode)  # udev's rules: not world-readable
        if on_node is not None:
            on_node(loop.node)
        clients = {name: ForeignClient(system_bus.address, uid, groups=groups(st)) for name, (uid, groups) in
                   peers.items()}
        try:
            root_path = await root.watch("devices", "block")
            paths = {}
            for name, peer in clients.items():
                reply = await peer.request("watch", source="devices", target="block")
                assert reply["ok"], reply
                paths[name] = reply["result"][0]
            loop.attach(image)
            udevd.settle()

            def fs_event(bodies):
                return [b for b in bodies if b[1] == loop.devpath and b[2].get("ID_FS_TYPE") == "ext4"]

            await root.wait_for(lambda: fs_event(device_signals(root, root_path)))
            root_props = fs_event(device_signals(root, root_path))[0][2]
            assert root_props["ID_FS_UUID"] == fs_uuid and root_props["ID_FS_LABEL"] == "wqd-secret"
            assert fs_uuid in root_props.get("DEVLINKS", fs_uuid)
            seen = {}
            for name, peer in clients.items():
                for _ in range(50):
                    signals = (await peer.request("signals", min=1, wait=0.2))["result"]
                    mine = fs_event([s[2] for s in signals if s[0] == paths[name] and s[1] == "DeviceChanged"])
                    if mine:
                        seen[name] = mine[0][2]
                        break
                assert name in seen, signals
            return root_props, seen, fs_uuid, loop.node
        finally:
            for peer in clients.values():
                peer.close()


def assert_redacted(props: dict, root_props: dict, fs_uuid: str, node: str) -> None:
    """The kind of device and filesystem, not which one."""
    assert props["ID_FS_TYPE"] == "ext4" and props["DEVNAME"] == node
    assert not {"ID_FS_UUID", "ID_FS_UUID_ENC", "ID_FS_LABEL", "ID_FS_LABEL_ENC", "DEVLINKS"} & set(props)
    assert not [v for v in props.values() if fs_uuid in v or "wqd-secret" in v]
    assert set(props) < set(root_props)


async def test_identifying_properties_only_for_who_may_open_the_node(udevd, system_bus, wqd_factory,
                                                                     client_factory, tmp_path):
    root_props, seen, fs_uuid, node = await identifying_seen(
        udevd, system_bus, wqd_factory, client_factory, tmp_path,
        {"outsider": (1000, lambda st: ()), "member": (1001, lambda st: (st.st_gid,))})
    assert seen["member"]["ID_FS_UUID"] == fs_uuid and seen["member"]["ID_FS_LABEL"] == "wqd-secret"
    assert_redacted(seen["outsider"], root_props, fs_uuid, node)


async def test_acl_on_the_node_counts(udevd, system_bus, wqd_factory, client_factory, tmp_path):
    """logind's uaccess gives the seat's user an ACL entry on the node: that user may
    open it, so gets the identifying properties; a user without one does not."""
    if shutil.which("setfacl") is None:
        pytest.skip("setfacl is not installed (Debian package acl; scripts/setup installs it)")

    def seat_acl(node: str) -> None:
        out = subprocess.run(["setfacl", "-m", "u:1000:rw", node], capture_output=True, text=True)
        if out.returncode:
            pytest.skip(f"no POSIX ACLs on /dev here: {out.stderr.strip()}")

    root_props, seen, fs_uuid, node = await identifying_seen(
        udevd, system_bus, wqd_factory, client_factory, tmp_path,
        {"seat": (1000, lambda st: ()), "other": (1001, lambda st: ())}, on_node=seat_acl)
    assert seen["seat"]["ID_FS_UUID"] == fs_uuid and seen["seat"]["ID_FS_LABEL"] == "wqd-secret"
    assert_redacted(seen["other"], root_props, fs_uuid, node)


async def test_storm_through_udevd(udevd, system_bus, wqd_factory, client_factory):
    # udevd runs its rules for each uevent (about 350/s on this machine kind under load):
    # a smaller storm than the 10,000 of the uevent backend keeps this test short.
    await storm(system_bus, wqd_factory, client_factory, config(), 3_000)


async def test_auto_backend_follows_udevd(no_udevd, tmp_path, system_bus, wqd_factory, client_factory):
    """With backend auto the choice is made again whenever the monitor opens: a udevd
    that starts after wqd serves the next first subscription, and after it stops
    the kernel's uevents do."""
    await wqd_factory(system_bus, config=config())
    client = await client_factory(system_bus.address)
    assert (await client.get(MANAGER, IFACE, "Sources"))["devices"] == "uevent"
    daemon = Udevd(tmp_path / "udevd").start()
    try:
        path = await client.watch("devices", "mem")
        assert (await client.get(MANAGER, IFACE, "Sources"))["devices"] == "udev"
        trigger(NULL_DEVPATH, "change")
        await client.wait_for(lambda: device_signals(client, path, NULL_DEVPATH))
        assert "USEC_INITIALIZED" in device_signals(client, path, NULL_DEVPATH)[0][2]  # processed by udevd
        await client.call(path, SUB_IFACE, "Close")
    finally:
        daemon.stop()
    path = await client.watch("devices", "mem")
    assert (await client.get(MANAGER, IFACE, "Sources"))["devices"] == "uevent"
    trigger(NULL_DEVPATH, "change")
    await client.wait_for(lambda: device_signals(client, path, NULL_DEVPATH))
    assert "USEC_INITIALIZED" not in device_signals(client, path, NULL_DEVPATH)[0][2]  # the kernel's own
