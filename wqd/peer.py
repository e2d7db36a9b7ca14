"""Who a D-Bus peer is: the credentials the bus took from the kernel at connect time.

Captured once per unique name (never re-read), from
``org.freedesktop.DBus.GetConnectionCredentials``: the uid, groups and security
label are the kernel's (``SO_PEERCRED``, ``SO_PEERGROUPS``, ``SO_PEERSEC``) as of
``connect()``. What the bus does not carry (start time, namespaces, uid/gid maps,
sandbox identity) is read under ``/proc`` once, at first contact, and only after
the process has been pinned down:

1. a pidfd for it: the bus's own ``ProcessFD`` (``SO_PEERPIDFD``, pinned when the
   peer connected) where offered, else ``pidfd_open(ProcessID)``;
2. ``/proc/PID`` opened as a directory fd, then the pidfd checked alive: the
   directory is now bound to that very process (a reused PID would be a different
   ``struct pid``), and every later read goes through it (``openat``);
3. verification before anything else is read: the process's effective uid is the
   one the bus reported, and, unless the bus's ``ProcessFD`` pinned it (a pidfd
   taken at connect time cannot name a later process), it started no later than
   the moment wqd saw the peer's unique name appear (``NameOwnerChanged`` with an
   empty old owner, recorded by ``wqd.bus.identity``, in the ticks of
   ``/proc/PID/stat``'s starttime). A process started after that cannot be the one
   that connected: the connector exited and its PID was reused, while its
   connection lived on in a child or a passed fd.
4. a peer without ``ProcessFD`` whose appearance wqd did not see (it connected
   before wqd's match rule took effect: before wqd started, or the client that
   activated it) has no moment to be checked against: it is unverifiable.

Residual windows: ``starttime`` has clock-tick resolution (a PID reused within
the same 10 ms tick); and the bus records the PID at ``connect()`` while the name
appears at ``Hello``, up to the bus's ``auth_timeout`` later (5 s on Debian's
system bus, 240 s on session buses): a connector that exits and has its PID
reused in between passes. Reusing a PID means cycling the whole PID space (an
unprivileged user cannot choose a host PID), so the window must be shorter than
that takes; ``ProcessFD`` closes both.

On any doubt the fields stay unknown (``verified=False``) and policies fail
closed on unknowns: the ``namespace`` plugin denies such a peer outright, the
``sandbox`` plugin too (it might be sandboxed), and it cannot watch mounts. Its
uid and groups, the bus's, still count for the ``unix`` and ``rules`` plugins.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import stat
import time
from dataclasses import dataclass, field

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
FLATPAK_INFO_MAX = 64 * 1024  # bytes; a real .flatpak-info is a few hundred


@dataclass(frozen=True, slots=True)
class Sandbox:
    """A sandboxed app: ``kind`` is ``flatpak`` or ``snap``.

    ``confirmed`` says the identity comes from something the app cannot forge: the
    ``.flatpak-info`` in its root (read-only inside the sandbox), or the AppArmor
    label the kernel reported through the bus (``snap.NAME.APP``). A snap seen only
    through its cgroup name is sandboxed but unconfirmed (``app_id`` may be a lie):
    it is denied, whatever the rules say for that app id.
    """

    kind: str
    app_id: str | None
    confirmed: bool


IdMap = tuple[tuple[int, int, int], ...]  # (inside, outside, count) lines of uid_map / gid_map


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    unique_name: str
    uid: int
    gids: frozenset[int] = frozenset()
    pid: int | None = None
    security_label: str | None = None
    # Read through a verified pidfd at first contact; None when unknown.
    start_time: int | None = None  # clock ticks since boot (/proc/PID/stat field 22)
    mnt_ns: int | None = None
    user_ns: int | None = None
    pid_ns: int | None = None
    verified: bool = False
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    gid: int | None = None  # effective (primary) gid, from /proc/PID/status
    uid_map: IdMap | None = None  # the peer's user namespace, as seen from wqd's
    gid_map: IdMap | None = None
    sandbox: Sandbox | None = None

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def in_group(self, gid: int) -> bool:
        """Primary or supplementary group."""
        return gid == self.gid or gid in self.gids

    @property
    def app_id(self) -> str | None:
        """The sandboxed app's id, only where confirmed."""
        sb = self.sandbox
        return sb.app_id if sb is not None and sb.confirmed else None


class IdentityUnclear(Exception):
    """The peer's process could not be pinned down; callers fail closed."""


# -- sans-I/O parsers of /proc files -------------------------------------------


def parse_stat_start_time(stat_line: bytes) -> int:
    # comm may hold spaces and parentheses: the fields after the last ')' are fixed.
    fields = stat_line[stat_line.rindex(b")") + 2 :].split()
    return int(fields[19])  # field 22, starttime


def parse_status(status: bytes) -> dict[str, tuple[int, ...]]:
    """``Uid``, ``Gid`` (real, effective, saved, fs) and ``Groups`` of /proc/PID/status."""
    out: dict[str, tuple[int, ...]] = {}
    for line in status.splitlines():
        key, _, value = line.partition(b":")
        if key in (b"Uid", b"Gid", b"Groups"):
            out[key.decode()] = tuple(int(x) for x in value.split())
    if "Uid" not in out or "Gid" not in out:
        raise IdentityUnclear("no Uid/Gid in /proc/PID/status")
    return out


def parse_id_map(text: bytes) -> IdMap:
    lines = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            lines.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return tuple(lines)


def map_to_inside(value: int, id_map: IdMap | None) -> int | None:
    """Translate an id as wqd sees it into the peer's namespace; ``None`` if unmapped."""
    if id_map is None:
        return None
    for inside, outside, count in id_map:
        if outside <= value < outside + count:
            return inside + (value - outside)
    return None


def parse_flatpak_info(data: bytes) -> str | None:
    """The app id (``[Application] name=``) of a ``.flatpak-info`` key file, else None."""
    section = None
    for raw in data.decode("utf-8", "replace").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Application" and "=" in line:
            key, _, value = line.partition("=")
            if key.strip() == "name":
                value = value.strip()
                return value if APP_ID.fullmatch(value) else None
    return None


APP_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")
_SNAP_LABEL = re.compile(r"snap\.([a-z0-9][a-z0-9-]{0,39})\.[^ ]+")
_SNAP_CGROUP = re.compile(r"(?:^|/)snap\.([a-z0-9][a-z0-9-]{0,39})\.[^/]+\.scope(?:/|$)")


def snap_from_label(label: str | None) -> str | None:
    """``snap.NAME.APP (enforce)`` (AppArmor, via ``LinuxSecurityLabel``) -> NAME."""
    if not label:
        return None
    m = _SNAP_LABEL.fullmatch(label.split(" ", 1)[0])
    return m.group(1) if m else None


def snap_from_cgroup(cgroup: bytes) -> str | None:
    """A ``snap.NAME.APP-UUID.scope`` cgroup in /proc/PID/cgroup -> NAME."""
    for line in cgroup.decode("utf-8", "replace").splitlines():
        path = line.split(":", 2)[-1]
        m = _SNAP_CGROUP.search(path)
        if m:
            return m.group(1)
    return None


# -- reading a process safely ----------------------------------------------------


def _pidfd_alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, just not ours to signal


def pidfd_pid(pidfd: int) -> int:
    """The PID (in wqd's PID namespace) a pidfd refers to: ``Pid:`` of its fdinfo.

    0 means the process is in a PID namespace wqd cannot see, -1 that it has exited.
    """
    with open(f"/proc/self/fdinfo/{pidfd}", "rb") as f:
        for line in f:
            if line.startswith(b"Pid:"):
                return int(line.split()[1])
    raise IdentityUnclear("this kernel's pidfd fdinfo has no Pid line")


def _read_at(dirfd: int, name: str, limit: int = 65536) -> bytes:
    """Read at most *limit* bytes of a regular file (never a FIFO or device a peer planted)."""
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dirfd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{name} is not a regular file")
        chunks, size = [], 0
        while size < limit:
            chunk = os.read(fd, min(65536, limit - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class PinnedProcess:
    """``/proc/PID`` of the process a pidfd refers to, as a directory fd.

    Use as a context manager; :meth:`read` and :meth:`open` go through the
    directory fd, so they see that process or fail (ESRCH/ENOENT once it exits).
    """

    def __init__(self, pid: int, pidfd: int | None = None) -> None:
        self.pid = pid
        self._own_pidfd = pidfd is None
        self.pidfd = -1
        self.dirfd = -1
        try:
            self.pidfd = os.pidfd_open(pid) if pidfd is None else pidfd
            self.dirfd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            self.close()
            raise IdentityUnclear(f"process {pid}: {exc.strerror}") from None
        if not _pidfd_alive(self.pidfd):
            self.close()
            raise IdentityUnclear(f"process {pid} exited")

    def read(self, name: str, limit: int = 65536) -> bytes:
        return _read_at(self.dirfd, name, limit)

    def alive(self) -> bool:
        return _pidfd_alive(self.pidfd)

    def close(self) -> None:
        if self.dirfd >= 0:
            os.close(self.dirfd)
            self.dirfd = -1
        if self._own_pidfd and self.pidfd >= 0:
            os.close(self.pidfd)
        self.pidfd = -1

    def __enter__(self) -> PinnedProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _proc_start_time(pid: int) -> int:
    """starttime of /proc/PID/stat, by PID (racy on its own: compare it with a
    recorded start time while a pidfd is held, or use :func:`reopen`)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return parse_stat_start_time(f.read())


def boottime_ticks() -> int:
    """Now, in the unit of /proc/PID/stat's starttime (clock ticks since boot)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * CLOCK_TICKS)


def _verify(proc: PinnedProcess, uid: int, not_after: int | None) -> tuple[int, dict]:
    try:
        start = parse_stat_start_time(proc.read("stat"))
        status = parse_status(proc.read("status"))
    except (OSError, ValueError, IndexError) as exc:
        raise IdentityUnclear(f"/proc/{proc.pid}: {exc}") from None
    euid = status["Uid"][1]
    if euid != uid:
        raise IdentityUnclear(f"process {proc.pid} runs as uid {euid}, the bus said {uid}")
    if not_after is not None and start > not_after:
        raise IdentityUnclear(f"process {proc.pid} started after its connection appeared on the bus: PID reused")
    return start, status


def _sandbox(proc: PinnedProcess, label: str | None) -> Sandbox | None:
    try:
        info = proc.read("root/.flatpak-info", FLATPAK_INFO_MAX + 1)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        if exc.errno in (errno.ESRCH, errno.EACCES, errno.EPERM):
            raise IdentityUnclear(f"/proc/{proc.pid}/root: {exc.strerror}") from None
        return Sandbox("flatpak", None, False)  # there, but not a readable regular file
    if info is not None:
        app = parse_flatpak_info(info) if len(info) <= FLATPAK_INFO_MAX else None
        return Sandbox("flatpak", app, app is not None)
    name = snap_from_label(label)
    if name is not None:
        return Sandbox("snap", name, True)
    try:
        name = snap_from_cgroup(proc.read("cgroup"))
    except OSError as exc:
        raise IdentityUnclear(f"/proc/{proc.pid}/cgroup: {exc.strerror}") from None
    if name is not None:
        return Sandbox("snap", name, False)
    return None


def inspect_process(pid: int, uid: int, pidfd: int | None = None, *, not_after: int | None = None,
                    label: str | None = None) -> dict:
    """Pin *pid* (through *pidfd* if given), verify it, then read what the bus lacks.

    *uid* is what the bus reported; *not_after* is when the peer's name appeared
    on the bus, in :func:`boottime_ticks` units. Returns the fields of ``PeerCredentials`` read
    here. Raises ``IdentityUnclear``.
    """
    with PinnedProcess(pid, pidfd) as proc:
        start, status = _verify(proc, uid, not_after)
        info: dict = {"start_time": start, "gid": status["Gid"][1], "gids": frozenset(status.get("Groups", ()))}
        for name in ("mnt", "user", "pid"):
            try:
                info[f"{name}_ns"] = os.stat(f"ns/{name}", dir_fd=proc.dirfd).st_ino
            except OSError:
                info[f"{name}_ns"] = None
        try:
            info["uid_map"] = parse_id_map(proc.read("uid_map"))
            info["gid_map"] = parse_id_map(proc.read("gid_map"))
        except (OSError, ValueError):
            info["uid_map"] = info["gid_map"] = None
        info["sandbox"] = _sandbox(proc, label)
        if not proc.alive():
            raise IdentityUnclear(f"process {pid} exited while being inspected")
        return info


def reopen(peer: PeerCredentials) -> PinnedProcess:
    """Pin the peer's process again, later: same PID, uid and start time, or ``IdentityUnclear``."""
    if not peer.verified or peer.pid is None or peer.start_time is None:
        raise IdentityUnclear(f"peer {peer.unique_name} has no verified process")
    proc = PinnedProcess(peer.pid)
    try:
        start, _ = _verify(proc, peer.uid, None)
        if start != peer.start_time:
            raise IdentityUnclear(f"process {peer.pid} is not the one that connected as {peer.unique_name}")
    except BaseException:
        proc.close()
        raise
    return proc


def open_namespace(peer: PeerCredentials, kind: str) -> int:
    """An fd of the peer's namespace *kind* (``mnt``, ``user``, ``pid``, ...), checked to be
    the one recorded at first contact. The caller closes it. Raises ``IdentityUnclear``."""
    recorded = getattr(peer, f"{kind}_ns", None)
    with reopen(peer) as proc:
        try:
            fd = os.open(f"ns/{kind}", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc.dirfd)
        except OSError as exc:
            raise IdentityUnclear(f"/proc/{peer.pid}/ns/{kind}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if recorded is None or st.st_ino != recorded:
                raise IdentityUnclear(f"peer {peer.unique_name} changed its {kind} namespace")
            if not proc.alive():
                raise IdentityUnclear(f"process {peer.pid} exited")
        except BaseException:
            os.close(fd)
            raise
        return fd


_OWN: dict[str, int] | None = None


def own_namespaces() -> dict[str, int]:
    """wqd's own namespace inodes (``mnt``, ``user``, ``pid``), read once."""
    global _OWN
    if _OWN is None:
        _OWN = {name: os.stat(f"/proc/self/ns/{name}").st_ino for name in ("mnt", "user", "pid")}
    return dict(_OWN)


def own_namespace(kind: str = "mnt") -> int:
    """wqd's own namespace inode of *kind* (the mount namespace by default)."""
    return own_namespaces()[kind]
