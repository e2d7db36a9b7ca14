"""The ``keys`` source: key and keyring changes.

Targets: a key serial in decimal, ``@u`` (the caller's user keyring), ``@us`` (its
user session keyring) or ``@p`` (its persistent keyring). Resolution and the
kernel watch happen with the *peer's* credentials where the daemon is root, in a
credential helper out of the event loop and out of the peer's reach (see
``wqd.sources.helper_pool``), so the kernel itself judges View as it would for the
peer; the ``unix`` policy then judges the permission word as well. Watch calls of a
non-root uid are paced by a token bucket per uid (``[keys] watch_rate`` and
``watch_burst``): each costs the helper several key operations.

One kernel watch per watched key, refcounted across subscriptions. It serves every
subscriber only if it sees what each is entitled to (issue 12, finding 5): the
``proc-keys`` poller arms with the credentials of the subscriber that sees the most
of the key (members of a keyring, a payload), so a keyring that grants root only
View is polled with its owner's credentials once the owner subscribes; see the
backends for ``watch_queue``. Backends: ``watch_queue`` (notification pipe),
``proc-keys`` (polling fallback), ``replay`` (kernel-format records from a file or
FIFO, explicit configuration only).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from wqd.errors import AccessDenied, InvalidArgument, LimitsExceeded, NotSupported
from wqd.events import KEY_CHANGES, Event, KeyChanged, TypedTarget
from wqd.kernel import errors as kerr
from wqd.kernel.credentials import Credentials
from wqd.peer import PeerCredentials
from wqd.sources import Strings, check_options
from wqd.sources.helper_pool import HelperPool
from wqd.sources.key_backends import open_backend
from wqd.sources.token_buckets import TokenBuckets
from wqd.subscription import Sink

log = logging.getLogger(__name__)

NAME = "keys"
SPECIAL_TARGETS = frozenset({"@u", "@us", "@p"})
OPTIONS = {"changes": Strings(KEY_CHANGES, nonempty=True)}  # Watch options (check_options)
BACKENDS = ("auto", "watch_queue", "proc-keys", "replay")
SETTINGS = {  # [keys] (wqd.settings), read with the rest of the file: bad ones stop wqd (wqd.config)
    "backend": (str, "auto", lambda v: v in BACKENDS, "auto, watch_queue, proc-keys or replay"),
    "poll_interval": ((int, float), 1.0, lambda v: 0.01 <= v <= 3600, "0.01..3600"),  # proc-keys, seconds
    "queue_pages": (int, 4, lambda v: 1 <= v <= 16, "1..16"),  # watch_queue: pipe size in pages
    "replay_path": (str, "", lambda v: True, "a path"),  # replay: file or FIFO of kernel-format records
    "helper_timeout": ((int, float), 5.0, lambda v: 0.1 <= v <= 600, "0.1..600"),  # seconds per operation
    "helpers_max": (int, 64, lambda v: 1 <= v <= 4096, "1..4096"),  # credential helper processes at once
    "watch_rate": ((int, float), 20.0, lambda v: 0.01 <= v <= 1e6, "0.01..1000000"),  # Watch calls a second ...
    "watch_burst": (int, 40, lambda v: 1 <= v <= 1_000_000, "1..1000000"),  # ... and at once, per non-root uid
}


@dataclass(frozen=True, slots=True)
class KeyTarget(TypedTarget):
    """A keys target: ``object_id`` is the key's serial; ``uid``/``gid``/``perm`` its
    owner and permission word (none with the replay backend)."""

    changes: frozenset[str] | None = None  # the ``changes`` option; None: every change
    type: str = ""  # the key's type and description, as the kernel described it
    description: str = ""


@dataclass(eq=False, slots=True)
class KeyWatch:
    """One watched key: its kernel watch and the subscriptions sharing it."""

    serial: int
    creds: Credentials | None  # whose credentials armed (and poll) the watch
    subs: set = field(default_factory=set)
    tag: int = 0
    state: object = None  # backend data (proc-keys snapshot)


def peer_credentials(peer: PeerCredentials) -> Credentials | None:
    """The credentials to act with for *peer*: ``None`` means the daemon's own
    (the peer is the daemon's uid, or the daemon is not root and cannot change)."""
    if peer.uid == os.geteuid() or os.geteuid() != 0:
        return None
    try:
        gid = pwd.getpwuid(peer.uid).pw_gid
    except KeyError:
        gid = min(peer.gids) if peer.gids else 65534
    return Credentials(peer.uid, gid, tuple(sorted(peer.gids)))


def parse_serial(spec: str) -> int:
    if not spec.isascii() or not spec.isdigit() or len(spec) > 10:
        raise InvalidArgument("keys target must be a key serial in decimal, @u, @us or @p")
    serial = int(spec)
    if not 0 < serial < 2**31:
        raise InvalidArgument("key serial out of range")
    return serial


class KeysSource:
    name = NAME

    def __init__(self, backend, *, resolve_keys: bool = True, helper_timeout: float = 5.0,
                 helpers_max: int = 64, watch_rate: float = 20.0, watch_burst: int = 40,
                 prestart: bool = True) -> None:
        self.impl = backend
        self.resolve_keys = resolve_keys  # replay: targets are serials, nothing to ask the kernel
        # start the daemon's helper at start(): most first Watch calls need it. Not for
        # a keys source inside another source (credentials), whose helper would sit
        # unused, and its reaping would wake an idle daemon.
        self.prestart = prestart
        self.watches: dict[int, KeyWatch] = {}
        self.sink = None
        self.helpers = HelperPool(timeout=helper_timeout, limit=helpers_max,
                                  pass_fds=getattr(backend, "helper_fds", ()))
        self.rate = TokenBuckets(watch_rate, watch_burst)
        self._turns: dict[int, asyncio.Future] = {}  # serial -> the last arm/disarm in line
        self._disarming: set[asyncio.Task] = set()

    @property
    def backend(self) -> str:
        return self.impl.name if self.impl is not None else ""

    async def start(self, sink: Sink) -> None:
        self.sink = sink
        await self.impl.start(self, sink)
        if self.resolve_keys and self.prestart:
            self.helpers.prestart(None)

    async def stop(self) -> None:
        for watch in list(self.watches.values()):
            self._schedule_disarm(watch)
        self.watches.clear()
        if self._disarming:
            await asyncio.wait(set(self._disarming), timeout=self.helpers.timeout + 1)
        await self.impl.stop()
        await self.helpers.close()

    async def run(self, creds: Credentials | None, op: str, *args):
        """A key operation with *creds* (``None``: the daemon's), in a helper."""
        return await self.helpers.run(creds, op, *args)

    @contextlib.asynccontextmanager
    async def _turn(self, serial: int):
        """Arms and disarms of one key, one at a time and in order (a re-arm must
        not overtake the disarm of the watch it replaces: the kernel says EBUSY)."""
        loop = asyncio.get_running_loop()
        prev = self._turns.get(serial)
        mine = self._turns[serial] = loop.create_future()

        def release(_=None):
            if not mine.done():
                mine.set_result(None)
            if self._turns.get(serial) is mine:
                del self._turns[serial]
        try:
            if prev is not None:
                await asyncio.shield(prev)
        except asyncio.CancelledError:
            prev.add_done_callback(release)  # keep the order for those behind us
            raise
        try:
            yield
        finally:
            release()

    # -- Watch() ----------------------------------------------------------

    async def resolve(self, peer: PeerCredentials, spec: str, options: dict) -> KeyTarget:
        changes = check_options(NAME, OPTIONS, options)["changes"]
        if spec in SPECIAL_TARGETS:
            if not self.resolve_keys:
                raise NotSupported(f"{spec} cannot be resolved by the {self.backend} backend; pass a serial")
            if peer.uid != os.geteuid() and os.geteuid() != 0:
                raise NotSupported(f"this instance runs as uid {os.geteuid()} and cannot reach {spec} of uid {peer.uid}")
        else:
            serial = parse_serial(spec)
        if not self.resolve_keys:
            return KeyTarget(NAME, spec, serial, changes=changes)
        self.rate.admit(peer.uid, "keys Watch")
        creds = peer_credentials(peer)
        if spec in SPECIAL_TARGETS:
            try:
                serial = await self.run(creds, "resolve", spec, peer.uid)
            except kerr.NotSupported:
                raise NotSupported(f"{spec} is not supported by this kernel") from None
            except kerr.PermissionDenied:
                raise AccessDenied(f"cannot resolve {spec} for the caller") from None
            except kerr.KernelError as exc:
                raise NotSupported(f"cannot resolve {spec}: {exc.strerror}") from None
        try:
            desc, flags = await self.run(creds, "describe", serial)
        except (kerr.NoSuchKey, kerr.KeyRevoked, kerr.KeyExpired):
            raise InvalidArgument(f"no such key {serial}") from None
        except kerr.PermissionDenied:
            raise AccessDenied("the key does not grant View to the caller") from None
        except kerr.KernelError as exc:
            raise InvalidArgument(f"cannot describe key {serial}: {exc.strerror}") from None
        if flags is not None and "I" not in flags and "N" not in flags:
            # KEYCTL_WATCH_KEY waits until construction ends (lookup_user_key without
            # KEY_LOOKUP_PARTIAL): arming now would stall the helper on the constructor.
            raise NotSupported(f"key {serial} is still under construction; watch it once it is instantiated")
        return KeyTarget(NAME, spec, serial, desc.uid, desc.gid, desc.perm, changes=changes, type=desc.type,
                         description=desc.description)

    def routes(self, sub) -> Iterable[Hashable]:
        return (sub.target.object_id,)

    def accepts(self, sub, event: Event) -> bool:
        changes = sub.target.changes
        return changes is None or event.change in changes

    async def attach(self, sub) -> None:
        serial = sub.target.object_id
        creds = peer_credentials(sub.owner) if self.resolve_keys else None
        async with self._turn(serial):  # arming only: joining must not hold up others
            watch = self.watches.get(serial)
            if watch is None:
                watch = await self._arm(serial, sub)
                self.watches[serial] = watch
            watch.subs.add(sub)  # now: a detach meanwhile must not find it empty
        try:
            await self.impl.join(self, watch, creds)
        except (kerr.KernelError, LimitsExceeded) as exc:
            log.debug("key %d: no better view with %s: %s", serial, creds, exc)
        except BaseException:
            self._leave(watch, sub)
            raise
        self.impl.filters_changed(self)

    async def _arm(self, serial: int, sub) -> KeyWatch:
        """Arm with the daemon's own credentials where they reach the key (so one
        watch serves every entitled peer, as the kernel's would), else the peer's."""
        attempts: list[Credentials | None] = [None]
        if self.resolve_keys and (creds := peer_credentials(sub.owner)) is not None:
            attempts.append(creds)
        for i, creds in enumerate(attempts):
            watch = KeyWatch(serial, creds)
            try:
                await self.impl.arm(watch)
                return watch
            except (kerr.PermissionDenied, kerr.NoSuchKey):
                if i + 1 < len(attempts):
                    continue
                raise AccessDenied("the kernel refused to watch this key for the caller") from None
            except kerr.Busy as exc:
                raise LimitsExceeded(f"the kernel refused another watch: {exc.strerror}") from None
            except (kerr.KeyRevoked, kerr.KeyExpired):
                raise InvalidArgument(f"key {serial} is revoked or expired") from None
            except kerr.KernelError as exc:
                raise InvalidArgument(f"cannot watch key {serial}: {exc.strerror}") from None
        raise AssertionError("unreachable")

    def detach(self, sub) -> None:
        watch = self.watches.get(sub.target.object_id)
        if watch is not None:
            self._leave(watch, sub)
        self.impl.filters_changed(self)

    def _leave(self, watch: KeyWatch, sub) -> None:
        watch.subs.discard(sub)
        if watch.subs:
            self.impl.left(self, watch, peer_credentials(sub.owner) if self.resolve_keys else None)
            return
        if self.watches.get(watch.serial) is watch:
            del self.watches[watch.serial]
        self._schedule_disarm(watch)

    def _schedule_disarm(self, watch: KeyWatch) -> None:
        task = asyncio.get_running_loop().create_task(self._disarm(watch))
        self._disarming.add(task)
        task.add_done_callback(self._disarming.discard)

    async def _disarm(self, watch: KeyWatch) -> None:
        async with self._turn(watch.serial):
            try:
                await self.impl.disarm(self, watch)
            except kerr.KernelError as exc:
                log.debug("unwatching key %d: %s", watch.serial, exc)
            except Exception as exc:  # noqa: BLE001 - a helper that timed out: the key's watch
                log.warning("unwatching key %d: %s", watch.serial, exc)  # dies with the key
        log.debug("released the watch on key %d", watch.serial)

    def wanted_changes(self) -> frozenset[str] | None:
        """The union of what every subscription wants; ``None`` if any wants all."""
        wanted: set[str] = set()
        for watch in self.watches.values():
            for sub in watch.subs:
                changes = sub.target.changes
                if changes is None:
                    return None
                wanted |= changes
        return frozenset(wanted)

    # -- helpers for backends ---------------------------------------------

    def emit_change(self, key: int, change: str, aux: int = 0) -> None:
        self.sink.dispatch(KeyChanged(key, change, aux))


def open_source(cfg, *, prestart: bool = True) -> KeysSource:
    """The source for this machine from the ``[keys]`` settings (checked when the
    configuration was read: ``wqd.config``); *prestart*: see ``KeysSource``."""
    backend = open_backend(cfg.keys_backend, replay_path=cfg.keys_replay_path,
                           interval=cfg.keys_poll_interval, pages=cfg.keys_queue_pages)
    return KeysSource(backend, resolve_keys=backend.name != "replay", helper_timeout=cfg.keys_helper_timeout,
                      helpers_max=cfg.keys_helpers_max, watch_rate=cfg.keys_watch_rate,
                      watch_burst=cfg.keys_watch_burst, prestart=prestart)
