"""Run a short kernel operation with another user's credentials.

The key subsystem has no capability that lets root see every user's keys: a key
is visible to whoever its permission word grants View. So to resolve ``@u`` of a
peer, describe a key as that peer would see it, or arm a watch on a key only the
peer may view, a root daemon forks a child that drops to the peer's uid and groups,
does the operation, and reports back through a pipe. The kernel then judges the
access itself. The child shares the parent's fds (the notification pipe).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from wqd.kernel.errors import KernelError, PermissionDenied

T = TypeVar("T")
_LEN = struct.Struct("=I")


@dataclass(frozen=True, slots=True)
class Credentials:
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def is_current(self) -> bool:
        return os.geteuid() == self.uid


def run_as(creds: Credentials | None, fn: Callable[..., T], *args) -> T:
    """Call ``fn(*args)`` as *creds* (in a forked child), or here when ``None``.

    Exceptions raised by *fn* are re-raised in the caller. Blocks for the child's
    lifetime, which is a few syscalls: call it for short kernel operations only.
    """
    if creds is None or creds.is_current():
        return fn(*args)
    if os.geteuid() != 0:
        raise PermissionDenied(1, "changing credentials needs root")
    import pickle  # only when a helper runs: keeps daemon start-up lean
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
            os.write(w, _LEN.pack(len(data)))
            view = memoryview(data)
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
    if len(data) < _LEN.size:
        raise KernelError(5, "credential helper died")
    ok, value = pickle.loads(data[_LEN.size:])
    if ok:
        return value
    raise value
