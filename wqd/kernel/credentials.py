"""Credentials to act with, and acting with them: the blocking, asyncio-free part.

``Credentials`` (uid, gid, groups) names what a key or file operation is done as;
``FRAME`` and ``MAX_MESSAGE`` are the framing of the helper protocol (a
length-prefixed pickle, between two root processes); ``run_as`` forks a child
with the credentials and waits for it, for tests and one-shot tools.

The daemon's side, a pool of long-lived helper processes driven by the event
loop, is a source's concern and lives with the sources: ``wqd.sources.helper_pool``
(the kernel layer never imports asyncio; ``tests/test_layers.py``). The helper
process itself, the operations it may perform, is ``wqd.kernel.cred_helper``.
"""

from __future__ import annotations

import os
import pickle
import struct
from dataclasses import dataclass

from wqd.kernel import errors as kerr

FRAME = struct.Struct("=I")  # the length before each pickled message
MAX_MESSAGE = 16 << 20  # a reply bigger than this is a broken helper


@dataclass(frozen=True, slots=True)
class Credentials:
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def is_current(self) -> bool:
        return os.geteuid() == self.uid


def run_as(creds: Credentials | None, fn, *args):
    """Call ``fn(*args)`` as *creds* in a forked child and wait for it: **blocking**.

    For tests and one-shot tools only (e.g. to compute what a uid may open); the
    daemon never calls it (it uses ``wqd.sources.helper_pool.HelperPool``).
    """
    if creds is None or creds.is_current():
        return fn(*args)
    if os.geteuid() != 0:
        raise kerr.PermissionDenied(1, "changing credentials needs root")
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # child: never return into the caller's code
        status = 0
        try:
            os.close(r)
            try:
                os.setgroups(list(creds.groups))
                os.setresgid(creds.gid, creds.gid, creds.gid)
                os.setresuid(creds.uid, creds.uid, creds.uid)
                result = (True, fn(*args))
            except BaseException as exc:  # noqa: BLE001 - carried to the parent
                result = (False, exc if isinstance(exc, OSError) else RuntimeError(repr(exc)))
            data = pickle.dumps(result)
            view = memoryview(FRAME.pack(len(data)) + data)
            while view:
                view = view[os.write(w, view):]
        except BaseException:  # noqa: BLE001
            status = 1
        finally:
            os._exit(status)
    os.close(w)
    try:
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    data = b"".join(chunks)
    if len(data) < FRAME.size:
        raise kerr.KernelError(5, "credential helper died")
    ok, value = pickle.loads(data[FRAME.size:])
    if ok:
        return value
    raise value
