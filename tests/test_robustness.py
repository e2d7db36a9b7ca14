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
    # 10 MB in 100 calls: dbus-daemon answers calls beyond its max_replies_per_connection
    # (128 unless configured, as on the system bus and these test buses) itself, with
    # LimitsExceeded, before they reach wqd: the storm stays under it so that every call
    # tests wqd's answer.
    client = await Client.connect(wqd.address, bus_class=FlowControlledBus)
    bad = [raw_call(client, "Watch", "ssa{sv}", ["keys", "x" * 100_000, {}]) for _ in range(100)]
    good_client = await client_factory(wqd.address)
    results = await asyncio.gather(*bad, good_client.get(MANAGER, IFACE, "Version"))
    assert results[-1] == "1"
    assert all(r.error_name == INVALID for r in results[:-1]), sorted({(r.error_name, str(r.body)[:120]) for r in results[:-1]})
    client.close()


async def test_no_reply_calls_anywhere_are_answered_by_wqd_and_logged_once(wqd):
    """Calls dbus-fast's own handlers would take (paths outside /io, the Peer interface,
    no-reply calls) are wqd's: no traceback in the log, however many; the peer's bad calls
    are logged once, and their count when it leaves."""
    from dbus_fast import MessageFlag

    client = await Client.connect(wqd.address, bus_class=FlowControlledBus)  # plain dbus-fast gives up on EAGAIN
    name = client.bus.unique_name
    before = len(wqd.log_text())
    n = 1000
    for i in range(n):
        path = ("/", "/elsewhere", "/io/wqd/WatchQueue1/subscription/0001", MANAGER)[i % 4]
        iface = ("org.freedesktop.DBus.Properties", "org.freedesktop.DBus.Introspectable", None, "no.such.Iface")[i % 4]
        client.bus.send(Message(destination=BUS_NAME, path=path, interface=iface, member="Get", signature="ss",
                                body=[IFACE, "Version"], flags=MessageFlag.NO_REPLY_EXPECTED))
    assert await client.get(MANAGER, IFACE, "Version") == "1"  # answered after all of them
    log = wqd.log_text()[before:]
    assert "Traceback" not in log and "Unexpected error" not in log, log[:2000]
    assert log.count(f"{name}: no-reply call") == 1, log[:2000]
    assert len(log) < 4000, f"{len(log)} bytes of log for {n} bad calls"
    client.close()
    for _ in range(100):
        if f"{name} left after" in wqd.log_text():
            break
        await asyncio.sleep(0.05)
    assert f"{name} left after {n} bad calls" in wqd.log_text()


async def test_calls_without_an_interface_are_looked_up_across_interfaces(client):
    """D-Bus specification: with no INTERFACE field the member names the method on
    whichever of the object's interfaces has it."""
    for path in (MANAGER, "/"):
        reply = await client.bus.call(Message(destination=BUS_NAME, path=path, member="Ping"))
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    reply = await client.bus.call(Message(destination=BUS_NAME, path=MANAGER, member="Get", signature="ss",
                                          body=[IFACE, "Version"]))
    assert reply.message_type == MessageType.METHOD_RETURN and reply.body[0].value == "1", reply.body
    reply = await client.bus.call(Message(destination=BUS_NAME, path=MANAGER, member="GetMachineId"))
    assert reply.message_type == MessageType.METHOD_RETURN and len(reply.body[0]) == 32, reply.body
    reply = await client.bus.call(Message(destination=BUS_NAME, path=MANAGER, member="Close"))
    assert reply.error_name == "org.freedesktop.DBus.Error.UnknownMethod"  # the subscription's, not the manager's
    reply = await client.bus.call(Message(destination=BUS_NAME, path="/", member="Get", signature="ss",
                                          body=[IFACE, "Version"]))
    assert reply.error_name == "org.freedesktop.DBus.Error.UnknownMethod"  # "/" has no properties


async def test_subscription_paths_are_canonical(client):
    path = await client.watch("keys", "@u")
    number = path.rsplit("/", 1)[1]
    for alias in ("0" + number, "000" + number, "+" + number):
        alias_path = path.rsplit("/", 1)[0] + "/" + alias
        if not alias.replace("_", "").isalnum():
            continue  # not a valid object path: the bus refuses it before wqd
        reply = await raw_call(client, "Close", "", [], path=alias_path, iface=SUB_IFACE)
        assert reply.error_name == "io.wqd.WatchQueue1.Error.NoSuchObject", (alias, reply.body)
        reply = await raw_call(client, "Get", "ss", [SUB_IFACE, "Source"], path=alias_path,
                               iface="org.freedesktop.DBus.Properties")
        assert reply.error_name == "io.wqd.WatchQueue1.Error.NoSuchObject", (alias, reply.body)
    assert await client.get(path, SUB_IFACE, "Source") == "keys"  # not closed through an alias


@pytest.mark.parametrize("where", ["source", "target", "member", "interface", "property"])
async def test_error_texts_are_bounded(client, where):
    """A 1 MB argument never comes back whole: error texts stay a few hundred bytes."""
    big = "x" * 1_000_000
    if where == "source":
        reply = await raw_call(client, "Watch", "ssa{sv}", [big, "", {}])
    elif where == "target":
        reply = await raw_call(client, "Watch", "ssa{sv}", ["keys", big, {}])
    elif where == "property":
        reply = await raw_call(client, "Get", "ss", [IFACE, big], iface="org.freedesktop.DBus.Properties")
    else:  # names are bounded by the bus (255); still only a part is repeated
        name = "a" * 200 if where == "member" else "a." + "b" * 200
        reply = await raw_call(client, name if where == "member" else "Watch", "", [],
                               iface=IFACE if where == "member" else name)
    assert reply.message_type == MessageType.ERROR
    text = reply.body[0] if reply.body else ""
    assert len(text.encode()) <= 300, f"{len(text)} characters of error text"
    assert "x" * 100 not in text and "a" * 100 not in text and "b" * 100 not in text


async def test_a_member_two_interfaces_have_needs_its_interface(monkeypatch):
    """No wqd object has such a member today; if one ever does, a call without an
    interface is refused (the specification leaves the choice open) rather than guessed."""
    from wqd.bus import service

    assert service.WatchQueueService._resolve("manager", None, "Get") == "org.freedesktop.DBus.Properties"
    monkeypatch.setitem(service.METHODS, IFACE, {**service.METHODS[IFACE], "Get": "ss"})
    with pytest.raises(service.CallError) as caught:
        service.WatchQueueService._resolve("manager", None, "Get")
    assert caught.value.name == "org.freedesktop.DBus.Error.UnknownMethod" and "ambiguous" in caught.value.text
    assert service.WatchQueueService._resolve("manager", IFACE, "Get") == IFACE


async def test_non_ascii_arguments_do_not_cost_wqd_its_connection(wqd):
    """A caller's non-ASCII text echoed in an error (and a non-ASCII target kept in a
    subscription's Target) is marshalled with its length in bytes. dbus-fast before
    2.11.1 (Debian 12's 1.84.2) counted characters, and the bus then dropped wqd's
    connection: one call from any user stopped the daemon. The client marshals
    with wqd's own writer too, so this runs on the lowest declared dbus-fast."""
    client = await Client.connect(wqd.address, bus_class=FlowControlledBus)
    try:
        for source in ("ü", "日本語" * 20, "x\u00e9\U0001f600"):
            reply = await raw_call(client, "Watch", "ssa{sv}", [source, "/mnt/ü", {}])
            assert reply.message_type == MessageType.ERROR and reply.error_name == INVALID, reply.body
            assert source[:8] in reply.body[0]
        path = (await raw_call(client, "Watch", "ssa{sv}", ["mounts", "/tmp/wqd-ü-日本", {}])).body[0]
        reply = await raw_call(client, "Get", "ss", [SUB_IFACE, "Target"], path=path,
                               iface="org.freedesktop.DBus.Properties")
        assert reply.body[0].value == "/tmp/wqd-ü-日本"
        assert await client.get(MANAGER, IFACE, "Version") == "1"  # still on the bus
        assert wqd.proc.poll() is None
    finally:
        client.close()
