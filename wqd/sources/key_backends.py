"""Backends of the ``keys`` source: ``watch_queue``, ``proc-keys``, ``replay``.

Each has ``async arm(watch)`` / ``async disarm(source, watch)`` for one watched key,
run in a credential helper (``source.run``), never on the event loop;
``async join(source, watch, creds)`` / ``left(source, watch, creds)`` when a
subscriber with *creds* shares or leaves a watch; and ``filters_changed(source)``
when the set of wanted changes may have changed.

Sharing one watch between subscribers (issue 12, finding 5):

- ``watch_queue``: the kernel checks View once, when ``KEYCTL_WATCH_KEY`` arms, and
  then posts every change of the key to the queue, Read or not (only an LSM's
  ``post_notification`` hook may filter, by the armer's credentials). A peer's own
  watch would get exactly that. So a watch armed by the daemon (or the first peer)
  serves every subscriber whose own Watch passed the View check and the policy:
  nothing is lost and nothing extra is shown. Sharing is safe; ``join`` does nothing.
- ``proc-keys``: the poller sees only what its credentials may Read (a keyring's
  members, a payload's digest). When a subscriber whose credentials see more joins,
  the watch is taken over by those credentials (no events from the switch itself);
  when the subscriber whose credentials poll leaves, the remaining subscribers'
  credentials are tried and the one that sees the most takes over. Subscribers with
  View only then get ``linked``/``unlinked``, as the watch queue would give them.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat

from wqd.events import KEY_CHANGE_SUBTYPE, SourceLoss, TargetGone
from wqd.kernel import errors as kerr
from wqd.kernel import watch_queue as wq
from wqd.parse.proc_keys import KeySnapshot, diff
from wqd.parse.watch_queue import WatchQueueParser
from wqd.sources.reader import FdReader, read_available

log = logging.getLogger(__name__)


def debug_enabled() -> bool:
    return log.isEnabledFor(logging.DEBUG)

READ_SIZE = 4096  # one page: whole records, and a bounded batch per wakeup
READS_PER_WAKEUP = 16
ALL_SUBTYPES = set(range(256))


class _RecordReader:
    """Reads kernel-format records from ``self.fd`` (via ``FdReader``) into the hub."""

    fd: int = -1
    final_reads = True  # notification pipes return whole records per read()
    reader: FdReader | None = None

    def _start_reader(self, source, sink, pollable: bool = True) -> None:
        self.source, self.sink, self.emit = source, sink, sink.dispatch
        self.reader = FdReader(self.fd, sink, self._read_one, self.name, READS_PER_WAKEUP, pollable)

    def _read_one(self) -> bool:
        data = read_available(self.fd, READ_SIZE, self.name)
        if data is None:
            return False
        if not data:
            self._eof()
            return False
        events = self.parser.feed(data, final=self.final_reads)
        if debug_enabled():
            log.debug("%s: read %d bytes, %d record(s)", self.name, len(data), len(events))
        self.records(events)
        return True

    def _eof(self) -> None:
        pass

    def _stop_reader(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    def records(self, events) -> None:
        source = self.source
        for event in events:
            if isinstance(event, TargetGone):
                watch = source.watches.get(event.target) if event.target else None
                if watch is None:
                    watch = next((w for w in source.watches.values() if w.tag == event.tag), None)
                if watch is None or (self.check_tags and watch.tag != event.tag):
                    continue  # the removal of a watch we dropped ourselves
                self.emit(TargetGone(source.name, watch.serial, event.reason, tag=event.tag))
            elif isinstance(event, SourceLoss):
                self.emit(event)
                self.resync()
            else:
                self.emit(event)

    def resync(self) -> None:
        pass

    async def join(self, source, watch, creds) -> None:
        pass

    def left(self, source, watch, creds) -> None:
        pass


class WatchQueueBackend(_RecordReader):
    """One notification pipe; one kernel watch per watched key."""

    name = "watch_queue"
    check_tags = True

    def __init__(self, pages: int = wq.DEFAULT_PAGES) -> None:
        self.fd, self.wfd = wq.open_notification_pipe()  # NotPackaged on ENOPKG
        try:
            wq.set_size(self.fd, pages)
        except kerr.KernelError:
            self.close()
            raise
        self.parser = WatchQueueParser()
        self._tag = 0
        self._resync: asyncio.Task | None = None
        self._filter: frozenset[str] | None | bool = False  # False: never set

    async def start(self, source, sink) -> None:
        self._start_reader(source, sink)

    async def stop(self) -> None:
        self._stop_reader()
        self.close()

    def close(self) -> None:
        for fd in (self.fd, self.wfd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.wfd = -1

    def _next_tag(self, in_use: set[int]) -> int:
        # Tags are 8 bits (WATCH_INFO_ID); 0 is left unused. With more than 255
        # watches tags repeat; the key serial in the record still tells them apart.
        for _ in range(255):
            self._tag = self._tag % 255 + 1
            if self._tag not in in_use:
                return self._tag
        return self._tag

    @property
    def helper_fds(self) -> tuple[int, ...]:
        return (self.fd,)  # KEYCTL_WATCH_KEY names the queue by fd: helpers inherit it

    async def arm(self, watch) -> None:
        watch.tag = self._next_tag({w.tag for w in self.source.watches.values()})
        try:
            await self.source.run(watch.creds, "watch_key", watch.serial, self.fd, watch.tag)
        except kerr.Busy as exc:
            if exc.errno != errno.EBUSY:
                raise
            # A watch of ours on this key outlived its subscription (its release or
            # its arming was abandoned at the helper's deadline): replace it.
            await self.source.run(watch.creds, "watch_key", watch.serial, self.fd, -1)
            await self.source.run(watch.creds, "watch_key", watch.serial, self.fd, watch.tag)

    async def disarm(self, source, watch) -> None:
        await source.run(watch.creds, "watch_key", watch.serial, self.fd, -1)

    def filters_changed(self, source) -> None:
        wanted = source.wanted_changes()
        if wanted == self._filter:
            return
        if wanted is None:
            wq.set_filter(self.fd, None)
        else:
            # Meta records (removal) must pass too: the kernel drops any type
            # that has no filter entry once a filter is set.
            wq.set_filter(self.fd, [
                (wq.WATCH_TYPE_KEY_NOTIFY, {KEY_CHANGE_SUBTYPE[c] for c in wanted}),
                (wq.WATCH_TYPE_META, ALL_SUBTYPES),
            ])
        self._filter = wanted
        log.debug("kernel filter: %s", "none" if wanted is None else sorted(wanted))

    def resync(self) -> None:
        """After a loss record: end the subscriptions of keys that went away."""
        if self._resync is None or self._resync.done():
            self._resync = asyncio.get_running_loop().create_task(self._resync_now())

    async def _resync_now(self) -> None:
        for watch in list(self.source.watches.values()):
            try:
                exists = await self.source.run(watch.creds, "exists", watch.serial)
            except Exception as exc:  # noqa: BLE001 - a helper gone: try again at the next loss
                log.warning("resync of key %d: %s", watch.serial, exc)
                continue
            if not exists and self.source.watches.get(watch.serial) is watch:
                self.emit(TargetGone(self.source.name, watch.serial, "key removed", tag=watch.tag))


def sees_more(new: KeySnapshot, old: KeySnapshot | None) -> bool:
    """Does *new* show what *old* could not (members of a keyring, a payload)?"""
    if not new.exists:
        return False
    if old is None or not old.exists:
        return True
    return (new.members is not None and old.members is None) or (new.digest is not None and old.digest is None)


class ProcKeysBackend:
    """Polling fallback: snapshots every *interval* seconds while keys are watched.

    Each credential set's keys are polled by its own helper, in its own task: a slow
    or stopped helper delays only the watches polled with those credentials, and a
    poll in flight is not started again. At most ``BATCH`` keys of one credential
    set are read per interval (the rest in the next intervals, in turn), so one uid
    with thousands of watched keys costs a bounded amount per tick.
    """

    name = "proc-keys"
    BATCH = 256
    CANDIDATES = 8  # credentials tried when the polling subscriber leaves

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._timer: asyncio.TimerHandle | None = None
        self._polling: dict[object, asyncio.Task] = {}
        self._cursor: dict[object, int] = {}
        self._tasks: set[asyncio.Task] = set()

    async def start(self, source, sink) -> None:
        self.source = source
        self.emit = sink.dispatch
        self.loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in [*self._polling.values(), *self._tasks]:
            task.cancel()
        self._polling.clear()

    async def _snapshot(self, creds, serial: int) -> KeySnapshot:
        return (await self.source.run(creds, "snapshot", [serial]))[serial]

    async def arm(self, watch) -> None:
        snap = await self._snapshot(watch.creds, watch.serial)
        if not snap.exists:
            raise kerr.NoSuchKey(errno.ENOKEY, "key is gone or not visible with these credentials")
        watch.state = snap
        log.debug("polling key %d as %s: %s", watch.serial, watch.creds or "the daemon", snap)
        if self._timer is None:
            self._timer = self.loop.call_later(self.interval, self._tick)

    async def disarm(self, source, watch) -> None:
        if not source.watches and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def join(self, source, watch, creds) -> None:
        """Take the watch over with *creds* if they see more of the key."""
        if creds == watch.creds:
            return
        snap = await self._snapshot(creds, watch.serial)
        if sees_more(snap, watch.state) and source.watches.get(watch.serial) is watch:
            self._switch(watch, creds, snap)

    def _switch(self, watch, creds, snap: KeySnapshot) -> None:
        log.debug("key %d: now polled as %s, who sees more than %s", watch.serial, creds or "the daemon",
                  watch.creds or "the daemon")
        old, watch.creds, watch.state = watch.state, creds, snap
        if old is not None:
            self._apply(watch, old, snap)

    def left(self, source, watch, creds) -> None:
        if creds != watch.creds:
            return
        task = self.loop.create_task(self._rechoose(source, watch, creds))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _rechoose(self, source, watch, gone) -> None:
        """The subscriber whose credentials polled left: the remaining one who sees most polls."""
        from wqd.sources.keys import peer_credentials  # the keys source module imports us
        candidates = []
        for sub in watch.subs:
            creds = peer_credentials(sub.owner)
            if creds not in candidates:
                candidates.append(creds)
        if gone in candidates:  # another connection of the same credentials stays
            return
        best = None
        for creds in candidates[: self.CANDIDATES]:
            try:
                snap = await self._snapshot(creds, watch.serial)
            except Exception as exc:  # noqa: BLE001
                log.debug("key %d: cannot poll as %s: %s", watch.serial, creds, exc)
                continue
            if not snap.exists:
                continue
            if best is None or sees_more(snap, best[1]):
                best = (creds, snap)
        if best is None or source.watches.get(watch.serial) is not watch or watch.creds != gone:
            return
        self._switch(watch, *best)

    def filters_changed(self, source) -> None:
        pass

    def _tick(self) -> None:
        self._timer = None
        groups: dict[object, list] = {}
        for watch in self.source.watches.values():
            groups.setdefault(watch.creds, []).append(watch)
        for creds, watches in groups.items():
            if creds in self._polling:
                continue  # still at the last one
            if len(watches) > self.BATCH:
                start = self._cursor.get(creds, 0) % len(watches)
                watches = (watches[start:] + watches[:start])[: self.BATCH]
                self._cursor[creds] = start + self.BATCH
            task = self.loop.create_task(self._poll(creds, watches))
            self._polling[creds] = task
            task.add_done_callback(lambda _t, c=creds: self._polling.pop(c, None))
        for creds in list(self._cursor):
            if creds not in groups:
                del self._cursor[creds]
        if self.source.watches:
            self._timer = self.loop.call_later(self.interval, self._tick)

    async def _poll(self, creds, watches: list) -> None:
        try:
            snaps = await self.source.run(creds, "snapshot", [w.serial for w in watches])
        except Exception as exc:  # noqa: BLE001 - a helper that failed: the next tick tries again
            log.warning("polling keys as %s failed: %s", creds or "the daemon", exc)
            return
        for watch in watches:
            if self.source.watches.get(watch.serial) is not watch or watch.creds != creds:
                continue  # released or taken over while we polled
            new = snaps[watch.serial]
            old, watch.state = watch.state, new
            self._apply(watch, old, new)

    def _apply(self, watch, old: KeySnapshot, new: KeySnapshot) -> None:
        changes, gone = diff(old, new)
        if changes or gone:
            log.debug("key %d: %s%s", watch.serial, changes, " (gone)" if gone else "")
        for change, aux in changes:
            self.source.emit_change(watch.serial, change, aux)
        if gone:
            self.emit(TargetGone(self.source.name, watch.serial, "key removed", tag=watch.tag))


class ReplayBackend(_RecordReader):
    """Kernel-format records from a file or FIFO (captures, benchmarks)."""

    name = "replay"
    check_tags = False
    final_reads = False  # a stream: records may straddle reads

    def __init__(self, path: str) -> None:
        self.path = path
        self.parser = WatchQueueParser()
        self._keepalive = -1

    async def start(self, source, sink) -> None:
        st = os.stat(self.path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        fifo = stat.S_ISFIFO(st.st_mode)
        if fifo:
            # Hold a writer ourselves, so that a client closing its end is not EOF.
            self._keepalive = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._start_reader(source, sink, pollable=fifo)

    def _eof(self) -> None:
        if self._keepalive < 0:  # a regular file, read to its end
            log.info("replay: %s read to its end", self.path)

    async def stop(self) -> None:
        self._stop_reader()
        for fd in (self.fd, self._keepalive):
            if fd >= 0:
                os.close(fd)
        self.fd = self._keepalive = -1

    async def arm(self, watch) -> None:
        pass

    async def disarm(self, source, watch) -> None:
        pass

    def filters_changed(self, source) -> None:
        pass


def open_backend(kind: str, *, replay_path: str | None = None, interval: float = 1.0, pages: int = wq.DEFAULT_PAGES):
    """``auto`` probes: the watch queue if the kernel has it, else ``proc-keys``."""
    if kind == "replay":
        if not replay_path:
            raise ValueError("the replay backend needs keys.replay_path")
        return ReplayBackend(replay_path)
    if kind in ("auto", "watch_queue"):
        try:
            return WatchQueueBackend(pages)
        except kerr.NotPackaged:
            if kind == "watch_queue":
                raise
            log.info("no watch queue in this kernel (ENOPKG); keys fall back to polling /proc/keys")
        except kerr.KernelError as exc:
            if kind == "watch_queue":
                raise
            log.warning("notification pipe unusable (%s); keys fall back to polling", exc)
    if kind in ("auto", "proc-keys"):
        return ProcKeysBackend(interval)
    raise ValueError(f"unknown keys backend {kind!r}")
