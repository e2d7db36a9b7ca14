"""The ``fs-errors`` source: errors a filesystem reports (``FAN_FS_ERROR``).

``Watch("fs-errors", MOUNT_POINT, {})``: the mount point, as an absolute path in
the host's mount namespace, PID 1's (a peer in another namespace gets
``NotSupported``: its paths name other mounts). Under its unit wqd itself runs in
a private copy of that namespace (ProtectSystem=, PrivateTmp=), which no peer is
in and whose /tmp, /home... are not the host's: so the path is looked up in the
host's mount table (``/proc/1/mountinfo``) and opened through the host's root
(``/proc/1/root``), never in wqd's own view (``wqd.sources.mounts.host_namespace``). The whole filesystem mounted there is watched
(``FAN_MARK_FILESYSTEM``), so every mount point of it reports the same errors.

Signal: ``FilesystemError(mount_point, error, count)``: ``error`` is the errno of
the first error the kernel recorded since the last report (ext4 reports
``EFSCORRUPTED``, 117, for corruption and ``EIO``, 5, for I/O errors), ``count``
how many errors the kernel merged into this report.

Needs Linux >= 5.16 and CAP_SYS_ADMIN: without them the source is unavailable
(``Sources`` says ``""``, Watch says ``NotSupported``); a filesystem that cannot
report errors (no file handles, e.g. proc) makes that Watch ``NotSupported``.
One fanotify group serves every watched filesystem; events name the filesystem
by its fsid. ``FAN_Q_OVERFLOW`` -> ``Lost`` to every subscriber (errors are
counts, not state: there is nothing to resynchronise).

Unmounts. A subscription watches the mount its path named at ``Watch`` time (the
mount id, checked again on the directory wqd opened, so a mount replaced in
between is refused, never confused). While any subscription exists wqd waits for
``POLLPRI`` on its mountinfo (``wqd.sources.reader.MountinfoWaiter``, as the
``mountinfo`` backend of ``mounts`` does); when the watched mount is gone its
subscriptions end with ``Removed("unmounted")``. wqd holds no fd on the filesystem (that would make
``umount`` fail with EBUSY).
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from wqd.errors import AccessDenied, InvalidArgument, LimitsExceeded, NotSupported
from wqd.events import Event, FilesystemError, SourceLoss, TargetGone, TypedTarget
from wqd.kernel import errors as kerr
from wqd.kernel import fanotify as fan
from wqd.parse.fanotify import ErrorInfo, FanotifyEvent, FidInfo
from wqd.parse.mountinfo import parse_mountinfo
from wqd.peer import PeerCredentials
from wqd.sources import Sink, check_options, read_settings
from wqd.sources.mount_backends import FanotifyReader, read_mountinfo
from wqd.sources.mounts import HostNamespace, host_namespace, open_host_root, own_namespace
from wqd.sources.reader import MountinfoWaiter

log = logging.getLogger(__name__)

NAME = "fs-errors"
OPTIONS: dict = {}  # check_options: none yet
CAP_SYS_ADMIN = 21  # include/uapi/linux/capability.h
# fanotify_mark() takes the directory as an fd (no path to race); not O_PATH, which
# it refuses (EBADF). Not following a symlink put in place of the mount point.
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ROOT = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


@dataclass(eq=False)
class WatchedFilesystem:
    fsid: tuple[int, int]
    mount_points: dict[str, int] = field(default_factory=dict)  # mount point -> subscriptions


@dataclass(frozen=True, slots=True)
class FsErrorTarget(TypedTarget):
    """A fs-errors target: ``spec`` is the mount point (normalised), ``object_id``
    the mount's (mountinfo) id at Watch time."""

    fstype: str = ""  # as mountinfo names it, for error messages
    device: str = ""  # major:minor of the filesystem: where to look for another mount of it


def mount_id_of(fd: int) -> int | None:
    """The (mountinfo) id of the mount *fd* is on, from ``/proc/self/fdinfo``."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def has_cap_sys_admin() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    return False


class FsErrorsSource:
    name = NAME
    backend = "fanotify"

    def __init__(self, fd: int) -> None:
        self.fd = fd
        host = host_namespace()
        # the host's root: mount points are opened through it, in the host's namespace
        try:
            self.root_fd = open_host_root(host)
        except OSError as exc:
            log.warning("cannot open %s/root (%s): fs-errors serves wqd's own mount namespace", host.proc, exc)
            host = HostNamespace(own_namespace(), "/proc/self")
            self.root_fd = os.open("/", _ROOT)
        self.own_ns = host.ns
        self.proc = host.proc  # where the host's mountinfo is
        self.filesystems: dict[tuple[int, int], WatchedFilesystem] = {}
        self.mounts: dict[int, tuple[str, int]] = {}  # watched mount id -> (mount point, subscriptions)
        self.table_fd = -1  # the host's mountinfo, open while a mount is watched
        self.table_watch: MountinfoWaiter | None = None  # ... for its unmount
        self.reader: FanotifyReader | None = None
        self.sink: Sink | None = None

    async def start(self, sink: Sink) -> None:
        self.sink = sink
        self.reader = FanotifyReader(self.fd, sink, self._events, "filesystem errors")

    async def stop(self) -> None:
        self.mounts.clear()
        self._unwatch_table_if_idle()
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        elif self.fd >= 0:
            os.close(self.fd)
        self.fd = -1
        self.filesystems.clear()
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def _read_table(self):
        with open(f"{self.proc}/mountinfo", "rb") as f:
            return parse_mountinfo(f.read())

    def _open_dir(self, path: str) -> int:
        """*path* (absolute, normalised) opened in the host's namespace."""
        return os.open(path.lstrip("/") or ".", _DIR, dir_fd=self.root_fd)

    # -- Watch() ----------------------------------------------------------

    async def resolve(self, peer: PeerCredentials, spec: str, options: dict) -> FsErrorTarget:
        check_options(NAME, OPTIONS, options)
        if not spec.startswith("/") or "\0" in spec:
            raise InvalidArgument("fs-errors target must be the absolute path of a mount point")
        path = "/" + posixpath.normpath(spec).lstrip("/")
        if peer.mnt_ns is None or peer.mnt_ns != self.own_ns:
            raise NotSupported("fs-errors watches mount points of the host's mount namespace only")
        try:
            table = self._read_table()
        except OSError as exc:
            raise NotSupported(f"cannot read the mount table: {exc.strerror}") from None
        entry = next((e for e in reversed(table.values()) if e.mount_point == path), None)
        if entry is None:
            raise InvalidArgument(f"{path} is not a mount point")
        return FsErrorTarget(NAME, path, entry.mount_id, fstype=entry.fstype, device=entry.device)

    def routes(self, sub) -> Iterable[Hashable]:
        return (sub.target.spec,)

    def accepts(self, sub, event: Event) -> bool:
        return True

    def attach(self, sub) -> None:
        if self.table_watch is None:  # first, so an unmount from here on is seen
            try:
                self._watch_table()
            except OSError as exc:
                raise NotSupported(f"cannot follow the mount table: {exc.strerror}") from None
        try:
            self._mark(sub)
        except BaseException:
            self._unwatch_table_if_idle()
            raise
        mount_id = sub.target.object_id
        path, n = self.mounts.get(mount_id, (sub.target.spec, 0))
        self.mounts[mount_id] = (path, n + 1)

    def _mark(self, sub) -> None:
        """Mark the filesystem at *sub*'s mount point (once per filesystem) and count it."""
        path = sub.target.spec
        fstype = sub.target.fstype or "this filesystem"
        try:
            dirfd = self._open_dir(path)
        except OSError:
            raise InvalidArgument(f"{path} is not a mount point") from None
        try:
            if mount_id_of(dirfd) != sub.target.object_id:
                raise InvalidArgument(f"{path} is not the mount it was a moment ago (unmounted or replaced)")
            fsid = fan.fsid_of(dirfd)
            fs = self.filesystems.get(fsid)
            if fs is None:
                try:
                    fan.mark_filesystem_errors(self.fd, dirfd)
                except kerr.PermissionDenied:
                    raise AccessDenied("wqd may not watch this filesystem") from None
                except kerr.KernelError as exc:
                    if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                        raise LimitsExceeded(f"the kernel refused another mark: {exc.strerror}") from None
                    raise NotSupported(f"{fstype} at {path} cannot report errors: {exc.strerror}") from None
                fs = WatchedFilesystem(fsid)
                self.filesystems[fsid] = fs
            fs.mount_points[path] = fs.mount_points.get(path, 0) + 1
            sub.state["fsid"] = fsid
        except kerr.KernelError as exc:
            raise NotSupported(f"cannot watch {path}: {exc.strerror}") from None
        finally:
            os.close(dirfd)

    def detach(self, sub) -> None:
        fsid = sub.state.pop("fsid", None)
        fs = self.filesystems.get(fsid)
        if fs is None:
            return
        mount_id = sub.target.object_id
        path, n = self.mounts.get(mount_id, ("", 1))
        if n > 1:
            self.mounts[mount_id] = (path, n - 1)
        else:
            self.mounts.pop(mount_id, None)
            self._unwatch_table_if_idle()
        path = sub.target.spec
        left = fs.mount_points.get(path, 0) - 1
        if left > 0:
            fs.mount_points[path] = left
            return
        fs.mount_points.pop(path, None)
        if fs.mount_points:
            return
        del self.filesystems[fsid]
        # The mark is on the filesystem: remove it through any mount of it that is
        # left (the path may be unmounted, or name another filesystem by now). When
        # none is left, the filesystem is gone and its mark with it. A sandboxed wqd
        # looks in its own private copy of the namespace too: a filesystem unmounted
        # from the host's stays mounted there (and marked) unless that copy is a slave.
        # Only mounts of the same device are opened (opening others could trigger automounts).
        device = sub.target.device
        candidates = [(self._open_dir, path)]
        views = [(self._open_dir, self.proc)]
        if self.proc != "/proc/self":
            views.append((lambda p: os.open(p, _DIR), "/proc/self"))
        for opener, proc in views:
            try:
                with open(f"{proc}/mountinfo", "rb") as f:
                    candidates += [(opener, e.mount_point) for e in parse_mountinfo(f.read()).values()
                                   if e.device == device and e.mount_point != path]
            except OSError:
                pass
        for opener, candidate in candidates:
            try:
                dirfd = opener(candidate)
            except OSError:
                continue
            try:
                if fan.fsid_of(dirfd) == fsid:
                    fan.mark_filesystem_errors(self.fd, dirfd, remove=True)
                    return
            except OSError as exc:
                log.debug("unmarking %s through %s: %s", fsid, candidate, exc)
            finally:
                os.close(dirfd)

    def _watch_table(self) -> None:
        self.table_fd = os.open(f"{self.proc}/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.table_watch = MountinfoWaiter(self.table_fd, self._table_changed)
        except BaseException:
            os.close(self.table_fd)
            self.table_fd = -1
            raise

    def _unwatch_table_if_idle(self) -> None:
        if not self.mounts and self.table_watch is not None:
            self.table_watch.close()
            self.table_watch = None
            os.close(self.table_fd)
            self.table_fd = -1

    def _table_changed(self) -> None:
        if self.table_watch is None:
            return
        self.table_watch.take()  # how many changes does not matter here: only which mounts are left
        try:
            present = read_mountinfo(self.table_fd)
        except OSError as exc:
            log.error("reading the mount table: %s", exc)
            return
        for mount_id, (path, _) in list(self.mounts.items()):
            if mount_id not in present:
                self.sink.dispatch(TargetGone(NAME, path, "unmounted", mount_id))

    # -- kernel events ------------------------------------------------------

    def _events(self, events: list[FanotifyEvent]) -> None:
        for event in events:
            if event.overflow:
                self.sink.dispatch(SourceLoss(NAME, 1, None))
                continue
            if not event.mask & fan.FAN_FS_ERROR:
                continue
            error, fid = event.info(ErrorInfo), event.info(FidInfo)
            if error is None or fid is None:
                continue
            fs = self.filesystems.get(fid.fsid)
            if fs is None:
                log.debug("error event for an unwatched filesystem %s", fid.fsid)
                continue
            for mount_point in fs.mount_points:
                self.sink.dispatch(FilesystemError(mount_point, error.error, error.count & 0xFFFFFFFF))


def check_settings(conf: dict) -> dict:
    return read_settings(NAME, conf, {})  # none yet


def open_source(cfg) -> FsErrorsSource:
    check_settings(cfg.raw.get(NAME, {}))
    if not has_cap_sys_admin():
        raise PermissionError(errno.EPERM, "filesystem error notifications need CAP_SYS_ADMIN")
    return FsErrorsSource(fan.open_error_notifications())
