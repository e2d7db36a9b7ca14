"""Backends of the ``mounts`` source, and the fanotify fd reader ``fs-errors`` shares.

- ``fanotify``: one fanotify group per watched mount namespace (``FAN_REPORT_MNT``,
  ``FAN_MARK_MNTNS``, Linux >= 6.15, CAP_SYS_ADMIN). Events carry a 64-bit mount
  id; a resolver turns it into a ``MountEntry``: ``statmount`` (Linux >= 6.8), or
  where that is missing, correlation with a fresh read of the namespace's
  mountinfo. A table of the namespace's mounts, kept from the events, names what
  a detached mount was (the kernel can no longer say). ``FAN_Q_OVERFLOW`` ->
  ``Lost`` for that namespace, then a fresh table and the difference reported.
  Only the statmount resolver needs the namespace's 64-bit id (``NS_GET_MNTNS_ID``):
  without that ioctl the mountinfo resolver still serves another namespace.
- ``mountinfo``: ``poll(POLLPRI)`` on the namespace's mountinfo (``MountinfoWaiter``,
  ``wqd.sources.reader``), then read and diff. Rescans are at
  most every ``coalesce`` seconds, so a storm costs a bounded number of reads. A
  mount that comes and goes between two reads is invisible: when the reads saw
  fewer differences than the kernel signalled changes, the shortfall is reported
  as ``Lost`` (a lower bound; see ``MountinfoBackend``).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from wqd.events import SourceLoss
from wqd.kernel import errors as kerr
from wqd.kernel import fanotify as fan
from wqd.parse.fanotify import FanotifyEvent, FanotifyParser, MountInfo, mount_action
from wqd.parse.mountinfo import MountDiff, MountEntry, MountinfoParser, diff, entry_from_statmount
from wqd.sources.reader import FdReader, MountinfoWaiter, read_available

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
#
# A resolver is made per watched namespace (``FanotifyBackend.arm``), after the
# namespace is marked, and keeps what it needs of it.

class StatmountResolver:
    """Asks the kernel: ``statmount`` by mount id, ``listmount`` for a snapshot."""

    name = "statmount"

    def __init__(self, watch) -> None:
        # statmount/listmount's id 0 is wqd's process's own namespace only; any
        # other is named by its 64-bit id (NS_GET_MNTNS_ID, only this resolver needs it)
        own = watch.own and watch.ns == os.stat("/proc/self/ns/mnt").st_ino
        self.ns_id = 0 if own else fan.mount_namespace_id(watch.nsfd)

    def snapshot(self) -> dict[int, MountEntry]:
        table = {}
        for mid in fan.listmount(self.ns_id):
            entry = self.lookup(mid, "attached", None)
            if entry is not None:
                table[mid] = entry
        return table

    def lookup(self, mnt_id: int, action: str, known: MountEntry | None) -> MountEntry | None:
        """What mount *mnt_id* is now (*known*: what the table says it was)."""
        if action == "detached":
            return None  # a detached mount is gone from statmount's view: the table knows
        try:
            return entry_from_statmount(fan.statmount(mnt_id, self.ns_id))
        except kerr.KernelError as exc:
            if exc.errno != errno.ENOENT:
                log.debug("statmount(%#x): %s", mnt_id, exc)
            return None  # came and went before we looked

    def resync(self, table: dict[int, MountEntry]) -> tuple[MountDiff, dict[int, MountEntry]]:
        """What changed since *table*, and the table to keep."""
        new = self.snapshot()
        return diff(table, new), new


class MountinfoResolver:
    """Where statmount is missing: correlate events with mountinfo differences, in order.

    Each lookup re-reads the namespace's mountinfo and queues what appeared,
    vanished or moved since the last read; an event takes its own queued entry
    when it knows the mount already, else the first queued entry of its kind.
    Mount ids in the entries are mountinfo's; the event keeps the kernel's 64-bit id.
    """

    name = "mountinfo"

    def __init__(self, watch) -> None:
        self.fd = watch.mountinfo_fd
        self.seen: dict[int, MountEntry] = {}  # mountinfo as last read
        self.pending: dict[str, deque] = {"attached": deque(), "detached": deque(), "moved": deque()}

    def snapshot(self) -> dict[int, MountEntry]:
        self.seen = read_mountinfo(self.fd)
        for queue in self.pending.values():
            queue.clear()
        return {}  # the table learns the kernel's ids from the events

    def _rescan(self) -> MountDiff:
        new = read_mountinfo(self.fd)
        out = diff(self.seen, new)
        self.seen = new
        for action, entry, _origin in out.actions():
            self.pending[action].append(entry)
        return out

    def lookup(self, mnt_id: int, action: str, known: MountEntry | None) -> MountEntry | None:
        self._rescan()
        queue = self.pending[action]
        if known is not None:  # take its own entry; never another mount's
            for i, entry in enumerate(queue):
                if entry.same_object(known) and (action != "detached" or entry.mount_point == known.mount_point):
                    del queue[i]
                    return entry
            return known if action == "detached" else None
        return queue.popleft() if queue else None

    def resync(self, table: dict[int, MountEntry]) -> tuple[MountDiff, dict[int, MountEntry]]:
        out = self._rescan()
        for queue in self.pending.values():
            queue.clear()
        return out, table


@dataclass(eq=False)
class FanotifyNamespace:
    """``FanotifyBackend``'s state of one watched namespace (``NamespaceWatch.state``)."""

    resolver: StatmountResolver | MountinfoResolver
    table: dict[int, MountEntry]  # the kernel's 64-bit mount id -> what it is, kept from the events
    reader: FanotifyReader | None = None
    # mount ids a resync reported, by action: their queued events are not reported again
    resynced: dict[str, set[int]] = dataclasses.field(default_factory=lambda: _by_action(set))


def _by_action(make) -> dict:
    return {action: make() for action in ("attached", "detached", "moved")}


class FanotifyBackend:
    name = "fanotify"
    needs_nsfd = True

    def __init__(self, resolver: type[StatmountResolver] | type[MountinfoResolver]) -> None:
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
            # Marked first, then the table: a change in between is reported (it
            # happened after the Watch began) rather than missed.
            resolver = self.resolver(watch)
            state = FanotifyNamespace(resolver, resolver.snapshot())
        except BaseException:
            os.close(fd)
            raise
        state.reader = FanotifyReader(fd, self.sink, lambda events: self._events(watch, state, events),
                                      f"mount events of namespace {watch.ns}")
        watch.state = state

    def disarm(self, watch) -> None:
        state, watch.state = watch.state, None
        if state is not None:
            state.reader.close()

    def mounts_known(self, watch) -> int:
        return len(watch.state.table)

    def _events(self, watch, state: FanotifyNamespace, events: list[FanotifyEvent]) -> None:
        source = self.source
        for event in events:
            if event.overflow:
                self.sink.dispatch(SourceLoss(self.source.name, 1, frozenset({watch.ns})))
                self._resync(watch, state)
                continue
            action = mount_action(event.mask)
            info = event.info(MountInfo)
            if action is None or info is None:
                continue
            mid = info.mnt_id
            if mid in state.resynced[action]:
                state.resynced[action].discard(mid)  # already reported by the resync
                continue
            known = state.table.get(mid)
            if action == "detached":
                state.table.pop(mid, None)
                entry = state.resolver.lookup(mid, action, known) or known
            else:
                entry = state.resolver.lookup(mid, action, known)
                if entry is None and known is not None:
                    # gone before we looked: what it is we know, where it went we do not
                    entry = known if action == "attached" else dataclasses.replace(known, mount_point="")
                if entry is not None:
                    state.table[mid] = entry
            origin = known.mount_point if action == "moved" and known is not None else None
            source.emit(watch, action, mid, entry, origin)

    def _resync(self, watch, state: FanotifyNamespace) -> None:
        try:
            changes, state.table = state.resolver.resync(state.table)
        except (OSError, ValueError) as exc:
            log.error("resynchronising mounts of namespace %d: %s", watch.ns, exc)
            return
        state.resynced = _by_action(set)
        for action, entry, origin in changes.actions():
            mid = entry.mount_id
            state.resynced[action].add(mid)
            self.source.emit(watch, action, mid, entry, origin)
        log.info("mounts of namespace %d resynchronised: %d change(s)", watch.ns, changes.size)


@dataclass(eq=False)
class MountinfoNamespace:
    """``MountinfoBackend``'s state of one watched namespace (``NamespaceWatch.state``)."""

    waiter: MountinfoWaiter
    table: dict[int, MountEntry] = dataclasses.field(default_factory=dict)  # mountinfo as last read
    unexplained: int = 0  # changes signalled before a read that failed: the next read owes them


class MountinfoBackend:
    """Diffs of the namespace's mountinfo, woken by POLLPRI (``MountinfoWaiter``):
    each callback is at least one change, and one change makes one callback; a
    storm is read at most every ``coalesce`` seconds.

    Loss: when a read explains fewer differences than the changes signalled since
    the previous read, mounts came and went unseen: ``Lost(changes - differences)``.
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

    async def stop(self) -> None:
        for watch in list(self.armed):
            self.disarm(watch)

    def arm(self, watch) -> None:
        # Armed, then the table: a change before the read is in it, one after wakes us.
        waiter = MountinfoWaiter(watch.mountinfo_fd, lambda: self._rescan(watch), self.coalesce)
        try:
            state = MountinfoNamespace(waiter, read_mountinfo(watch.mountinfo_fd))
        except BaseException:
            waiter.close()
            raise
        watch.state = state
        self.armed.add(watch)

    def disarm(self, watch) -> None:
        if watch not in self.armed:
            return
        self.armed.discard(watch)
        state, watch.state = watch.state, None
        state.waiter.close()

    def mounts_known(self, watch) -> int:
        return len(watch.state.table)

    def _rescan(self, watch) -> None:
        if watch not in self.armed:
            return  # disarmed while it waited for relief
        if self.sink.congested:
            # read later: the kernel keeps no queue, the next diff covers it (and
            # the waiter calls again only once this read is done)
            self.sink.on_relief(lambda: self._rescan(watch))
            return
        state = watch.state
        signalled = state.waiter.take() + state.unexplained
        try:
            new = read_mountinfo(watch.mountinfo_fd)
        except OSError as exc:
            log.error("reading mountinfo of namespace %d: %s", watch.ns, exc)
            state.unexplained = signalled
            return
        state.unexplained = 0
        changes = diff(state.table, new)
        state.table = new
        unexplained = signalled - changes.size
        if unexplained > 0:
            self.sink.dispatch(SourceLoss(self.source.name, unexplained, frozenset({watch.ns})))
        for action, entry, origin in changes.actions():
            self.source.emit(watch, action, entry.mount_id, entry, origin)


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
    """The resolver class (one is made per watched namespace): ``auto`` is
    statmount where the kernel has it, else mountinfo."""
    if kind == "mountinfo":
        return MountinfoResolver
    if kind not in ("auto", "statmount"):
        raise ValueError(f"unknown mounts resolver {kind!r}")
    try:
        fan.listmount()
        return StatmountResolver
    except kerr.KernelError as exc:
        if kind == "statmount":
            raise
        log.info("statmount/listmount unavailable (%s); mount ids resolved through mountinfo", exc)
        return MountinfoResolver
