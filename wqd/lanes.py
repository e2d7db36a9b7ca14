"""The work ``wqd.hub`` queues in its per-uid lanes, and what it costs.

A lane holds one uid's work in order, as ``[job, subscriptions, how far done]``;
the jobs are ``Fanout`` (one event to the subscriptions of its route, judged once
per distinct decision), ``Lose`` (a loss to count), ``Tally`` (events the lane
could not take, counted per class of equal subscriptions) and ``End``
(subscriptions to end). ``Lanes`` holds them and serves them round-robin, for
``wqd.hub`` (see there for the rules).

Why ``Tally``: a uid that holds thousands of equal subscriptions and reads
nothing must not cost O(subscriptions) per event. Equal subscriptions (one
connection, one pooled option set and target: the same filter, the same
judgement) form a class; an event that a lane cannot take is counted once per
class (``Tally.add``, O(classes)), and each subscription is told its own exact
count (``Tally.apply``) once, however many events were counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from wqd import journal
from wqd.budgets import event_bytes
from wqd.events import Event
from wqd.peer import PeerCredentials

if TYPE_CHECKING:
    from wqd.hub import Hub
    from wqd.subscription import Subscription

log = logging.getLogger("wqd.hub")  # what the lanes log is the hub's (journal filters and tests know it so)

QUANTUM = 64  # subscriptions of one uid's lane served before the next uid's turn
SLICE = 1024  # subscriptions judged and queued per turn of the event loop (wqd.hub)
TURN = 0.0005  # ... or this many seconds of it, whichever comes first: a slice of cheap steps
# (a count per full queue, ~0.2 us) or of dear ones (a first enqueue, ~4 us) is
# then the same short wait for the next uid's event, or a method call (p7)
LANE_BEHIND = 1024  # subscriptions waiting in one uid's lane that make it "behind"
LANE_GRACE = 0.0  # seconds a lane may be behind and still hold the sources back: none (p7, wqd.hub)
LANE_JOBS = 256  # events a lane behind keeps waiting; beyond, they are lost for it
LANE_JOBS_MAX = 4096  # ... and with more work than this waiting, it holds the sources back again
CLASSIFY_SLICE = 1024  # subscriptions a lane on its way to a Tally classifies per turn of the loop
LANE_RECHECK = 0.02  # seconds a lane parked behind the outlet waits at most before it looks again


@dataclass(slots=True)
class LostMark:
    """In a subscriber's queue: *count* events lost here."""

    count: int


# -- the work in the lanes ------------------------------------------------------


def kit_of(policy, source) -> tuple:
    """What a ``Fanout`` needs of the policy stack and the source, looked up once."""
    return (policy.post, getattr(policy, "decision_key", None), getattr(source, "shape", None),
            getattr(source, "shape_key", None))


class Fanout:
    """One event on its way to the subscriptions of its route: judged once per
    distinct decision (``PolicyStack.decision_key``), shaped once per distinct
    shape (``Source.shape_key``), shared by every lane it is in."""

    __slots__ = ("event", "source", "post", "key_of", "shape", "shape_key", "by_peer", "by_key", "shaped", "sizes")

    def __init__(self, event: Event, source, kit: tuple) -> None:
        """*kit*: (post, decision_key or None, shape or None, shape_key or None), from ``kit_of``."""
        self.event = event
        self.source = source
        self.post, self.key_of, self.shape, self.shape_key = kit
        self.by_peer: dict[int, tuple] = {}  # id(owner) -> (owner, judged copy or None, its size)
        self.by_key: dict | None = None  # decision key -> judged copy or None (made when needed)
        self.shaped: dict | None = None  # (id(judged copy), shape key) -> shaped copy
        self.sizes: dict[int, tuple] | None = None  # id(copy) -> (copy, estimated bytes)

    def judged(self, owner: PeerCredentials) -> tuple:
        """(owner, the event as *owner* may see it or None, its estimated size: 0 for root)."""
        cached = self.by_peer.get(id(owner))
        if cached is not None and cached[0] is owner:
            return cached
        event = self.event
        key = self.key_of(owner, event) if self.key_of is not None else None
        if key is None:
            seen = self.post(owner, event)
        else:
            by_key = self.by_key
            if by_key is None:
                by_key = self.by_key = {}
            if key in by_key:
                seen = by_key[key]
            else:
                seen = by_key[key] = self.post(owner, event)
        size = 0 if seen is None or not owner.uid else self.size(seen)
        cached = self.by_peer[id(owner)] = (owner, seen, size)
        return cached

    def size(self, copy: Event) -> int:
        sizes = self.sizes
        if sizes is None:
            sizes = self.sizes = {}
        cached = sizes.get(id(copy))
        if cached is None or cached[0] is not copy:
            cached = sizes[id(copy)] = (copy, event_bytes(copy))
        return cached[1]

    def apply(self, hub: Hub, subs: list[Subscription], start: int, stop: int) -> None:
        event, accepts, shape, shape_key = self.event, self.source.accepts, self.shape, self.shape_key
        enqueue, lose, full, by_peer = hub.enqueue, hub.lose, hub.limits.queue_length, self.by_peer
        for i in range(start, stop):
            sub = subs[i]
            if not sub.active or not accepts(sub, event):
                continue
            if sub.queued_events >= full:  # the common case of a peer that does not read: count, no more
                queue = sub._queue
                if queue and type(queue[-1]) is LostMark:
                    queue[-1].count += 1
                    sub.lost += 1
                else:
                    lose(sub, 1)
                continue
            owner = sub.owner
            judged = by_peer.get(id(owner))
            if judged is None or judged[0] is not owner:
                judged = self.judged(owner)
            seen = judged[1]
            if seen is None:
                continue
            if shape is None:
                enqueue(sub, seen, judged[2])
                continue
            if shape_key is None:
                seen = shape(sub, seen)
            else:
                k = (id(seen), shape_key(sub))
                cache = self.shaped
                if cache is None:
                    cache = self.shaped = {}
                shaped = cache.get(k)
                if shaped is None:
                    shaped = cache[k] = shape(sub, seen)
                seen = shaped
            enqueue(sub, seen, self.size(seen) if owner.uid else 0)


class Lane:
    """One uid's work, in order: [job, subscriptions, how far done].

    *parked*: every subscription of the uid is paused (its peers read nothing) and
    the lane is behind, so it is not served (what it would queue could not be sent
    anyway) and does not hold the sources back; what it cannot keep is tallied
    (``Tally``). It is served again when one of them reads (``Hub.pause``).

    *need*: parked behind the outlet instead (``Hub.behind_everywhere``: every
    subscription of the uid paused or still holding something to send), the number
    of them that must be sent their queue (or be paused) before it is served again;
    *recheck*: the timer after which it is served again anyway."""

    __slots__ = ("jobs", "steps", "behind_since", "told", "parked", "classes", "classifying", "where", "need",
                 "recheck")

    def __init__(self) -> None:
        self.jobs: deque = deque()
        self.steps = 0  # subscriptions waiting
        self.behind_since: float | None = None
        self.told = False
        self.parked = False
        self.classes: tuple | None = None  # (subscriptions, their classes): ``classes_of``, for the last list
        self.classifying: list | None = None  # ``classify`` under way: [subscriptions, index, of, reps, done]
        self.where: tuple | None = None  # (subscriptions, id(subscription) -> class): ``class_in``, one list
        self.need = 0
        self.recheck: asyncio.TimerHandle | None = None

    def account(self, now: float) -> None:
        if self.steps > LANE_BEHIND:
            if self.behind_since is None:
                self.behind_since = now
        else:
            self.behind_since = None
            self.told = False

    def hogging(self, now: float) -> bool:
        return self.behind_since is not None and now - self.behind_since >= LANE_GRACE

    def holds(self, now: float) -> bool:
        """Whether this lane holds the sources back: any work waiting does, unless
        the lane has been behind for longer than the grace (then its excess is lost
        for it instead), up to ``LANE_JOBS_MAX``."""
        if not self.steps:
            return False
        if len(self.jobs) > LANE_JOBS_MAX:
            return True
        return not self.parked and not self.hogging(now)

    def classes_of(self, subs: list) -> tuple[list[int], list, dict]:
        """(class of each position of *subs*, one representative per class, class key ->
        class), kept for the last list asked about: the route tables' snapshots are the
        same list from event to event, so a lane that tallies event after event
        classifies once (and ``Lanes`` begins it, a slice a turn, before it is needed)."""
        self.classify(subs, len(subs))
        kept = self.classes
        return kept[1], kept[2], kept[3]

    def classify(self, subs: list, count: int) -> bool:
        """Classify *count* more of *subs*, from where the last call for the same list
        stopped; returns whether all of them are (then ``classes`` is theirs)."""
        kept = self.classes
        if kept is not None and kept[0] is subs:
            return True
        work = self.classifying
        if work is None or work[0] is not subs:
            work = self.classifying = [subs, {}, [], [], 0]
        _, index, of, reps, start = work
        stop = min(len(subs), start + count)
        for i in range(start, stop):
            sub = subs[i]
            key = class_key(sub)
            n = index.get(key)
            if n is None:
                n = index[key] = len(reps)
                reps.append(sub)
            of.append(n)
        work[4] = stop
        if stop < len(subs):
            return False
        self.classes = (subs, of, reps, index)
        self.classifying = None
        return True

    def class_in(self, hub: Hub, tally: Tally, subs: list, sub: Subscription) -> int | None:
        """*sub*'s class in *tally* of *subs*, or None if it is not one of them."""
        route = hub.snapshot_of(subs, tally.source, tally.route, sub.owner.uid)
        if route is not None:
            # *subs* is still the route table's list, so it holds every active subscription
            # of the uid on that route: O(1), not a map of 16,384 positions (p7).
            if sub.source != tally.source or route not in sub.routes:
                return None
            return tally.index.get(class_key(sub))
        where = self.where  # the table changed since: a map, once per list (one list a lane: ``Lanes.settle``)
        if where is None or where[0] is not subs:
            of = tally.of
            where = self.where = (subs, {id(s): of[i] for i, s in enumerate(subs)})
        return where[1].get(id(sub))


def class_key(sub: Subscription):
    """What makes subscriptions equal for a ``Tally``: one connection, one pooled option
    set and target (the same filter, the same judgement); an ended one is its own.

    (A shared object per class, hashed by identity, made ``Lane.classes_of`` 3x faster,
    3-4 ms instead of ~10 for 16,384 subscriptions, once per stall episode; it cost
    ~180 bytes per subscription whose class is its own, as most are: p5 1,871 against
    1,673-1,705 bytes, session 10. Not kept.)"""
    if sub.options_key is None:
        return id(sub)
    target = sub.target
    return (id(sub.owner), sub.options_key, target.spec, target.object_id)


class Lose:
    __slots__ = ("count", "private")

    def __init__(self, count: int, private: bool = False) -> None:
        self.count = count
        self.private = private  # one lane's own (events it could not take), may grow

    def apply(self, hub: Hub, subs: list[Subscription], start: int, stop: int) -> None:
        for i in range(start, stop):
            if subs[i].active:
                hub.lose(subs[i], self.count)


class Tally:
    """Events a lane could not take, counted per class of equal subscriptions
    (``Lane.classes_of``): an event counts for a class when its representative's
    filter accepts it and the policy lets its owner see it, the two things that
    would have queued it. Applied, each subscription loses its class's count,
    in its place in the queue; *settled* (``Lanes.settle``), one subscription
    loses its count so far at once, alone, and later only what was counted since."""

    __slots__ = ("of", "reps", "index", "source", "route", "counts", "settled")

    def __init__(self, of: list[int], reps: list, index: dict, source: str, route) -> None:
        self.of = of
        self.reps = reps
        self.index = index  # class key -> class
        self.source, self.route = source, route  # of the events: where the subscriptions came from
        self.counts = [0] * len(reps)
        self.settled: dict[int, int] | None = None  # id(subscription) -> what it has been told of

    def add(self, fanout: Fanout) -> None:
        event, accepts, counts = fanout.event, fanout.source.accepts, self.counts
        for n, rep in enumerate(self.reps):
            try:
                seen = accepts(rep, event) and fanout.judged(rep.owner)[1] is not None
            except Exception:  # a filter or policy that raised: lost for them, as in ``Lanes.run``
                seen = True
            if seen:
                counts[n] += 1

    def apply(self, hub: Hub, subs: list[Subscription], start: int, stop: int) -> None:
        of, counts, settled = self.of, self.counts, self.settled
        for i in range(start, stop):
            n = counts[of[i]]
            if n and subs[i].active:
                if settled is not None:
                    n -= settled.get(id(subs[i]), 0)
                    if n <= 0:
                        continue
                hub.lose(subs[i], n)

    def settle(self, hub: Hub, sub: Subscription, n: int) -> None:
        """Tell *sub*, of class *n* (``Lane.class_in``), its count so far, less what it was
        told before."""
        count = self.counts[n]
        settled = self.settled
        if settled is None:
            settled = self.settled = {}
        told = settled.get(id(sub), 0)
        if count > told:
            settled[id(sub)] = count
            hub.lose(sub, count - told)


class End:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def apply(self, hub: Hub, subs: list[Subscription], start: int, stop: int) -> None:
        for i in range(start, stop):
            hub.end(subs[i], self.reason)


# -- serving the lanes ------------------------------------------------------------


class Lanes:
    """Every uid's lane of fan-out work, served round-robin, ``QUANTUM`` subscriptions
    a turn and at most ``SLICE`` per turn of the event loop (``wqd.hub``'s rules).
    A lane whose uid reads nothing (``Hub.reads_none``) and that is behind is parked:
    taken out of the turns until ``unpark``."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.lanes: dict[int, Lane] = {}  # uid -> work not done yet
        self.turns: deque[int] = deque()  # uids with an unparked lane, in round-robin order
        self.backlog = 0  # subscriptions waiting in the lanes
        self.budget = SLICE  # left for this turn of the loop
        self.started: float | None = None  # when this turn's first step was taken
        self.tick: asyncio.Handle | None = None
        self.running = False
        self.waiting: set[int] = set()  # uids whose lane is parked behind the outlet (``eased``)

    def now(self, job: Fanout, groups: dict[int, list[Subscription]]) -> bool:
        """Do *job* at once for its one uid if nothing waits and it is small (within a
        quantum and this turn's budget); returns whether it did."""
        (uid, subs), = groups.items()
        if self.turns or self.running or uid in self.lanes or len(subs) > min(QUANTUM, self.budget):
            return False
        self.running = True
        try:
            job.apply(self.hub, subs, 0, len(subs))
        except Exception:
            log.exception("delivering to uid %d failed; the event is lost for it", uid)
            for sub in subs:
                if sub.active:
                    self.hub.lose(sub, 1)
        finally:
            self.running = False
        self.budget -= len(subs)
        self._schedule()
        return True

    def queue(self, groups: dict[int, list[Subscription]], job) -> None:
        lanes, turns = self.lanes, self.turns
        now = time.monotonic()
        for uid, subs in groups.items():
            lane = lanes.get(uid)
            if lane is None:
                lane = lanes[uid] = Lane()
                turns.append(uid)
            if (isinstance(job, Fanout) and (lane.parked or lane.steps > LANE_BEHIND)
                    and self.hub.stalls_all(uid)):
                # Parked or behind, and every subscription stalled: unparked, the lane would
                # tally it (``unpark``'s *fold*); tallied now, O(classes) as it comes, instead
                # of the second's worth of events at once when a probe lets the lane go (p7:
                # ~200 events x 5 classes, judged, in one 8 ms turn of the loop), or of a
                # step per subscription for an event that comes while a probe window has
                # the lane unparked (16,384 enqueues, ~55 ms of the loop an event).
                self._tally(lane, subs, job)
                continue
            if isinstance(job, Fanout) and len(lane.jobs) >= LANE_JOBS and lane.hogging(now):
                # This uid's lane has been far behind for a while: what it cannot take is lost
                # for it (told, in place, each subscription its own count), instead of holding
                # everyone's sources back.
                if not lane.told:
                    lane.told = True
                    log.warning("uid %d is far behind (%d subscriptions waiting): its subscriptions lose events "
                                "until it catches up", uid, lane.steps,
                                extra={"MESSAGE_ID": journal.EVENTS_LOST, "peer_uid": uid})
                self._tally(lane, subs, job)
                continue
            lane.jobs.append([job, subs, 0])
            lane.steps += len(subs)
            self.backlog += len(subs)
            lane.account(now)
            if len(lane.jobs) >= LANE_JOBS // 4 and len(subs) > CLASSIFY_SLICE and lane.behind_since is not None:
                self._classify_soon(uid, lane, subs)  # on its way to a Tally: classes ready by then

    def _classify_soon(self, uid: int, lane: Lane, subs: list[Subscription]) -> None:
        """Classify *subs* for *lane* ``CLASSIFY_SLICE`` a turn of the loop, before its
        first ``Tally`` needs it: at once it was one turn of 9-14 ms for 16,384 equal
        subscriptions (p7: the storm's worst event, when ``LANE_JOBS`` was reached)."""
        kept, work = lane.classes, lane.classifying
        if (kept is not None and kept[0] is subs) or (work is not None and work[0] is subs):
            return
        lane.classifying = [subs, {}, [], [], 0]
        asyncio.get_running_loop().call_soon(self._classify, uid, lane, subs)

    def _classify(self, uid: int, lane: Lane, subs: list[Subscription]) -> None:
        work = lane.classifying
        if self.lanes.get(uid) is not lane or work is None or work[0] is not subs:
            return  # done (a Tally needed it first), or the lane or its list has gone
        if not lane.classify(subs, CLASSIFY_SLICE):
            asyncio.get_running_loop().call_soon(self._classify, uid, lane, subs)

    def _tally(self, lane: Lane, subs: list[Subscription], job: Fanout) -> None:
        """Count *job*'s event as lost for *subs* in the ``Tally`` at the end of *lane*,
        or in a new one there (O(classes), not O(subscriptions))."""
        jobs = lane.jobs
        last = jobs[-1] if jobs else None
        if last is None or type(last[0]) is not Tally or last[1] is not subs or last[2] != 0:
            last = [Tally(*lane.classes_of(subs), job.event.source, job.event.route), subs, 0]
            jobs.append(last)
            lane.steps += len(subs)
            self.backlog += len(subs)
            lane.account(time.monotonic())
        last[0].add(job)

    def run(self) -> None:
        """Serve the lanes round-robin until this turn's budget is spent."""
        if self.running:
            return  # called back from within (a source dispatching while detaching, ...)
        self.running = True
        hub, lanes, turns = self.hub, self.lanes, self.turns
        started = self.started
        if started is None and turns:
            started = self.started = time.monotonic()
        try:
            while turns and self.budget > 0:
                uid = turns[0]
                lane = lanes[uid]
                jobs = lane.jobs
                if lane.steps > LANE_BEHIND and hub.reads_none(uid):
                    lane.parked = True  # nothing it queued could be sent: wait for a reader (``Hub.pause``)
                    turns.popleft()
                    continue
                quantum = min(QUANTUM, self.budget)
                need = None
                while jobs and quantum > 0:
                    work = jobs[0]
                    job, subs, pos = work
                    if pos == 0 and type(job) is Fanout and lane.steps > LANE_BEHIND:
                        need = hub.behind_everywhere(uid, subs)  # an event's start: can the outlet take it?
                        if need is not None:
                            break
                    stop = min(len(subs), pos + quantum)
                    try:
                        job.apply(hub, subs, pos, stop)
                    except Exception:  # a source's filter or shape raised: the daemon lives on
                        log.exception("delivering to uid %d failed; the rest of this event is lost for it", uid)
                        stop = len(subs)
                        for sub in subs[pos:]:
                            if sub.active:
                                hub.lose(sub, 1)
                    done = stop - pos
                    quantum -= done
                    self.budget -= done
                    self.backlog -= done
                    lane.steps -= done
                    if stop >= len(subs):
                        jobs.popleft()
                    else:
                        work[2] = stop
                if need is not None:
                    self._wait(uid, lane, need)
                elif not jobs:
                    del lanes[uid]
                    turns.popleft()
                else:
                    lane.account(time.monotonic())
                    turns.rotate(-1)
                if time.monotonic() - started >= TURN:
                    self.budget = 0
        finally:
            self.running = False
        if turns or self.budget < SLICE:
            self._schedule()
        hub._relieve()

    def _schedule(self) -> None:
        if self.tick is None:
            self.tick = asyncio.get_running_loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self.tick = None
        self.budget = SLICE
        self.started = None
        if self.turns:
            self.run()

    def _wait(self, uid: int, lane: Lane, need: int) -> None:
        """Park *lane*, at the head of the turns, until the outlet has sent *need* of
        its subscriptions what they hold (``eased``), or ``LANE_RECHECK`` at most.

        Why: the first events of a storm reach a uid that has stopped reading before
        the outlet knows it (until each connection has its budget, ``START_BUDGET`` at first, unread;
        p7: ~1,700 signals), and queueing event after event for thousands of
        subscriptions that have not been sent the last one yet costs the loop a step
        each (p7: ~15 events x 4,096) for nothing that can go out sooner. Waiting in
        the lane, in order, the events cost one step each, and become a ``Tally`` if
        the uid then turns out to read nothing."""
        self.turns.popleft()
        lane.parked = True
        lane.need = max(1, min(need, LANE_BEHIND))
        self.waiting.add(uid)
        lane.recheck = asyncio.get_running_loop().call_later(LANE_RECHECK, self.unpark, uid, False)

    def eased(self, uid: int, count: int = 1) -> None:
        """*count* subscriptions of *uid*, whose lane waits for the outlet, were sent all
        they held (or paused): that many fewer to wait for."""
        lane = self.lanes.get(uid)
        if lane is None or not lane.parked or not lane.need:
            self.waiting.discard(uid)
            return
        lane.need = max(0, lane.need - count)
        if not lane.need:
            self.unpark(uid, False)

    def settle(self, uid: int, sub: Subscription) -> bool:
        """*sub*, one of *uid*'s whose parked lane holds only counts (``Tally``; events
        not begun are tallied first, as ``unpark``'s *fold* does), is told its part of
        them at once, alone; the lane stays parked. False when the lane is not parked,
        or holds other work or tallies of more than one list (then it must be served,
        ``unpark``: each list's map would be O(subscriptions) of memory, and a uid that
        changes its table between events would make one per event).

        Why: a probe window lets go ``PROBE_SUBS`` of a stalled peer's subscriptions a
        period (``wqd.bus.credit``); unparking the lane for them applied its tallies to
        every subscription of the uid (p7: 16,384 ``hub.lose`` a probe, ~16 turns of the
        loop each second that the other uids' events waited behind). Settled, each costs
        O(its lane's jobs); the rest are told theirs when they are let go in their turn,
        or all at once when the uid reads again (``Tally.apply``, less what was told)."""
        lane = self.lanes.get(uid)
        if lane is None or not lane.parked:
            return False
        jobs = lane.jobs
        for work in jobs:
            if type(work[0]) is not Tally or work[2]:
                self._fold(lane)
                jobs = lane.jobs
                if any(type(work[0]) is not Tally or work[2] for work in jobs):
                    return False
                break
        if not jobs or not sub.active:
            return True
        subs = jobs[0][1]
        if any(work[1] is not subs for work in jobs):
            return False
        hub = self.hub
        n = lane.class_in(hub, jobs[0][0], subs, sub)
        if n is not None:
            for job, _subs, _pos in jobs:
                job.settle(hub, sub, n)
        return True

    def unpark(self, uid: int, fold: bool) -> None:
        """Serve *uid*'s parked lane again; with *fold*, tally what it holds first."""
        lane = self.lanes.get(uid)
        if lane is None or not lane.parked:
            return
        lane.parked = False
        if lane.recheck is not None:
            lane.recheck.cancel()
            lane.recheck = None
        lane.need = 0
        self.waiting.discard(uid)
        if fold:
            self._fold(lane)
        self.turns.append(uid)
        self._schedule()

    def _fold(self, lane: Lane) -> None:
        """Tally every event *lane* holds for whole subscription lists (in order: a
        ``Lose`` or ``End`` between them stays where it is)."""
        jobs, lane.jobs = lane.jobs, deque()
        for work in jobs:
            job, subs, pos = work
            if type(job) is Fanout and pos == 0:
                lane.steps -= len(subs)
                self.backlog -= len(subs)
                self._tally(lane, subs, job)
            else:
                lane.jobs.append(work)

    def holds(self) -> bool:
        """Whether work waiting in a lane holds the sources back (``Lane.holds``)."""
        if not self.backlog:
            return False
        now = time.monotonic()
        return any(lane.holds(now) for lane in self.lanes.values())
