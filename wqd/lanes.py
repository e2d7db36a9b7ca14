"""The work ``wqd.hub`` queues in its per-uid lanes, and what it costs.

A lane holds one uid's work in order, as ``[job, subscriptions, how far done]``;
the jobs are ``Fanout`` (one event to the subscriptions of its route, judged once
per distinct decision), ``Lose`` (a loss to count), ``Tally`` (events the lane
could not take, counted per class of equal subscriptions) and ``End``
(subscriptions to end). ``Hub._run`` serves the lanes; see ``wqd.hub`` for the rules.

Why ``Tally``: a uid that holds thousands of equal subscriptions and reads
nothing must not cost O(subscriptions) per event. Equal subscriptions (one
connection, one pooled option set and target: the same filter, the same
judgement) form a class; an event that a lane cannot take is counted once per
class (``Tally.add``, O(classes)), and each subscription is told its own exact
count (``Tally.apply``) once, however many events were counted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from wqd.budgets import event_bytes
from wqd.events import Event
from wqd.peer import PeerCredentials

if TYPE_CHECKING:
    from wqd.hub import Hub
    from wqd.subscription import Subscription

SLICE = 1024  # subscriptions judged and queued per turn of the event loop (wqd.hub)
LANE_BEHIND = SLICE  # subscriptions waiting in one uid's lane that make it "behind"
LANE_GRACE = 0.0  # seconds a lane may be behind and still hold the sources back: none (p7, wqd.hub)
LANE_JOBS = 256  # events a lane behind keeps waiting; beyond, they are lost for it
LANE_JOBS_MAX = 4096  # ... and with more work than this waiting, it holds the sources back again


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
    (``Tally``). It is served again when one of them reads (``Hub.pause``)."""

    __slots__ = ("jobs", "steps", "behind_since", "told", "parked", "classes")

    def __init__(self) -> None:
        self.jobs: deque = deque()
        self.steps = 0  # subscriptions waiting
        self.behind_since: float | None = None
        self.told = False
        self.parked = False
        self.classes: tuple | None = None  # (subscriptions, their classes): ``classes_of``, for the last list

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

    def classes_of(self, subs: list) -> tuple[list[int], list]:
        """(class of each position of *subs*, one representative per class), kept for the
        last list asked about: the route tables' snapshots are the same list from event
        to event, so a lane that tallies event after event classifies once."""
        kept = self.classes
        if kept is not None and kept[0] is subs:
            return kept[1], kept[2]
        index: dict = {}
        of: list[int] = []
        reps: list = []
        for sub in subs:
            key = (id(sub.owner), sub.options_key, sub.target.spec, sub.target.object_id)
            if sub.options_key is None:
                key = id(sub)
            n = index.get(key)
            if n is None:
                n = index[key] = len(reps)
                reps.append(sub)
            of.append(n)
        self.classes = (subs, of, reps)
        return of, reps


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
    in its place in the queue."""

    __slots__ = ("of", "reps", "counts")

    def __init__(self, of: list[int], reps: list) -> None:
        self.of = of
        self.reps = reps
        self.counts = [0] * len(reps)

    def add(self, fanout: Fanout) -> None:
        event, accepts, counts = fanout.event, fanout.source.accepts, self.counts
        for n, rep in enumerate(self.reps):
            try:
                seen = accepts(rep, event) and fanout.judged(rep.owner)[1] is not None
            except Exception:  # a filter or policy that raised: lost for them, as in ``Hub._run``
                seen = True
            if seen:
                counts[n] += 1

    def apply(self, hub: Hub, subs: list[Subscription], start: int, stop: int) -> None:
        of, counts = self.of, self.counts
        for i in range(start, stop):
            n = counts[of[i]]
            if n and subs[i].active:
                hub.lose(subs[i], n)


class End:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def apply(self, hub: Hub, subs: list[Subscription], start: int, stop: int) -> None:
        for i in range(start, stop):
            hub.end(subs[i], self.reason)
