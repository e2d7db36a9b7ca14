"""Per-peer credit: what each subscriber has been sent and has shown it read.

Peers that do not read. The bus queues what wqd sends to a peer until the peer
reads it, and dbus-daemon counts those bytes against *wqd's* allowance
(``max_incoming_bytes``, 127 MiB on a system bus): a subscriber that stops
reading would, given enough events, make the bus stop reading from wqd, and
every other peer would wait with it. So wqd keeps account per peer: after
``PING_EVERY`` bytes of signals it sends the peer ``org.freedesktop.DBus.Peer.Ping``
(an answer *from the peer* proves it read what came before, since the bus keeps
order). A peer with its budget of bytes unacknowledged, or whose uid's peers
have ``UID_BUDGET``, is *paused*: nothing more is sent to it until it answers.
The budget starts small (*slow start*): a new peer may leave ``START_BUDGET``
unread, doubled each time it answers a Ping, up to ``PEER_BUDGET`` (and while it
is under ``2 * PING_EVERY`` the Ping goes out at half of it, so a peer that reads
answers before it is paused). A connection that never reads is paused after
``START_BUDGET``, not ``PEER_BUDGET``: that much less for wqd to marshal and the
bus to relay to a peer that will not read it.
Its queues still hold the sources back (``Hub``'s back-pressure), so a slow
reader loses nothing; but a peer paused for ``STALL_AFTER`` seconds is
*stalled*: its queues stop holding the sources back, fill, and count ``Lost``
like any full queue. A uid that had a peer stalled in the last
``GRACE_COOLDOWN`` seconds gets no grace: its paused peers stall at once (so
opening connection after connection cannot keep the sources waiting), or after
``SLOW_GRACE`` if still in slow start: a peer that reads is paused at each doubling
of its budget during a burst (the outlet sends a batch before the Ping's answer can
come in), and must not lose for it.

Not every library answers Ping (jeepney does not; GDBus answers from a worker
thread), and no other sign of a peer's progress works on every bus (dbus-daemon's
``Debug.Stats`` is denied by Debian's system policy; dbus-broker has none). So a
stalled peer is *probed*: every ``PROBE_EVERY`` seconds a window of ``PROBE_WINDOW``
bytes is sent: the ``Lost``, then events in order; then it is paused again, with a
Ping if none is outstanding. A window lets go at most ``PROBE_SUBS`` of the peer's
subscriptions that have something to send, in turn from one window to the next
(what a window can carry is a signal or so for that many), each with whatever its
queue holds ahead of its ``Lost`` folded into that ``Lost`` first (so the count
comes first, at once, not behind a pause). One uid's stalled peers are probed
together, once a period: a probe costs the loop a fixed part (the uid's parked lane
is let go, ``wqd.hub``), and letting go all of a peer's thousands of subscriptions,
once per connection, made the other uids' events wait behind it (p7: 5 connections
of 4,096 stopped subscriptions, the victim's worst events exactly a second apart;
event p99 4.5-7x the quiet figure, 2.6x with this). A peer that answers resumes fully
(``RESUME_SLICE`` subscriptions a loop iteration). A peer that never
answers gets a ``PROBE_WINDOW`` a period for as long as its unanswered bytes stay
under ``PROBE_LIMIT`` (its uid's under ``UID_BUDGET``, everyone's under
``PROBE_TOTAL``): that bounds what stopped peers can make the bus hold, per
peer, per uid and in all (frozen sessions of many users included). Past that limit wqd
logs it once and sends it nothing more until it answers a Ping (its ``Lost``
property keeps counting). When the peer answers it gets what is queued, then
``Lost(n)``, then what follows. If the bus policy forbids the Ping (an old
``io.wqd.WatchQueue1.conf``) wqd logs it and goes without. Each unanswered
Ping is a pending reply the bus counts against wqd (dbus-daemon's
``max_replies_per_connection``), so one uid's peers have at most ``UID_PINGS``
outstanding: peers that never answer cannot use up wqd's allowance for everyone.

``Credits`` keeps these accounts for the outlet (``wqd.bus.emitter``): the
emitter calls ``account`` for each signal it queues, and ``Credits`` pauses,
stalls, probes and resumes peers through the hub (``Hub.pause``, ``Hub.stall``)
and wakes their subscriptions through the emitter's ``wake``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from dbus_fast import Message, MessageType

from wqd.bus.names import PEER_INTERFACE
from wqd.events import Event
from wqd.hub import Hub, LostMark, Preload, Subscription

log = logging.getLogger(__name__)

PING_EVERY = 32 << 10  # bytes of signals to one peer between acknowledgements asked for
PEER_BUDGET = 256 << 10  # bytes one peer may leave unread before its signals wait
START_BUDGET = 16 << 10  # ... a new peer's, doubled per Ping it answers up to PEER_BUDGET (slow start)
UID_BUDGET = 8 << 20  # the same, for all the connections of one uid together
RETRY = 1.0  # seconds before asking again when the bus refused to pass a Ping on
STALL_AFTER = 2.0  # seconds a paused peer's queues may hold the sources back
GRACE_COOLDOWN = 60.0  # seconds after a stall during which the uid's peers get no grace ...
SLOW_GRACE = 0.25  # ... but this much while in slow start (under PEER_BUDGET): time for its Ping's answer
PROBE_EVERY = 1.0  # seconds between the windows a stalled peer gets
PROBE_WINDOW = 16 << 10  # bytes of signals in one window
PROBE_LIMIT = 2 << 20  # unanswered bytes past which a stalled peer gets no more windows
UID_PINGS = 16  # unanswered Pings one uid's peers may have (each is a pending reply the bus counts for wqd)
PROBE_TOTAL = 32 << 20  # ... and all peers together (a quarter of a system bus's max_incoming_bytes)
PROBE_SUBS = PROBE_WINDOW // 128  # subscriptions one window lets go at most (each has a signal of >= 128 bytes)
PROBE_SLICE = 256  # a stalled peer's subscriptions looked at per loop iteration ...
FOLD_SLICE = 4096  # ... or this many queued items folded (a few ms), whichever comes first
RESUME_SLICE = 256  # a peer's subscriptions let go per loop iteration when it reads again
BUS = "org.freedesktop.DBus"


@dataclass(eq=False, slots=True)
class Credit:
    """What one peer has been sent and has shown it read (bytes of signals)."""

    peer: str
    uid: int
    sent: int = 0
    acked: int = 0
    ping: int | None = None  # ``sent`` when the unanswered Ping went out
    paused: bool = False
    stalled: bool = False
    window: int = 0  # bytes left in the open probe window (stalled peers only)
    budget: int = START_BUDGET  # bytes it may leave unread: START_BUDGET, doubled per answered Ping
    capped: bool = False  # past PROBE_LIMIT: said so in the log
    subs: set | None = None  # the subscriptions paused for it, ended ones included
    ring: deque | None = None  # ... in the order probe windows let them go (stalled peers only)
    open: list | None = None  # the subscriptions the open window let go
    retry: asyncio.TimerHandle | None = None
    stall_timer: asyncio.TimerHandle | None = None

    @property
    def unacked(self) -> int:
        return self.sent - self.acked


class Credits:
    """Every peer's ``Credit``, and what pausing, stalling and probing them takes."""

    def __init__(self, bus, hub: Hub, wake: Callable[[Subscription], None]) -> None:
        self.bus = bus
        self.hub = hub
        self.wake = wake  # the emitter's: *sub* has something to send
        self.loop = asyncio.get_running_loop()
        self._credit: dict[str, Credit] = {}
        self._uid_unacked: dict[int, int] = {}
        self._unacked = 0  # all peers' unanswered bytes together
        self._uid_stalled: dict[int, float] = {}  # uid -> when one of its peers last stalled
        self._pings: set[asyncio.Task] = set()  # at most one per peer
        self._uid_pings: dict[int, int] = {}  # uid -> its peers' unanswered Pings
        self._probing: dict[int, dict[str, Credit]] = {}  # uid -> its stalled peers, probed together
        self._probe_timers: dict[int, asyncio.TimerHandle] = {}  # uid -> its next probe
        self.pinging = True  # False once the bus policy refused a Ping

    def peer_gone(self, peer: str) -> None:
        credit = self._credit.pop(peer, None)
        if credit is None:
            return
        self._settle(credit, credit.sent)
        self._cancel_timers(credit)
        self._unprobe(credit)
        for sub in credit.subs or ():
            if not sub.active:  # ended while paused: its Removed can no longer be delivered
                self.hub.forget(sub)

    def added(self, sub: Subscription) -> None:
        """A new subscription of a paused peer is paused from the start (outside a probe
        window), as it would be on its first signal (``account``)."""
        credit = self._credit.get(sub.peer)
        if credit is not None and credit.paused and credit.window <= 0:
            self._pause_sub(credit, sub)

    def forget(self, sub: Subscription) -> None:
        credit = self._credit.get(sub.peer)
        if credit is not None and credit.subs:
            credit.subs.discard(sub)  # a peer paused for long must not keep every sub it closed

    # -- acknowledgements ----------------------------------------------------

    def account(self, sub: Subscription, size: int) -> None:
        """*size* bytes of signals were queued for *sub*'s peer."""
        credit = self._credit.get(sub.peer)
        if credit is None:
            credit = self._credit[sub.peer] = Credit(sub.peer, sub.owner.uid)
        credit.sent += size
        uid_unacked = self._uid_unacked[credit.uid] = self._uid_unacked.get(credit.uid, 0) + size
        self._unacked += size
        if credit.paused:
            if credit.window > 0:  # a probe window is open: count it down
                if sub not in credit.subs:  # made during the window: it sends in it
                    self._pause_sub(credit, sub)
                    self.hub.pause(sub, False)
                    credit.open.append(sub)
                credit.window -= size
                if credit.window <= 0 or uid_unacked >= UID_BUDGET or self._unacked >= PROBE_TOTAL:
                    self._close_window(credit)
            elif not sub.paused:  # made while its peer was paused
                self._pause_sub(credit, sub)
            return
        unacked = credit.unacked
        budget = credit.budget
        over = unacked >= budget or uid_unacked >= UID_BUDGET
        # Ask by half the budget while it is small, so a peer that reads answers before it is paused.
        if credit.ping is None and (unacked >= PING_EVERY or unacked >= budget >> 1 or over):
            self._ping(credit)
        if over:
            self._pause(credit)

    def _ping(self, credit: Credit) -> None:
        """Ask *credit*'s peer for a Ping answer, behind what it has been sent (``call_from``
        queues the call on the same writer, after the signals)."""
        uid = credit.uid
        pending = self._uid_pings.get(uid, 0)
        if pending >= UID_PINGS:
            return  # asked again when a window closes or a Ping of the uid's is answered
        self._uid_pings[uid] = pending + 1
        mark = credit.ping = credit.sent
        msg = Message(destination=credit.peer, path="/", interface=PEER_INTERFACE, member="Ping")
        task = self.loop.create_task(self._ask(credit, mark, msg))
        self._pings.add(task)
        task.add_done_callback(self._pings.discard)

    async def _ask(self, credit: Credit, mark: int, msg: Message) -> None:
        try:
            # Only the peer's own answer (or the bus's error) counts: a Pong forged by
            # another peer is ignored and this one still awaited (FlowControlledBus).
            reply = await self.bus.call_from(msg, credit.peer)
        except Exception:  # the connection is closing
            reply = None
        finally:
            left = self._uid_pings.get(credit.uid, 0) - 1
            if left > 0:
                self._uid_pings[credit.uid] = left
            else:
                self._uid_pings.pop(credit.uid, None)
        self._pong(credit, mark, reply)
        if left == UID_PINGS - 1:  # the uid was at its cap: a paused peer of it waiting to be asked
            for other in self._credit.values():
                if other.uid == credit.uid and other.paused and other.ping is None and other.unacked:
                    self._ping(other)
                    break

    def _pong(self, credit: Credit, mark: int, reply: Message | None) -> None:
        if credit.ping == mark:
            credit.ping = None
        if self._credit.get(credit.peer) is not credit:
            return  # the peer left
        uid_was_over = self._uid_unacked.get(credit.uid, 0) >= UID_BUDGET
        if reply is not None and reply.sender == credit.peer:
            self._settle(credit, mark)  # answered (even with an error): it read all before the Ping
            if credit.budget < PEER_BUDGET:  # slow start: it reads, so it may have more unread
                credit.budget = min(credit.budget << 1, PEER_BUDGET)
        elif reply is not None and reply.message_type == MessageType.ERROR and reply.sender == BUS:
            if reply.error_name == "org.freedesktop.DBus.Error.AccessDenied":
                log.warning("the bus policy does not let wqd ping its subscribers (install the shipped "
                            "io.wqd.WatchQueue1.conf): a subscriber that stops reading can now stall wqd")
                self._stop_pinging()
                return
            if reply.error_name in ("org.freedesktop.DBus.Error.ServiceUnknown",
                                    "org.freedesktop.DBus.Error.NameHasNoOwner"):
                return  # gone; NameOwnerChanged ends its subscriptions
            # The bus did not pass it on (its queue for the peer is full, ...): ask again later.
            if credit.retry is None:
                credit.retry = self.loop.call_later(RETRY, self._retry, credit)
            return
        else:
            return  # the connection is closing
        if credit.paused and credit.unacked < credit.budget and self._uid_unacked.get(credit.uid, 0) < UID_BUDGET:
            self._resume(credit)
        elif credit.ping is None and (credit.unacked >= PING_EVERY or credit.unacked >= credit.budget >> 1):
            self._ping(credit)
        if uid_was_over and self._uid_unacked.get(credit.uid, 0) < UID_BUDGET:
            for other in list(self._credit.values()):  # paused for the uid's total, not their own
                if other.paused and other.uid == credit.uid and other.unacked < other.budget:
                    self._resume(other)

    def _retry(self, credit: Credit) -> None:
        credit.retry = None
        if self._credit.get(credit.peer) is credit and credit.ping is None and credit.unacked:
            self._ping(credit)

    def _settle(self, credit: Credit, mark: int) -> None:
        """The peer has read everything up to *mark*."""
        if mark <= credit.acked:
            return
        done = mark - credit.acked
        credit.acked = mark
        self._unacked -= done
        left = self._uid_unacked.get(credit.uid, 0) - done
        if left > 0:
            self._uid_unacked[credit.uid] = left
        else:
            self._uid_unacked.pop(credit.uid, None)

    def _pause(self, credit: Credit) -> None:
        credit.paused = True
        credit.subs = set(self.hub.pause_all(credit.peer))  # (not stalled yet: it has just been paused)
        uid = credit.uid
        if uid != 0 and self.loop.time() - self._uid_stalled.get(uid, -GRACE_COOLDOWN) < GRACE_COOLDOWN:
            if credit.budget < PEER_BUDGET:  # in slow start: a reader is paused at each doubling in a burst
                credit.stall_timer = self.loop.call_later(SLOW_GRACE, self._stall, credit)
            else:
                self._stall(credit)  # no grace: a peer of this uid stalled a moment ago
        else:
            credit.stall_timer = self.loop.call_later(STALL_AFTER, self._stall, credit)
        log.info("%s has %d bytes of signals unread: nothing more goes to it until it reads",
                 credit.peer, credit.unacked)

    def _pause_sub(self, credit: Credit, sub: Subscription) -> None:
        self.hub.pause(sub, True)
        if sub not in credit.subs:
            credit.subs.add(sub)
            if credit.ring is not None:
                credit.ring.append(sub)
        if credit.stalled:
            self.hub.stall(sub, True)

    def _stall(self, credit: Credit) -> None:
        credit.stall_timer = None
        if not credit.paused or credit.stalled or self._credit.get(credit.peer) is not credit:
            return
        credit.stalled = True
        uid = credit.uid
        self._uid_stalled[uid] = self.loop.time()
        credit.ring = deque(credit.subs)
        self.hub.stall_all(credit.subs)
        self._probing.setdefault(uid, {})[credit.peer] = credit
        if uid not in self._probe_timers:  # else probed with the uid's other stalled peers, at most a period on
            self._probe_timers[uid] = self.loop.call_later(PROBE_EVERY, self._probe, uid)
        log.warning("%s stopped reading its signals: its subscriptions no longer hold the sources back and "
                    "count Lost until it reads", credit.peer)

    # -- probing a stalled peer ------------------------------------------------

    def _probe(self, uid: int) -> None:
        """Every PROBE_EVERY seconds while *uid* has stalled peers: a window for each of them,
        together (``_probe_peer``). One probe per uid, not per peer: each probe costs the
        loop its fixed part (the uid's lane, if it holds other work than counts, is let go
        once, ``Hub.pause``; counts are told only to what the windows let go, ``Hub.settle``),
        and a uid that spreads its subscriptions over many
        connections must not make the others' events wait behind one probe per connection
        a period (p7: 5 connections, event p99 4.5x the quiet figure, the worst events a
        second apart)."""
        self._probe_timers.pop(uid, None)
        probing = self._probing.get(uid)
        stalled = [c for c in (probing or {}).values() if c.stalled and self._credit.get(c.peer) is c]
        if not stalled:
            self._probing.pop(uid, None)
            return
        self._probe_timers[uid] = self.loop.call_later(PROBE_EVERY, self._probe, uid)
        for credit in stalled:  # one a turn of the loop: each lets go up to PROBE_SLICE subscriptions
            self.loop.call_soon(self._probe_peer, credit)

    def _unprobe(self, credit: Credit) -> None:
        """*credit*'s peer is no longer stalled (it reads, or left): no more windows for it."""
        probing = self._probing.get(credit.uid)
        if probing is not None and probing.pop(credit.peer, None) is credit and not probing:
            del self._probing[credit.uid]
            timer = self._probe_timers.pop(credit.uid, None)
            if timer is not None:
                timer.cancel()

    def _probe_peer(self, credit: Credit) -> None:
        """*credit*'s stalled peer: its Lost, then a window."""
        if not credit.stalled or self._credit.get(credit.peer) is not credit:
            return
        if (credit.unacked >= PROBE_LIMIT or self._uid_unacked.get(credit.uid, 0) >= UID_BUDGET
                or self._unacked >= PROBE_TOTAL):
            if credit.window > 0:
                self._close_window(credit)
            if not credit.capped:
                credit.capped = True
                log.warning("%s has neither answered a Ping nor left with %d bytes of signals unread: "
                            "nothing more goes to it until it answers one", credit.peer, credit.unacked)
            return
        if credit.window > 0:
            self._close_window(credit)  # (the last one's, unspent: it sent all it had)
        credit.window = PROBE_WINDOW
        credit.open = []
        self._probe_slice(credit, len(credit.ring), PROBE_SUBS)

    def _probe_slice(self, credit: Credit, scan: int, room: int) -> None:
        """Let go, in the ring's turn, up to *room* of *credit*'s subscriptions that have
        something to send (queued, or waiting in their uid's parked lane), looking at
        *scan* more at most, ``PROBE_SLICE`` of them or ``FOLD_SLICE`` queued items folded
        at a time, then let the loop run. Each is folded before it is let go, so its own
        Lost still comes first.

        Why at most ``PROBE_SUBS``: a window carries ``PROBE_WINDOW`` bytes, a signal or so
        for each of that many subscriptions; letting go all of a peer's thousands (and
        pausing them again when it closes) cost the loop O(subscriptions) a window, and
        the next window goes on from where this one stopped, so each has its turn."""
        if not credit.stalled or self._credit.get(credit.peer) is not credit or credit.window <= 0:
            return  # read again (``_resume`` let everything go), left, or the window is spent
        ring, subs, hub, opened = credit.ring, credit.subs, self.hub, credit.open
        backlog = hub.has_work(credit.uid)  # its lane holds events: each of them has something
        work = looked = 0
        while scan > 0 and room > 0 and looked < PROBE_SLICE and work < FOLD_SLICE and ring:
            sub = ring.popleft()
            scan -= 1
            if sub not in subs:
                continue  # forgotten meanwhile: out of the ring too
            ring.append(sub)
            looked += 1
            # Its part of what its uid's parked lane counted is told now (``Hub.settle``); only
            # a lane that holds other work must be let go to reach it.
            if not sub.queue and (not backlog or (hub.settle(sub) and not sub.queue)):
                continue
            work += self._fold(sub)
            hub.pause(sub, False)
            opened.append(sub)
            room -= 1
            if sub.queue:
                self.wake(sub)
            if credit.window <= 0:
                return  # (letting go may deliver at once)
        if scan > 0 and room > 0 and ring:
            self.loop.call_soon(self._probe_slice, credit, scan, room)

    def _fold(self, sub: Subscription) -> int:
        """Count what *sub*'s queue holds ahead of a LostMark at its tail as lost, in that
        mark: the subscriber learns of its loss now, in order, rather than after a backlog.
        Returns how many queued items that took."""
        queue = sub.queue
        # Only a loss at the tail (a queue that overflowed and still does): events after an
        # older loss came when there was room, and the window delivers them in order. So the
        # check is O(1), and each event is folded at most once.
        if len(queue) < 2 or not sub.stalled or not isinstance(queue[-1], LostMark):
            return 0
        ahead = len(queue) - 1
        folded = counted = 0
        uid = sub.owner.uid
        release = self.hub.budgets.unqueue  # what the uid is charged for a queued copy (wqd.budgets)
        for _ in range(ahead):
            item = queue.popleft()
            if isinstance(item, Preload):
                folded += len(item.events)
            elif isinstance(item, Event):
                folded += 1
                sub.queued_events -= 1  # stalled: not counted in the hub's back-pressure
                if uid:
                    release(uid, item)
            elif isinstance(item, LostMark):
                counted += item.count  # an older loss, in ``lost`` already
        queue[0].count += folded + counted
        sub.lost += folded
        return ahead

    def _close_window(self, credit: Credit) -> None:
        credit.window = 0
        opened, credit.open = credit.open or (), None
        for sub in opened:
            self.hub.pause(sub, True)
        if credit.ping is None:
            self._ping(credit)

    def _resume(self, credit: Credit, sliced: bool = True) -> None:
        self._cancel_timers(credit)
        self._unprobe(credit)
        was_stalled = credit.stalled
        credit.paused = credit.stalled = credit.capped = False
        credit.window = 0
        credit.ring = credit.open = None
        subs, credit.subs = list(credit.subs or ()), None
        self._resume_slice(credit, subs, 0, RESUME_SLICE if sliced else len(subs))
        if was_stalled:
            log.info("%s reads again: delivering to it", credit.peer)

    def _resume_slice(self, credit: Credit, subs: list[Subscription], start: int, size: int) -> None:
        """Let *credit*'s subscriptions go again, *size* of them a loop iteration: one
        peer holds up to ``subscriptions_per_peer`` of them, and letting 16,384 go at
        once (p7's attacker, sent SIGCONT) was one ~200 ms turn of the loop, which an
        attacker could repeat with each stop and start. Stops if the peer left or is
        paused again meanwhile: ``_pause`` holds them all again (``Hub.pause_all``), and
        those not let go yet are still stalled, as they would be again at once (its uid
        stalled within ``GRACE_COOLDOWN``), until ``_resume`` lets them go."""
        if start and (self._credit.get(credit.peer) is not credit or credit.paused):
            return
        stop = min(len(subs), start + size)
        hub, wake = self.hub, self.wake
        for i in range(start, stop):
            sub = subs[i]
            hub.stall(sub, False)  # first: what a parked lane holds is delivered, not tallied (Hub.pause)
            hub.pause(sub, False)
            if sub.queue:
                wake(sub)
        if stop < len(subs):
            self.loop.call_soon(self._resume_slice, credit, subs, stop, size)

    def _cancel_timers(self, credit: Credit) -> None:
        for timer in (credit.retry, credit.stall_timer):
            if timer is not None:
                timer.cancel()
        credit.retry = credit.stall_timer = None

    def _stop_pinging(self) -> None:
        self.pinging = False
        for credit in list(self._credit.values()):
            if credit.paused:
                self._resume(credit, sliced=False)  # (its account is dropped next: no later slices)
            self._cancel_timers(credit)
        for timer in self._probe_timers.values():
            timer.cancel()
        self._probe_timers.clear()
        self._probing.clear()
        self._credit.clear()
        self._uid_unacked.clear()
        self._unacked = 0
