"""Everything wqd takes from dbus-fast beyond its public API: here, and only here.

dbus-fast's public API has no way to see or bound what a connection has waiting
to be written, and its writer gives the connection up when the socket is full
(``wqd.bus.connection``). So wqd replaces that writer, and that takes the
private items below. Each has a comment saying why. Nothing else in wqd touches
a private dbus-fast name: signals (and their header) are marshalled by wqd's own
``wqd.bus.signals``, and Pings go out through the public ``MessageBus.call``.

``missing()`` lists what an installed dbus-fast no longer has;
tests/test_dbus_fast_internals.py fails naming it, so a dbus-fast release that
moves one of these turns the suite red rather than wqd failing at run time.
"""

from __future__ import annotations

import importlib

# The writer class: subclassed, because the flow-controlled writer must be the
# one dbus-fast's ``send``/``call`` write through (replies and signals in one order).
from dbus_fast.aio.message_bus import _MessageWriter as MessageWriter

# On the bus (``dbus_fast.aio.MessageBus``) object:
BUS_ATTRIBUTES = {
    "_writer": "the writer wqd replaces after connecting, and queues pre-marshalled signals on",
    "_finalize": "the writer ends the connection the way dbus-fast does when a write fails",
    "_user_disconnect": "a write failing after disconnect() is not an error",
    "_sock": "SO_SNDBUF is made small so that replies do not wait behind a second of signals",
    "_fd": "the replaced writer's add_writer registration is removed by fd",
    "_loop": "the loop that fd is registered with",
    "_negotiate_unix_fd": "read by MessageWriter.__init__",
    "_disconnected": "a checked call (FlowControlledBus.call_from) fails at once on a closed connection",
    "_method_return_handlers": "a reply that no call of dbus-fast's own awaits has its fds closed",
}
# On a ``MessageWriter`` (set in its __init__, or methods wqd overrides or calls):
WRITER_ATTRIBUTES = {
    "messages": "the queue of (bytes, fds, future) wqd appends to and batches from",
    "buf": "the message being written, in part",
    "offset": "how much of buf is written",
    "fut": "the future of the message being written",
    "unix_fds": "fds to pass with the message being written",
    "negotiate_unix_fd": "whether fds may be passed",
    "sock": "the socket written to",
    "fd": "its fd, for add_writer/remove_writer",
    "loop": "the loop",
    "bus": "the bus the writer belongs to",
    "buffer_message": "overridden: wqd marshals every message itself (dbus-fast < 2.11.1 gets UTF-8 lengths wrong)",
    "write_callback": "overridden: EAGAIN waits for writability instead of ending the connection",
    "schedule_write": "overridden: what dbus-fast calls to send a message",
}


def writer(bus):
    return bus._writer


def set_writer(bus, new) -> None:
    bus._writer = new


def finalize(bus, exc: Exception | None) -> None:
    bus._finalize(exc)


def user_disconnect(bus) -> bool:
    return bus._user_disconnect


def disconnected(bus) -> bool:
    return bool(bus._disconnected)


def awaits_reply(bus, serial: int) -> bool:
    """Whether dbus-fast itself waits for the reply to *serial* (its own calls)."""
    return serial in bus._method_return_handlers


def sock(bus):
    return bus._sock


def fd(bus) -> int:
    return bus._fd


def loop(bus):
    return bus._loop


def missing(bus=None, writer_=None) -> list[str]:
    """What wqd needs and the installed dbus-fast lacks, as ``module.name`` / ``Class.attr``.

    *bus* and *writer_* (a ``MessageBus`` and a ``MessageWriter`` made for it) let
    instance attributes be checked too; the class-level checks need neither.
    """
    gone = []
    module = importlib.import_module("dbus_fast.aio.message_bus")
    if not isinstance(getattr(module, "_MessageWriter", None), type):
        gone.append("dbus_fast.aio.message_bus._MessageWriter")
    for name in WRITER_ATTRIBUTES:
        if not hasattr(MessageWriter, name) and (writer_ is None or not hasattr(writer_, name)):
            gone.append(f"_MessageWriter.{name}")
    for name in BUS_ATTRIBUTES:
        if bus is not None and not hasattr(bus, name):
            gone.append(f"MessageBus.{name}")
    return gone
