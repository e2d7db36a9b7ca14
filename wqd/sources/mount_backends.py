"""Backends of the ``mounts`` source, and the fanotify fd reader ``fs-errors`` shares.

- ``fanotify``: one fanotify group per watched mount namespace (``FAN_REPORT_MNT``,
  ``FAN_MARK_MNTNS``, Linux >= 6.15, CAP_SYS_ADMIN). Events carry a 64-bit mount
  id; a resolver turns it into a ``MountEntry``: ``statmount`` (Linux >= 6.8), or
  where that is missing, correlation with a fresh read of the namespace's
  mountinfo. A table of the namespace's mounts, kept from the events, names what
  a detached mount was (the kernel can no longer say). ``FAN_Q_OVERFLOW`` ->
  ``Lost`` for that namespace, then a fresh table and the difference reported.
- ``mountinfo``: ``poll(POLLPRI)`` on the namespace's mountinfo (through an epoll
  set of its own, see ``MountinfoBackend``), then read and diff. Rescans are at
  most every ``coalesce`` seconds, so a storm costs a bounded number of reads. A
  mount that comes and goes between two reads is invisible: when the reads saw
  fewer differences than the kernel signalled changes, the shortfall is reported
  as ``Lost`` (a lower bound; see ``MountinfoBackend``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import select
import time
from collections import deque
from collections.abc import Callable

from wqd.events import SourceLoss
from wqd.kernel import errors as kerr
from wqd.kernel import fanotify as fan
from wqd.parse.fanotify import FanotifyEvent, FanotifyParser, MountInfo, mount_action
from wqd.parse.mountinfo import MountDiff, MountEntry, MountinfoParser, diff, entry_from_statmount
from wqd.sources.reader import FdReader, read_available

log = logging.getLogger(__name__)

# fanotify read() returns whole events only: 4 KiB is ~100 mount events, few enough
# that checking for congestion between reads keeps subscriber queues from overflowing.
READ_SIZE = 4096
READS_PER_WAKEUP = 16


class FanotifyReader:
    """One fanotify fd on the loop (``FdReader``): parsed events go to *handle*.

    While paused the events stay in the kernel's queue (16384 events by default);
    when it overflows the kernel queues ``FAN_Q_OVERFLOW`` and the handler reports loss.
    """

    def __init__(self, fd: int, sink, handle: Callable[[list[FanotifyEvent]], None], name: str) -> None:
        self.fd = fd
        self.handle = handle
        self.name = name
        self.parser = FanotifyParser()
        self.reader = FdReader(fd, sink, self._read_one, name, READS_PER_WAKEUP)

    def _read_one(self) -> bool:
        data = read_available(self.fd, READ_SIZE, self.name)
        if not data:
            return False
        events = self.parser.feed(data, final=True)
        for event in events:
            for fd in event.fds:  # wqd asks for none; never leak one the kernel gave anyway
                os.close(fd)
        try:
            self.handle(events)
        except Exception:
            log.exception("handling %s events", self.name)
        return True

    def close(self) -> None:
        if self.fd >= 0:
            self.reader.close()
            os.close(self.fd)
            self.fd = -1


def read_all(fd: int) -> bytes:
    """The whole of a /proc file open at *fd*, from its start."""
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def read_mountinfo(fd: int) -> dict[int, MountEntry]:
    parser = MountinfoParser()
    parser.feed(read_all(fd))
    return parser.finish()


# -- resolvers: 64-bit mount id -> MountEntry ---------------------------------

class StatmountResolver:
    name = "statmount"

    def snapshot(self, watch) -> dict[int, MountEntry]:
        table = {}
        for mid in fan.listmount(watch.ns_id):
            entry = self.lookup(watch, mid, "attached")
            if entry is not None:
                table[mid] = entry
        return table

    def lookup(self, watch, mnt_id: int, action: str) -> MountEntry | None:
        if action == "detached":
            return None  # a detached mount is gone from statmount's view: the table knows
        try:
            return entry_from_statmount(fan.statmount(mnt_id, watch.ns_id))
        except kerr.KernelError as exc:
            if exc.errno != errno.ENOENT:
                log.debug("statmount(%#x): %s", mnt_id, exc)
            return None  # came and went before we looked

    def resync(self, watch) -> MountDiff:
        new = self.snapshot(watch)
        out = diff(watch.table, new)
        watch.table = new
        return out


class MountinfoResolver:
    """Where statmount is missing: correlate events with mountinfo differences, in order.

    Each lookup re-reads the namespace's mountinfo and queues what appeared,
    vanished or moved since the last read; an event takes its own queued entry
    when it knows the mount already, else the first queued entry of its kind.
    Mount ids in the entries are mountinfo's; the event keeps the kernel's 64-bit id.
    """

    name = "mountinfo"

    def snapshot(self, watch) -> dict[int, MountEntry]:
        watch.mountinfo = read_mountinfo(watch.mountinfo_fd)
        watch.pending = {"attached": deque(), "detached": deque(), "moved": deque()}
        return {}

    def _rescan(self, watch) -> MountDiff:
        new = read_mountinfo(watch.mountinfo_fd)
        out = diff(watch.mountinfo, new)
        watch.mountinfo = new
        for action, entry, _origin in out.actions():
            watch.pending[action].append(entry)
        return out

    def lookup(self, watch, mnt_id: int, action: str) -> MountEntry | None:
        self._rescan(watch)
        queue = watch.pending[action]
        known = watch.table.get(mnt_id)
        if known is not None:  # take its own entry; never another mount's
            for i, entry in enumerate(queue):
                if entry.same_object(known) and (action != "detached" or entry.mount_point == known.mount_point):
                    del queue[i]
                    return entry
            return known if action == "detached" else None
        return queue.popleft() if queue else None

    def resync(self, watch) -> MountDiff:
        out = self._rescan(watch)
        for queue in watch.pending.values():
            queue.clear()
        return out


class FanotifyBackend:
    name = "fanotify"
    needs_nsfd = True

    def __init__(self, resolver) -> None:
        self.resolver = resolver

    async def start(self, source, sink) -> None:
        self.source = source
        self.sink = sink

    async def stop(self) -> None:
        pass

    def arm(self, watch) -> None:
        fd = fan.open_mount_notifications()
        try:
            fan.mark_mount_namespace(fd, watch.nsfd)
            if not watch.own or watch.ns != os.stat("/proc/self/ns/mnt").st_ino:
                # statmount/listmount's id 0 is wqd's process's own namespace only
                watch.ns_id = fan.mount_namespace_id(watch.nsfd)
            # Marked first, then the table: a change in between is reported (it
            # happened after the Watch began) rather than missed.
            watch.table = self.resolver.snapshot(watch)
        except BaseException:
            os.close(fd)
            raise
        watch.resynced = {"attached": set(), "detached": set(), "moved": set()}
        watch.reader = FanotifyReader(fd, self.sink, lambda events: self._events(watch, events),
                                      f"mount events of namespace {watch.ns}")

    def disarm(self, watch) -> None:
        reader = getattr(watch, "reader", None)
        if reader is not None:
            reader.close()
            watch.reader = None

    def _events(self, watch, events: list[FanotifyEvent]) -> None:
        source = self.source
        for event in events:
            if event.overflow:
                self.sink.dispatch(SourceLoss("mounts", 1, frozenset({watch.ns})))
                self._resync(watch)
                continue
            action = mount_action(event.mask)
            info = event.info(MountInfo)
            if action is None or info is None:
                continue
            mid = info.mnt_id
            if mid in watch.resynced[action]:
                watch.resynced[action].discard(mid)  # already reported by the resync
                continue
            known = watch.table.get(mid)
            if action == "detached":
                watch.table.pop(mid, None)
                entry = known
                if isinstance(self.resolver, MountinfoResolver) or entry is None:
                    entry = self.resolver.lookup(watch, mid, action) or entry
            else:
                entry = self.resolver.lookup(watch, mid, action)
                if entry is None and known is not None:
                    # gone before we looked: what it is we know, where it went we do not
                    entry = known if action == "attached" else dataclasses.replace(known, mount_point="")
                if entry is not None:
                    watch.table[mid] = entry
            origin = known.mount_point if action == "moved" and known is not None else None
            source.emit(watch, action, mid, entry, origin)

    def _resync(self, watch) -> None:
        try:
            changes = self.resolver.resync(watch)
        except (OSError, ValueError) as exc:
            log.error("resynchronising mounts of namespace %d: %s", watch.ns, exc)
            return
        watch.resynced = {"attached": set(), "detached": set(), "moved": set()}
        for action, entry, origin in changes.actions():
            mid = entry.mount_id
            watch.resynced[action].add(mid)
            self.source.emit(watch, action, mid, entry, origin)
        log.info("mounts of namespace %d resynchronised: %d change(s)", watch.ns, changes.size)


class MountinfoBackend:
    """Diffs of the namespace's mountinfo, woken by POLLPRI.

    The loop's selector waits for input only, and mountinfo is always readable, so
    each watched mountinfo sits alone in an epoll set of its own for ``EPOLLPRI``,
    and that set's fd is what the loop watches. Checking the set consumes the
    change (``mounts_poll`` re-arms as it reports), so each callback is at least
    one change, and one change makes one callback.

    Loss: when a read explains fewer differences than the callbacks since the
    previous read, mounts came and went unseen: ``Lost(callbacks - differences)``.
    A lower bound (one operation may change several entries, several changes may
    make one callback), and a change racing the read can rarely cost a spurious
    ``Lost(1)``; but a storm never passes silently.
    """

    name = "mountinfo"
    needs_nsfd = False

    def __init__(self, coalesce: float = 0.05) -> None:
        self.coalesce = coalesce
        self.armed: set = set()

    async def start(self, source, sink) -> None:
        self.source = source
        self.sink = sink
        self.loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        for watch in list(self.armed):
            self.disarm(watch)

    def arm(self, watch) -> None:
        watch.wakeups = 0
        watch.timer = None
        watch.waiting = False
        watch.last_scan = time.monotonic()
        ep = select.epoll()
        try:
            # Registered, then pending changes taken, then the table: a change
            # before the read is in it, one after wakes us.
            ep.register(watch.mountinfo_fd, select.EPOLLPRI)
            ep.poll(0)
            watch.table = read_mountinfo(watch.mountinfo_fd)
            self.loop.add_reader(ep.fileno(), self._ready, watch)
        except BaseException:
            ep.close()
            raise
        watch.reader = ep
        self.armed.add(watch)

    def disarm(self, watch) -> None:
        if watch not in self.armed:
            return
        self.armed.discard(watch)
        self.loop.remove_reader(watch.reader.fileno())
        watch.reader.close()
        watch.reader = None
        if watch.timer is not None:
            watch.timer.cancel()
            watch.timer = None
        watch.waiting = False

    def _ready(self, watch) -> None:
        watch.reader.poll(0)  # whatever is left of the check that woke us
        watch.wakeups += 1
        if watch.timer is not None or watch.waiting:
            return
        delay = max(0.0, watch.last_scan + self.coalesce - time.monotonic())
        watch.timer = self.loop.call_later(delay, self._rescan, watch)

    def _rescan(self, watch) -> None:
        watch.timer = None
        if watch not in self.armed:
            return
        if self.sink.congested:
            watch.waiting = True  # read later: the kernel keeps no queue, the next diff covers it
            self.sink.on_relief(lambda: self._relieved(watch))
            return
        if watch.reader.poll(0):  # a change not yet called back belongs to this read
            watch.wakeups += 1
        try:
            new = read_mountinfo(watch.mountinfo_fd)
        except OSError as exc:
            log.error("reading mountinfo of namespace %d: %s", watch.ns, exc)
            return
        watch.last_scan = time.monotonic()
        changes = diff(watch.table, new)
        watch.table = new
        unexplained = watch.wakeups - changes.size
        watch.wakeups = 0
        if unexplained > 0:
            self.sink.dispatch(SourceLoss("mounts", unexplained, frozenset({watch.ns})))
        for action, entry, origin in changes.actions():
            self.source.emit(watch, action, entry.mount_id, entry, origin)

    def _relieved(self, watch) -> None:
        watch.waiting = False
        self._rescan(watch)


def open_backend(kind: str = "auto", *, coalesce: float = 0.05, resolver: str = "auto"):
    """``auto``: fanotify where the kernel and our privileges allow, else mountinfo."""
    if kind not in ("auto", "fanotify", "mountinfo"):
        raise ValueError(f"unknown mounts backend {kind!r}")
    if kind in ("auto", "fanotify"):
        try:
            probe_fanotify()
            return FanotifyBackend(open_resolver(resolver))
        except kerr.KernelError as exc:
            if kind == "fanotify":
                raise
            log.info("mount notifications unavailable (%s); mounts fall back to polling mountinfo", exc)
    return MountinfoBackend(coalesce)


def probe_fanotify() -> None:
    fd = fan.open_mount_notifications()
    try:
        nsfd = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            fan.mark_mount_namespace(fd, nsfd)
        finally:
            os.close(nsfd)
    finally:
        os.close(fd)


def open_resolver(kind: str = "auto"):
    if kind == "mountinfo":
        return MountinfoResolver()
    if kind not in ("auto", "statmount"):
        raise ValueError(f"unknown mounts resolver {kind!r}")
    try:
        fan.listmount()
        return StatmountResolver()
    except kerr.KernelError as exc:
        if kind == "statmount":
            raise
        log.info("statmount/listmount unavailable (%s); mount ids resolved through mountinfo", exc)
        return MountinfoResolver()
