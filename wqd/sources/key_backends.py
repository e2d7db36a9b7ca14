"""Backends of the ``keys`` source: ``watch_queue``, ``proc-keys``, ``replay``.

Each has ``arm(watch)`` / ``disarm(watch)`` for one watched key, and
``filters_changed(source)`` when the set of wanted changes may have changed.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import stat

from wqd.events import KEY_CHANGE_SUBTYPE, KeyRemoved, SourceLoss
from wqd.kernel import errors as kerr
from wqd.kernel import keyctl
from wqd.kernel import watch_queue as wq
from wqd.kernel.credentials import run_as
from wqd.parse.proc_keys import KeySnapshot, diff, parse_proc_keys
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
            if isinstance(event, KeyRemoved):
                watch = source.watches.get(event.key) if event.key else None
                if watch is None:
                    watch = next((w for w in source.watches.values() if w.tag == event.tag), None)
                if watch is None or (self.check_tags and watch.tag != event.tag):
                    continue  # the removal of a watch we dropped ourselves
                self.emit(KeyRemoved(watch.serial, event.reason, event.tag))
            elif isinstance(event, SourceLoss):
                self.emit(event)
                self.resync()
            else:
                self.emit(event)

    def resync(self) -> None:
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

    def arm(self, watch) -> None:
        watch.tag = self._next_tag({w.tag for w in self.source.watches.values()})
        run_as(watch.creds, keyctl.watch_key, watch.serial, self.fd, watch.tag)

    def disarm(self, watch) -> None:
        run_as(watch.creds, keyctl.watch_key, watch.serial, self.fd, -1)

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
        for watch in list(self.source.watches.values()):
            try:
                run_as(watch.creds, keyctl.describe, watch.serial)
            except (kerr.NoSuchKey, kerr.KeyExpired):
                self.emit(KeyRemoved(watch.serial, "key removed", watch.tag))
            except kerr.KernelError:
                pass


def snapshot_keys(serials: list[int]) -> dict[int, KeySnapshot]:
    """Runs with the watcher's credentials: what it can see of each key now."""
    try:
        with open("/proc/keys") as f:
            proc = parse_proc_keys(f.read())
    except OSError:
        proc = {}
    out = {}
    for serial in serials:
        try:
            desc = keyctl.describe(serial)
        except kerr.KeyRevoked:
            entry = proc.get(serial)
            out[serial] = KeySnapshot(True, entry.flags if entry else "IR", *(
                (entry.perm, entry.uid, entry.gid) if entry else (0, 0, 0)))
            continue
        except kerr.KernelError:
            out[serial] = KeySnapshot(False)
            continue
        entry = proc.get(serial)
        members = digest = None
        try:
            payload = keyctl.read(serial)
            if desc.type == "keyring":
                members = tuple(keyctl.read_keyring_serials(serial))
            else:
                digest = hashlib.blake2b(payload, digest_size=16).digest()
        except kerr.KernelError:
            pass
        out[serial] = KeySnapshot(True, entry.flags if entry else "I", desc.perm, desc.uid, desc.gid, members, digest)
    return out


class ProcKeysBackend:
    """Polling fallback: snapshots every *interval* seconds while keys are watched."""

    name = "proc-keys"

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._timer: asyncio.TimerHandle | None = None

    async def start(self, source, sink) -> None:
        self.source = source
        self.emit = sink.dispatch
        self.loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def arm(self, watch) -> None:
        snap = run_as(watch.creds, snapshot_keys, [watch.serial])[watch.serial]
        if not snap.exists:
            raise kerr.NoSuchKey(errno.ENOKEY, "key is gone or not visible with these credentials")
        watch.state = snap
        log.debug("polling key %d as %s: %s", watch.serial, watch.creds or "the daemon", snap)
        if self._timer is None:
            self._timer = self.loop.call_later(self.interval, self._tick)

    def disarm(self, watch) -> None:
        if not self.source.watches and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def filters_changed(self, source) -> None:
        pass

    def _tick(self) -> None:
        self._timer = None
        groups: dict[object, list] = {}
        for watch in self.source.watches.values():
            groups.setdefault(watch.creds, []).append(watch)
        for creds, watches in groups.items():
            try:
                snaps = run_as(creds, snapshot_keys, [w.serial for w in watches])
            except Exception:
                log.exception("polling keys failed")
                continue
            for watch in watches:
                new = snaps[watch.serial]
                changes, gone = diff(watch.state, new)
                if changes or gone:
                    log.debug("key %d: %s%s", watch.serial, changes, " (gone)" if gone else "")
                watch.state = new
                for change, aux in changes:
                    self.source.emit_change(watch.serial, change, aux)
                if gone:
                    self.emit(KeyRemoved(watch.serial, "key removed", watch.tag))
        if self.source.watches:
            self._timer = self.loop.call_later(self.interval, self._tick)


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

    def arm(self, watch) -> None:
        pass

    def disarm(self, watch) -> None:
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
