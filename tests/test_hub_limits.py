"""Hub.set_limits (SIGHUP): back-pressure is recounted against the new half-way mark,
so sources paused under the old length resume, or pause under a shorter one."""

from __future__ import annotations

import asyncio

import pytest

from support import PathSource
from wqd.events import FilesystemError
from wqd.hub import Hub, Limits
from wqd.peer import PeerCredentials
from wqd.policy import ALLOW

pytestmark = pytest.mark.asyncio


class AllowAll:
    names = ("allow-all",)

    async def watch(self, peer, target):
        return ALLOW

    def post(self, peer, event):
        return event


async def test_set_limits_recounts_back_pressure():
    hub = Hub({"fs-errors": PathSource()}, AllowAll(), Limits(queue_length=8))
    sub = await hub.watch(PeerCredentials(":1.5", 0), "fs-errors", "/a", {})
    for n in range(5):  # 5 > 8 // 2: over the half-way mark
        hub.dispatch(FilesystemError("/a", 5, n))
    assert hub.congested
    resumed = []
    hub.on_relief(lambda: resumed.append(True))

    hub.set_limits(Limits(queue_length=100))
    await asyncio.sleep(0)
    assert not hub.congested and resumed == [True]
    assert sub.queued_events == 5

    hub.set_limits(Limits(queue_length=4))  # 5 queued, more than the new length holds
    assert hub.congested
    hub.dispatch(FilesystemError("/a", 5, 99))
    assert sub.lost == 1 and sub.queued_events == 5  # kept what it held, lost the new one
    while sub.queued_events:
        hub.take(sub)
    assert not hub.congested
