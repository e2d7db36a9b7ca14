"""One ``Watch()`` subscription that follows wqd across its restarts, for ``wqctl watch``.

wqd restarts: systemd's watchdog kills a stuck daemon and starts it again, an
administrator runs ``systemctl restart wqd``, a package upgrade does. A
subscription lives in the daemon, so it dies with it, and nothing would tell a
client that only listens for the subscription's signals: it would wait,
silent, for ever. So the follower also listens for ``NameOwnerChanged`` of
``io.wqd.WatchQueue1``: when the name loses the owner the subscription was made
with, it waits (bounded) for a new owner, calls ``Watch`` again with the same
source, target and options, and reports the gap to its caller, since events that
happened meanwhile are gone (the new daemon cannot know what the old one had not
sent).

Signals are taken only from the owner that answered ``Watch`` (its unique name,
never reused by the bus) and only for the path it returned: a new daemon numbers
its subscriptions from 1 again, so a path alone could name another peer's.
Everything arrives through one queue in the bus's order, so the old daemon's
last signals come out before its departure does.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from dbus_fast import Message, MessageType

from wqd.bus import names

BUS_DAEMON = "org.freedesktop.DBus"
RETURN_WAIT = 60.0  # seconds a restarted wqd may take to own its name again (TCG guests: ~10 s)


class FollowError(Exception):
    """The subscription cannot go on: the daemon did not come back, or refused again."""


@dataclass
class Restarted:
    """wqd left the bus and came back; the subscription is made again (events in between are lost)."""

    previous: str
    path: str


class Follower:
    """Subscribe with ``Watch(source, target, options)`` and keep the subscription across restarts.

    ``call`` is the caller's ``(bus, path, iface, member, signature, body, destination=)
    -> Message`` that raises ``refused`` for an error reply (wqctl's ``CliError``); a
    refused re-subscription becomes ``FollowError`` with that text, while the first
    ``Watch``'s refusal reaches the caller as it is.
    """

    def __init__(self, bus, call, refused: type[Exception], source: str, target: str, options: dict,
                 return_wait: float = RETURN_WAIT):
        self.bus, self.call, self.refused = bus, call, refused
        self.source, self.target, self.options = source, target, options
        self.return_wait = return_wait
        self.path: str | None = None
        self.owner: str | None = None
        self.queue: asyncio.Queue = asyncio.Queue()  # ("signal", Message) | ("owner", new unique name or "")
        self._early: list[Message] = []

    def _on_message(self, msg: Message):
        if msg.message_type != MessageType.SIGNAL:
            return
        if msg.sender == BUS_DAEMON and msg.member == "NameOwnerChanged" and msg.body[:1] == [names.BUS_NAME]:
            self.queue.put_nowait(("owner", msg.body[2]))
        elif msg.interface == names.SUBSCRIPTION_INTERFACE:
            if self.path is None:
                self._early.append(msg)  # a signal racing the Watch reply
            elif msg.path == self.path and msg.sender == self.owner:
                self.queue.put_nowait(("signal", msg))

    async def start(self) -> str:
        """Listen for the name's owner changes, then subscribe; the subscription's path."""
        self.bus.add_message_handler(self._on_message)
        await self.call(self.bus, "/org/freedesktop/DBus", BUS_DAEMON, "AddMatch", "s",
                        [f"type='signal',sender='{BUS_DAEMON}',interface='{BUS_DAEMON}',"
                         f"member='NameOwnerChanged',arg0='{names.BUS_NAME}'"], destination=BUS_DAEMON)
        return await self._subscribe()

    async def _subscribe(self) -> str:
        self.path, self._early = None, []
        reply = await self.call(self.bus, names.MANAGER_PATH, names.MANAGER_INTERFACE, "Watch", "ssa{sv}",
                                [self.source, self.target, self.options])
        self.owner, self.path = reply.sender, reply.body[0]
        for msg in self._early:
            if msg.path == self.path and msg.sender == self.owner:
                self.queue.put_nowait(("signal", msg))
        self._early = []
        return self.path

    async def next(self) -> Message | Restarted:
        """The next signal of the subscription, or ``Restarted`` once it is made again."""
        while True:
            kind, value = await self.queue.get()
            if kind == "signal":
                return value
            if value != self.owner:  # the daemon we subscribed with is gone
                return await self._follow(value)

    async def _follow(self, new_owner: str) -> Restarted:
        previous, self.path, self.owner = self.path, None, None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.return_wait
        while not new_owner:
            try:
                kind, value = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise FollowError(f"wqd left the bus and did not come back within {self.return_wait:g} s") from None
            if kind == "owner":
                new_owner = value
        try:
            path = await self._subscribe()
        except self.refused as exc:
            raise FollowError(f"wqd restarted, but watching {self.source} {self.target!r} again failed: "
                              f"{exc}") from None
        return Restarted(previous, path)
