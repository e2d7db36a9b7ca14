"""Peers as other uids on a system-type bus: denial, ownership, no leaks.

The bus includes the shipped data/dbus/io.wqd.WatchQueue1.conf under a default
deny policy, like a real system bus; clients run as uid 1000/1001 via setpriv.
"""

import asyncio
import subprocess
import uuid

import pytest

from support import IFACE, MANAGER, SUB_IFACE, ForeignClient, keyctl

pytestmark = [pytest.mark.asyncio, pytest.mark.bus, pytest.mark.root]

EAVESDROP = "type='signal',eavesdrop='true'"


@pytest.fixture
def foreign_on():
    """Start bus clients as other uids (closed at teardown)."""
    clients = []

    def make(address, uid, **kw):
        c = ForeignClient(address, uid, **kw)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def foreign(system_bus, foreign_on):
    return lambda uid, **kw: foreign_on(system_bus.address, uid, **kw)


@pytest.fixture
def private_ring():
    """A keyring of root's that grants nothing to others (perm 0x3f3f0000)."""
    serial = keyctl("newring", "wqd-private", "@u")
    keyctl("setperm", serial, "0x3f3f0000")
    yield int(serial)
    keyctl("unlink", serial, "@u")


@pytest.fixture
def world_ring():
    """A keyring of root's whose other bits grant View (0x3f3f0001)."""
    serial = keyctl("newring", "wqd-world", "@u")
    keyctl("setperm", serial, "0x3f3f0001")
    yield int(serial)
    keyctl("unlink", serial, "@u")


async def test_denied_a_key_without_view(system_bus, wqd_factory, foreign, private_ring):
    await wqd_factory(system_bus)
    peer = foreign(1000)
    out = await peer.request("watch", source="keys", target=str(private_ring))
    assert out == {"ok": False, "error": "io.wqd.WatchQueue1.Error.AccessDenied", "text": out["text"]}
    assert "View" in out["text"]


async def test_other_view_bit_allows(system_bus, wqd_factory, foreign, world_ring):
    await wqd_factory(system_bus)
    peer = foreign(1000)
    out = await peer.request("watch", source="keys", target=str(world_ring))
    assert out["ok"], out
    path = out["result"][0]
    k = keyctl("add", "user", "w", "x", str(world_ring))
    got = await peer.request("signals", min=1, wait=10)
    assert got["result"] == [[path, "KeyChanged", [world_ring, "linked", int(k)]]]


async def test_group_bits_apply_to_group_members(system_bus, wqd_factory, foreign):
    ring = keyctl("newring", "wqd-group", "@u")
    try:
        keyctl("chgrp", ring, "4242")
        keyctl("setperm", ring, "0x3f3f0100")  # group View only
        await wqd_factory(system_bus)
        member = foreign(1000, groups=(4242,))
        stranger = foreign(1001)
        assert (await member.request("watch", source="keys", target=ring))["ok"]
        denied = await stranger.request("watch", source="keys", target=ring)
        assert denied["error"] == "io.wqd.WatchQueue1.Error.AccessDenied"
    finally:
        keyctl("unlink", ring, "@u")


async def test_cannot_touch_another_peers_subscription(system_bus, wqd_factory, foreign, world_ring):
    await wqd_factory(system_bus)
    owner = foreign(1000)
    other = foreign(1001)
    spy = foreign(1001)
    await spy.request("match", rule=EAVESDROP)  # the bus may accept the rule; it must still deliver nothing
    path = (await owner.request("watch", source="keys", target=str(world_ring)))["result"][0]

    out = await other.request("call", path=path, iface=SUB_IFACE, member="Close")
    assert out["error"] == "io.wqd.WatchQueue1.Error.NoSuchObject"
    for prop in ("Source", "Target", "Delivered", "Lost"):
        out = await other.request("get", path=path, iface=SUB_IFACE, prop=prop)
        assert out["error"] == "io.wqd.WatchQueue1.Error.NoSuchObject", prop
    out = await other.request("call", path=path, iface="org.freedesktop.DBus.Properties", member="GetAll",
                              signature="s", body=[SUB_IFACE])
    assert out["error"] == "io.wqd.WatchQueue1.Error.NoSuchObject"
    out = await other.request("call", path=MANAGER, iface=IFACE, member="ListSubscriptions")
    assert out == {"ok": True, "result": [[]]}

    k = keyctl("add", "user", "x", "y", str(world_ring))
    got = await owner.request("signals", min=1, wait=10)
    assert got["result"] == [[path, "KeyChanged", [world_ring, "linked", int(k)]]]
    await asyncio.sleep(0.3)
    assert (await other.request("signals"))["result"] == []
    assert (await spy.request("signals"))["result"] == [], "an eavesdropper saw a unicast signal"
    # the owner can still use it
    out = await owner.request("get", path=path, iface=SUB_IFACE, prop="Delivered")
    assert out == {"ok": True, "result": [1]}


async def test_root_instance_resolves_at_u_of_another_uid(system_bus, wqd_factory, foreign):
    await wqd_factory(system_bus)
    peer = foreign(1000)
    out = await peer.request("watch", source="keys", target="@u")
    assert out["ok"], out
    path = out["result"][0]
    # The subscription's target resolves to uid 1000's user keyring, not root's:
    # a key added to root's @u must not show up.
    k = keyctl("add", "user", "root-only", "x", "@u")
    try:
        await asyncio.sleep(0.5)
        assert (await peer.request("signals"))["result"] == []
    finally:
        keyctl("unlink", k, "@u")
    # and uid 1000 adding to its own @u does show up
    import subprocess

    as_1000 = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "keyctl"]
    name = f"wqd-mine-{uuid.uuid4().hex[:8]}"  # fresh: re-adding a name would be an update
    mine = subprocess.run([*as_1000, "add", "user", name, "x", "@u"], check=True, capture_output=True,
                          text=True).stdout.strip()
    try:
        got = await peer.request("signals", min=1, wait=10)
        assert got["result"][0][1] == "KeyChanged" and got["result"][0][2][1:] == ["linked", int(mine)]
    finally:
        subprocess.run([*as_1000, "unlink", mine, "@u"], capture_output=True)


async def test_unprivileged_instance_cannot_reach_another_uids_keyrings(tmp_path, wqd_factory, foreign_on):
    """An instance running as uid 1000 answers NotSupported for @u/@us/@p of uid 1001."""
    from support import start_bus

    extra = '<policy user="1000"><allow own="io.wqd.WatchQueue1"/></policy>'
    bus = start_bus(tmp_path / "bus1000", "system", extra=extra)
    try:
        await wqd_factory(bus, wrapper=("setpriv", "--reuid=1000", "--regid=1000", "--clear-groups"))
        peer = foreign_on(bus.address, 1001)
        for target in ("@u", "@us", "@p"):
            out = await peer.request("watch", source="keys", target=target)
            assert out["error"] == "io.wqd.WatchQueue1.Error.NotSupported", (target, out)
            assert "uid 1000" in out["text"]
    finally:
        bus.stop()


async def test_root_instance_resolves_at_p_of_another_uid(system_bus, wqd_factory, foreign):
    """@p is the caller's persistent keyring; the kernel gives it to uid 1000 only."""
    import subprocess

    await wqd_factory(system_bus)
    peer = foreign(1000)
    out = await peer.request("watch", source="keys", target="@p")
    assert out["ok"], out
    # uid 1000, in a fresh session keyring of its own, adds a key to its persistent keyring
    as_1000 = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "keyctl", "session", "-", "sh", "-c"]
    name = f"wqd-p-{uuid.uuid4().hex[:8]}"  # fresh: re-adding a name would be an update
    added = subprocess.run([*as_1000, f'keyctl add user {name} x "$(keyctl get_persistent @s)"'],
                           check=True, capture_output=True, text=True).stdout.strip()
    try:
        got = await peer.request("signals", min=1, wait=10)
        assert got["result"][0][1:] == ["KeyChanged", [got["result"][0][2][0], "linked", int(added)]]
    finally:
        subprocess.run([*as_1000, f'keyctl unlink {added} "$(keyctl get_persistent @s)"'], capture_output=True)
