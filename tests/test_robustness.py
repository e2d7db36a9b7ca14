"""Bad calls get named errors; owners leaving free their subscriptions; the daemon keeps serving."""

import asyncio

import pytest
from dbus_fast import Message, MessageType, Variant

from wqd.bus.connection import FlowControlledBus
from support import BUS_NAME, IFACE, MANAGER, SUB_IFACE, BusError, Client, ForeignClient, keyctl, request_until_ok, \
    variant_options

pytestmark = [pytest.mark.asyncio, pytest.mark.bus]

INVALID = "io.wqd.WatchQueue1.Error.InvalidArgument"


async def raw_call(client, member, signature, body, path=MANAGER, iface=IFACE):
    return await client.bus.call(Message(destination=BUS_NAME, path=path, interface=iface, member=member,
                                         signature=signature, body=body))


@pytest.mark.parametrize("source,target,options,error", [
    ("nosuch", "", {}, INVALID),
    ("keys", "not-a-number", {}, INVALID),
    ("keys", "-5", {}, INVALID),
    ("keys", "99999999999", {}, INVALID),
    ("keys", "@s", {}, INVALID),
    ("keys", "x" * 100_000, {}, INVALID),  # huge string
    ("keys", "1", {"bogus": Variant("s", "x")}, INVALID),
    ("keys", "1", {"changes": Variant("s", "linked")}, INVALID),  # wrong option type
    ("keys", "1", {"changes": Variant("as", ["linked", "exploded"])}, INVALID),
    ("keys", "1", {"changes": Variant("as", [])}, INVALID),
    ("keys", "2147483600", {}, INVALID),  # well-formed, no such key
    ("devices", "", {"changes": Variant("as", ["x"])}, None),  # whatever this source says, a named error
])
async def test_bad_watch_calls_get_named_errors(client, source, target, options, error):
    reply = await raw_call(client, "Watch", "ssa{sv}", [source, target, options])
    if error is None:
        assert reply.message_type == MessageType.ERROR
        assert reply.error_name.startswith("io.wqd.WatchQueue1.Error.")
        assert reply.error_name != "io.wqd.WatchQueue1.Error.Failed"
    else:
        assert reply.message_type == MessageType.ERROR and reply.error_name == error, reply.body
    # still serving
    assert await client.get(MANAGER, IFACE, "Version") == "1"


@pytest.mark.parametrize("member,signature,body", [
    ("Watch", "s", ["keys"]),
    ("Watch", "sss", ["keys", "1", "x"]),
    ("ListSubscriptions", "s", ["x"]),
])
async def test_wrong_signatures(client, member, signature, body):
    reply = await raw_call(client, member, signature, body)
    assert reply.error_name == INVALID


async def test_unknown_members_paths_and_properties(client):
    reply = await raw_call(client, "Explode", "", [])
    assert reply.error_name == "org.freedesktop.DBus.Error.UnknownMethod"
    reply = await raw_call(client, "Close", "", [], path=MANAGER + "/subscription/12345", iface=SUB_IFACE)
    assert reply.error_name == "io.wqd.WatchQueue1.Error.NoSuchObject"
    reply = await raw_call(client, "Close", "", [], path=MANAGER + "/subscription/abc", iface=SUB_IFACE)
    assert reply.error_name == "io.wqd.WatchQueue1.Error.NoSuchObject"
    reply = await raw_call(client, "Get", "ss", [IFACE, "Nope"], iface="org.freedesktop.DBus.Properties")
    assert reply.error_name == "org.freedesktop.DBus.Error.UnknownProperty"
    reply = await raw_call(client, "Set", "ssv", [IFACE, "Version", Variant("s", "2")],
                           iface="org.freedesktop.DBus.Properties")
    assert reply.error_name == "org.freedesktop.DBus.Error.PropertyReadOnly"
    reply = await client.bus.call(Message(destination=BUS_NAME, path="/elsewhere", interface=IFACE, member="Watch",
                                          signature="ssa{sv}", body=["keys", "1", {}]))
    assert reply.message_type == MessageType.ERROR
    assert await client.get(MANAGER, IFACE, "Version") == "1"


async def test_owner_leaving_frees_subscription_and_watch(wqd, client_factory):
    ring = keyctl("newring", "wqd-leave", "@u")
    try:
        owner = await client_factory(wqd.address)
        other = await client_factory(wqd.address)
        path = await owner.watch("keys", ring)
        # A stranger is told it does not exist, live as it is (no oracle on others) ...
        reply = await other.call(path, SUB_IFACE, "Close")
        assert reply.error_name == "io.wqd.WatchQueue1.Error.NoSuchObject"
        owner.close()
        # ... and once the owner has left, it is freed.
        for _ in range(100):
            if f"released the watch on key {int(ring)}" in wqd.log_text():
                break
            await asyncio.sleep(0.05)
        # the kernel-side watch (here: the poller's) was released with it
        assert f"released the watch on key {int(ring)}" in wqd.log_text()
    finally:
        keyctl("unlink", ring, "@u")


async def test_limits_exceeded(session_bus, wqd_factory, client_factory):
    wqd = await wqd_factory(session_bus, config="""
        [daemon]
        subscriptions_per_peer = 3
        [keys]
        backend = "proc-keys"
        poll_interval = 0.05
    """)
    client = await client_factory(wqd.address)
    ring = keyctl("newring", "wqd-limits", "@u")
    try:
        for _ in range(3):
            await client.watch("keys", ring)
        with pytest.raises(BusError) as err:
            await client.watch("keys", ring)
        assert err.value.name == "io.wqd.WatchQueue1.Error.LimitsExceeded"
        # another connection has its own allowance
        other = await client_factory(wqd.address)
        assert await other.watch("keys", ring)
    finally:
        keyctl("unlink", ring, "@u")


@pytest.mark.root
@pytest.mark.bus
async def test_subscriptions_per_uid(system_bus, wqd_factory):
    """All the connections of one uid share one allowance (root's are not counted)."""
    await wqd_factory(system_bus, config="""
        [daemon]
        subscriptions_per_uid = 3
        [keys]
        backend = "proc-keys"
        poll_interval = 0.05
    """)
    first, second, other = (ForeignClient(system_bus.address, uid) for uid in (1000, 1000, 1001))
    try:
        for client in (first, first, second):
            assert (await client.request("watch", source="mounts", target=""))["ok"]
        out = await second.request("watch", source="mounts", target="")
        assert out["error"] == "io.wqd.WatchQueue1.Error.LimitsExceeded", out
        assert out["text"] == "too many subscriptions for uid 1000"
        assert (await other.request("watch", source="mounts", target=""))["ok"]  # uid 1001: its own
        first.close()  # its two subscriptions end with its connection
        out = await request_until_ok(second, "watch", source="mounts", target="")
        assert out["ok"], out
    finally:
        for client in (first, second, other):
            client.close()


async def test_a_storm_of_bad_calls_from_one_peer_does_not_stop_others(client_factory, wqd):
    # The flooding client needs wqd's flow-controlled writer itself: plain dbus-fast
    # drops its connection when 10 MB of calls do not fit the socket at once.
    client = await Client.connect(wqd.address, bus_class=FlowControlledBus)
    bad = [raw_call(client, "Watch", "ssa{sv}", ["keys", "x" * 50_000, {}]) for _ in range(200)]
    good_client = await client_factory(wqd.address)
    results = await asyncio.gather(*bad, good_client.get(MANAGER, IFACE, "Version"))
    assert results[-1] == "1"
    assert all(r.error_name == INVALID for r in results[:-1])
    client.close()
