"""keys over the bus: real keyctl changes -> KeyChanged, on the backend this kernel has.

The host kernel has no watch queue, so this runs the proc-keys fallback; the same
changes on the watch_queue backend are covered by the kernel tier (tests/kernel/).
"""

import asyncio

import pytest
from dbus_fast import Message, MessageType

from support import IFACE, MANAGER, SUB_IFACE, Client, keyctl, variant_options

pytestmark = [pytest.mark.asyncio, pytest.mark.bus]


@pytest.fixture
def ring():
    serial = keyctl("newring", "wqd-test", "@u")
    yield int(serial)
    try:
        keyctl("unlink", serial, "@u")
    except Exception:
        pass


def add(ring, name="k", data="v"):
    return int(keyctl("add", "user", name, data, str(ring)))


async def eavesdropper(address):
    """A second connection with a catch-all match rule: must receive none of wqd's signals."""
    spy = await Client.connect(address)
    await spy.bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                               interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                               body=["type='signal'"]))
    return spy


def wqd_signals(client):
    return [m for m in client.all_signals if m.interface == SUB_IFACE]


async def test_sources_reports_the_backend(client):
    sources = await client.get(MANAGER, IFACE, "Sources")
    assert sources["keys"] == "proc-keys"  # the host kernel has no watch queue (ENOPKG)
    assert await client.get(MANAGER, IFACE, "Version") == "1"


CASES = {
    # name: (watch the ring or a key in it, prepare, act) -> expected (key, change, aux) given ids
    "linked": ("ring", lambda r: {}, lambda r, ids: {"new": add(r, "n")}, lambda r, ids: [(r, "linked", ids["new"])]),
    "unlinked": ("ring", lambda r: {"k": add(r)}, lambda r, ids: keyctl("unlink", str(ids["k"]), str(r)),
                 lambda r, ids: [(r, "unlinked", ids["k"])]),
    "cleared": ("ring", lambda r: {"a": add(r, "a"), "b": add(r, "b")}, lambda r, ids: keyctl("clear", str(r)),
                lambda r, ids: [(r, "cleared", 0)]),
    "updated": ("key", lambda r: {"k": add(r)}, lambda r, ids: keyctl("update", str(ids["k"]), "new"),
                lambda r, ids: [(ids["k"], "updated", 0)]),
    "revoked": ("key", lambda r: {"k": add(r)}, lambda r, ids: keyctl("revoke", str(ids["k"])),
                lambda r, ids: [(ids["k"], "revoked", 0)]),
    "setattr": ("key", lambda r: {"k": add(r)}, lambda r, ids: keyctl("setperm", str(ids["k"]), "0x3f3f0000"),
                lambda r, ids: [(ids["k"], "setattr", 0)]),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_change_arrives_unicast(case, wqd, client, ring):
    what, prepare, act, expect = CASES[case]
    ids = prepare(ring)
    target = ring if what == "ring" else ids["k"]
    spy = await eavesdropper(wqd.address)
    path = await client.watch("keys", str(target))
    await asyncio.sleep(0.2)  # let the poller take its first snapshot interval
    result = act(ring, ids)
    if isinstance(result, dict):
        ids.update(result)
    want = expect(ring, ids)
    sigs = await client.wait_signals(path, len(want))
    assert [("KeyChanged", list(w)) for w in want] == sigs[:len(want)]
    assert await client.get(path, SUB_IFACE, "Delivered") == len(want)
    await asyncio.sleep(0.2)
    assert wqd_signals(spy) == [], "a catch-all connection received a unicast signal"
    spy.close()


async def test_changes_option_filters(client, ring):
    k = add(ring)
    path = await client.watch("keys", str(ring), variant_options(changes=["unlinked"]))
    await asyncio.sleep(0.2)
    add(ring, "other")  # linked: filtered out
    keyctl("unlink", str(k), str(ring))
    sigs = await client.wait_signals(path, 1)
    await asyncio.sleep(0.3)
    assert sigs == [("KeyChanged", [ring, "unlinked", k])]


async def test_key_gone_ends_subscription_with_removed(client, ring):
    k = add(ring)
    path = await client.watch("keys", str(k))
    keyctl("invalidate", str(k))  # proc-keys sees the key vanish; the watch queue says "invalidated" first
    sigs = await client.wait_signals(path, 1)
    assert sigs[-1] == ("Removed", ["key removed"])
    reply = await client.call(path, SUB_IFACE, "Close")
    assert reply.error_name == "io.wqd.WatchQueue1.Error.NoSuchObject"


async def test_at_u_resolves_to_the_callers_user_keyring(client):
    path = await client.watch("keys", "@u")
    assert await client.get(path, SUB_IFACE, "Target") == "@u"
    k = int(keyctl("add", "user", "wqd-at-u", "x", "@u"))
    try:
        sigs = await client.wait_signals(path, 1)
        assert sigs[0][0] == "KeyChanged" and sigs[0][1][1:] == ["linked", k]
    finally:
        keyctl("unlink", str(k), "@u")


async def test_list_subscriptions_and_close(client, ring):
    a = await client.watch("keys", str(ring))
    b = await client.watch("keys", str(ring))
    reply = await client.call(MANAGER, IFACE, "ListSubscriptions")
    assert sorted(reply.body[0]) == sorted([a, b])
    reply = await client.call(a, SUB_IFACE, "Close")
    assert reply.message_type == MessageType.METHOD_RETURN
    reply = await client.call(MANAGER, IFACE, "ListSubscriptions")
    assert reply.body[0] == [b]
    # b still works after a's close (the watch is refcounted)
    k = add(ring, "after")
    sigs = await client.wait_signals(b, 1)
    assert sigs[0] == ("KeyChanged", [ring, "linked", k])
    assert client.signals[a] == []
