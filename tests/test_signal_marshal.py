"""wqd.bus.signals marshals exactly what dbus-fast's Message would, and the batched writer keeps order."""

import asyncio
import socket

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from wqd.bus.connection import connect
from wqd.bus.signals import encode, marshal_body, signal_header
from wqd.events import DeviceChanged, FilesystemError, KeyChanged, MountChanged

pytestmark = [pytest.mark.bus]  # one test needs a bus

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
        sub = Subscription(17, PeerCredentials(receiver.unique_name, 0), "devices", None, {})
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
