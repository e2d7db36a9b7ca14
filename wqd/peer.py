"""Who a D-Bus peer is: the credentials the bus took from the kernel at connect time.

Captured once per unique name (never re-read), from
``org.freedesktop.DBus.GetConnectionCredentials``. Anything read from ``/proc``
goes through a pidfd and is verified (same uid, process still alive) before it is
trusted; on doubt the field stays unknown, and policies fail closed on unknowns.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    unique_name: str
    uid: int
    gids: frozenset[int] = frozenset()
    pid: int | None = None
    security_label: str | None = None
    # Read through a verified pidfd at first contact; None when unknown.
    start_time: int | None = None
    mnt_ns: int | None = None
    user_ns: int | None = None
    pid_ns: int | None = None
    verified: bool = False
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_root(self) -> bool:
        return self.uid == 0


class IdentityUnclear(Exception):
    """The peer's process could not be pinned down; callers fail closed."""


def _proc_start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # comm may hold spaces and parentheses: the fields after the last ')' are fixed.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])  # field 22, starttime


def _proc_uids(pid: int) -> tuple[int, ...]:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"Uid:"):
                return tuple(int(x) for x in line.split()[1:])
    raise IdentityUnclear("no Uid line")


def _proc_gids(pid: int) -> frozenset[int]:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"Groups:"):
                return frozenset(int(x) for x in line.split()[1:])
    return frozenset()


def _pidfd_alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, just not ours to signal


def inspect_process(pid: int, uid: int, pidfd: int | None = None) -> dict:
    """Read start time, groups and namespaces of *pid*, verified against *uid*.

    With *pidfd* (from the bus's ProcessFD) it is used as is; otherwise a pidfd is
    opened for the PID. The reads are trusted only if, afterwards, the pidfd still
    names a live process whose real uid is *uid*. Raises ``IdentityUnclear``.
    """
    own = pidfd is None
    try:
        fd = os.pidfd_open(pid) if own else pidfd
    except OSError as exc:
        raise IdentityUnclear(f"pidfd_open({pid}): {exc.strerror}") from None
    try:
        try:
            start = _proc_start_time(pid)
            uids = _proc_uids(pid)
            gids = _proc_gids(pid)
            ns = {}
            for name in ("mnt", "user", "pid"):
                try:
                    ns[name] = os.stat(f"/proc/{pid}/ns/{name}").st_ino
                except OSError:
                    ns[name] = None
        except (OSError, ValueError, IndexError) as exc:
            raise IdentityUnclear(f"/proc/{pid}: {exc}") from None
        if uids[0] != uid or not _pidfd_alive(fd):
            raise IdentityUnclear(f"process {pid} is not the peer that connected")
        return {"start_time": start, "gids": gids, "mnt_ns": ns["mnt"], "user_ns": ns["user"], "pid_ns": ns["pid"]}
    finally:
        if own:
            os.close(fd)


def own_namespaces() -> dict[str, int]:
    return {name: os.stat(f"/proc/self/ns/{name}").st_ino for name in ("mnt", "user", "pid")}
