"""Hub: a uid whose peers all stopped reading costs O(1) per event, and each of its
subscriptions is still told exactly what it lost.

When every subscription of a uid is paused (the outlet holds its signals back) and
its lane is behind, the lane is parked: the events wait in it, and what it cannot
keep is tallied per class of equal subscriptions (``wqd.lanes.Tally``). A subscription
that a probe window of a stalled peer lets go is told its own count at once, alone,
and the lane stays parked (``Lanes.settle``); let go by a peer that reads again, the
lane is served: each subscription gets one ``Lost`` with its own count, less what it
was told, or what it held is delivered.

The policy is the real ``unix`` plugin in a real ``PolicyStack``; the source is the
least a source is, with a real filter (``actions``), counting how often it is asked.
"""

from __future__ import annotations

import asyncio

import pytest

from support import PathSource
from wqd import lanes
from wqd.events import MountChanged
from wqd.hub import Hub, Limits, LostMark
from wqd.peer import PeerCredentials
from wqd.policy import PolicyStack
from wqd.policy.unix import UnixPolicy
from wqd.sources.mounts import MountTarget

pytestmark = pytest.mark.asyncio

NS = 4026531840


class FilteringMounts(PathSource):
    """Routes by mount namespace; ``actions`` filters, as the real mounts source's option does."""

    name = "mounts"

    def __init__(self) -> None:
        self.asked = 0

    async def resolve(self, peer, spec, options):
        actions = options.get("actions")
        return MountTarget("mounts", spec, peer.mnt_ns, actions=None if actions is None else frozenset(actions))

    def routes(self, sub):
        return (sub.target.object_id,)

    def accepts(self, sub, event):
        self.asked += 1
        actions = sub.target.actions
        return actions is None or event.action in actions


def peer(n: int, uid: int) -> PeerCredentials:
    return PeerCredentials(f":1.{n}", uid, mnt_ns=NS, verified=True)


def mount(n: int) -> MountChanged:
    return MountChanged("attached" if n % 3 else "detached", n, f"/mnt/{n}", {"source": "wqd", "options": "rw"}, NS)


async def settle(hub: Hub) -> None:
    while hub.work.turns or hub.work.tick is not None:
        await asyncio.sleep(0)


async def attacker_and_victim(source: FilteringMounts) -> tuple[Hub, list, list, object]:
    """uid 1000: 2 connections, each with LANE_BEHIND subscriptions, half of them
    only for ``attached``; uid 1001: one subscription."""
    hub = Hub({"mounts": source}, PolicyStack([UnixPolicy({})]), Limits(subscriptions_per_peer=10_000))
    every, attached = [], []
    for n in (1, 2):
        owner = peer(n, 1000)  # one object per connection, as wqd.bus.identity keeps it
        for _ in range(lanes.LANE_BEHIND // 2):
            every.append(await hub.watch(owner, "mounts", "", {}))
            attached.append(await hub.watch(owner, "mounts", "", {"actions": ("attached",)}))
    victim = await hub.watch(peer(9, 1001), "mounts", "", {})
    return hub, every, attached, victim


async def parked() -> tuple[Hub, list]:
    """``attacker_and_victim`` with uid 1000's subscriptions paused and one event
    dispatched: its lane parked. Returns the hub and one option set's subscriptions."""
    hub, every, attached, _victim = await attacker_and_victim(FilteringMounts())
    for sub in every + attached:
        hub.pause(sub, True)
    hub.dispatch(mount(1))
    await settle(hub)
    assert hub.work.lanes[1000].parked
    return hub, every


async def test_a_stalled_uid_costs_o1_per_event_and_each_subscription_is_told_its_own_loss():
    source = FilteringMounts()
    hub, every, attached, victim = await attacker_and_victim(source)
    for sub in every + attached:  # what the emitter does to a peer that stopped reading: paused, then stalled
        hub.pause(sub, True)
        hub.stall(sub, True)
    events = 3 * lanes.LANE_JOBS
    source.asked = 0
    got = []
    for n in range(events):
        hub.dispatch(mount(n))
        await settle(hub)
        got += [hub.take(victim).mount_id for _ in range(victim.queued_events)]  # it reads
        assert got[-1:] == [n]  # the other uid gets every event, at once
    # Per event: the victim, and one question per class of the attacker's (4 classes:
    # 2 connections x 2 option sets) once its lane holds LANE_JOBS: not 2,048 subscriptions.
    assert source.asked <= events * (1 + 4)
    assert all(s.queued_events == 0 and s.lost == 0 for s in every + attached)  # nothing done for them yet
    assert not hub.congested  # and they hold nobody back

    def told(sub):
        return [(type(i), i.count) for i in sub.queue]

    gone = attached.pop()
    hub.end(gone)  # the table changes: the lane's list of them is not the table's any more (Tally.where)
    assert hub.work.lanes[1000].parked and not gone.queue
    probed = every[0]
    hub.pause(probed, False)  # a probe window lets one go: it alone is told its loss so far
    await settle(hub)
    want_every, want_attached = events, sum(1 for n in range(events) if n % 3)
    assert probed.lost == want_every and told(probed) == [(LostMark, want_every)]
    assert all(s.lost == 0 and not s.queue for s in every[1:] + attached)  # the rest: not one step each
    assert hub.work.lanes[1000].parked and source.asked <= events * (1 + 4)

    hub.pause(probed, False)  # told twice? no: a second window before anything new adds nothing
    hub.pause(probed, True)  # the window closes; two more events (the first detached, the second attached)
    for n in (events, events + 1):
        hub.dispatch(mount(n))
        await settle(hub)
        got += [hub.take(victim).mount_id for _ in range(victim.queued_events)]
    hub.pause(probed, False)  # the next window: only what was counted since, in the same Lost (not sent yet)
    await settle(hub)
    assert probed.lost == want_every + 2 and told(probed) == [(LostMark, want_every + 2)]

    for sub in every + attached:  # its peers read again: from now on every event is queued for each
        hub.stall(sub, False)
        hub.pause(sub, False)
    await settle(hub)
    assert not hub.work.lanes  # served: each of the others told its own count, the probed one nothing more
    assert probed.lost == want_every + 2 and told(probed) == [(LostMark, want_every + 2)]
    for sub in every[1:]:
        assert sub.lost == want_every + 2 and told(sub) == [(LostMark, want_every + 2)]
    for sub in attached:
        assert sub.lost == want_attached + 1 and told(sub) == [(LostMark, want_attached + 1)]
    hub.dispatch(mount(events + 2))  # (attached: every subscription takes it)
    await settle(hub)
    assert all(s.queued_events == 1 and isinstance(s.queue[-1], MountChanged) for s in every + attached)
    assert got == list(range(events + 2)) and victim.queued_events == 1 and victim.lost == 0


async def test_a_paused_uid_that_reads_again_gets_what_its_parked_lane_held():
    source = FilteringMounts()
    hub, every, attached, victim = await attacker_and_victim(source)
    for sub in every + attached:  # paused, not stalled: a slow reader
        hub.pause(sub, True)
    held = lanes.LANE_JOBS // 2
    for n in range(held):
        hub.dispatch(mount(n))
        await settle(hub)
    assert all(s.queued_events == 0 for s in every + attached) and victim.queued_events == held
    for sub in every + attached:
        hub.pause(sub, False)
    await settle(hub)
    for sub in every:
        assert sub.lost == 0 and [i.mount_id for i in sub.queue] == list(range(held))  # all, in order
    for sub in attached:
        assert sub.lost == 0 and [i.mount_id for i in sub.queue] == [n for n in range(held) if n % 3]


async def test_a_parked_lane_whose_subscriptions_end_is_let_go():
    """A uid that leaves while its lane is parked: the lane goes, and the uid's next
    subscription is served (a parked lane is in no turn, so it must not linger)."""
    hub, every = await parked()
    hub.drop_owner(every[0].peer)
    hub.drop_owner(every[-1].peer)
    await settle(hub)
    assert 1000 not in hub.work.lanes and not hub.work.backlog
    again = await hub.watch(peer(3, 1000), "mounts", "", {})
    hub.dispatch(mount(2))
    await settle(hub)
    assert [i.mount_id for i in again.queue] == [2]


async def test_a_new_subscription_that_reads_unparks_the_lane():
    """A parked lane waits for a reader: a new subscription of the uid that is not
    paused (a connection that reads) is one, and gets the events from then on."""
    hub, every = await parked()
    reader = await hub.watch(peer(3, 1000), "mounts", "", {})
    assert not hub.work.lanes[1000].parked
    hub.dispatch(mount(2))
    await settle(hub)
    assert [i.mount_id for i in reader.queue] == [2]
    assert all([i.mount_id for i in s.queue] == [1, 2] for s in every)  # served, in order


class Outlet:
    """Where the hub hands its queues on. The emitter needs a bus; these tests play
    its part by hand: ``sent`` is what the emitter does for a subscription it has
    sent everything (``Hub.take`` until the queue is empty)."""

    def added(self, sub) -> None: ...

    def wake(self, sub) -> None: ...

    def forget(self, sub) -> None: ...

    def peer_gone(self, peer) -> None: ...


def sent(hub: Hub, subs: list) -> dict:
    """Everything queued for *subs*, taken as the emitter takes it: {sub: [mount id or ("lost", n)]}."""
    got = {}
    for sub in subs:
        items = got.setdefault(sub, [])
        while sub.queue:
            item = hub.take(sub)
            items.append(("lost", item.count) if isinstance(item, LostMark) else item.mount_id)
    return got


async def behind_everywhere(source: FilteringMounts) -> tuple[Hub, list, list, object]:
    """``attacker_and_victim`` with an outlet, and one event (``attached``: every
    subscription takes it) queued for all that the outlet has not sent yet."""
    hub, every, attached, victim = await attacker_and_victim(source)
    hub.outlet = Outlet()
    hub.dispatch(mount(1))
    await settle(hub)
    assert all([i.mount_id for i in s.queue] == [1] for s in every + attached + [victim])
    return hub, every, attached, victim


async def test_a_uid_the_outlet_is_behind_everywhere_waits_in_its_lane_and_gets_every_event_in_order():
    """The first events of a storm, before the outlet knows a uid reads nothing: while
    each of its subscriptions still holds something unsent, its lane waits (each event
    one step, not 2,048), and as the outlet catches up it gets them all, in order."""
    source = FilteringMounts()
    events = 8
    hub, every, attached, victim = await attacker_and_victim(source)
    every.append(await hub.watch(peer(1, 1000), "mounts", "", {}))  # 2,049: an event ends within a quantum
    hub.outlet = Outlet()
    for n in range(1, events + 1):  # a storm: each event comes before the last is done
        hub.dispatch(mount(n))
    await settle(hub)
    assert [i.mount_id for i in victim.queue] == list(range(1, events + 1))  # the other uid: every event
    assert hub.work.lanes[1000].parked
    assert all([i.mount_id for i in s.queue] == [1] for s in every + attached)  # the outlet has sent none
    assert source.asked == len(every + attached) + events  # the rest waits in the lane: not 2,049 steps each
    assert not hub.congested

    got = {sub: [] for sub in every + attached}
    for _ in range(4 * events):  # the outlet sends what is queued, the lane goes on
        for sub, items in sent(hub, every + attached).items():
            got[sub] += items
        await settle(hub)
        if 1000 not in hub.work.lanes and not any(s.queue for s in every + attached):
            break
    assert 1000 not in hub.work.lanes
    for sub in every:
        assert sub.lost == 0 and got[sub] == list(range(1, events + 1))
    for sub in attached:
        assert sub.lost == 0 and got[sub] == [n for n in range(1, events + 1) if n % 3]


async def test_a_uid_found_stopped_while_its_lane_waits_is_told_exactly_what_it_lost():
    """p7's storm: the lane waits behind the outlet, then the outlet finds the uid's
    peers read nothing (paused, then stalled); a probe lets one go. What waited is
    tallied, and each subscription is told its own exact loss after what it holds."""
    source = FilteringMounts()
    events = lanes.LANE_JOBS + 10  # beyond LANE_JOBS the lane tallies what comes
    hub, every, attached, victim = await behind_everywhere(source)
    hub.dispatch(mount(2))
    await settle(hub)
    assert hub.work.lanes[1000].parked
    for sub in every + attached:
        hub.pause(sub, True)
        hub.stall(sub, True)
    await settle(hub)
    assert hub.work.lanes[1000].parked and not hub.work.turns
    for n in range(3, events + 1):
        hub.dispatch(mount(n))
        await settle(hub)
    assert len(victim.queue) == events
    want_every = events - 1  # 2 .. events
    want_attached = sum(1 for n in range(2, events + 1) if n % 3)
    hub.pause(every[0], False)  # the probe window: it alone is told, after what it holds
    await settle(hub)
    first = sent(hub, every + attached)
    assert first[every[0]] == [1, ("lost", want_every)] and every[0].lost == want_every
    assert all(items == [1] and sub.lost == 0 for sub, items in first.items() if sub is not every[0])
    for sub in every + attached:  # its peers read again: each of the others is told its own
        hub.stall(sub, False)
        hub.pause(sub, False)
    await settle(hub)
    got = {sub: first[sub] + items for sub, items in sent(hub, every + attached).items()}
    for sub in every:
        assert got[sub] == [1, ("lost", want_every)] and sub.lost == want_every
    for sub in attached:
        assert got[sub] == [1, ("lost", want_attached)] and sub.lost == want_attached


async def test_a_lane_on_its_way_to_a_tally_classifies_a_slice_a_turn_before_it_is_needed():
    """Once a lane that is behind holds LANE_JOBS // 4 events, it classifies its
    subscriptions CLASSIFY_SLICE a turn of the loop, so that the first ``Tally`` (at
    LANE_JOBS) finds the classes made instead of making them all in one turn (p7:
    16,384 subscriptions, 9-14 ms); and what is tallied is still exact."""
    hub, every, attached, _victim = await attacker_and_victim(FilteringMounts())
    for sub in every + attached:  # paused, not stalled: the events wait in the parked lane
        hub.pause(sub, True)
    for n in range(lanes.LANE_JOBS // 4):
        hub.dispatch(mount(n))
    lane = hub.work.lanes[1000]
    assert lane.classifying is not None and lane.classes is None  # begun, not done
    subs = lane.classifying[0]
    assert len(subs) > lanes.CLASSIFY_SLICE
    progress = []
    while lane.classifying is not None:
        progress.append(lane.classifying[4])
        await asyncio.sleep(0)
    progress.append(len(subs))
    assert len(progress) >= 3 and all(0 <= b - a <= lanes.CLASSIFY_SLICE for a, b in zip(progress, progress[1:]))
    assert lane.classes[0] is subs and len(lane.classes[2]) == 4  # 2 connections x 2 option sets

    events = lanes.LANE_JOBS + 10
    for n in range(lanes.LANE_JOBS // 4, events):  # beyond LANE_JOBS, tallied with the classes made
        hub.dispatch(mount(n))
        await settle(hub)
    tallies = [work[0] for work in lane.jobs if isinstance(work[0], lanes.Tally)]
    assert tallies and all(t.of is lane.classes[1] for t in tallies)
    for sub in every + attached:  # they read again: every event delivered or counted, in order
        hub.pause(sub, False)
    await settle(hub)
    for sub in every:
        assert sub.queued_events + sub.lost == events
    for sub in attached:
        assert sub.queued_events + sub.lost == sum(1 for n in range(events) if n % 3)


async def test_a_stalled_lane_with_tallies_of_two_lists_is_served_when_a_probe_lets_one_go():
    """A uid whose table changed between its tallied events holds a Tally per list; a
    probe window then serves the lane instead of settling one subscription (a map of
    positions per list would cost O(subscriptions) of memory each, one per change), and
    each subscription is still told its own exact count."""
    hub, every, attached, _victim = await attacker_and_victim(FilteringMounts())
    for sub in every + attached:
        hub.pause(sub, True)
        hub.stall(sub, True)
    hub.dispatch(mount(1))
    await settle(hub)
    hub.end(attached.pop())  # the table changes: the next events are tallied for a new list
    hub.dispatch(mount(2))
    await settle(hub)
    lane = hub.work.lanes[1000]
    assert lane.parked and len({id(work[1]) for work in lane.jobs}) == 2
    assert not hub.settle(every[0])
    hub.pause(every[0], False)  # the probe window: the lane is served
    await settle(hub)
    assert 1000 not in hub.work.lanes
    for sub in every:
        assert sub.lost == 2 and [(type(i), i.count) for i in sub.queue] == [(LostMark, 2)]
    for sub in attached:
        assert sub.lost == 2 and [(type(i), i.count) for i in sub.queue] == [(LostMark, 2)]
