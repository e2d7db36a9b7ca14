"""The outlet: drains subscriber queues onto the bus as unicast signals.

Turns are taken per uid, then per peer (connection) of that uid, then per
subscription of that peer, round-robin at each level, one signal a turn: so a
uid with thousands of subscriptions (on one connection or on many) gets one
uid's share of the bus, not thousands of shares, and another uid's one
subscriber waits behind at most one signal of each other uid with something
queued, however many subscriptions those hold. Each subscription's items go out
in its own order (Lost and Removed in their places). Only what has something
queued is in a ring (``_UidTurn``, ``_PeerTurn``), and it leaves its ring when
its queue is empty or its peer is paused, so a turn costs O(1) whatever the
numbers. A batch at a time, so method calls are answered during a storm; and it
pauses while the connection's writer backlog is above a high-water mark, so a
burst never turns into unbounded buffering or ``BlockingIOError``. What each
peer has been sent and has read, and pausing, stalling and probing the peers
that stop reading, is ``wqd.bus.credit``'s.

Signals are marshalled by ``wqd.bus.signals``: each subscription's header once
per member, each event's body once however many subscribers get it; a batch is
queued on the writer and flushed together (several messages per ``sendmsg``).

A body that cannot be marshalled (a string that is not valid UTF-8 in an
event no source escaped) costs its subscribers ``Lost(1)`` in its place,
logged; the batch goes on.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import deque

from wqd.bus import dbus_fast_internals as internals
from wqd.bus.credit import Credits
from wqd.bus.names import SUBSCRIPTION_INTERFACE, subscription_path
from wqd.bus.signals import encode, marshal_body, signal_header
from wqd.events import Event
from wqd.hub import EndMark, Hub, LostMark, Subscription

log = logging.getLogger(__name__)

HIGH_WATER = 64  # messages waiting in the connection's writer
BATCH = 64  # signals per loop iteration before yielding ...
TURN = 0.0005  # ... or this many seconds (as wqd.lanes.TURN): signals to subscriptions not sent to
# before, or Lost with a count to marshal, cost ~15 us each, not ~5 (p7)
SKIPS = 512  # ... or paused subscriptions taken out of the rings (a paused peer's thousands)
_LOST_ONE = marshal_body("t", [1])
_U32 = struct.Struct("<I")


class HeaderTemplates:
    """Signal headers from a template per (destination, member, signature): only the
    path differs between one peer's subscriptions, and it is the first header field,
    so the fields after it (each 8-aligned) are the same bytes whatever its length.
    ``signal_header`` marshals all of them (~40 us); a probe window or a storm's first
    contact with a uid of thousands of subscriptions needs a header for each of them
    (p7: hundreds a window), in the loop's time. Equal to ``signal_header``'s bytes
    (tests/test_flow_headers.py)."""

    def __init__(self) -> None:
        # destination -> (member, signature) -> (fixed part, later fields); per destination,
        # so that forgetting a peer is one pop, not a scan of every peer's templates (a uid
        # opening and closing connections by the thousand)
        self._tails: dict[str, dict[tuple[str, str], tuple[bytes, bytes]]] = {}

    def header(self, destination: str, path: str, member: str, signature: str) -> bytes:
        mine = self._tails.get(destination)
        if mine is None:
            mine = self._tails[destination] = {}
        cached = mine.get((member, signature))
        if cached is None:
            ref = signal_header(destination, "/", SUBSCRIPTION_INTERFACE, member, signature)
            # "/" ends the path field at 26, padded to 32; the array's length is at 12
            end = 16 + _U32.unpack_from(ref, 12)[0]
            cached = mine[(member, signature)] = (ref[:12], ref[32:end])
        fixed, tail = cached
        data = path.encode()
        field = b"\x01\x01o\0" + _U32.pack(len(data)) + data + b"\0"
        field += b"\0" * (-len(field) % 8)
        fields = len(field) + len(tail)
        return b"".join((fixed, _U32.pack(fields), field, tail, b"\0" * (-fields % 8)))

    def forget(self, destination: str) -> None:
        self._tails.pop(destination, None)


class _PeerTurn:
    """One peer's subscriptions with something queued, in turn."""

    __slots__ = ("peer", "uid", "subs")

    def __init__(self, peer: str, uid: "_UidTurn") -> None:
        self.peer = peer
        self.uid = uid
        self.subs: deque[Subscription] = deque()


class _UidTurn:
    """One uid's peers with something queued, in turn."""

    __slots__ = ("uid", "peers")

    def __init__(self, uid: int) -> None:
        self.uid = uid
        self.peers: deque[_PeerTurn] = deque()


class SignalEmitter:
    def __init__(self, bus, hub: Hub) -> None:
        self.bus = bus
        self.hub = hub
        self.loop = asyncio.get_running_loop()
        self._ready: deque[_UidTurn] = deque()  # uids with something queued, in turn
        self._uid_turns: dict[int, _UidTurn] = {}
        self._peer_turns: dict[str, _PeerTurn] = {}
        self._queued: set[Subscription] = set()  # in their peer's ring
        self._scheduled = False
        self._waiting: asyncio.Task | None = None
        self._headers: dict[Subscription, dict[str, bytes]] = {}  # marshalled once per member
        self._templates = HeaderTemplates()
        self.credits = Credits(bus, hub, self.wake)  # peers that do not read (wqd.bus.credit)
        self.unmarshallable = 0  # events that could not be marshalled (each cost Lost(1))
        hub.outlet = self

    def added(self, sub: Subscription) -> None:
        self.credits.added(sub)

    def wake(self, sub: Subscription) -> None:
        if sub.paused:
            return  # woken again when its peer reads
        if sub not in self._queued:
            self._queued.add(sub)
            turn = self._peer_turns.get(sub.peer)
            if turn is None:
                uid = sub.owner.uid
                ring = self._uid_turns.get(uid)
                if ring is None:
                    ring = self._uid_turns[uid] = _UidTurn(uid)
                    self._ready.append(ring)
                turn = self._peer_turns[sub.peer] = _PeerTurn(sub.peer, ring)
                ring.peers.append(turn)
            turn.subs.append(sub)
        if not self._scheduled and self._waiting is None:
            self._scheduled = True
            self.loop.call_soon(self._drain)

    def peer_gone(self, peer: str) -> None:
        self._templates.forget(peer)
        self.credits.peer_gone(peer)

    def forget(self, sub: Subscription) -> None:
        self._headers.pop(sub, None)
        self.credits.forget(sub)
        if sub in self._queued:
            self._queued.discard(sub)
            turn = self._peer_turns.get(sub.peer)
            if turn is not None:
                try:
                    turn.subs.remove(sub)  # O(the peer's ready subscriptions), not everyone's
                except ValueError:
                    pass
                if not turn.subs:
                    self._drop_turn(turn)

    def _drop_turn(self, turn: _PeerTurn) -> None:
        """*turn*'s peer has nothing (unpaused) queued: out of its uid's ring, and the uid
        out of the ring of uids once it has no such peer left."""
        if self._peer_turns.get(turn.peer) is turn:
            del self._peer_turns[turn.peer]
        ring = turn.uid
        peers = ring.peers
        if peers and peers[0] is turn:
            peers.popleft()
        else:
            try:
                peers.remove(turn)
            except ValueError:
                pass
        if not peers:
            if self._uid_turns.get(ring.uid) is ring:
                del self._uid_turns[ring.uid]
            ready = self._ready
            if ready and ready[0] is ring:
                ready.popleft()
            else:
                try:
                    ready.remove(ring)
                except ValueError:
                    pass

    def _drain(self) -> None:
        self._scheduled = False
        bus = self.bus
        writer = internals.writer(bus)
        if writer is None:
            return
        try:
            self._drain_into(bus, writer)
        finally:
            writer.flush()

    def _drain_into(self, bus, writer) -> None:
        ready, hub, take, credits = self._ready, self.hub, self.hub.take, self.credits
        queue, next_serial, headers, template = writer.queue, bus.next_serial, self._headers, self._templates.header
        bodies: dict[int, tuple] = {}  # id(event) -> (event, body): one marshalling per event
        sent = skipped = 0
        deadline = time.monotonic() + TURN
        while ready:
            if writer.backlog >= HIGH_WATER:
                writer.flush()
                if writer.backlog >= HIGH_WATER:
                    self._waiting = self.loop.create_task(self._wait_writer())
                    return
            if sent >= BATCH or skipped >= SKIPS or (sent & 7 == 7 and time.monotonic() >= deadline):
                self._scheduled = True
                self.loop.call_soon(self._drain)
                return
            # The uid whose turn it is, its peer whose turn it is, that peer's subscription.
            ring = ready[0]
            peers = ring.peers
            turn = peers[0]
            subs = turn.subs
            sub = subs[0]
            if sub.paused:  # its peer went over budget: out of the ring until it reads (wake)
                skipped += 1
                subs.popleft()
                self._queued.discard(sub)
                if not subs:
                    self._drop_turn(turn)
                continue
            item = take(sub)
            if not sub.queue:
                subs.popleft()
                self._queued.discard(sub)
            elif len(subs) > 1:
                subs.rotate(-1)
            if not subs:
                self._drop_turn(turn)  # the uid's next peer is first now (or the next uid)
            elif len(peers) > 1:
                peers.rotate(-1)
            if peers and len(ready) > 1:  # the uid still has a peer with something queued
                ready.rotate(-1)
            if isinstance(item, Event):
                member, signature = item.signal, item.signature
                cached = bodies.get(id(item))
                if cached is None:
                    cached = bodies[id(item)] = (item, self._marshal(item))
                body = cached[1]
                if body is None:  # told in its place, in order: Lost(1)
                    sub.delivered -= 1
                    sub.lost += 1
                    member, signature, body = "Lost", "t", _LOST_ONE
            elif isinstance(item, LostMark):
                member, signature, body = "Lost", "t", marshal_body("t", [item.count])
            else:
                member, signature, body = "Removed", "s", marshal_body("s", [item.reason])
            mine = headers.get(sub)
            if mine is None:
                mine = headers[sub] = {}
            header = mine.get(member)
            if header is None:
                header = mine[member] = template(sub.peer, subscription_path(sub.number), member, signature)
            message = encode(header, body, next_serial())
            queue(message)
            sent += 1
            if isinstance(item, EndMark):
                hub.forget(sub)
            if credits.pinging:
                credits.account(sub, len(message))

    def _marshal(self, event: Event) -> bytes | None:
        try:
            return marshal_body(event.signature, event.body())
        except Exception as exc:  # a string the bus cannot carry, a value out of range
            self.unmarshallable += 1
            n = self.unmarshallable
            if n & (n - 1) == 0:  # the 1st, 2nd, 4th, ...: never a log line per event
                log.warning("a %s event could not be marshalled (%s: %s); its subscribers get Lost(1) "
                            "in its place (%d such events so far)", event.signal, type(exc).__name__,
                            str(exc)[:120], n)
            return None


    async def _wait_writer(self) -> None:
        try:
            writer = internals.writer(self.bus)
            if writer is not None:
                await writer.wait_backlog(HIGH_WATER // 2)
        finally:
            self._waiting = None
        self._drain()
