"""The outlet: drains subscriber queues onto the bus as unicast signals.

Round-robin over subscriptions with something queued, so one busy subscriber
cannot starve the others; a batch at a time, so method calls are answered during
a storm; and it pauses while the connection's writer backlog is above a
high-water mark, so a burst never turns into unbounded buffering or
``BlockingIOError``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from dbus_fast import Message, MessageType

from wqd.bus.names import SUBSCRIPTION_INTERFACE, subscription_path
from wqd.events import Event
from wqd.hub import EndMark, Hub, LostMark, Subscription

log = logging.getLogger(__name__)

HIGH_WATER = 64  # messages waiting in the connection's writer
BATCH = 256  # signals per loop iteration before yielding


class SignalEmitter:
    def __init__(self, bus, hub: Hub) -> None:
        self.bus = bus
        self.hub = hub
        self.loop = asyncio.get_running_loop()
        self._ready: deque[Subscription] = deque()
        self._queued: set[Subscription] = set()
        self._scheduled = False
        self._waiting: asyncio.Task | None = None
        self._last: asyncio.Future | None = None
        hub.outlet = self

    def wake(self, sub: Subscription) -> None:
        if sub not in self._queued:
            self._queued.add(sub)
            self._ready.append(sub)
        if not self._scheduled and self._waiting is None:
            self._scheduled = True
            self.loop.call_soon(self._drain)

    def forget(self, sub: Subscription) -> None:
        if sub in self._queued:
            self._queued.discard(sub)
            try:
                self._ready.remove(sub)
            except ValueError:
                pass

    def _drain(self) -> None:
        self._scheduled = False
        bus = self.bus
        writer = bus._writer
        if writer is None:
            return
        ready, hub, take = self._ready, self.hub, self.hub.take
        sent = 0
        while ready:
            if writer.backlog >= HIGH_WATER:
                self._waiting = self.loop.create_task(self._wait_writer())
                return
            if sent >= BATCH:
                self._scheduled = True
                self.loop.call_soon(self._drain)
                return
            sub = ready[0]
            item = take(sub)
            if not sub.queue:
                ready.popleft()
                self._queued.discard(sub)
            elif len(ready) > 1:
                ready.rotate(-1)
            path = subscription_path(sub.number)
            if isinstance(item, Event):
                member, signature, body = item.signal, item.signature, item.body()
            elif isinstance(item, LostMark):
                member, signature, body = "Lost", "t", [item.count]
            else:
                member, signature, body = "Removed", "s", [item.reason]
            msg = Message(
                message_type=MessageType.SIGNAL, destination=sub.peer, path=path,
                interface=SUBSCRIPTION_INTERFACE, member=member, signature=signature, body=body,
            )
            self._last = bus.send(msg)
            sent += 1
            if isinstance(item, EndMark):
                hub.forget(sub)

    async def _wait_writer(self) -> None:
        try:
            while self.bus._writer is not None and self.bus._writer.backlog >= HIGH_WATER // 2:
                last = self._last
                if last is None or last.done():
                    await asyncio.sleep(0.001)
                else:
                    await asyncio.wait([last])
        finally:
            self._waiting = None
        self._drain()
