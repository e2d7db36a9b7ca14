"""What wqd keeps on each uid's behalf, in bytes, and the pool of option sets.

Issue 11: counts alone (subscriptions per connection, per uid) let one uid take
gigabytes (256 properties of 128 characters per subscription, 16,384 times). So
each uid but root has ``Limits.bytes_per_uid`` (``wqd.hub``) for what wqd keeps
for it:

- per subscription a fixed ``SUBSCRIPTION_BYTES`` plus its target's spec;
- its option set and target details, stored once in a pool however many
  subscriptions (of any uid) hold an equal one, and charged to a uid once however
  many of its subscriptions hold it (``share``, ``hold``, ``release``);
- the events queued for its subscriptions: ``QUEUE_ENTRY_BYTES`` an entry, and
  each distinct copy at its estimated size once (the copy shared by a uid's
  thousand subscriptions is one copy in memory) until the last entry is taken
  (``queue``, ``unqueue``).

A Watch that would go beyond it answers ``LimitsExceeded`` (``check``); an event
that would is lost (``Lost``) for that subscription, like on a full queue. What a
subscription held is given back when it ends. The hub decides when; this module
only keeps the accounts (it knows no subscriptions, lanes or policies).
"""

from __future__ import annotations

import asyncio
from collections import deque

from wqd.errors import LimitsExceeded
from wqd.events import Event, WatchTarget

SUBSCRIPTION_BYTES = 2048  # what a subscription costs besides its target and options (measured: p5)
QUEUE_ENTRY_BYTES = 16  # a queued entry (a deque slot and its share of the block), besides the event itself
RELEASE_SLICE = 4096  # queued entries of ended subscriptions given back per turn of the loop (``Releases``)


class Budgets:
    """Bytes charged per uid (root is not counted), against *limit* each."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # Limits.bytes_per_uid; the hub sets it again on SIGHUP
        self._held: dict[int, int] = {}  # uid -> bytes charged
        # canonical option set -> [the target details' frozensets, bytes, refs, the key itself]
        self.pool: dict[tuple, list] = {}
        self._uid_sets: dict[tuple[int, tuple], int] = {}  # (uid, option set) -> its subscriptions holding it
        self._copies: dict[tuple[int, int], list] = {}  # (uid, id(event)) -> [entries queued, bytes charged]

    def held_by(self, uid: int) -> int:
        """Bytes charged to *uid* now (0 for root)."""
        return self._held.get(uid, 0)

    def check(self, uid: int, more: int) -> None:
        if uid != 0 and self._held.get(uid, 0) + more > self.limit:
            raise LimitsExceeded(f"uid {uid} holds its share of wqd's memory ({self.limit} bytes)")

    def charge(self, uid: int, amount: int) -> None:
        """Add *amount* (negative: give back) to what *uid* holds."""
        if uid == 0 or not amount:
            return
        left = self._held.get(uid, 0) + amount
        if left > 0:
            self._held[uid] = left
        else:
            self._held.pop(uid, None)

    # -- the pool of option sets -------------------------------------------------

    def share(self, uid: int, source: str, target: WatchTarget, options: dict, spec: str) -> tuple[list, int]:
        """The pool's entry for this option set and target (made if new, not held yet),
        with *target*'s details made the pool's frozensets (the caller's copies are let
        go with the call), and the bytes to charge for the subscription itself. Raises
        ``LimitsExceeded`` when *uid* cannot afford both. Nothing is held until ``hold``.

        The options themselves are not kept (the source has read them into the
        target); their size is charged still, as it always was: what the source made
        of them is of their order."""
        extra = target.details()
        key = (source, canonical(options), canonical(extra))
        entry = self.pool.get(key)
        if entry is None:
            entry = [{k: v for k, v in extra.items() if isinstance(v, frozenset)},
                     size_of(options) + size_of(extra), 0, key]
        shared_extra, size, _refs, key = entry  # the pool's key: this call's copies are let go
        charge = SUBSCRIPTION_BYTES + len(spec)
        self.check(uid, charge + (0 if (uid, key) in self._uid_sets else size))
        target.share(shared_extra)
        return entry, charge

    def hold(self, uid: int, entry: list) -> tuple:
        """Hold the pool *entry* for a subscription of *uid* (charged once per uid);
        returns its key, for ``release``."""
        key = entry[3]
        entry = self.pool.setdefault(key, entry)  # (an equal one may have come and gone meanwhile)
        entry[2] += 1
        n = self._uid_sets.get((uid, key), 0)
        if not n:
            self.charge(uid, entry[1])
        self._uid_sets[(uid, key)] = n + 1
        return key

    def release(self, uid: int, key: tuple | None) -> None:
        if key is None:
            return
        entry = self.pool.get(key)
        if entry is None:
            return
        n = self._uid_sets.get((uid, key), 0) - 1
        if n > 0:
            self._uid_sets[(uid, key)] = n
        else:
            self._uid_sets.pop((uid, key), None)
            self.charge(uid, -entry[1])
        entry[2] -= 1
        if entry[2] <= 0:
            del self.pool[key]

    # -- queued events ---------------------------------------------------------

    def queue(self, uid: int, item, size: int = 0) -> bool:
        """Charge *uid* (not root) for one more queued entry of *item* (*size*: its
        estimated bytes, 0: estimated here); False, charging nothing, if it cannot
        afford it."""
        held = self._held.get(uid, 0)
        key = (uid, id(item))
        copy = self._copies.get(key)
        if copy is None:
            if not size:
                size = event_bytes(item)
            cost = QUEUE_ENTRY_BYTES + size
        else:
            cost = QUEUE_ENTRY_BYTES
        if held + cost > self.limit:
            return False
        if copy is None:
            self._copies[key] = [1, size]
        else:
            copy[0] += 1
        self._held[uid] = held + cost
        return True

    def unqueue(self, uid: int, item) -> None:
        """One queued entry of *item* was taken or dropped: give back what it cost."""
        key = (uid, id(item))
        copy = self._copies.get(key)
        if copy is None:
            return
        copy[0] -= 1
        freed = QUEUE_ENTRY_BYTES
        if not copy[0]:
            del self._copies[key]
            freed += copy[1]
        self.charge(uid, -freed)


class Releases:
    """The queues of ended subscriptions, given back to their uids' budgets
    ``RELEASE_SLICE`` entries a turn of the loop (``Hub.forget``). A uid may hold
    millions of entries (``QUEUE_ENTRY_BYTES`` of its ``bytes_per_uid`` each), and
    giving back 4,096 subscriptions of 300 entries each at once, when the connection
    that held them left, was one 5.4 s turn of the loop for everyone (under cProfile). Until then the
    uid is still charged for them (what it left behind is its own to wait for), and
    the events are kept, so that each ``unqueue`` finds its copy."""

    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets
        self.pending: deque[tuple[int, deque]] = deque()  # (uid, the queue it left)
        self.handle: asyncio.Handle | None = None

    def add(self, uid: int, queue: deque) -> None:
        self.pending.append((uid, queue))
        if self.handle is None:
            try:
                self.handle = asyncio.get_running_loop().call_soon(self.run)
            except RuntimeError:  # no loop running (a synchronous caller): at once
                while self.pending:
                    self.run()

    def run(self) -> None:
        self.handle = None
        unqueue, pending, left = self.budgets.unqueue, self.pending, RELEASE_SLICE
        while pending and left > 0:
            uid, queue = pending[0]
            while queue and left > 0:
                item = queue.popleft()
                left -= 1
                if isinstance(item, Event):  # (a LostMark, a Preload or an EndMark cost nothing)
                    unqueue(uid, item)
            if not queue:
                pending.popleft()
        if pending:
            try:
                self.handle = asyncio.get_running_loop().call_soon(self.run)
            except RuntimeError:
                pass  # ``add``'s loop goes on


# -- sizes and sharing ------------------------------------------------------------


def event_bytes(event) -> int:
    """A fair estimate of what *event* holds in memory (strings, dicts, the object)."""
    total = 96
    for value in event.body():
        total += size_of(value)
    return total


def size_of(value) -> int:
    if isinstance(value, str):
        return 56 + len(value)
    if isinstance(value, bytes):
        return 40 + len(value)
    if isinstance(value, (bool, int, float)) or value is None:
        return 32
    if isinstance(value, dict):
        return 64 + sum(24 + size_of(k) + size_of(v) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return 64 + sum(16 + size_of(v) for v in value)
    return 64


def canonical(value):
    """A hashable, order-independent key for an options dict or a target's details."""
    if isinstance(value, dict):
        return tuple(sorted(((str(k), canonical(v)) for k, v in value.items()), key=lambda kv: kv[0]))
    if isinstance(value, (list, tuple)):
        return ("l", tuple(canonical(v) for v in value))
    if isinstance(value, (set, frozenset)):
        return ("s", frozenset(canonical(v) for v in value))
    if isinstance(value, (str, bytes, int, float, bool)) or value is None:
        return value
    return ("o", object())  # not comparable by value: never shared
