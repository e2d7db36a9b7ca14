"""A dbus-fast connection with flow control.

dbus-fast's writer gives up the whole connection when the socket is full
(``sock.send`` raises ``BlockingIOError`` and the bus is finalised), and it offers
no way to see how much is waiting. wqd sends bursts of signals, so it replaces the
writer with one that treats ``EAGAIN`` as "wait until writable" and reports its
backlog; the emitter pauses at a high-water mark (see ``wqd.bus.emitter``).
Queued messages go out several per ``sendmsg()``, and the emitter can queue
pre-marshalled signals (``queue``/``flush``, ``wqd.bus.signals``).

Replies are matched by serial *and sender* (``call_from``, ``expect_reply``):
dbus-fast matches by serial alone, and a session-type bus forwards replies nobody
asked for, so any peer could otherwise answer for the bus daemon or for polkit.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
from collections.abc import Callable

from dbus_fast import BusType, Message, MessageType, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.constants import NameFlag
from dbus_fast.errors import DBusError

from wqd.bus import dbus_fast_internals as internals
from wqd.bus.signals import marshal_message
from wqd.bus.dbus_fast_internals import MessageWriter

log = logging.getLogger(__name__)

BATCH_MESSAGES = 64  # messages per sendmsg() at most
BATCH_BYTES = 65536
SEND_BUFFER = 8192  # SO_SNDBUF (the kernel doubles it): a few ms of signals at the bus's pace
BUS_DAEMON = "org.freedesktop.DBus"
BUS_PATH = "/org/freedesktop/DBus"
FORGERS_LOGGED = 256  # distinct senders of forged replies named in the log; the rest are counted


class FlowControlledWriter(MessageWriter):
    def __init__(self, bus: MessageBus) -> None:
        super().__init__(bus)
        self.armed = False
        self._waiter: asyncio.Future | None = None
        self._waiter_mark = 0

    @property
    def backlog(self) -> int:
        """Messages not yet fully handed to the kernel."""
        return len(self.messages) + (self.buf is not None)

    def _arm(self) -> None:
        if not self.armed:
            self.loop.add_writer(self.fd, self.write_callback)
            self.armed = True

    def write_callback(self, remove_writer: bool = True) -> None:
        sock = self.sock
        try:
            while True:
                if self.buf is None:
                    if not self.messages:
                        if self.armed:
                            self.loop.remove_writer(self.fd)
                            self.armed = False
                        self._relieve()
                        return
                    if len(self.messages) > 1 and not self.messages[0][1]:
                        if not self._send_batch(sock):
                            self._arm()
                            self._relieve()
                            return
                        continue
                    buf, unix_fds, fut = self.messages.popleft()
                    self.unix_fds = unix_fds
                    self.buf = memoryview(buf)
                    self.offset = 0
                    self.fut = fut
                try:
                    if self.unix_fds and self.negotiate_unix_fd:
                        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", self.unix_fds))]
                        self.offset += sock.sendmsg([self.buf[self.offset:]], anc)
                        self.unix_fds = None
                    else:
                        self.offset += sock.send(self.buf[self.offset:])
                except (BlockingIOError, InterruptedError):
                    self._arm()
                    self._relieve()
                    return
                if self.offset < len(self.buf):
                    self._arm()
                    self._relieve()
                    return
                self.buf = None
                fut, self.fut = self.fut, None
                if fut is not None and not fut.done():
                    fut.set_result(None)
        except Exception as exc:
            fut, self.fut = self.fut, None
            if fut is not None and not fut.done():
                if internals.user_disconnect(self.bus):
                    fut.set_result(None)
                else:
                    fut.set_exception(exc)
            waiter, self._waiter = self._waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            internals.finalize(self.bus, exc)

    def _send_batch(self, sock) -> bool:
        """Hand queued messages without fds to the kernel in one ``sendmsg``.

        One system call (and one wakeup of the bus daemon) per batch instead of
        per message. Returns False when the socket is full; a message written in
        part becomes the current buffer.
        """
        messages = self.messages
        batch = []
        size = 0
        while messages and len(batch) < BATCH_MESSAGES and size < BATCH_BYTES and not messages[0][1]:
            item = messages.popleft()
            batch.append(item)
            size += len(item[0])
        try:
            sent = sock.sendmsg([item[0] for item in batch])
        except (BlockingIOError, InterruptedError):
            messages.extendleft(reversed(batch))
            return False
        for i, (buf, _fds, fut) in enumerate(batch):
            if sent < len(buf):
                self.buf, self.offset, self.fut, self.unix_fds = memoryview(buf), sent, fut, None
                messages.extendleft(reversed(batch[i + 1:]))
                return False
            sent -= len(buf)
            if fut is not None and not fut.done():
                fut.set_result(None)
        return True

    def queue(self, buf: bytes | bytearray, fut: asyncio.Future | None = None) -> None:
        """Queue an already marshalled message (no fds); ``flush()`` writes what is queued."""
        self.messages.append((buf, None, fut))

    def flush(self) -> None:
        if self.bus.unique_name and not self.armed:
            self.write_callback()

    def wait_backlog(self, mark: int) -> asyncio.Future:
        """A future that is done once the backlog is at most *mark* (or the connection failed)."""
        fut = self.loop.create_future()
        if self.backlog <= mark:
            fut.set_result(None)
        else:
            if self._waiter is not None and not self._waiter.done():
                self._waiter.cancel()
            self._waiter, self._waiter_mark = fut, mark
        return fut

    def _relieve(self) -> None:
        waiter = self._waiter
        if waiter is not None and self.backlog <= self._waiter_mark:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def buffer_message(self, msg: Message, future: asyncio.Future | None = None) -> None:
        """Marshalled by wqd (``wqd.bus.signals.marshal_message``), not by dbus-fast:
        dbus-fast before 2.11.1 marshals non-ASCII strings wrongly, and the bus then
        drops the connection."""
        fds = msg.unix_fds
        self.messages.append((marshal_message(msg, self.negotiate_unix_fd), list(fds) if fds else None, future))

    def schedule_write(self, msg=None, future=None) -> None:
        if msg is not None:
            self.buffer_message(msg, future)
        if self.bus.unique_name and not self.armed:
            self.write_callback()


ReplyCallback = Callable[[Message | None, Exception | None], None]


class FlowControlledBus(MessageBus):
    """``MessageBus`` whose writer never raises ``BlockingIOError`` and shows its backlog,
    and whose checked calls take a reply only from the connection they asked."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._checked: dict[int, tuple[str, ReplyCallback]] = {}  # serial -> (sender, callback)
        self._forgers: set[str] = set()
        self.forged_replies = 0  # replies ignored because the wrong connection sent them
        # First in the handler list (nothing else is registered yet): a reply is
        # judged before any other handler or dbus-fast's own serial match sees it.
        self.add_message_handler(self._on_reply)

    # -- replies checked by sender -------------------------------------------

    def expect_reply(self, serial: int, sender: str, callback: ReplyCallback) -> None:
        """Call ``callback(reply, None)`` with the reply to *serial* that *sender* sends.

        A reply from anyone else is ignored (logged once per sender) and the real
        one still awaited. Errors from the bus daemon count too: it answers for a
        destination that is gone, refused by policy or did not reply. When the
        connection ends first, ``callback(None, exc)``.
        """
        self._checked[serial] = (sender, callback)

    def forget_reply(self, serial: int) -> None:
        self._checked.pop(serial, None)

    async def call_from(self, msg: Message, sender: str) -> Message:
        """``call()``, but only a reply from *sender* (a unique name, or the bus
        daemon's ``org.freedesktop.DBus``) answers it."""
        if internals.disconnected(self):
            raise DBusError("org.freedesktop.DBus.Error.Disconnected", "not connected to the bus")
        if not msg.serial:
            msg.serial = self.next_serial()
        fut = asyncio.get_running_loop().create_future()

        def done(reply: Message | None, err: Exception | None) -> None:
            if fut.done():
                return
            if err is not None:
                fut.set_exception(err)
            else:
                fut.set_result(reply)

        self.expect_reply(msg.serial, sender, done)
        try:
            self.send(msg)
            return await fut
        finally:
            self.forget_reply(msg.serial)

    async def call_bus(self, member: str, signature: str = "", body: list | None = None) -> Message:
        """A method of the bus daemon (``org.freedesktop.DBus``), answered only by it."""
        return await self.call_from(Message(destination=BUS_DAEMON, path=BUS_PATH, interface=BUS_DAEMON,
                                            member=member, signature=signature, body=body or []), BUS_DAEMON)

    async def request_name(self, name: str, flags: NameFlag = NameFlag.NONE) -> RequestNameReply:
        reply = await self.call_bus("RequestName", "su", [name, int(flags)])
        if reply.message_type == MessageType.ERROR:
            raise DBusError(reply.error_name, reply.body[0] if reply.body else "")
        if reply.signature != "u":
            raise DBusError("org.freedesktop.DBus.Error.InvalidSignature", "RequestName answered " + reply.signature)
        return RequestNameReply(reply.body[0])

    def _on_reply(self, msg: Message) -> bool | None:
        if msg.message_type not in (MessageType.METHOD_RETURN, MessageType.ERROR):
            return None
        entry = self._checked.get(msg.reply_serial)
        if entry is None:
            # dbus-fast's own pending calls (Hello, bus.call) take it. Nothing else
            # asked for this reply: keep none of the fds it carries.
            if msg.unix_fds and not internals.awaits_reply(self, msg.reply_serial):
                close_fds(msg)
            return None
        sender, callback = entry
        if msg.sender == sender or (msg.message_type == MessageType.ERROR and msg.sender == BUS_DAEMON):
            del self._checked[msg.reply_serial]
            try:
                callback(msg, None)
            except Exception:
                log.exception("handling the reply to serial %d failed", msg.reply_serial)
            return True
        self.forged_replies += 1
        close_fds(msg)
        if msg.sender not in self._forgers and len(self._forgers) < FORGERS_LOGGED:
            self._forgers.add(msg.sender)
            log.warning("ignored a reply from %s to a call answered only by %s (forged?); "
                        "further ones from %s are counted, not logged", msg.sender, sender, msg.sender)
        if self.forged_replies >= 1024 and self.forged_replies & (self.forged_replies - 1) == 0:
            log.warning("%d forged replies ignored so far", self.forged_replies)
        return True  # handled: neither another handler nor dbus-fast sees it

    def _connection_ended(self, ended: asyncio.Future) -> None:
        """Fail the checked calls still pending (``wait_for_disconnect`` is done)."""
        err = None if ended.cancelled() else ended.exception()
        pending, self._checked = self._checked, {}
        exc = err or DBusError("org.freedesktop.DBus.Error.Disconnected", "the bus connection ended")
        for _sender, callback in pending.values():
            try:
                callback(None, exc)
            except Exception:
                log.exception("handling the end of a pending call failed")

    # -- flow control ----------------------------------------------------------

    async def connect(self) -> FlowControlledBus:
        await super().connect()
        self._end_watch = asyncio.ensure_future(self.wait_for_disconnect())
        self._end_watch.add_done_callback(self._connection_ended)
        # What the kernel buffers is queued ahead of every reply too: bound it
        # (the default, net.core.wmem_default, holds a second of signals).
        internals.sock(self).setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        old = internals.writer(self)
        new = FlowControlledWriter(self)
        new.messages.extend(old.messages)
        new.buf, new.offset, new.fut, new.unix_fds = old.buf, old.offset, old.fut, old.unix_fds
        internals.loop(self).remove_writer(internals.fd(self))
        internals.set_writer(self, new)
        if new.backlog:
            new.write_callback()
        return self

    @property
    def backlog(self) -> int:
        writer = internals.writer(self)
        return writer.backlog if writer is not None else 0


def close_fds(msg: Message) -> None:
    """Close the fds a message carried (wqd keeps none a peer sends)."""
    fds, msg.unix_fds = msg.unix_fds, []
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


async def connect(address: str | None = None, system: bool = False) -> FlowControlledBus:
    # fd passing is negotiated so that GetConnectionCredentials can carry the
    # peer's ProcessFD (a pidfd) where the bus offers it (wqd.bus.identity); fds
    # peers send in calls or signals are closed on arrival (wqd.bus.service).
    if address:
        bus = FlowControlledBus(bus_address=address, negotiate_unix_fd=True)
    else:
        bus = FlowControlledBus(bus_type=BusType.SYSTEM if system else BusType.SESSION, negotiate_unix_fd=True)
    return await bus.connect()
