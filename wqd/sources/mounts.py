"""The ``mounts`` source: mounts attached, detached and moved, in the caller's own namespace.

``Watch("mounts", TARGET, options)``:

- ``TARGET``: ``""`` for every mount of the caller's mount namespace, or an absolute
  path prefix: only mount points equal to it or below it (compared as text, as the
  caller's namespace shows them; a move is delivered when either end is under it).
- ``options``: ``"actions": as`` — any of ``attached``, ``detached``, ``moved``.

Signals: ``MountChanged(action, mount_id, mount_point, info)``; ``info`` has
``fstype``, ``source``, ``options`` (``/proc/mounts`` style), and for a move
``moved_from``. ``mount_id`` is the kernel's 64-bit unique id (fanotify backend) or
mountinfo's id (mountinfo backend). A mount that came and went before wqd could
look it up is reported with an empty mount point and no info, to every subscriber
of its namespace whatever its prefix (it may have been under it).

Namespaces. "wqd's own" namespace is the host's: PID 1's (``host_namespace``),
not the private copy wqd's unit gives its process. A peer sees the mounts of
*its own* mount namespace, never wqd's unless that is its own: the namespace is the one the peer was in when it first
called (``PeerCredentials.mnt_ns``, read through a verified pidfd). For a peer in
another namespace wqd watches that namespace, reached through the peer's process:
``/proc/PID/ns/mnt`` and ``/proc/PID/mountinfo`` opened through its pinned
``/proc/PID`` directory, trusted only if the process is still the one that
connected (uid, start time), still alive afterwards, and the namespace's inode is
``mnt_ns``; otherwise the Watch fails with ``AccessDenied`` (fail closed). Whether
such peers may watch at all is the policy's call (``unix``:
``policy.mounts_other_namespaces``). Events are routed by namespace inode, so one
namespace's events never reach another's subscribers.

Configuration (``[mounts]``): ``backend`` = ``auto`` | ``fanotify`` | ``mountinfo``;
``coalesce`` = seconds between mountinfo rescans in a storm (0.05); ``resolver`` =
``auto`` | ``statmount`` | ``mountinfo`` (how the fanotify backend names a mount
id; ``mountinfo`` where statmount is filtered, e.g. by seccomp);
``namespaces_per_uid`` (8) and ``namespaces_total`` (64): how many mount
namespaces other than wqd's own may be watched for one uid, and at all. Each
costs a fanotify group (the kernel allows 128 per user, wqd's own namespace and
``fs-errors`` included) or a few fds: anyone can make namespaces (``unshare
-Urm``), so without these caps one user could use them all up. Beyond them
``Watch`` answers ``LimitsExceeded``; root's peers are exempt from the per-uid
cap. Joining a namespace already watched costs nothing and is not counted.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from wqd.errors import AccessDenied, InvalidArgument, LimitsExceeded, NotSupported
from wqd.events import Event, MountChanged, TypedTarget
from wqd.kernel import errors as kerr
from wqd.parse.mountinfo import MountEntry
from wqd.peer import IdentityUnclear, PeerCredentials, own_namespace, reopen
from wqd.sources import Sink, Strings, check_options, read_settings
from wqd.sources.mount_backends import open_backend

log = logging.getLogger(__name__)

NAME = "mounts"
ACTIONS = ("attached", "detached", "moved")
OPTIONS = {"actions": Strings(ACTIONS, nonempty=True)}  # check_options
NAMESPACES_PER_UID = 8
NAMESPACES_TOTAL = 64
SCHEMA = {  # [mounts]
    "backend": (str, "auto", lambda v: v in ("auto", "fanotify", "mountinfo"), "auto, fanotify or mountinfo"),
    "coalesce": ((int, float), 0.05, lambda v: 0 <= v <= 60, "0..60 seconds"),
    "resolver": (str, "auto", lambda v: v in ("auto", "statmount", "mountinfo"), "auto, statmount or mountinfo"),
    "namespaces_per_uid": (int, NAMESPACES_PER_UID, lambda v: 0 <= v <= 100_000, "0..100000"),
    "namespaces_total": (int, NAMESPACES_TOTAL, lambda v: 0 <= v <= 100_000, "0..100000"),
}
_RO = os.O_RDONLY | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class MountTarget(TypedTarget):
    """A mounts target: ``object_id`` is the inode of the caller's mount namespace,
    the route of its events."""

    prefix: str | None = None  # only mount points equal to it or below it; None: all
    actions: frozenset[str] | None = None  # the ``actions`` option; None: every action
    other_namespace: bool = False  # the namespace is not wqd's own (the policy may refuse it)


@dataclass(eq=False)
class NamespaceWatch:
    """One watched mount namespace, shared by its subscriptions: what any backend
    needs of it. What a backend keeps per namespace (its reader, its table of
    mounts) is its own, in ``state``, made by its ``arm`` and dropped by its ``disarm``."""

    ns: int  # inode of the namespace: the route of its events
    own: bool  # wqd's own namespace
    nsfd: int = -1
    mountinfo_fd: int = -1
    subs: set = field(default_factory=set)
    state: object = None  # the backend's (``wqd.sources.mount_backends``)

    def close(self) -> None:
        for fd in (self.nsfd, self.mountinfo_fd):
            if fd >= 0:
                os.close(fd)
        self.nsfd = self.mountinfo_fd = -1


@dataclass(frozen=True)
class HostNamespace:
    """The mount namespace wqd serves as its own, and where it is reached."""

    ns: int  # inode of the namespace
    proc: str  # a /proc/PID directory of a process in it ("/proc/self", or a kept fd's path)


_HOST: HostNamespace | None = None


def host_namespace() -> HostNamespace:
    """The mount namespace wqd was started from: "its own" for peers (found once, kept).

    Under its unit wqd runs in a mount namespace of its own: ProtectSystem=,
    ProtectHome= and PrivateTmp= make a private copy (a slave) of the namespace
    systemd started it from, with its own /tmp, /home and mount ids, and no peer
    is in that copy. The namespace the system's peers are in, and whose paths
    they name, is the one wqd was started from: its parent's at start-up
    (systemd, PID 1, under the unit; whoever ran ``unshare -m wqd`` by hand),
    else PID 1's (where the parent cannot be read, or is in another PID
    namespace). Both are chosen by whoever started wqd, never by a peer.

    The parent's ``/proc/PID`` is opened once and kept (an fd: a PID can be
    reused, an open ``/proc/PID`` directory cannot), and trusted only if wqd's
    parent was still the same process after it was opened. Where none can be
    read (no CAP_SYS_PTRACE, hidepid=), or it is wqd's own, wqd's own namespace
    (``/proc/self``) is the answer, as if wqd were not sandboxed.
    """
    global _HOST
    if _HOST is None:
        _HOST = _find_host_namespace()
    return _HOST


def open_host_root(host: HostNamespace | None = None) -> int:
    """An ``O_PATH`` fd of the root directory of *host* (``host_namespace()``):
    paths looked up from it (``dir_fd=``, or a helper's working directory) walk
    the host's mounts, not the private /tmp, /home of wqd's own namespace.
    Raises OSError (``/proc/PID/root`` needs ptrace access to that process)."""
    host = host or host_namespace()
    return os.open(f"{host.proc}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def _find_host_namespace() -> HostNamespace:
    own = own_namespace()
    ppid = os.getppid()
    for pid in dict.fromkeys(p for p in (ppid, 1) if p > 0):
        try:
            dirfd = os.open(f"/proc/{pid}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            log.debug("mount namespace of pid %d: %s", pid, exc)
            continue
        try:
            ns = os.stat("ns/mnt", dir_fd=dirfd).st_ino
        except OSError as exc:
            log.debug("mount namespace of pid %d: %s", pid, exc)
            ns = None
        if ns is None or (pid == ppid and os.getppid() != ppid) or ns == own:
            os.close(dirfd)  # unreadable; the parent went away meanwhile; or not sandboxed
            if ns == own:
                break
            continue
        log.info("serving the mount namespace of pid %d (%d), not wqd's own (%d)", pid, ns, own)
        return HostNamespace(ns, f"/proc/self/fd/{dirfd}")  # dirfd kept for wqd's life
    return HostNamespace(own, "/proc/self")


def parse_prefix(spec: str) -> str | None:
    if spec == "":
        return None
    if "\0" in spec or not spec.startswith("/"):
        raise InvalidArgument('mounts target must be "" or an absolute path prefix')
    norm = posixpath.normpath(spec)
    return "/" + norm.lstrip("/")


def under(path: str, prefix: str) -> bool:
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


def open_peer_namespace(peer: PeerCredentials, ns: int, need_nsfd: bool) -> tuple[int, int]:
    """(nsfd or -1, mountinfo fd) of *peer*'s mount namespace, verified to be inode *ns*.

    Both are opened through the peer's pinned ``/proc/PID`` directory (``reopen``:
    same PID, uid and start time as at first contact), and trusted only if the
    process is still alive afterwards and the namespace is still *ns*.
    """
    opened: list[int] = []
    try:
        with reopen(peer) as proc:
            nsfd = -1
            if need_nsfd:
                nsfd = os.open("ns/mnt", _RO, dir_fd=proc.dirfd)
                opened.append(nsfd)
            mountinfo = os.open("mountinfo", _RO, dir_fd=proc.dirfd)
            opened.append(mountinfo)
            inode = os.fstat(nsfd).st_ino if nsfd >= 0 else os.stat("ns/mnt", dir_fd=proc.dirfd).st_ino
            if inode != ns or os.stat("ns/mnt", dir_fd=proc.dirfd).st_ino != ns or not proc.alive():
                raise IdentityUnclear("not the mount namespace the caller had")
        opened.clear()
        return nsfd, mountinfo
    except (OSError, IdentityUnclear) as exc:
        log.info("peer %s: mount namespace not reachable: %s", peer.unique_name, exc)
        raise AccessDenied("the caller's mount namespace could not be reached and verified") from None
    finally:
        for fd in opened:
            os.close(fd)


class MountsSource:
    name = NAME

    def __init__(self, backend, own_ns: int | None = None, *, namespaces_per_uid: int = NAMESPACES_PER_UID,
                 namespaces_total: int = NAMESPACES_TOTAL) -> None:
        self.impl = backend
        # "own": the host's namespace (PID 1's), which wqd under its unit is not in
        host = host_namespace() if own_ns is None else HostNamespace(own_ns, "/proc/self")
        self.own_ns = host.ns
        self.own_proc = host.proc
        self.namespaces_per_uid = namespaces_per_uid
        self.namespaces_total = namespaces_total
        self.watches: dict[int, NamespaceWatch] = {}
        self.sink: Sink | None = None

    @property
    def backend(self) -> str:
        return self.impl.name

    async def start(self, sink: Sink) -> None:
        self.sink = sink
        await self.impl.start(self, sink)

    async def stop(self) -> None:
        for watch in list(self.watches.values()):
            self._release(watch)
        self.watches.clear()
        await self.impl.stop()

    # -- Watch() ----------------------------------------------------------

    async def resolve(self, peer: PeerCredentials, spec: str, options: dict) -> MountTarget:
        opts = check_options(NAME, OPTIONS, options)
        prefix = parse_prefix(spec)
        if peer.mnt_ns is None:
            raise AccessDenied("wqd could not verify the caller's mount namespace")
        return MountTarget(NAME, spec, peer.mnt_ns, prefix=prefix, actions=opts["actions"],
                           other_namespace=peer.mnt_ns != self.own_ns)

    def routes(self, sub) -> Iterable[Hashable]:
        return (sub.target.object_id,)

    def accepts(self, sub, event: Event) -> bool:
        target: MountTarget = sub.target
        if target.actions is not None and event.action not in target.actions:
            return False
        prefix = target.prefix
        if prefix is None or not event.mount_point:
            return True
        if under(event.mount_point, prefix):
            return True
        origin = event.info.get("moved_from")
        return bool(origin) and under(origin, prefix)

    def attach(self, sub) -> None:
        ns = sub.target.object_id
        if ns != sub.owner.mnt_ns:  # resolve() made it so; never watch another's namespace
            raise AccessDenied("a peer may watch its own mount namespace only")
        watch = self.watches.get(ns)
        if watch is None:
            if ns != self.own_ns:
                self._check_namespace_caps(sub.owner.uid)
            watch = self._open(sub.owner, ns)
            try:
                self.impl.arm(watch)
            except kerr.KernelError as exc:
                watch.close()
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.ENOMEM):
                    raise LimitsExceeded(f"the kernel refused another mount watch: {exc.strerror}") from None
                if isinstance(exc, kerr.PermissionDenied):
                    raise AccessDenied("wqd may not watch this mount namespace") from None
                raise NotSupported(f"cannot watch this mount namespace: {exc.strerror}") from None
            except OSError as exc:
                watch.close()
                raise NotSupported(f"cannot watch this mount namespace: {exc.strerror}") from None
            except BaseException:
                watch.close()
                raise
            self.watches[ns] = watch
            log.info("watching mount namespace %d (%s, %d mounts)", ns, "own" if watch.own else "a peer's",
                     self.impl.mounts_known(watch))
        watch.subs.add(sub)

    def _check_namespace_caps(self, uid: int) -> None:
        foreign = [w for w in self.watches.values() if not w.own]
        if len(foreign) >= self.namespaces_total:
            raise LimitsExceeded(f"wqd already watches {len(foreign)} other mount namespaces, its limit")
        if uid != 0:
            mine = sum(1 for w in foreign if any(s.owner.uid == uid for s in w.subs))
            if mine >= self.namespaces_per_uid:
                raise LimitsExceeded(f"uid {uid} already has {mine} other mount namespaces watched, the limit")

    def _open(self, peer: PeerCredentials, ns: int) -> NamespaceWatch:
        need_nsfd = self.impl.needs_nsfd
        if ns == self.own_ns:
            watch = NamespaceWatch(ns, True)
            try:
                if need_nsfd:
                    watch.nsfd = os.open(f"{self.own_proc}/ns/mnt", _RO)
                watch.mountinfo_fd = os.open(f"{self.own_proc}/mountinfo", _RO)
                # the namespace opened must be the one resolved (PID 1 may setns())
                if need_nsfd and os.fstat(watch.nsfd).st_ino != ns:
                    raise OSError(errno.ESTALE, "the host's mount namespace changed")
            except OSError as exc:
                watch.close()
                raise NotSupported(f"cannot open the host's mount namespace: {exc.strerror}") from None
            return watch
        nsfd, mountinfo = open_peer_namespace(peer, ns, need_nsfd)
        return NamespaceWatch(ns, False, nsfd, mountinfo)

    def detach(self, sub) -> None:
        ns = sub.target.object_id
        watch = self.watches.get(ns)
        if watch is None:
            return
        watch.subs.discard(sub)
        if not watch.subs:
            del self.watches[ns]
            self._release(watch)

    def _release(self, watch: NamespaceWatch) -> None:
        try:
            self.impl.disarm(watch)
        finally:
            watch.close()

    # -- for backends -----------------------------------------------------

    def emit(self, watch: NamespaceWatch, action: str, mount_id: int, entry: MountEntry | None,
             moved_from: str | None = None) -> None:
        if entry is None:
            event = MountChanged(action, mount_id, "", {}, mnt_ns=watch.ns)
        else:
            info = entry.info()
            if action == "moved" and moved_from:
                info["moved_from"] = moved_from
            event = MountChanged(action, mount_id, entry.mount_point, info, mnt_ns=watch.ns)
        self.sink.dispatch(event)


def check_settings(conf: dict) -> dict:
    return read_settings(NAME, conf, SCHEMA)


def open_source(cfg) -> MountsSource:
    s = check_settings(cfg.raw.get(NAME, {}))
    backend = open_backend(s["backend"], coalesce=float(s["coalesce"]), resolver=s["resolver"])
    return MountsSource(backend, namespaces_per_uid=s["namespaces_per_uid"], namespaces_total=s["namespaces_total"])
