"""What the ``credentials`` source wakes up on: inotify on cache directories
(``FILE:``/``DIR:``) and on sssd-kcm's store (``KCM:``). No polling: every read
of a cache follows a kernel event (docs/credentials.md, "How each type is
watched").

- ``DirectoryWatches``: one inotify fd, one reader on the loop
  (``wqd.sources.reader.FdReader``), watches refcounted per path. A cache is
  watched through its *directory*, filtered by name: kinit and kinit -R write
  ``name.XXXXXX`` and rename it over the cache (``IN_MOVED_TO``), kdestroy
  overwrites and unlinks (``IN_DELETE``); a watch on the cache file itself
  would die at the first rename.
- ``KcmStore``: sssd-kcm 2.8 keeps every uid's caches in one tdb whose
  committed transactions end with ``utime()`` (``IN_ATTRIB`` on the file, and
  nothing on reads); the directory is watched too, for the store being made or
  replaced. The event does not say whose cache changed: every watched ``KCM:``
  cache is re-read, each as its peer, in its uid's paced lane
  (``wqd.sources.credentials_reads``): any uid's kinit wakes them all.

An inotify queue overflow (``IN_Q_OVERFLOW``) wakes every watcher: the reads
find what changed, nothing is lost but the order of events in between. A user
spamming files in ``/tmp`` wakes no ``FILE:`` watch but of its cache's own
name (the listeners filter by name); it can only make the kernel queue
overflow, whose wakes are paced like any other.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from wqd.kernel import errors as kerr
from wqd.kernel import inotify
from wqd.sources.reader import FdReader, read_available

log = logging.getLogger(__name__)

#: What a change of a cache in a directory looks like (see the module docstring);
#: IN_CREATE/IN_MOVED_FROM for a DIR: collection's files and sssd-kcm's store.
DIRECTORY_MASK = (inotify.IN_MOVED_TO | inotify.IN_MOVED_FROM | inotify.IN_DELETE | inotify.IN_CLOSE_WRITE
                  | inotify.IN_CREATE | inotify.IN_DELETE_SELF | inotify.IN_ONLYDIR)
#: sssd-kcm's tdb: ``utime(name, NULL)`` after each commit.
STORE_MASK = inotify.IN_ATTRIB | inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF
KCM_STORE = "/var/lib/sss/secrets/secrets.ldb"  # compiled into sssd_kcm (Debian 12/13)

Wake = Callable[[], None]


def _nothing() -> None:
    pass


class _Watched:
    """One inotify watch and who listens on it: ``(names or None, wake, gone)``."""

    __slots__ = ("path", "listeners", "wd")

    def __init__(self, path: str, wd: int) -> None:
        self.path, self.wd = path, wd
        self.listeners: dict[int, tuple[frozenset[str] | None, Wake, Wake]] = {}


class DirectoryWatches:
    """One inotify fd for the source; ``add(path, mask, names, wake, gone)`` calls
    *wake* on every event of *path* (for a directory: of an entry in *names*, or
    of any entry when *names* is None), and *gone* after the last wake when the
    watch itself ends with its inode (the directory removed: ``IN_IGNORED``).
    ``remove(token)`` undoes one ``add``."""

    def __init__(self) -> None:
        self.fd = -1
        self.reader: FdReader | None = None
        self.by_path: dict[str, _Watched] = {}
        self.by_wd: dict[int, _Watched] = {}
        self.tokens: dict[int, _Watched] = {}
        self.next = 1

    def start(self, sink) -> None:
        self.fd = inotify.init()
        self.reader = FdReader(self.fd, sink, self._read_one, "inotify")

    def stop(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.by_path.clear()
        self.by_wd.clear()
        self.tokens.clear()

    def add(self, path: str, mask: int, names: frozenset[str] | None, wake: Wake, gone: Wake = _nothing) -> int:
        """Raises ``KernelError`` (ENOENT: *path* is not there; ENOSPC: the
        inotify watch limit, ``fs.inotify.max_user_watches``)."""
        watched = self.by_path.get(path)
        if watched is None:
            try:
                wd = inotify.add_watch(self.fd, path, mask)
            except OSError as exc:
                raise kerr.typed(exc, f"inotify_add_watch {path}") from None
            watched = self._watched(path, wd)
            self.by_path[path] = watched
        return self._listen(watched, names, wake, gone)

    def listen(self, path: str, wd: int, names: frozenset[str] | None, wake: Wake, gone: Wake = _nothing) -> int:
        """``add`` for a watch descriptor someone else added to this fd (a
        credential helper, as the peer: ``cred_helper.op_inotify_add``); *path*
        only names it in logs. Not found by path: the same path in wqd's own
        namespace may be another directory."""
        log.debug("inotify: wd %d is %s", wd, path)
        return self._listen(self._watched(path, wd), names, wake, gone)

    def _watched(self, path: str, wd: int) -> _Watched:
        watched = self.by_wd.get(wd)  # another path to the same inode
        if watched is None:
            watched = self.by_wd[wd] = _Watched(path, wd)
        return watched

    def _listen(self, watched: _Watched, names, wake: Wake, gone: Wake) -> int:
        token, self.next = self.next, self.next + 1
        watched.listeners[token] = (names, wake, gone)
        self.tokens[token] = watched
        return token

    def remove(self, token: int) -> None:
        watched = self.tokens.pop(token, None)
        if watched is None:
            return
        watched.listeners.pop(token, None)
        if watched.listeners:
            return
        for path in [p for p, w in self.by_path.items() if w is watched]:
            del self.by_path[path]
        if self.by_wd.pop(watched.wd, None) is not None and self.fd >= 0:
            try:
                inotify.rm_watch(self.fd, watched.wd)
            except OSError:
                pass  # already gone with its inode (IN_IGNORED)

    def _read_one(self) -> bool:
        data = read_available(self.fd, inotify.READ_SIZE, "inotify")
        if not data:
            return False
        woken: dict[int, Wake] = {}
        ended: list[Wake] = []
        for event in inotify.decode(data):
            if event.mask & inotify.IN_Q_OVERFLOW:
                log.warning("inotify queue overflowed: re-reading every watched cache")
                for watched in self.by_wd.values():
                    for token, (_names, wake, _gone) in watched.listeners.items():
                        woken[token] = wake
                continue
            watched = self.by_wd.get(event.wd)
            if watched is None:
                continue
            for token, (names, wake, _gone) in watched.listeners.items():
                if names is None or not event.name or event.name in names:
                    woken[token] = wake
            if event.mask & inotify.IN_IGNORED:  # the inode is gone: its watch with it
                self.by_wd.pop(event.wd, None)
                for path in [p for p, w in self.by_path.items() if w is watched]:
                    del self.by_path[path]
                for token, (_names, _wake, gone) in watched.listeners.items():
                    self.tokens.pop(token, None)
                    ended.append(gone)
        for wake in woken.values():  # once per listener per read, however many records
            wake()
        for gone in ended:
            gone()
        return True


class KcmStore:
    """sssd-kcm's store, watched for ``KCM:`` watches: *wake* on every commit.

    Unavailable (``OSError``) when the store's directory is absent (sssd-kcm not
    installed). The file itself may be absent until sssd-kcm first runs; the
    directory watch re-arms it when it appears, and wakes (a new store)."""

    def __init__(self, watches: DirectoryWatches, path: str = KCM_STORE) -> None:
        self.watches = watches
        self.path = path
        self.directory, self.name = os.path.split(path)
        self.wake: Wake | None = None
        self._dir_token = self._file_token = None

    def available(self) -> str | None:
        if not os.path.isdir(self.directory):
            return f"{self.directory} is absent (sssd-kcm is not installed)"
        return None

    def start(self, wake: Wake) -> None:
        """Raises ``KernelError`` when the directory cannot be watched (EACCES:
        wqd runs unprivileged); nothing is left armed then."""
        self._dir_token = self.watches.add(self.directory, DIRECTORY_MASK, frozenset({self.name}), self._entry)
        self.wake = wake
        self._arm_file()

    def _arm_file(self) -> None:
        if self._file_token is not None:
            self.watches.remove(self._file_token)
            self._file_token = None
        try:
            self._file_token = self.watches.add(self.path, STORE_MASK, None, self._changed)
        except kerr.KernelError as exc:
            log.info("sssd-kcm's store %s is not there yet (%s): waiting for it", self.path, exc.strerror)

    def _entry(self) -> None:
        self._arm_file()  # made, replaced or removed: follow the name
        self._changed()

    def _changed(self) -> None:
        if self.wake is not None:
            self.wake()

    def stop(self) -> None:
        for token in (self._dir_token, self._file_token):
            if token is not None:
                self.watches.remove(token)
        self._dir_token = self._file_token = None
        self.wake = None
