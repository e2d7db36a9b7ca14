"""wqd.bus.credit: a peer of many subscriptions that reads again is let go
``RESUME_SLICE`` subscriptions a loop iteration, not all in one turn of the loop
(16,384 of them were ~200 ms of it, and an attacker can stop and start its reader
at will); all of them, unless it is paused again meanwhile.

Real ``Hub`` and ``Credits``; no bus: resuming sends nothing (the outlet's ``wake``
is recorded), and the Ping the pause asks for fails without one, as on a closing
connection. The stall is called at once instead of after ``STALL_AFTER``."""

from __future__ import annotations

import asyncio

import pytest

from test_hub_parking import FilteringMounts, peer
from wqd.bus.credit import PEER_BUDGET, RESUME_SLICE, Credits
from wqd.hub import Hub, Limits
from wqd.policy import PolicyStack
from wqd.policy.unix import UnixPolicy

pytestmark = pytest.mark.asyncio


async def stalled_peer(n: int):
    hub = Hub({"mounts": FilteringMounts()}, PolicyStack([UnixPolicy({})]), Limits(subscriptions_per_peer=10_000))
    owner = peer(1, 1000)
    subs = [await hub.watch(owner, "mounts", "", {}) for _ in range(n)]
    woken = []
    credits = Credits(None, hub, woken.append)
    credits.account(subs[0], PEER_BUDGET)  # what the outlet does: a budget of signals unanswered
    credit = credits._credit[owner.unique_name]
    assert credit.paused and all(s.paused for s in subs)
    credits._stall(credit)
    assert all(s.stalled for s in subs)
    await asyncio.sleep(0)  # (the Ping task fails: no bus)
    return hub, credits, credit, subs


async def test_a_peer_that_reads_again_is_let_go_a_slice_at_a_time():
    hub, credits, credit, subs = await stalled_peer(3 * RESUME_SLICE + 10)
    credits._resume(credit)
    let_go = [s for s in subs if not s.paused]
    assert len(let_go) == RESUME_SLICE and all(not s.stalled for s in let_go)  # this turn: one slice
    for _ in range(3):
        await asyncio.sleep(0)
    assert not any(s.paused or s.stalled for s in subs)  # all of them, in the next turns
    assert not credit.paused and not hub.stalls_all(1000)


async def test_a_peer_paused_again_while_it_is_let_go_keeps_the_rest_held():
    hub, credits, credit, subs = await stalled_peer(3 * RESUME_SLICE)
    credits._resume(credit)
    credits.account(subs[0], PEER_BUDGET)  # it stopped again before the next slice: paused again
    assert credit.paused and all(s.paused for s in subs)
    for _ in range(4):
        await asyncio.sleep(0)
    assert all(s.paused for s in subs)  # the later slices did not let them go
    assert sum(s.stalled for s in subs) == 2 * RESUME_SLICE  # those not let go yet: stalled still
    credits._resume(credit)  # it reads again: all of them go
    for _ in range(4):
        await asyncio.sleep(0)
    assert not any(s.paused or s.stalled for s in subs)
