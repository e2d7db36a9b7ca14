"""One kernel fd on the event loop, with back-pressure: the reader every source shares;
and the one waiter for changes of a mount table (``MountinfoWaiter``).

``add_reader`` on the fd; each wakeup does at most *batch* reads (so method calls
are answered during a storm), until ``read_one`` says the fd is drained. While the
hub's queues are filling (``sink.congested``) the reader is removed: data waits in
the kernel, which reports overflow its own way (a loss record, ``ENOBUFS``,
``FAN_Q_OVERFLOW``), rather than queueing without bound in wqd. It comes back when
the sink calls ``on_relief``.

Regular files cannot be polled (``pollable=False``): they are read in batches
from the loop until ``read_one`` reports the end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def read_available(fd: int, size: int, name: str) -> bytes | None:
    """One non-blocking read: the bytes (``b""`` at the end), or None when there is
    nothing to read now (EAGAIN) or the read failed (logged)."""
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return None
    except OSError as exc:
        log.error("reading %s: %s", name, exc)
        return None


class FdReader:
    def __init__(self, fd: int, sink, read_one: Callable[[], bool], name: str, batch: int = 16,
                 pollable: bool = True) -> None:
        """*read_one* reads and handles one chunk; it returns False when there is
        nothing more to read now (EAGAIN, or the end of a regular file)."""
        self.fd = fd
        self.sink = sink
        self.read_one = read_one
        self.name = name
        self.batch = batch
        self.pollable = pollable
        self.loop = asyncio.get_running_loop()
        self.paused = False
        self.closed = False
        if pollable:
            self.loop.add_reader(fd, self._drain)
        else:
            self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        for _ in range(self.batch):
            if self.closed:
                return
            if self.sink.congested:
                self._pause()
                return
            try:
                more = self.read_one()
            except Exception:
                log.exception("reading %s", self.name)
                more = False
            if not more:
                return
        if not self.pollable and not self.closed:
            self.loop.call_soon(self._drain)  # a file: more to read, after others had their turn

    def _pause(self) -> None:
        if self.pollable:
            self.loop.remove_reader(self.fd)
        self.paused = True
        self.sink.on_relief(self._resume)

    def _resume(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            if self.pollable:
                self.loop.add_reader(self.fd, self._drain)
            self._drain()

    def close(self) -> None:
        """Stop reading (the fd itself belongs to the caller). Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.pollable and not self.paused:
            self.loop.remove_reader(self.fd)


class MountinfoWaiter:
    """Calls *changed* after the mount table open at *fd* (a ``/proc/PID/mountinfo``)
    changed: what ``mounts`` (its ``mountinfo`` backend) and ``fs-errors`` (to see
    an unmount) both wait for.

    The kernel signals a change of a mount table as ``POLLPRI`` (fs/proc_namespace.c
    ``mounts_poll``), and mountinfo is always readable, while the loop's selector
    waits for input only. So the fd sits alone in an epoll set of its own for
    ``EPOLLPRI``, and that set's fd is what the loop watches: checking the set
    consumes the change (``mounts_poll`` re-arms as it reports), so each wakeup is
    at least one change, and one change makes one wakeup.

    *changed* is called at most once every *coalesce* seconds (at once after a
    quiet spell), and not again until the owner has called ``take``, which it does
    when it reads the table: a storm costs a bounded number of reads, and an
    owner that puts its read off (back-pressure) is not called meanwhile; the
    changes wait in the count. The fd is the caller's (armed from construction: a
    change after it wakes us, so the caller reads its first table afterwards).
    """

    def __init__(self, fd: int, changed: Callable[[], None], coalesce: float = 0.05) -> None:
        self.fd = fd
        self.changed = changed
        self.coalesce = coalesce
        self.loop = asyncio.get_running_loop()
        self.wakeups = 0  # changes signalled since the last take
        self.taken = True  # the owner has read since the last call: the next change may call again
        self.last = time.monotonic()  # the last take
        self.timer: asyncio.TimerHandle | None = None
        self.epoll = select.epoll()
        try:
            self.epoll.register(fd, select.EPOLLPRI)
            self.epoll.poll(0)  # what is pending now, the caller's first read covers
            self.loop.add_reader(self.epoll.fileno(), self._ready)
        except BaseException:
            self.epoll.close()
            raise

    def take(self) -> int:
        """The owner is about to read the table: how many changes were signalled
        since the last ``take`` (one signalled but not yet called back belongs to
        this read too). From now on a change calls *changed* again."""
        if self.epoll.poll(0):
            self.wakeups += 1
        count, self.wakeups = self.wakeups, 0
        self.taken = True
        self.last = time.monotonic()
        return count

    def _ready(self) -> None:
        self.epoll.poll(0)  # whatever is left of the check that woke us
        self.wakeups += 1
        if self.timer is None and self.taken:
            delay = max(0.0, self.last + self.coalesce - time.monotonic())
            self.timer = self.loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self.timer = None
        self.taken = False
        self.changed()

    def close(self) -> None:
        """Stop waiting (the fd itself belongs to the caller). Idempotent."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.epoll.closed:
            return
        self.loop.remove_reader(self.epoll.fileno())
        self.epoll.close()
