"""The outlet: drains subscriber queues onto the bus as unicast signals.

Round-robin over subscriptions with something queued, so one busy subscriber
cannot starve the others; a batch at a time, so method calls are answered during
a storm; and it pauses while the connection's writer backlog is above a
high-water mark, so a burst never turns into unbounded buffering or
``BlockingIOError``.

Signals are marshalled by ``wqd.bus.signals``: each subscription's header once
per member, each event's body once however many subscribers get it; a batch is
queued on the writer and flushed together (several messages per ``sendmsg``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from wqd.bus.names import SUBSCRIPTION_INTERFACE, subscription_path
from wqd.bus.signals import encode, marshal_body, signal_header
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
        self._headers: dict[Subscription, dict[str, bytes]] = {}  # marshalled once per member
        hub.outlet = self

    def wake(self, sub: Subscription) -> None:
        if sub not in self._queued:
            self._queued.add(sub)
            self._ready.append(sub)
        if not self._scheduled and self._waiting is None:
            self._scheduled = True
            self.loop.call_soon(self._drain)

    def forget(self, sub: Subscription) -> None:
        self._headers.pop(sub, None)
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
        try:
            self._drain_into(bus, writer)
        finally:
            writer.flush()

    def _drain_into(self, bus, writer) -> None:
        ready, hub, take = self._ready, self.hub, self.hub.take
        queue, next_serial, headers = writer.queue, bus.next_serial, self._headers
        bodies: dict[int, tuple] = {}  # id(event) -> (event, body): one marshalling per event
        sent = 0
        while ready:
            if writer.backlog >= HIGH_WATER:
                writer.flush()
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
            if isinstance(item, Event):
                member, signature = item.signal, item.signature
                cached = bodies.get(id(item))
                if cached is None:
                    cached = bodies[id(item)] = (item, marshal_body(signature, item.body()))
                body = cached[1]
            elif isinstance(item, LostMark):
                member, signature, body = "Lost", "t", marshal_body("t", [item.count])
            else:
                member, signature, body = "Removed", "s", marshal_body("s", [item.reason])
            mine = headers.get(sub)
            if mine is None:
                mine = headers[sub] = {}
            header = mine.get(member)
            if header is None:
                header = mine[member] = signal_header(sub.peer, subscription_path(sub.number),
                                                      SUBSCRIPTION_INTERFACE, member, signature)
            queue(encode(header, body, next_serial()))
            sent += 1
            if isinstance(item, EndMark):
                hub.forget(sub)

    async def _wait_writer(self) -> None:
        try:
            writer = self.bus._writer
            if writer is not None:
                await writer.wait_backlog(HIGH_WATER // 2)
        finally:
            self._waiting = None
        self._drain()
