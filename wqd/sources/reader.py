"""One kernel fd on the event loop, with back-pressure: the reader every source shares.

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
