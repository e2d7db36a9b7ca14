"""Subscriptions, routing and per-subscriber queues.

Data flow: a source emits an ``Event`` -> the hub finds the subscriptions on its
route -> the source's per-subscription filter -> ``policy.post(peer, event)`` ->
the subscriber's bounded queue -> the outlet (the bus emitter) drains it.

A full queue drops the event, counts it in ``lost`` and leaves a ``LostMark`` in
the queue, so the subscriber is told ``Lost(n)`` exactly where the gap is.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

from wqd import journal
from wqd.errors import AccessDenied, InvalidArgument, LimitsExceeded, NoSuchObject, NotSupported
from wqd.events import Event, KeyRemoved, SourceLoss, TargetGone, WatchTarget
from wqd.peer import PeerCredentials
from wqd.policy import PolicyStack
from wqd.sources import ANY, Source

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LostMark:
    count: int


@dataclass(frozen=True, slots=True)
class EndMark:
    reason: str


@dataclass(slots=True)
class Preload:
    """Events for one subscription, ahead of anything queued after them (an initial
    snapshot): taken one at a time, outside the queue limit (their number is bounded
    by what exists, not by an event rate)."""

    events: deque


@dataclass(frozen=True, slots=True)
class Limits:
    queue_length: int = 1024  # events queued per subscriber before loss
    subscriptions_per_peer: int = 4096
    subscriptions_total: int = 65536
    target_length: int = 4096  # bytes
    subscriptions_per_uid: int = 16384  # all connections of one uid but root's


@dataclass(eq=False, slots=True)
class Subscription:
    number: int
    owner: PeerCredentials
    source: str
    target: WatchTarget
    options: dict
    _queue: deque | None = field(default=None, repr=False)  # see ``queue``
    queued_events: int = 0
    delivered: int = 0
    lost: int = 0
    active: bool = True
    paused: bool = False  # the outlet waits for the peer to read before sending more (wqd.bus.emitter)
    stalled: bool = False  # ... and has waited too long: its queue no longer pauses the sources
    routes: tuple = ()
    state: dict = field(default_factory=dict)  # the source's per-subscription data

    @property
    def peer(self) -> str:
        return self.owner.unique_name

    @property
    def queue(self) -> deque:
        """Made on first use: an empty deque is 760 bytes, and most subscriptions are idle."""
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        return queue


class Outlet(Protocol):
    def wake(self, sub: Subscription) -> None:
        """*sub* has something queued."""

    def forget(self, sub: Subscription) -> None:
        """*sub* is gone: drop its object and queue."""

    def peer_gone(self, peer: str) -> None:
        """*peer* left the bus: drop what is kept about it."""


class Hub:
    def __init__(self, sources: dict[str, Source], policy: PolicyStack, limits: Limits | None = None) -> None:
        self.sources = sources
        self.policy = policy
        self.limits = limits or Limits()
        self.outlet: Outlet | None = None
        self.subscriptions: dict[int, Subscription] = {}
        self._by_route: dict[tuple[str, Hashable], set[Subscription]] = {}
        self._by_owner: dict[str, set[Subscription]] = {}
        self._per_uid: dict[int, int] = {}  # active subscriptions of each uid
        self._pressured = 0  # subscriptions not stalled with a queue more than half full
        self._relief: list = []

    # -- subscribing ------------------------------------------------------

    async def watch(self, peer: PeerCredentials, source_name: str, spec: str, options: dict) -> Subscription:
        source = self.sources.get(source_name)
        if source is None:
            raise InvalidArgument(f"unknown source {source_name!r}; known: {', '.join(sorted(self.sources))}")
        if not source.backend:
            raise NotSupported(f"source {source_name!r} is not available on this system")
        if len(spec.encode()) > self.limits.target_length:
            raise InvalidArgument("target is too long")
        if len(self._by_owner.get(peer.unique_name, ())) >= self.limits.subscriptions_per_peer:
            raise LimitsExceeded("too many subscriptions for this connection")
        if peer.uid != 0 and self._per_uid.get(peer.uid, 0) >= self.limits.subscriptions_per_uid:
            raise LimitsExceeded(f"too many subscriptions for uid {peer.uid}")
        if len(self.subscriptions) >= self.limits.subscriptions_total:
            raise LimitsExceeded("too many subscriptions")
        target = await source.resolve(peer, spec, options)
        policy = self.policy
        decision = await policy.watch(peer, target)
        while policy is not self.policy:  # reloaded (SIGHUP) while deciding: the new policy decides
            policy = self.policy
            decision = await policy.watch(peer, target)
        if not decision.allowed:
            log.info("denied %s watch %s %r: %s", peer.unique_name, source_name, spec, decision.reason,
                     extra={"MESSAGE_ID": journal.POLICY_DENIED, "peer_uid": peer.uid, "peer_pid": peer.pid})
            raise AccessDenied(decision.reason or "access denied")
        # Random, never 0, unique among the live ones: the numbers tell nobody how
        # often others subscribe (issue 12). 63 bits: at most 19 digits in the path.
        # Two Watch calls awaiting attach at once could only collide with odds of 2**-63.
        number = secrets.randbits(63)
        while not number or number in self.subscriptions:
            number = secrets.randbits(63)
        sub = Subscription(number, peer, source_name, target, options)
        sub.routes = tuple(source.routes(sub))
        attached = source.attach(sub)  # may raise: nothing registered yet
        if inspect.isawaitable(attached):  # keys: arming runs in a credential helper
            await attached
        self.subscriptions[sub.number] = sub
        self._by_owner.setdefault(peer.unique_name, set()).add(sub)
        self._per_uid[peer.uid] = self._per_uid.get(peer.uid, 0) + 1
        for route in sub.routes:
            self._by_route.setdefault((source_name, route), set()).add(sub)
        log.info("subscription %d: %s watches %s %r", sub.number, peer.unique_name, source_name, spec,
                 extra={"MESSAGE_ID": journal.SUBSCRIPTION_CREATED, "peer_uid": peer.uid, "peer_pid": peer.pid})
        return sub

    def get(self, number: int, peer: str) -> Subscription:
        sub = self.subscriptions.get(number)
        # Another peer's subscription answers exactly like one never made or closed:
        # no oracle on who else is subscribed.
        if sub is None or not sub.active or sub.peer != peer:
            raise NoSuchObject("no such subscription")
        return sub

    def owned_by(self, peer: str) -> list[Subscription]:
        return sorted(self._by_owner.get(peer, ()), key=lambda s: s.number)

    def end(self, sub: Subscription, reason: str | None = None) -> None:
        """Stop routing to *sub* and release its kernel watch.

        With a *reason* the subscriber is told ``Removed(reason)`` after what is
        already queued; without one (Close, owner left) the queue is dropped.
        """
        if not sub.active:
            return
        sub.active = False
        for route in sub.routes:
            bucket = self._by_route.get((sub.source, route))
            if bucket is not None:
                bucket.discard(sub)
                if not bucket:
                    del self._by_route[(sub.source, route)]
        owned = self._by_owner.get(sub.peer)
        if owned is not None:
            owned.discard(sub)
            if not owned:
                del self._by_owner[sub.peer]
        uid = sub.owner.uid
        left = self._per_uid.get(uid, 0) - 1
        if left > 0:
            self._per_uid[uid] = left
        else:
            self._per_uid.pop(uid, None)
        try:
            self.sources[sub.source].detach(sub)
        except Exception:
            log.exception("detaching subscription %d failed", sub.number)
        log.info("subscription %d ended: %s", sub.number, reason or "closed",
                 extra={"MESSAGE_ID": journal.SUBSCRIPTION_ENDED, "peer_uid": sub.owner.uid, "peer_pid": sub.owner.pid})
        if reason is not None and self.outlet is not None:
            sub.queue.append(EndMark(reason))
            self.outlet.wake(sub)
        else:
            self.forget(sub)

    def forget(self, sub: Subscription) -> None:
        if sub.queued_events > self.limits.queue_length // 2 and not sub.stalled:
            self._unpressure()
        sub.queue.clear()
        sub.queued_events = 0
        self.subscriptions.pop(sub.number, None)
        if self.outlet is not None:
            self.outlet.forget(sub)

    def drop_owner(self, peer: str) -> int:
        subs = list(self._by_owner.get(peer, ()))
        for sub in subs:
            self.end(sub)
        self.policy.forget(peer)
        if self.outlet is not None:
            self.outlet.peer_gone(peer)
        return len(subs)

    async def recheck(self, policy: PolicyStack, concurrency: int = 64) -> int:
        """Make *policy* the policy, and judge every live subscription by it again.

        A subscription it now denies ends with ``Removed("access revoked")``. Watches
        decided meanwhile are re-decided by *policy* (see ``watch``). Returns how
        many subscriptions were revoked.
        """
        self.policy = policy
        gate = asyncio.Semaphore(concurrency)
        revoked = 0

        async def judge(sub: Subscription) -> None:
            nonlocal revoked
            async with gate:
                if not sub.active:
                    return
                decision = await policy.watch(sub.owner, sub.target)
            if sub.active and self.policy is policy and not decision.allowed:
                log.info("subscription %d of %s revoked: %s", sub.number, sub.peer, decision.reason,
                         extra={"MESSAGE_ID": journal.POLICY_DENIED, "peer_uid": sub.owner.uid,
                                "peer_pid": sub.owner.pid})
                revoked += 1
                self.end(sub, "access revoked")

        await asyncio.gather(*(judge(s) for s in list(self.subscriptions.values()) if s.active))
        return revoked

    # -- delivering -------------------------------------------------------

    def subscribers(self, source: str, route: Hashable) -> list[Subscription]:
        found = self._by_route.get((source, route))
        any_ = self._by_route.get((source, ANY))
        if found and any_:
            return [*found, *any_]
        return list(found or any_ or ())

    def dispatch(self, event: Event) -> None:
        """Entry point for sources (synchronous: runs in the fd's reader callback)."""
        if isinstance(event, SourceLoss):
            self._loss(event)
            return
        if isinstance(event, KeyRemoved):
            for sub in self.subscribers("keys", event.key):
                self.end(sub, event.reason)
            return
        if isinstance(event, TargetGone):
            for sub in self.subscribers(event.source_name, event.route):
                if not event.object_id or sub.target.object_id == event.object_id:
                    self.end(sub, event.reason)
            return
        source = self.sources[event.source]
        post = self.policy.post
        shape = getattr(source, "shape", None)  # per-subscription trimming (devices: "properties")
        for sub in self.subscribers(event.source, event.route):
            if not source.accepts(sub, event):
                continue
            seen = post(sub.owner, event)
            if seen is not None:
                self.enqueue(sub, seen if shape is None else shape(sub, seen))

    def preload(self, sub: Subscription, events) -> int:
        """Queue *events* (an initial snapshot) for *sub* alone, judged like any event
        (the source's filter, the policy, the source's ``shape``), as one ``Preload``.
        Returns how many were queued."""
        source = self.sources[sub.source]
        post = self.policy.post
        shape = getattr(source, "shape", None)
        seen = deque()
        for event in events:
            if source.accepts(sub, event) and (event := post(sub.owner, event)) is not None:
                seen.append(event if shape is None else shape(sub, event))
        if seen:
            sub.queue.append(Preload(seen))
            if self.outlet is not None:
                self.outlet.wake(sub)
        return len(seen)

    def enqueue(self, sub: Subscription, item: Event) -> None:
        n = sub.queued_events
        if n >= self.limits.queue_length:
            self.lose(sub, 1)
            return
        sub.queue.append(item)
        sub.queued_events = n + 1
        if n + 1 == self.limits.queue_length // 2 + 1 and not sub.stalled:
            self._pressured += 1
        if self.outlet is not None:
            self.outlet.wake(sub)

    def take(self, sub: Subscription):
        """Pop the next item for the outlet (Event, LostMark or EndMark), counting it."""
        queue = sub.queue
        item = queue[0]
        if isinstance(item, Preload):
            event = item.events.popleft()
            if not item.events:
                queue.popleft()
            sub.delivered += 1
            return event
        item = queue.popleft()
        if isinstance(item, Event):
            n = sub.queued_events
            sub.queued_events = n - 1
            sub.delivered += 1
            if n == self.limits.queue_length // 2 + 1 and not sub.stalled:
                self._unpressure()
        return item

    def stall(self, sub: Subscription, stalled: bool) -> None:
        """*sub*'s peer has stopped reading (the outlet gave up waiting), or reads
        again. While stalled its queue fills and then loses, like any full queue,
        but does not pause the sources: a peer that does not read must not stall
        everyone else."""
        if sub.stalled == stalled:
            return
        sub.stalled = stalled
        if sub.queued_events > self.limits.queue_length // 2:
            if stalled:
                self._unpressure()
            else:
                self._pressured += 1

    def set_limits(self, limits: Limits) -> None:
        """New limits (SIGHUP). Subscriptions over a lowered cap stay (new ones are
        refused); a queue longer than a lowered length keeps what it holds and loses
        from then on. Back-pressure is recounted against the new half-way mark."""
        self.limits = limits
        half = limits.queue_length // 2
        self._pressured = sum(1 for sub in self.subscriptions.values() if sub.queued_events > half and not sub.stalled)
        if not self._pressured:
            self._pressured = 1
            self._unpressure()  # wake sources paused by the old length

    def _unpressure(self) -> None:
        self._pressured -= 1
        if not self._pressured and self._relief:
            relief, self._relief = self._relief, []
            loop = asyncio.get_running_loop()
            for callback in relief:
                loop.call_soon(callback)

    @property
    def congested(self) -> bool:
        return self._pressured > 0

    def on_relief(self, callback) -> None:
        if self._pressured:
            self._relief.append(callback)
        else:
            callback()

    def lose(self, sub: Subscription, count: int) -> None:
        sub.lost += count
        tail = sub.queue[-1] if sub.queue else None
        if isinstance(tail, LostMark):
            tail.count += count
        else:
            sub.queue.append(LostMark(count))
            if self.outlet is not None:
                self.outlet.wake(sub)

    def _loss(self, loss: SourceLoss) -> None:
        if loss.routes is None:
            subs = [s for s in self.subscriptions.values() if s.source == loss.source_name and s.active]
        else:
            subs = {s for r in loss.routes for s in self.subscribers(loss.source_name, r)}
        log.warning("source %s lost %d event(s); %d subscriber(s) told", loss.source_name, loss.count, len(subs),
                    extra={"MESSAGE_ID": journal.EVENTS_LOST})
        for sub in subs:
            self.lose(sub, loss.count)
