"""Subscriptions, routing and per-subscriber queues.

Data flow: a source emits an ``Event`` -> the hub finds the subscriptions on its
route -> the source's per-subscription filter -> ``policy.post(peer, event)`` ->
the subscriber's bounded queue -> the outlet (the bus emitter) drains it.

A full queue drops the event, counts it in ``lost`` and leaves a ``LostMark`` in
the queue, so the subscriber is told ``Lost(n)`` exactly where the gap is.

Fan-out (what one event costs). ``dispatch`` does not judge and queue per
subscriber on the spot. The subscriptions on the event's route are taken as they
are (per uid: the route table is kept per uid), and the work is queued in one
*lane* per uid. Lanes are served round-robin, ``QUANTUM`` subscriptions a turn and
at most ``SLICE`` (or ``TURN`` seconds of them) per turn of the event loop, so method calls are answered during
any fan-out, and one uid's thousands of subscriptions cannot starve another uid's
one: that one waits for at most one quantum of each other uid per event. The work
in each lane stays in order, so each subscription still gets its events in order,
and losses (``SourceLoss``) and removals (``TargetGone``) queue in
the same lanes, behind the events before them. While work waits in a lane the
hub is ``congested``, as with a queue more than half full: the sources stop
reading the kernel (which reports its own overflow its own way) until it is
done, so what waits in wqd is what one read of a source dispatched, and nothing
is lost silently. Except for a lane that is *behind* (more than ``wqd.lanes.LANE_BEHIND``
subscriptions waiting: a uid with more subscriptions on one route than a turn
of the loop can serve): it does not hold the sources back, or every other uid
would wait for it; it keeps up to ``LANE_JOBS`` events waiting, and what comes
beyond is counted ``Lost`` for its own subscriptions, in place (logged once per
episode). A uid's subscriptions cost the others at most a quantum per turn.
(The lanes and their service are ``wqd.lanes.Lanes``.)

Parked lanes. A lane that is behind, of a uid whose every subscription is paused
by the outlet (its peers read nothing: ``wqd.bus.credit``), is parked (``pause``):
not served, not holding the sources back; its events wait in it and, beyond
``LANE_JOBS``, are tallied per class of equal subscriptions (``wqd.lanes.Tally``),
O(classes) an event instead of a step per subscription (p7: 4,096 stopped
subscriptions made each event cost ~16 ms of the loop). It is served again, in
order, when one of them may be sent to (its peer reads, a new subscription that
is not paused, or the last one ends); what it holds when every one of them is
stalled is tallied, so each subscription is told one ``Lost`` with its own exact
count. A probe window (of a uid whose every subscription is stalled) does not let
the lane go: each subscription the window lets go is told its count so far, alone
(``settle``, O(the lane's jobs)), and the rest theirs in their turn or when the
uid reads again (p7: applying the tallies to all 16,384 subscriptions at each probe
was ~16 turns of the loop a second that the other uids' events waited behind).
While every one of them is stalled an event
that reaches the lane, parked or behind, is tallied as it comes (O(classes) an
event, not the probe period's worth at once when a probe lets the lane go: p7, 200
events x 5 classes judged in one 8 ms turn of the loop; nor a step per
subscription for each event that comes while a probe window has it unparked). Pausing and stalling a connection's
subscriptions is one step for all of them (``pause_all``, ``stall_all``). Until then a parked subscription's ``Lost``
counts lag behind (its ``Lost`` property, read, is settled first). A uid with one
connection that reads keeps its lane unparked, and costs as before.

A lane that is behind also waits, parked, while the outlet is behind that uid
everywhere (``behind_everywhere``: every subscription of the uid is paused or
still holds something unsent when the lane's next event comes up): the first
events of a storm reach a uid that stopped reading before the outlet knows it,
and queueing each for thousands of subscriptions that have not been sent the
last one yet costs the loop a step each for nothing that could go out sooner.
It is served again, in order, once the outlet has sent that many of them their
queue (or paused them), or after ``wqd.lanes.LANE_RECHECK`` at most.

The judging is shared: the policy stack's ``decision_key(peer, event)`` says
what its ``post`` depends on for that event (see ``wqd.policy``), and subscribers
whose keys are equal get one judged (redacted) copy, judged once per event; a
source's ``shape_key(sub)`` does the same for its per-subscription trimming
(``shape``). So one event costs ``post`` once per *distinct* decision and a dict
look-up per subscriber. A policy that declares no key is asked per peer.

Budgets. Besides the counts (per connection, per uid, in all), each uid but root
has ``Limits.bytes_per_uid`` for what wqd keeps on its behalf: its subscriptions,
their option sets (pooled) and their queued events, accounted in ``wqd.budgets``.
A Watch that would go beyond it answers ``LimitsExceeded``; an event that would
is lost (``Lost``) for that subscription, like on a full queue.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol

from wqd import journal
from wqd.budgets import SUBSCRIPTION_BYTES, Budgets, Releases
from wqd.errors import AccessDenied, InvalidArgument, LimitsExceeded, NoSuchObject, NotSupported
from wqd.events import Event, SourceLoss, TargetGone
from wqd.lanes import End, Fanout, Lanes, Lose, LostMark, kit_of
from wqd.peer import PeerCredentials
from wqd.policy import PolicyStack
from wqd.subscription import ANY, Source, Subscription

log = logging.getLogger(__name__)



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
    bytes_per_uid: int = 64 << 20  # options, targets and queued events of one uid but root (see module doc)


class Outlet(Protocol):
    def added(self, sub: Subscription) -> None:
        """*sub* is new: paused at once if its peer is (``Hub.pause``), so a peer that
        reads nothing cannot unpark its uid's lane by subscribing again."""

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
        # (source, route) -> uid -> subscriptions: a fan-out is split into per-uid lanes without a pass over them
        self._by_route: dict[tuple[str, Hashable], dict[int, set[Subscription]]] = {}
        self._by_owner: dict[str, set[Subscription]] = {}
        self._per_uid: dict[int, int] = {}  # active subscriptions of each uid
        self._paused: dict[int, int] = {}  # ... of them paused by the outlet (``pause``)
        self._stalled: dict[int, int] = {}  # ... and stalled (``stall``)
        self.budgets = Budgets(self.limits.bytes_per_uid)
        self.releases = Releases(self.budgets)  # what ended subscriptions had queued, given back
        self._pressured = 0  # subscriptions not stalled with a queue more than half full
        self._relief: list = []
        self.work = Lanes(self)  # the fan-out work not done yet, per uid (wqd.lanes)
        self._snaps: dict[tuple, dict[int, list[Subscription]]] = {}  # route -> uid -> snapshot (``_routed``)
        self._kits: dict[str, tuple] = {}  # source -> (policy, what a Fanout needs of it and the source)

    # -- subscribing ------------------------------------------------------

    async def watch(self, peer: PeerCredentials, source_name: str, spec: str, options: dict) -> Subscription:
        source = self.sources.get(source_name)
        if source is None:
            raise InvalidArgument(f"unknown source {source_name!r}; known: {', '.join(sorted(self.sources))}")
        if not source.backend:
            raise NotSupported(f"source {source_name!r} is not available on this system")
        if len(spec.encode()) > self.limits.target_length:
            raise InvalidArgument("target is too long")
        self._check_counts(peer)
        self.budgets.check(peer.uid, SUBSCRIPTION_BYTES + len(spec))
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
        self._check_counts(peer)  # again: other Watch calls of this peer may have been decided meanwhile
        pooled, charge = self.budgets.share(peer.uid, source_name, target, options, spec)
        # Random, never 0, unique among the live ones: the numbers tell nobody how
        # often others subscribe (issue 12). 63 bits: at most 19 digits in the path.
        number = secrets.randbits(63)
        while not number or number in self.subscriptions:
            number = secrets.randbits(63)
        sub = Subscription(number, peer, source_name, target)
        sub.routes = tuple(source.routes(sub))
        attached = source.attach(sub)  # may raise: nothing registered yet
        if inspect.isawaitable(attached):  # keys: arming runs in a credential helper
            await attached
            try:  # it awaited: other calls may have been registered meanwhile
                self._check_counts(peer)
                pooled, charge = self.budgets.share(peer.uid, source_name, target, options, spec)
                if number in self.subscriptions:
                    raise LimitsExceeded("subscription number taken; try again")
            except Exception:
                source.detach(sub)
                raise
        sub.options_key, sub.charge = self.budgets.hold(peer.uid, pooled), charge
        self.subscriptions[sub.number] = sub
        self._by_owner.setdefault(peer.unique_name, set()).add(sub)
        self._per_uid[peer.uid] = self._per_uid.get(peer.uid, 0) + 1
        self.budgets.charge(peer.uid, charge)
        for route in sub.routes:
            self._by_route.setdefault((source_name, route), {}).setdefault(peer.uid, set()).add(sub)
            self._changed((source_name, route), peer.uid)
        if self.outlet is not None:
            self.outlet.added(sub)
        self._unpark(peer.uid)  # not paused (its peer reads): the uid's events must flow again
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

    # -- budgets ----------------------------------------------------------

    def _check_counts(self, peer: PeerCredentials) -> None:
        if len(self._by_owner.get(peer.unique_name, ())) >= self.limits.subscriptions_per_peer:
            raise LimitsExceeded("too many subscriptions for this connection")
        if peer.uid != 0 and self._per_uid.get(peer.uid, 0) >= self.limits.subscriptions_per_uid:
            raise LimitsExceeded(f"too many subscriptions for uid {peer.uid}")
        if len(self.subscriptions) >= self.limits.subscriptions_total:
            raise LimitsExceeded("too many subscriptions")

    def held_by(self, uid: int) -> int:
        """Bytes charged to *uid* now (0 for root, which is not counted): ``wqd.budgets``."""
        return self.budgets.held_by(uid)

    # -- ending -----------------------------------------------------------

    def end(self, sub: Subscription, reason: str | None = None) -> None:
        """Stop routing to *sub* and release its kernel watch.

        With a *reason* the subscriber is told ``Removed(reason)`` after what is
        already queued; without one (Close, owner left) the queue is dropped.
        """
        if not sub.active:
            return
        if reason is not None:
            self.settle(sub)  # what a parked lane counted for it comes before its Removed
        sub.active = False
        uid = sub.owner.uid
        for route in sub.routes:
            by_uid = self._by_route.get((sub.source, route))
            if by_uid is not None:
                bucket = by_uid.get(uid)
                if bucket is not None:
                    bucket.discard(sub)
                    if not bucket:
                        del by_uid[uid]
                        if not by_uid:
                            del self._by_route[(sub.source, route)]
                self._changed((sub.source, route), uid)
        owned = self._by_owner.get(sub.peer)
        if owned is not None:
            owned.discard(sub)
            if not owned:
                del self._by_owner[sub.peer]
        left = self._per_uid.get(uid, 0) - 1
        if left > 0:
            self._per_uid[uid] = left
        else:
            self._per_uid.pop(uid, None)
        if sub.paused:
            self._count(self._paused, uid, -1)
        if sub.stalled:
            self._count(self._stalled, uid, -1)
        self._unpark(uid)  # (its last one ended: the lane must not wait for a reader that is gone)
        self.budgets.charge(uid, -sub.charge)
        sub.charge = 0
        self.budgets.release(uid, sub.options_key)
        sub.options_key = None
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
        uid = sub.owner.uid
        if uid and sub.queued_events:
            self.releases.add(uid, sub._queue)  # given back a slice a turn of the loop (wqd.budgets.Releases)
        elif sub._queue:
            sub._queue.clear()
        sub._queue = None
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

    def _routed(self, source: str, route: Hashable) -> dict[int, list[Subscription]]:
        """uid -> the subscriptions on *route* (and on ``ANY``) now. Where one table
        serves, the lists are its kept snapshots (made again when it changes): the
        same list from event to event, never to be modified."""
        found = self._by_route.get((source, route))
        any_ = self._by_route.get((source, ANY))
        if not (found and any_):
            table = found or any_
            if not table:
                return {}
            key = (source, route) if found else (source, ANY)
            snaps = self._snaps.get(key)
            if snaps is None:
                snaps = self._snaps[key] = {}
            out = {}
            for uid, subs in table.items():
                snap = snaps.get(uid)
                if snap is None:
                    snap = snaps[uid] = list(subs)
                out[uid] = snap
            return out
        out = {}
        for table in (found, any_):
            for uid, subs in table.items():
                have = out.get(uid)
                if have is None:
                    out[uid] = list(subs)
                else:
                    have.extend(subs)
        return out

    def snapshot_of(self, subs: list, source: str, route: Hashable, uid: int) -> Hashable | None:
        """The route (*route* or ``ANY``) of *source* whose kept list of *uid*'s subscriptions
        *subs* still is (nothing was added to or removed from that table since), or None."""
        for key in ((source, route), (source, ANY)):
            snaps = self._snaps.get(key)
            if snaps is not None and snaps.get(uid) is subs:
                return key[1]
        return None

    def _changed(self, key: tuple, uid: int) -> None:
        snaps = self._snaps.get(key)
        if snaps is not None:
            snaps.pop(uid, None)
            if not snaps or key not in self._by_route:
                del self._snaps[key]

    def subscribers(self, source: str, route: Hashable) -> list[Subscription]:
        return [sub for subs in self._routed(source, route).values() for sub in subs]

    def dispatch(self, event: Event) -> None:
        """Entry point for sources (synchronous: runs in the fd's reader callback).

        Queues the work in the lanes of the uids it reaches and does what this turn
        of the loop still allows (``SLICE``); the rest follows in later turns, in order.
        """
        if isinstance(event, SourceLoss):
            if event.routes is None:
                groups: dict[int, list[Subscription]] = {}
                for sub in self.subscriptions.values():
                    if sub.source == event.source_name and sub.active:
                        groups.setdefault(sub.owner.uid, []).append(sub)
            else:
                seen_subs: dict[int, set[Subscription]] = {}
                for route in event.routes:
                    for uid, subs in self._routed(event.source_name, route).items():
                        seen_subs.setdefault(uid, set()).update(subs)
                groups = {uid: list(subs) for uid, subs in seen_subs.items()}
            log.warning("source %s lost %d event(s); %d subscriber(s) told", event.source_name, event.count,
                        sum(len(g) for g in groups.values()), extra={"MESSAGE_ID": journal.EVENTS_LOST})
            self.work.queue(groups, Lose(event.count))
        elif isinstance(event, TargetGone):
            groups = self._routed(event.source_name, event.route)
            if event.object_id:
                groups = {uid: kept for uid, subs in groups.items()
                          if (kept := [s for s in subs if s.target.object_id == event.object_id])}
            self.work.queue(groups, End(event.reason))
        else:
            groups = self._routed(event.source, event.route)
            if not groups:
                return
            source = self.sources[event.source]
            kit = self._kits.get(event.source)
            if kit is None or kit[0] is not self.policy:
                kit = self._kits[event.source] = (self.policy, kit_of(self.policy, source))
            job = Fanout(event, source, kit[1])
            if len(groups) == 1 and self.work.now(job, groups):  # nothing waits, and little to do: done
                return
            self.work.queue(groups, job)
        self.work.run()

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

    def enqueue(self, sub: Subscription, item: Event, size: int = 0) -> None:
        """Queue *item* for *sub*; *size*: its estimated bytes (0: estimated here).

        The owner's uid (not root) is charged for it (``Budgets.queue``: the entry, and
        each distinct copy once however many of its subscriptions hold it) until it is
        taken; one it cannot afford is lost."""
        n = sub.queued_events
        if n >= self.limits.queue_length:
            self.lose(sub, 1)
            return
        uid = sub.owner.uid
        if uid and not self.budgets.queue(uid, item, size):
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
                if not queue and self.work.waiting and sub.owner.uid in self.work.waiting:
                    self.work.eased(sub.owner.uid)
            sub.delivered += 1
            return event
        item = queue.popleft()
        if not queue and self.work.waiting and sub.owner.uid in self.work.waiting:
            self.work.eased(sub.owner.uid)  # its uid's lane waits for the outlet (``Lanes._wait``)
        if isinstance(item, Event):
            n = sub.queued_events
            sub.queued_events = n - 1
            sub.delivered += 1
            if sub.owner.uid:
                self.budgets.unqueue(sub.owner.uid, item)
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
        if sub.active:
            self._count(self._stalled, sub.owner.uid, 1 if stalled else -1)
            if not stalled:
                self._unpark(sub.owner.uid)  # (its peer reads while a probe window has it let go)
        if sub.queued_events > self.limits.queue_length // 2:
            if stalled:
                self._unpressure()
            else:
                self._pressured += 1

    def pause(self, sub: Subscription, paused: bool) -> None:
        """The outlet holds *sub*'s signals back until its peer reads (``paused``), or
        sends them again. When every subscription of a uid is paused, its lane, if it
        is behind, is parked (``Lane``): the events wait there (and beyond
        ``LANE_JOBS`` are tallied) instead of costing a step per subscription each.
        The first of them to be let go unparks it; if every one of them is stalled
        (stopped reading long ago: a probe window lets it go), what the lane holds is
        tallied, and only the one let go is told its part (``settle``); the lane is
        served again when one of them reads."""
        if sub.paused == paused:
            return
        sub.paused = paused
        if not sub.active:
            return
        uid = sub.owner.uid
        self._count(self._paused, uid, 1 if paused else -1)
        if not paused:
            if not self.settle(sub):  # (a probe window: only this one is told, the lane stays parked)
                self._unpark(uid)
        elif uid in self.work.waiting:
            self.work.eased(uid)  # one fewer to wait for: it will not be sent its queue now

    def pause_all(self, peer: str) -> list[Subscription]:
        """``pause(sub, True)`` for every subscription of *peer* (the outlet found it reads
        nothing), in one step; returns them. One step: a connection holds up to
        ``subscriptions_per_peer`` of them, and pausing them one by one (each counted,
        each easing a waiting lane) cost a storm's first contact with a stopped uid ~5 ms
        of the loop a connection (p7: 5 connections, in one turn of the outlet)."""
        subs = list(self._by_owner.get(peer, ()))
        paused = 0
        for sub in subs:
            if not sub.paused:
                sub.paused = True
                paused += sub.active
        if paused:
            uid = subs[0].owner.uid
            self._count(self._paused, uid, paused)
            if uid in self.work.waiting:
                self.work.eased(uid, paused)
        return subs

    def stall_all(self, subs) -> None:
        """``stall(sub, True)`` for each of *subs* (one peer's, paused), in one step."""
        half = self.limits.queue_length // 2
        stalled = pressured = 0
        uid = None
        for sub in subs:
            if sub.stalled:
                continue
            sub.stalled = True
            if sub.active:
                stalled += 1
                uid = sub.owner.uid
            if sub.queued_events > half:
                pressured += 1
        if stalled:
            self._count(self._stalled, uid, stalled)
        for _ in range(pressured):
            self._unpressure()

    def stalls_all(self, uid: int) -> bool:
        """Whether every subscription of *uid* is stalled (``Lanes`` tallies what its parked lane gets)."""
        n = self._per_uid.get(uid, 0)
        return bool(n) and self._stalled.get(uid, 0) >= n

    def settle(self, sub: Subscription) -> bool:
        """If every subscription of *sub*'s uid is stalled and its lane is parked holding
        only counts, tell *sub* alone its part of them (``Lanes.settle``); returns whether
        it did (else what the lane holds reaches *sub* only when the lane is served)."""
        uid = sub.owner.uid
        return self.stalls_all(uid) and self.work.settle(uid, sub)

    def has_work(self, uid: int) -> bool:
        """Whether *uid*'s lane holds work not done yet (parked or not)."""
        lane = self.work.lanes.get(uid)
        return lane is not None and lane.steps > 0

    def reads_none(self, uid: int) -> bool:
        """Whether every subscription of *uid* is paused (``Lanes`` parks its lane then)."""
        return self._paused.get(uid, 0) >= self._per_uid.get(uid, 1)

    def behind_everywhere(self, uid: int, subs: list[Subscription]) -> int | None:
        """Whether *subs* are all of *uid*'s subscriptions and each is paused or still
        holds something for the outlet to send (``Lanes._wait``): then how many are not
        paused; else None. O(len(subs)) at worst, once per event of a lane that is behind,
        and it stops at the first that is idle (a uid that reads). Never without an
        outlet: nothing would drain the queues."""
        if self.outlet is None or len(subs) < self._per_uid.get(uid, 0):
            return None
        waiting = 0
        for sub in subs:
            if not sub.paused:
                if not sub._queue:
                    return None
                waiting += 1
        return waiting

    def _unpark(self, uid: int) -> None:
        """*uid*'s lane, if parked and a subscription of the uid is no longer paused (or
        it has none left), is served again; tallied first if every one is stalled."""
        lane = self.work.lanes.get(uid)
        if lane is None or not lane.parked:
            return
        subs = self._per_uid.get(uid, 0)
        if subs and self._paused.get(uid, 0) >= subs:
            return
        self.work.unpark(uid, fold=self._stalled.get(uid, 0) >= subs)  # none reads: all it holds is lost

    @staticmethod
    def _count(counts: dict[int, int], uid: int, delta: int) -> None:
        n = counts.get(uid, 0) + delta
        if n > 0:
            counts[uid] = n
        else:
            counts.pop(uid, None)

    def set_limits(self, limits: Limits) -> None:
        """New limits (SIGHUP). Subscriptions over a lowered cap stay (new ones are
        refused); a queue longer than a lowered length keeps what it holds and loses
        from then on. Back-pressure is recounted against the new half-way mark."""
        self.limits = limits
        self.budgets.limit = limits.bytes_per_uid
        half = limits.queue_length // 2
        self._pressured = sum(1 for sub in self.subscriptions.values() if sub.queued_events > half and not sub.stalled)
        if not self._pressured:
            self._pressured = 1
            self._unpressure()  # wake sources paused by the old length

    def _unpressure(self) -> None:
        self._pressured -= 1
        if not self._pressured:
            self._relieve()

    def _relieve(self) -> None:
        if self._relief and not self.congested:
            relief, self._relief = self._relief, []
            loop = asyncio.get_running_loop()
            for callback in relief:
                loop.call_soon(callback)

    @property
    def congested(self) -> bool:
        return self._pressured > 0 or self.work.holds()

    def on_relief(self, callback) -> None:
        if self.congested:
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
