"""The ``credentials`` source: Kerberos credential caches, as their owner sees them.

``Watch("credentials", TARGET, {})``: TARGET ``""`` is the caller's default cache
(collection), krb5.conf's ``default_ccache_name`` for the caller's uid
(``wqd.krb5cache.default_ccache_name``); otherwise an explicit name,
``FILE:/path``, ``DIR:/path`` (a collection), ``KCM:`` (the caller's KCM
collection, or ``KCM:UID…`` of its own uid), ``KEYRING:persistent:UID``. Each change of the cache (for a
collection: of its primary) is a ``CredentialsChanged(cache, change, info)``;
``change`` is ``wqd.krb5cache.classify``'s diff of two reads, or ``expiring``,
sent once per ticket ``[credentials] expiring_lead`` seconds before its TGT
expires, from a ``loop.call_at`` timer (re-armed on every change, cancelled
when the last subscriber leaves). Nothing here polls; only ``KEYRING:`` on a
kernel without watch queues rides the keys source's ``proc-keys`` poller.

Who may watch what: a peer only caches of its own uid, root any. A name that
says another uid (``KCM:N…``, ``KEYRING:persistent:N``) is refused up front; otherwise the first read,
done **as the peer** in a credential helper (``wqd.sources.helper_pool``, op
``krb5_read``, with the peer's fs *and* effective ids for the read, so that
sssd-kcm's ``SO_PEERCRED`` check and the file permissions decide), answers
AccessDenied when the peer may not read it. A later read that is denied (the
file's owner changed its mode) ends the subscriptions: fail closed.

Reads never run on the event loop and are bounded per uid, whatever other
uids do (docs/credentials.md, "Against a hostile user"):

- ``Watch`` of a non-root uid is paced by a token bucket per uid
  (``[credentials] watch_rate``/``watch_burst``, ``wqd.sources.token_buckets``,
  as keys is): each costs a read as the peer. Beyond it, ``LimitsExceeded``.
- A uid watches at most ``[credentials] caches_per_uid`` distinct caches (each
  an inotify watch of the daemon's, and a read on each wake), refused before
  any read.
- Events do not start reads: they wake the watch in its uid's lane
  (``wqd.sources.credentials_reads.PacedReads``): one pass at a time per uid,
  the next at least ``[credentials] read_interval`` per read of the last one
  after it, the wakes during one coalesced into the next. So another uid's
  kinit loop against sssd-kcm (the store wakes every ``KCM:`` watch) costs any
  uid at most one read per interval on average, and a victim never waits
  behind the attacker's reads.
- A read that finds no TGT where there was one says ``destroyed`` only if a
  read ``SETTLE`` later still finds none: kinit -R into ``KCM:``/``KEYRING:``
  initialises then stores (two writes), and sssd-kcm's kdestroy of the primary
  passes through a moment without a default; reads back to back found both.

Paths are the peer's, not wqd's: under its unit wqd has a mount namespace of
its own (PrivateTmp=: another /tmp; ProtectHome=: no /home, /run/user), so a
``FILE:/tmp/krb5cc_1000`` looked up there is another file, or none. The
helpers' working directory is the host's root (``mounts.open_host_root``, the
namespace wqd was started from) and they look ``FILE:``/``DIR:`` paths up
relative to it (``cred_helper.host_relative``); they also add the directory's
inotify watch to this source's fd themselves, as the peer, so the kernel
checks the peer's permission on the directory (wqd's unit keeps no CAP_DAC_*:
as root it could not search a 0700 /run/user/UID, and would not lend that).

A watched cache is keyed by (uid, name, ``reader_of`` the rest of the
identity): peers with the same credentials share its reads and its timer;
peers of one uid with other groups never share (file modes read the groups as
much as the uid, so one's access must not stand in for the other's).

``KEYRING:persistent:UID`` caches wake on key watches: a ``keys`` source of
this source's own (``wqd.sources.credentials_keyring``), on whatever backend
``[keys]`` gives it (the notification pipe, or the ``proc-keys`` poller, which
``Sources`` names). Other ``KEYRING:`` anchors (session, process, thread, user)
are the peer process's own keyrings, which wqd cannot see: ``NotSupported``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import time
from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from wqd import krb5cache
from wqd.errors import AccessDenied, InvalidArgument, LimitsExceeded, NotSupported, WqdError
from wqd.events import CredentialsChanged, Event, TargetGone, TypedTarget
from wqd.kernel import errors as kerr
from wqd.kernel import inotify
from wqd.kernel.credentials import Credentials
from wqd.sources.helper_pool import HelperPool
from wqd.peer import PeerCredentials
from wqd.settings import read_settings
from wqd.sources import check_options
from wqd.sources import keys
from wqd.sources.credentials_backends import DIRECTORY_MASK, KCM_STORE, DirectoryWatches, KcmStore
from wqd.sources.credentials_keyring import KeyringCaches
from wqd.sources.credentials_reads import PacedReads
from wqd.sources.keys import peer_credentials
from wqd.sources.mounts import open_host_root
from wqd.sources.token_buckets import TokenBuckets
from wqd.subscription import Sink

log = logging.getLogger(__name__)

NAME = "credentials"
OPTIONS: dict = {}  # Watch options (check_options): none yet
TYPES = ("FILE", "DIR", "KCM", "KEYRING")  # KEYRING: the persistent collection only
SETTLE = 0.1  # seconds a cache found without its TGT has to get one back before it counts as destroyed
SCHEMA = {  # [credentials] (wqd.settings)
    "expiring_lead": ((int, float), 300, lambda v: 0 <= v <= 86400, "0..86400 seconds"),
    "kcm_store": (str, KCM_STORE, lambda v: v.startswith("/"), "an absolute path"),
    # a read's deadline: the first KCM: read may socket-activate sssd-kcm (6.6 s under qemu TCG)
    "helper_timeout": ((int, float), 30.0, lambda v: 0.1 <= v <= 600, "0.1..600 seconds"),
    "watch_rate": ((int, float), 20.0, lambda v: 0.01 <= v <= 1e6, "0.01..1000000"),  # Watch calls a second ...
    "watch_burst": (int, 40, lambda v: 1 <= v <= 1_000_000, "1..1000000"),  # ... and at once, per non-root uid
    "caches_per_uid": (int, 32, lambda v: 1 <= v <= 65536, "1..65536"),  # distinct caches watched, non-root uid
    "read_interval": ((int, float), 0.2, lambda v: 0 <= v <= 60, "0..60 seconds"),  # between a uid's re-read passes
}


@dataclass(frozen=True, slots=True)
class CredentialsTarget(TypedTarget):
    """A credentials target: ``cache`` is the watched name (TARGET, or the
    caller's default resolved), ``kind`` its type; ``uid`` (the common field) is
    whose caches these are: the peer's, whose identity reads them, with
    ``reader``, the rest of that identity (``reader_of``)."""

    cache: str = ""
    kind: str = ""
    reader: tuple = ()


@dataclass(eq=False, slots=True)
class CacheWatch:
    """One watched cache of one credential set, shared by its subscriptions."""

    key: tuple[int, str, tuple]  # (uid, cache name, reader): the route of its events
    kind: str
    creds: Credentials | None  # what it is read as: every subscriber's own (``key``)
    subs: set = field(default_factory=set)
    peer: PeerCredentials | None = None  # the first subscriber (of the same credentials): arms key watches
    state: krb5cache.CacheState | None = None
    ready: asyncio.Future | None = None  # done when its first subscriber armed it (or failed to)
    token: int | None = None  # its DirectoryWatches listener (FILE/DIR)
    settle_until: float | None = None  # loop time: a read found no TGT; "destroyed" only if still so then
    timer: asyncio.TimerHandle | None = None  # the ``expiring`` timer of its TGT
    warned: str = ""  # the ticket ``expiring`` was sent for
    orphaned: bool = False  # its directory is gone: one last read, then its subscriptions end


def reader_of(creds: Credentials | None) -> tuple:
    """The part of a read's identity besides the uid: ``(gid, groups)``, or ``()``
    for the daemon's own. File modes look at the groups as much as the uid, so
    two peers of one uid with other groups never share a watch or its reads."""
    return () if creds is None else (creds.gid, creds.groups)


def parse_cache_name(name: str) -> tuple[str, str | None, str | None]:
    """``(type, directory, entry)`` of a cache name wqd serves: the directory to
    watch and the entry in it that is the cache (``None``: any entry, a ``DIR:``
    collection). ``KCM:`` has neither. Raises InvalidArgument / NotSupported."""
    kind, sep, residual = name.partition(":")
    kind = kind.upper()
    if not sep:
        raise InvalidArgument("credentials target must be a cache name TYPE:RESIDUAL or ''")
    if kind not in TYPES:
        raise NotSupported(f"cache type {kind} is not served (FILE:, DIR:, KCM:, KEYRING:persistent:UID)")
    if kind == "KEYRING":
        anchor, _, rest = residual.partition(":")
        if anchor != "persistent":  # session, user, process, thread: the peer process's own keyrings
            raise NotSupported("only KEYRING:persistent:UID is served: wqd cannot see a process's "
                               "session, process or thread keyring")
        if not rest.split(":")[0].isdigit():
            raise InvalidArgument("KEYRING:persistent: needs the uid")
    if kind in ("KCM", "KEYRING"):
        return kind, None, None
    one = kind == "DIR" and residual.startswith(":")  # DIR::dir/tkt names one cache of the collection
    path = residual[1:] if one else residual
    if not path.startswith("/") or "\0" in path:
        raise InvalidArgument(f"{kind}: needs an absolute path")
    path = os.path.normpath(path)
    if kind == "DIR" and not one:
        return kind, path, None
    return kind, os.path.dirname(path), os.path.basename(path)


def access_probe(name: str) -> str | None:
    """What the helper stat()s as the peer before reading *name*: the cache file,
    or a collection's ``primary`` (searching the directory is what the peer
    needs; a 0700 directory of another uid reads as empty to krb5, not denied)."""
    kind, directory, entry = parse_cache_name(name)
    if directory is None:
        return None
    return os.path.join(directory, entry or "primary")


class CredentialsSource:
    name = NAME

    def __init__(self, *, expiring_lead: float = 300, kcm_store: str = KCM_STORE,
                 helper_timeout: float = 30.0, binding_dir: str = "", watch_rate: float = 20.0,
                 watch_burst: int = 40, caches_per_uid: int = 32, read_interval: float = 0.2) -> None:
        self.lead = expiring_lead
        self.binding_dir = binding_dir
        self.watches: dict[tuple[int, str, tuple], CacheWatch] = {}
        self.kcm_watches: dict[CacheWatch, None] = {}  # the KCM: ones, which every store change wakes
        self.per_uid: Counter[int] = Counter()  # watched caches of each uid (for caches_per_uid)
        self.caches_per_uid = caches_per_uid
        self.rate = TokenBuckets(watch_rate, watch_burst)
        self.reads = PacedReads(read_interval, self._reread)
        self.helper_reads: Counter[int] = Counter()  # per uid, since start (logged at debug level)
        self.sink: Sink | None = None
        self.inotify = DirectoryWatches()
        self.kcm = KcmStore(self.inotify, kcm_store)
        self.kcm_reason = self.kcm.available()
        self.helpers = HelperPool(timeout=helper_timeout, preload=binding_dir)
        self.keyring: KeyringCaches | None = None  # set by open_source when the keys machinery runs here
        self.keyring_reason = "the keys source cannot run here"

    @property
    def backend(self) -> str:
        """What each type runs on: ``inotify`` (FILE:, DIR:), ``+kcm`` (sssd-kcm's
        store), ``+keys/BACKEND`` (KEYRING:; ``proc-keys`` polls)."""
        parts = ["inotify"]
        if self.kcm_reason is None:
            parts.append("kcm")
        if self.keyring is not None:
            parts.append("keys/" + self.keyring.backend)
        return "+".join(parts)

    async def start(self, sink: Sink) -> None:
        self.sink = sink
        self.inotify.start(sink)
        # The helpers look FILE:/DIR: paths up from the host's root and add the
        # inotify watches to this fd themselves, as the peer (module docstring).
        self.helpers.pass_fds = (self.inotify.fd,)
        try:
            self.helpers.root_fd = open_host_root()
        except OSError as exc:
            log.warning("credentials: cannot open the host's root (%s): FILE:/DIR: paths are looked up "
                        "in wqd's own mount namespace", exc.strerror)
        if self.kcm_reason is None:
            try:
                self.kcm.start(self._kcm_changed)
            except OSError as exc:  # an unprivileged instance: the store's directory is 0700 root
                self.kcm_reason = f"cannot watch {self.kcm.directory}: {exc.strerror}"
        if self.kcm_reason is None:
            log.info("credentials: KCM: caches by sssd-kcm's store %s", self.kcm.path)
        else:
            log.info("credentials: KCM: caches unavailable: %s", self.kcm_reason)
        if self.keyring is not None:
            await self.keyring.start(sink)

    async def stop(self) -> None:
        for watch in list(self.watches.values()):
            self._drop(watch)
        await self.reads.close()
        self.kcm.stop()
        self.inotify.stop()
        if self.keyring is not None:
            await self.keyring.stop()
        await self.helpers.close()
        if self.helpers.root_fd >= 0:
            os.close(self.helpers.root_fd)
            self.helpers.root_fd = -1

    # -- Watch() ----------------------------------------------------------

    async def resolve(self, peer: PeerCredentials, spec: str, options: dict) -> CredentialsTarget:
        check_options(NAME, OPTIONS, options)
        if peer.uid != os.geteuid() and os.geteuid() != 0:  # it would read as itself: another uid's caches
            raise NotSupported(f"this instance runs as uid {os.geteuid()} and cannot read caches as uid {peer.uid}")
        if spec == "":
            try:
                spec = krb5cache.default_ccache_name(peer.uid)
            except (ValueError, KeyError) as exc:
                raise NotSupported(f"cannot resolve the caller's default cache: {exc}") from None
        kind = parse_cache_name(spec)[0]
        if kind == "KCM":
            if self.kcm_reason is not None:
                raise NotSupported(f"KCM: caches are unavailable here: {self.kcm_reason}")
            owner = spec.partition(":")[2].split(":")[0]
        elif kind == "KEYRING":
            if self.keyring is None:
                raise NotSupported(f"KEYRING: caches are unavailable here: {self.keyring_reason}")
            owner = spec.split(":")[2]
        else:
            owner = ""
        if owner and not peer.is_root and owner != str(peer.uid):
            raise AccessDenied(f"{kind} caches of another uid")
        self.rate.admit(peer.uid, "credentials Watch")  # before the helper's read
        creds = peer_credentials(peer)
        target = CredentialsTarget(NAME, spec, uid=peer.uid, cache=spec, kind=kind, reader=reader_of(creds))
        self._check_room(self._key(target))
        self._judge(await self._read(creds, spec, peer.uid), spec)  # as the peer: may it?
        return target

    @staticmethod
    def _key(target: CredentialsTarget) -> tuple[int, str, tuple]:
        return (target.uid, target.cache, target.reader)

    def _check_room(self, key: tuple[int, str, tuple]) -> None:
        """A new watched cache of a non-root uid within ``caches_per_uid``: each
        is an inotify watch (counted against the daemon's own limit) and a read
        on each of its wakes; joining one watched already costs neither."""
        uid = key[0]
        if uid != 0 and key not in self.watches and self.per_uid[uid] >= self.caches_per_uid:
            raise LimitsExceeded(f"uid {uid} watches {self.caches_per_uid} credential caches already "
                                 "([credentials] caches_per_uid)")

    def routes(self, sub) -> Iterable[Hashable]:
        return (self._key(sub.target),)

    def accepts(self, sub, event: Event) -> bool:
        return True

    async def attach(self, sub) -> None:
        target = sub.target
        key = self._key(target)
        while (watch := self.watches.get(key)) is not None:
            if not watch.ready.done():  # the first subscriber is still arming it: its outcome is ours
                try:
                    await asyncio.shield(watch.ready)
                except asyncio.CancelledError:
                    if not watch.ready.cancelled() or asyncio.current_task().cancelling():
                        raise  # this call was cancelled, not the first one
            if self.watches.get(key) is watch:
                watch.subs.add(sub)
                return
            # it ended meanwhile (its subscribers left, or the first one's call went): arm one anew
        self._check_room(key)  # another Watch of this uid may have taken the room since resolve
        watch = self.watches[key] = CacheWatch(key, target.kind, peer_credentials(sub.owner), {sub}, sub.owner)
        self.per_uid[target.uid] += 1
        if target.kind == "KCM":
            self.kcm_watches[watch] = None
        watch.ready = asyncio.get_running_loop().create_future()
        watch.ready.add_done_callback(lambda f: f.cancelled() or f.exception())  # seen by those who wait
        try:  # armed before the first read: no change falls between (a wake meanwhile reads again after it)
            if target.kind == "KEYRING":
                await self.keyring.refresh(watch, sub.owner, target.uid)
            elif target.kind != "KCM":
                watch.token = await self._watch_directory(watch.creds, target.cache, lambda: self._changed(watch),
                                                          lambda: self._orphaned(watch))
            watch.state = self._judge(await self._read(watch.creds, target.cache, target.uid), target.cache)
        except BaseException as exc:
            self._drop(watch)  # nobody else joined: they wait for ``ready``
            if isinstance(exc, Exception):
                watch.ready.set_exception(exc)
            else:
                watch.ready.cancel()
            raise
        watch.ready.set_result(None)
        self._arm_timer(watch)

    async def _watch_directory(self, creds: Credentials | None, cache: str, wake, gone) -> int:
        """The cache's directory watched on this source's inotify fd by a helper
        with *creds*: the path is the host's (not wqd's private /tmp), and the
        kernel checks that the peer may read the directory (wqd keeps no
        CAP_DAC_* under its unit, and would not lend them)."""
        _kind, directory, entry = parse_cache_name(cache)
        names = None if entry is None else frozenset({entry})
        try:
            wd = await self.helpers.run(creds, "inotify_add", self.inotify.fd, directory,
                                        DIRECTORY_MASK | inotify.IN_MASK_ADD)
        except kerr.PermissionDenied as exc:
            raise AccessDenied(f"the caller may not watch {directory}: {exc.strerror}") from None
        except OSError as exc:
            raise InvalidArgument(f"cannot watch {directory}: {exc.strerror}") from None
        return self.inotify.listen(directory, wd, names, wake, gone)

    def detach(self, sub) -> None:
        watch = self.watches.get(self._key(sub.target))
        if watch is None:
            return
        watch.subs.discard(sub)
        if not watch.subs:
            self._drop(watch)

    def _drop(self, watch: CacheWatch) -> None:
        if self.watches.get(watch.key) is watch:
            del self.watches[watch.key]
            self.per_uid[watch.key[0]] -= 1
            if self.per_uid[watch.key[0]] <= 0:
                del self.per_uid[watch.key[0]]
        self.kcm_watches.pop(watch, None)
        self.reads.forget(watch.key[0], watch)  # a read in flight finds it dropped
        if watch.token is not None:
            self.inotify.remove(watch.token)
            watch.token = None
        if watch.timer is not None:
            watch.timer.cancel()
            watch.timer = None
        if watch.kind == "KEYRING" and self.keyring is not None:
            self.keyring.forget(watch)

    # -- reading, as the peer ---------------------------------------------

    async def _read(self, creds: Credentials | None, cache: str, uid: int) -> dict:
        self.helper_reads[uid] += 1  # tests/hostile/test_credentials_storm.py counts these lines
        log.debug("credentials: helper read %d as uid %d: %s", self.helper_reads[uid], uid, cache)
        try:
            return await self.helpers.run(creds, "krb5_read", self.binding_dir, os.environ.get("KRB5_CONFIG"),
                                          cache, access_probe(cache))
        except WqdError:
            raise
        except Exception as exc:
            log.warning("reading %s for uid %s: %s", cache, uid, exc)
            raise NotSupported(f"cannot read {cache}") from None

    @staticmethod
    def _judge(reply: dict, cache: str) -> krb5cache.CacheState | None:
        """The state in a helper's reply, or the named error it stands for."""
        error = reply.get("error")
        if error == "denied":
            raise AccessDenied("the caller may not read this cache")
        if error is not None:
            log.info("reading %s: %s", cache, reply.get("message"))
            raise NotSupported(f"cannot read {cache}: {reply.get('message')}")
        state = reply["state"]
        return None if state is None else krb5cache.CacheState(**state)

    def _orphaned(self, watch: CacheWatch) -> None:
        """The cache's directory was removed (a logout's /run/user/UID): nothing
        will wake this watch again, so read once more (``destroyed``) and end."""
        log.info("%s: its directory was removed; the watch ends", watch.key[1])
        watch.token = None
        watch.orphaned = True
        self._changed(watch)

    def _kcm_changed(self) -> None:
        for watch in self.kcm_watches:
            self._changed(watch)

    def _changed(self, watch: CacheWatch) -> None:
        """An event for *watch*: a read in its uid's lane (``PacedReads``)."""
        if self.watches.get(watch.key) is watch:
            self.reads.wake(watch.key[0], watch)

    async def _reread(self, watch: CacheWatch) -> None:
        """One read of *watch* for its lane, and what it changed."""
        if self.watches.get(watch.key) is not watch:
            return
        if not watch.ready.done():  # its first read is in flight: one more after it
            watch.ready.add_done_callback(lambda _f: self._changed(watch))
            return
        uid, cache, _reader = watch.key
        try:
            if watch.kind == "KEYRING":  # follow the collection's keys: new caches, gone ones
                await self.keyring.refresh(watch, watch.peer, uid)
            new = self._judge(await self._read(watch.creds, cache, uid), cache)
        except AccessDenied:
            if self.watches.get(watch.key) is watch:
                log.info("uid %d may no longer read %s: its subscriptions end", uid, cache)
                self.sink.dispatch(TargetGone(NAME, watch.key, "access revoked"))
            return
        except WqdError as exc:  # no KCM server, a helper that timed out: no news is not "destroyed"
            log.warning("re-reading %s for uid %d: %s", cache, uid, exc)
            new = watch.state
        if self.watches.get(watch.key) is not watch:  # its last subscriber left meanwhile
            return
        if new is None and watch.state is not None and self._settling(watch):
            return
        watch.settle_until = None
        old, watch.state = watch.state, new
        change = krb5cache.classify(old, new)
        if change is not None:
            self._emit(watch, change, new if new is not None else old)
            self._arm_timer(watch)
        if watch.orphaned and not self.reads.pending(uid, watch):
            self.sink.dispatch(TargetGone(NAME, watch.key, "the cache's directory was removed"))

    def _settling(self, watch: CacheWatch) -> bool:
        """A read found no TGT where there was one: true (say nothing yet) until
        SETTLE after the first such read, when one more read decides. A writer
        may be half-way: kinit -R into KCM:/KEYRING: initialises the cache, then
        stores the new TGT (a read between finds it empty); sssd-kcm's kdestroy
        of the primary is a moment without a default before the next cache is
        made it. A read in between that finds a TGT again ends it."""
        loop = asyncio.get_running_loop()
        if watch.settle_until is None:
            watch.settle_until = loop.time() + SETTLE
            loop.call_at(watch.settle_until, self._changed, watch)
            return True
        return loop.time() < watch.settle_until

    def _emit(self, watch: CacheWatch, change: str, state: krb5cache.CacheState) -> None:
        uid, cache, reader = watch.key
        self.sink.dispatch(CredentialsChanged(cache, change, state.principal, state.expires,
                                              state.renew_until, uid, reader))

    # -- expiring: one timer per watched TGT ------------------------------

    def _arm_timer(self, watch: CacheWatch) -> None:
        if watch.timer is not None:
            watch.timer.cancel()
            watch.timer = None
        state = watch.state
        if state is None or state.ticket_id == watch.warned:
            return
        now = time.time()
        if now >= state.expires:
            return  # expired already: nothing to warn of
        loop = asyncio.get_running_loop()
        delay = max(0.0, state.expires - self.lead - now)
        watch.timer = loop.call_at(loop.time() + delay, self._expiring, watch)

    def _expiring(self, watch: CacheWatch) -> None:
        watch.timer = None
        if self.watches.get(watch.key) is not watch or watch.state is None:
            return
        watch.warned = watch.state.ticket_id
        self._emit(watch, "expiring", watch.state)


def check_settings(table: dict) -> dict:
    return read_settings(NAME, table, SCHEMA)


def binding_directory() -> str:
    """The directory holding the ``krb5`` package, for the helper's path; it must
    be root's and writable by nobody else (the helper runs code from it as root)."""
    spec = importlib.util.find_spec("krb5")  # found, not imported: the helpers import it
    if spec is None or not spec.origin:
        raise ImportError("the krb5 binding is not installed (pip install 'wqd[credentials]'; Debian: /usr/share/doc/wqd/README.Debian)")
    package = os.path.dirname(os.path.abspath(spec.origin))
    directory = os.path.dirname(package)
    for path in (directory, package):
        st = os.stat(path)
        if os.geteuid() == 0 and (st.st_uid != 0 or st.st_mode & 0o022):
            raise OSError(f"{path} is not root's alone: the credential helper will not import from it")
    return directory


def open_source(cfg) -> CredentialsSource:
    """Raises ImportError (no pykrb5), ValueError (bad settings)."""
    settings = check_settings(cfg.raw.get(NAME, {}))
    source = CredentialsSource(expiring_lead=settings["expiring_lead"], kcm_store=settings["kcm_store"],
                               helper_timeout=settings["helper_timeout"], binding_dir=binding_directory(),
                               watch_rate=settings["watch_rate"], watch_burst=settings["watch_burst"],
                               caches_per_uid=settings["caches_per_uid"], read_interval=settings["read_interval"])
    try:  # KEYRING: runs on a keys source of its own ([keys] settings): its backend, its helpers
        if cfg.keys_backend == "replay":  # a second reader of the capture would take the keys source's records
            raise ValueError("[keys] backend is replay: no kernel keys to watch")
        source.keyring = KeyringCaches(keys.open_source(cfg, prestart=False), source._changed)
    except (OSError, ValueError) as exc:
        source.keyring_reason = str(exc)
        log.info("credentials: KEYRING: caches unavailable: %s", exc)
    return source
