"""wqd.bus.signals marshals exactly what dbus-fast's Message would, and the batched writer keeps order."""

import asyncio
import socket

import pytest
from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from wqd.bus.connection import connect
from wqd.bus.signals import encode, marshal_body, marshal_message, signal_header
from wqd.events import DeviceChanged, FilesystemError, KeyChanged, MountChanged

pytestmark = [pytest.mark.bus]  # one test needs a bus

def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


# dbus-fast before 2.11.1 (Debian 12's 1.84.2) marshals a string's length in characters.
REFERENCE_COUNTS_CHARACTERS = Message(message_type=MessageType.SIGNAL, path="/", interface="a.b", member="M",
                                      signature="s", body=["ü"], serial=1)._marshall(False)[-7] == 1

IFACE = "io.wqd.Subscription1"
PATH = "/io/wqd/WatchQueue1/subscription/17"


@pytest.mark.parametrize("member,signature,body", [
    ("KeyChanged", "usu", KeyChanged(424242, "linked", 7).body()),
    ("DeviceChanged", "ssa{ss}", DeviceChanged("add", "/devices/virtual/block/loop3", "block",
                                               {"DEVNAME": "/dev/loop3", "ID_FS_TYPE": "ext4"}).body()),
    ("MountChanged", "stsa{ss}", MountChanged("attached", 2**40 + 3, "/mnt/ü", {"fstype": "tmpfs"}).body()),
    ("MountChanged", "stsa{ss}", MountChanged("detached", 7, "/mnt/\udcff", {"source": "a\\b"}).body()),
    ("DeviceChanged", "ssa{ss}", DeviceChanged("remove", "/devices/x", "block", {}).body()),
    ("FilesystemError", "siu", FilesystemError("/mnt/data", -5, 3).body()),
    ("Lost", "t", [2**64 - 1]),
    ("Lost", "t", [12]),
    ("Removed", "s", ["key removed"]),
])
@pytest.mark.parametrize("destination", [":1.5", ":1.123456"])
def test_same_bytes_as_dbus_fast(member, signature, body, destination):
    if REFERENCE_COUNTS_CHARACTERS and any(not str(v).isascii() for v in _strings(body)):
        pytest.skip("the installed dbus-fast writes string lengths in characters (fixed in 2.11.1, PR #261): "
                    "no reference for non-ASCII text; test_non_ascii_strings_are_counted_in_bytes checks it")
    for serial in (1, 77, 2**32 - 1):
        expected = Message(message_type=MessageType.SIGNAL, destination=destination, path=PATH, interface=IFACE,
                           member=member, signature=signature, body=body, serial=serial)._marshall(False)
        got = encode(signal_header(destination, PATH, IFACE, member, signature), marshal_body(signature, body), serial)
        assert bytes(got) == bytes(expected)


@pytest.mark.asyncio
async def test_batched_writer_delivers_in_order(session_bus):
    """Thousands of queued signals through the flow-controlled writer arrive complete and in order."""
    sender = await connect(session_bus.address)
    receiver = await MessageBus(bus_address=session_bus.address).connect()
    try:
        got = []
        done = asyncio.get_running_loop().create_future()
        n = 5000

        def on_message(msg):
            if msg.message_type == MessageType.SIGNAL and msg.member == "KeyChanged":
                got.append(msg.body[2])
                if len(got) == n and not done.done():
                    done.set_result(None)

        receiver.add_message_handler(on_message)
        writer = sender._writer
        header = signal_header(receiver.unique_name, PATH, IFACE, "KeyChanged", "usu")
        # A small send buffer makes the kernel refuse part of a batch, so partial sendmsg and
        # EAGAIN paths run too.
        sender._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        for i in range(n):
            writer.queue(encode(header, marshal_body("usu", [1, "linked", i]), sender.next_serial()))
            if writer.backlog >= 256:
                writer.flush()
                await writer.wait_backlog(64)
        writer.flush()
        await asyncio.wait_for(done, 60)
        assert got == list(range(n))
    finally:
        sender.disconnect()
        receiver.disconnect()


def test_a_string_the_bus_cannot_carry_raises():
    """wqd's marshaller refuses what is not UTF-8 (the emitter answers that with Lost(1))
    instead of sending bytes the bus would reject by dropping wqd's connection."""
    with pytest.raises(UnicodeEncodeError):
        marshal_body("ssa{ss}", ["add", "/devices/\udcff", {}])
    with pytest.raises(UnicodeEncodeError):
        marshal_body("ssa{ss}", ["add", "/devices/x", {"ID_FS_LABEL": "\udcfe"}])


@pytest.mark.asyncio
async def test_an_event_that_cannot_be_marshalled_costs_lost_one_in_its_place(session_bus):
    """The real emitter on a real bus: an event with a string the bus cannot carry (as a
    source decoding with surrogateescape and not escaping would make) reaches its
    subscriber as Lost(1) where it was, counted lost, not delivered; the batch goes on."""
    from wqd.bus.emitter import SignalEmitter
    from wqd.hub import Hub, Subscription
    from wqd.peer import PeerCredentials
    from wqd.policy import PolicyStack

    sender = await connect(session_bus.address)
    receiver = await MessageBus(bus_address=session_bus.address).connect()
    try:
        got = []
        receiver.add_message_handler(lambda m: got.append((m.member, m.body))
                                     if m.message_type == MessageType.SIGNAL and m.path == PATH else None)
        hub = Hub({}, PolicyStack([]))
        SignalEmitter(sender, hub)
        sub = Subscription(17, PeerCredentials(receiver.unique_name, 0), "devices", None)
        for devpath in ("/devices/a", "/devices/\udcff", "/devices/b"):
            hub.enqueue(sub, DeviceChanged("change", devpath, "mem", {}))
        for _ in range(100):
            if len(got) >= 3:
                break
            await asyncio.sleep(0.05)
        assert got == [("DeviceChanged", ["change", "/devices/a", {}]), ("Lost", [1]),
                       ("DeviceChanged", ["change", "/devices/b", {}])]
        assert (sub.delivered, sub.lost) == (2, 1)
    finally:
        sender.disconnect()
        receiver.disconnect()


@pytest.mark.parametrize("kind,fields,signature,body", [
    ("METHOD_CALL", dict(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                         interface="org.freedesktop.DBus", member="GetConnectionCredentials"), "s", [":1.42"]),
    ("METHOD_RETURN", dict(destination=":1.7", reply_serial=12), "o", ["/io/wqd/WatchQueue1/subscription/5"]),
    ("METHOD_RETURN", dict(destination=":1.7", reply_serial=13), "ao", [["/a/b", "/c"]]),
    ("METHOD_RETURN", dict(destination=":1.7", reply_serial=14), "v", [Variant("a{ss}", {"keys": "proc-keys"})]),
    ("METHOD_RETURN", dict(destination=":1.7", reply_serial=15), "a{sv}",
     [{"Version": Variant("s", "1"), "Delivered": Variant("t", 2**40), "Lost": Variant("t", 0)}]),
    ("METHOD_RETURN", dict(destination=":1.7", reply_serial=16), "", []),
    ("ERROR", dict(destination=":1.7", reply_serial=17, error_name="io.wqd.WatchQueue1.Error.InvalidArgument"),
     "s", ["unknown source 'x'"]),
    ("METHOD_CALL", dict(destination=":1.9", path="/", interface="org.freedesktop.DBus.Peer", member="Ping",
                         flags=MessageFlag.NO_REPLY_EXPECTED), "", []),
])
def test_every_message_wqd_sends_is_marshalled_like_dbus_fast(kind, fields, signature, body):
    """wqd marshals replies, errors and calls itself too (FlowControlledWriter.buffer_message)."""
    msg = Message(message_type=MessageType[kind], signature=signature, body=body, serial=99, **fields)
    assert bytes(marshal_message(msg)) == bytes(msg._marshall(False))


def test_non_ascii_strings_are_counted_in_bytes():
    """The D-Bus specification: a string's length is its UTF-8 byte count (dbus-fast
    before 2.11.1 counted characters; wqd must not, whichever dbus-fast is installed)."""
    msg = Message(message_type=MessageType.ERROR, destination=":1.7", reply_serial=3, serial=4,
                  error_name="io.wqd.WatchQueue1.Error.InvalidArgument", signature="s", body=["/mnt/ü日"])
    wire = bytes(marshal_message(msg))
    text = "/mnt/ü日".encode()
    assert wire.endswith(len(text).to_bytes(4, "little") + text + b"\0")
    assert int.from_bytes(wire[4:8], "little") == 4 + len(text) + 1  # body length


@pytest.mark.asyncio
async def test_replies_with_non_ascii_text_reach_the_caller(session_bus):
    """Through a real bus: the writer's own marshalling is what the bus accepts."""
    server = await connect(session_bus.address)
    caller = await connect(session_bus.address)

    def answer(msg):
        if msg.member == "Echo":
            server.send(Message.new_method_return(msg, "s", [msg.body[0] + " ü"]))
            return True
    server.add_message_handler(answer)
    try:
        reply = await caller.call(Message(destination=server.unique_name, path="/", interface="x.y", member="Echo",
                                          signature="s", body=["日本"]))
        assert reply.message_type == MessageType.METHOD_RETURN and reply.body == ["日本 ü"], reply.body
    finally:
        server.disconnect()
        caller.disconnect()
