"""When the ``credentials`` source re-reads a watched cache: paced per uid.

Every re-read is a credential helper round trip as the peer (and for ``KCM:``
round trips to sssd-kcm, which serves every uid from one process), and what
wakes a watch is not always its owner's doing: sssd-kcm's store is one file for
every uid, so *any* uid's kinit wakes every ``KCM:`` watch of every uid; an
inotify queue overflow (a user spamming files in ``/tmp``, where ``FILE:``
caches live) wakes every watch. So wakes do not start reads; they mark the
watch pending in its uid's ``ReadLane``, and each lane runs **one pass at a
time**: it reads the watches pending when the pass starts, one after another,
and starts its next pass no sooner than ``interval`` seconds per read of the
last pass after that pass started (``[credentials] read_interval``). Wakes that
come during a pass make (at most) one more pass. Nothing is dropped: a watch
woken is read again, after the wake, within about ``interval`` times the reads
of its lane's last pass, plus its own pass.

What this bounds, whatever other uids do: a uid's helper reads come to at most
one per ``interval`` on average, however many caches it watches (a user with
``caches_per_uid`` ``KCM:`` names cannot make wqd load sssd-kcm, which serves
every uid from one process, with a pass of all of them each ``interval``), and
the lanes of different uids never wait for each other, so a victim's own
change is read at most ``interval`` times its own woken watches after its last
event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class ReadLane:
    """The pending re-reads of one uid's watches and the task reading them."""

    __slots__ = ("pending", "task", "next")

    def __init__(self) -> None:
        self.pending: dict[object, None] = {}  # watches to read, in the order woken
        self.task: asyncio.Task | None = None
        self.next = float("-inf")  # loop time the next pass may start


class PacedReads:
    """``wake(uid, watch)`` asks for one more read of *watch*; *read(watch)* does
    it (it must handle its own errors); ``forget(watch)`` drops a pending one."""

    MAX_IDLE = 1024  # lanes kept before idle ones are pruned

    def __init__(self, interval: float, read: Callable[[object], Awaitable[None]]) -> None:
        self.interval = interval
        self.read = read
        self.lanes: dict[int, ReadLane] = {}  # uid -> its lane, kept while idle (pruned past MAX_IDLE)

    def wake(self, uid: int, watch) -> None:
        lane = self.lanes.get(uid)
        if lane is None:
            if len(self.lanes) >= self.MAX_IDLE:
                self._prune()
            lane = self.lanes[uid] = ReadLane()
        lane.pending[watch] = None
        if lane.task is None:
            lane.task = asyncio.get_running_loop().create_task(self._run(lane))

    def pending(self, uid: int, watch) -> bool:
        lane = self.lanes.get(uid)
        return lane is not None and watch in lane.pending

    def forget(self, uid: int, watch) -> None:
        lane = self.lanes.get(uid)
        if lane is not None:
            lane.pending.pop(watch, None)

    async def _run(self, lane: ReadLane) -> None:
        loop = asyncio.get_running_loop()
        try:
            while lane.pending:
                wait = lane.next - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                batch, lane.pending = lane.pending, {}
                lane.next = loop.time() + self.interval * len(batch)
                for watch in batch:
                    try:
                        await self.read(watch)
                    except Exception:  # noqa: BLE001 - one read's bug must not stop the lane
                        log.exception("re-reading a cache")
        finally:
            lane.task = None  # the lane stays, with the time of its next pass: the pace holds

    def _prune(self) -> None:
        """Forget the lanes with nothing to do whose pace has run out."""
        now = asyncio.get_running_loop().time()
        for uid, lane in list(self.lanes.items()):
            if lane.task is None and not lane.pending and lane.next <= now:
                del self.lanes[uid]

    async def close(self) -> None:
        tasks = [lane.task for lane in self.lanes.values() if lane.task is not None]
        self.lanes.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
