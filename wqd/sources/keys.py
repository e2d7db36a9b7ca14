"""The ``keys`` source: key and keyring changes.

Targets: a key serial in decimal, ``@u`` (the caller's user keyring), ``@us`` (its
user session keyring) or ``@p`` (its persistent keyring). Resolution and the
kernel watch happen with the *peer's* credentials where the daemon is root (see
``wqd.kernel.credentials``), so the kernel itself judges View as it would for the
peer; the ``unix`` policy then judges the permission word as well.

One kernel watch per watched key, refcounted across subscriptions. Backends:
``watch_queue`` (notification pipe), ``proc-keys`` (polling fallback), ``replay``
(kernel-format records from a file or FIFO, explicit configuration only).
"""

from __future__ import annotations

import logging
import os
import pwd
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from wqd.errors import AccessDenied, InvalidArgument, LimitsExceeded, NotSupported
from wqd.events import KEY_CHANGES, Event, KeyChanged, WatchTarget
from wqd.kernel import errors as kerr
from wqd.kernel import keyctl
from wqd.kernel.credentials import Credentials, run_as
from wqd.parse.proc_keys import parse_proc_keys
from wqd.peer import PeerCredentials
from wqd.sources import Sink, string_list_option

log = logging.getLogger(__name__)

SPECIAL_TARGETS = {
    "@u": keyctl.KEY_SPEC_USER_KEYRING,
    "@us": keyctl.KEY_SPEC_USER_SESSION_KEYRING,
}
OPTIONS = frozenset({"changes"})


@dataclass(eq=False, slots=True)
class KeyWatch:
    """One watched key: its kernel watch and the subscriptions sharing it."""

    serial: int
    creds: Credentials | None  # whose credentials armed (and poll) the watch
    subs: set = field(default_factory=set)
    tag: int = 0
    state: object = None  # backend data (proc-keys snapshot)


def peer_credentials(peer: PeerCredentials) -> Credentials | None:
    """The credentials to act with for *peer*: ``None`` means the daemon's own."""
    if peer.uid == os.geteuid():
        return None
    try:
        gid = pwd.getpwuid(peer.uid).pw_gid
    except KeyError:
        gid = min(peer.gids) if peer.gids else 65534
    return Credentials(peer.uid, gid, tuple(sorted(peer.gids)))


def _resolve_as(spec: str, uid: int) -> int:
    """Runs with the peer's credentials (or the daemon's, for itself)."""
    if spec == "@p":
        return keyctl.get_persistent(-1 if uid == os.geteuid() else uid, keyctl.KEY_SPEC_PROCESS_KEYRING)
    return keyctl.get_keyring_id(SPECIAL_TARGETS[spec], True)


def _describe_with_flags(serial: int) -> tuple[keyctl.KeyDescription, str | None]:
    """KEYCTL_DESCRIBE plus the key's /proc/keys flags (None if not listed there)."""
    desc = keyctl.describe(serial)
    try:
        with open("/proc/keys") as f:
            entry = parse_proc_keys(f.read()).get(serial)
    except OSError:
        entry = None
    return desc, entry.flags if entry else None


def parse_serial(spec: str) -> int:
    if not spec.isascii() or not spec.isdigit() or len(spec) > 10:
        raise InvalidArgument("keys target must be a key serial in decimal, @u, @us or @p")
    serial = int(spec)
    if not 0 < serial < 2**31:
        raise InvalidArgument("key serial out of range")
    return serial


class KeysSource:
    name = "keys"

    def __init__(self, backend, *, resolve_keys: bool = True) -> None:
        self.impl = backend
        self.resolve_keys = resolve_keys  # replay: targets are serials, nothing to ask the kernel
        self.watches: dict[int, KeyWatch] = {}
        self.sink = None

    @property
    def backend(self) -> str:
        return self.impl.name if self.impl is not None else ""

    async def start(self, sink: Sink) -> None:
        self.sink = sink
        await self.impl.start(self, sink)

    async def stop(self) -> None:
        for watch in list(self.watches.values()):
            self._disarm(watch)
        self.watches.clear()
        await self.impl.stop()

    # -- Watch() ----------------------------------------------------------

    async def resolve(self, peer: PeerCredentials, spec: str, options: dict) -> WatchTarget:
        unknown = set(options) - OPTIONS
        if unknown:
            raise InvalidArgument(f"unknown option(s) for keys: {', '.join(sorted(unknown))}")
        changes = string_list_option(options, "changes", KEY_CHANGES)
        if changes is not None and not changes:
            raise InvalidArgument("option 'changes' must not be empty")
        creds = peer_credentials(peer)
        if spec in SPECIAL_TARGETS or spec == "@p":
            if not self.resolve_keys:
                raise NotSupported(f"{spec} cannot be resolved by the {self.backend} backend; pass a serial")
            if creds is not None and os.geteuid() != 0:
                raise NotSupported(f"this instance runs as uid {os.geteuid()} and cannot reach {spec} of uid {peer.uid}")
            try:
                serial = run_as(creds, _resolve_as, spec, peer.uid)
            except kerr.NotSupported:
                raise NotSupported(f"{spec} is not supported by this kernel") from None
            except kerr.PermissionDenied:
                raise AccessDenied(f"cannot resolve {spec} for the caller") from None
            except kerr.KernelError as exc:
                raise NotSupported(f"cannot resolve {spec}: {exc.strerror}") from None
        else:
            serial = parse_serial(spec)
        if not self.resolve_keys:
            return WatchTarget("keys", spec, serial, extra={"changes": changes})
        if creds is not None and os.geteuid() != 0:
            creds = None  # an unprivileged instance describes as itself; policy judges
        try:
            desc, flags = run_as(creds, _describe_with_flags, serial)
        except (kerr.NoSuchKey, kerr.KeyRevoked, kerr.KeyExpired):
            raise InvalidArgument(f"no such key {serial}") from None
        except kerr.PermissionDenied:
            raise AccessDenied("the key does not grant View to the caller") from None
        except kerr.KernelError as exc:
            raise InvalidArgument(f"cannot describe key {serial}: {exc.strerror}") from None
        if flags is not None and "I" not in flags and "N" not in flags:
            # KEYCTL_WATCH_KEY waits until construction ends (lookup_user_key without
            # KEY_LOOKUP_PARTIAL): arming now would stall the daemon on the constructor.
            raise NotSupported(f"key {serial} is still under construction; watch it once it is instantiated")
        return WatchTarget("keys", spec, serial, desc.uid, desc.gid, desc.perm,
                           extra={"type": desc.type, "description": desc.description, "changes": changes})

    def routes(self, sub) -> Iterable[Hashable]:
        return (sub.target.object_id,)

    def accepts(self, sub, event: Event) -> bool:
        changes = sub.target.extra.get("changes")
        return changes is None or event.change in changes

    def attach(self, sub) -> None:
        serial = sub.target.object_id
        watch = self.watches.get(serial)
        if watch is None:
            watch = self._arm(serial, sub)
            self.watches[serial] = watch
        watch.subs.add(sub)
        self.impl.filters_changed(self)

    def _arm(self, serial: int, sub) -> KeyWatch:
        """Arm with the daemon's own credentials where they reach the key (so one
        watch serves every entitled peer, as the kernel's would), else the peer's."""
        attempts: list[Credentials | None] = [None]
        if os.geteuid() == 0 and (creds := peer_credentials(sub.owner)) is not None:
            attempts.append(creds)
        for i, creds in enumerate(attempts):
            watch = KeyWatch(serial, creds)
            try:
                self.impl.arm(watch)
                return watch
            except (kerr.PermissionDenied, kerr.NoSuchKey):
                if i + 1 < len(attempts):
                    continue
                raise AccessDenied("the kernel refused to watch this key for the caller") from None
            except kerr.Busy as exc:
                raise LimitsExceeded(f"the kernel refused another watch: {exc.strerror}") from None
            except (kerr.KeyRevoked, kerr.KeyExpired):
                raise InvalidArgument(f"key {serial} is revoked or expired") from None
        raise AssertionError("unreachable")

    def detach(self, sub) -> None:
        serial = sub.target.object_id
        watch = self.watches.get(serial)
        if watch is None:
            return
        watch.subs.discard(sub)
        if not watch.subs:
            del self.watches[serial]
            self._disarm(watch)
        self.impl.filters_changed(self)

    def _disarm(self, watch: KeyWatch) -> None:
        try:
            self.impl.disarm(watch)
        except kerr.KernelError as exc:
            log.debug("unwatching key %d: %s", watch.serial, exc)
        log.debug("released the watch on key %d", watch.serial)

    def wanted_changes(self) -> frozenset[str] | None:
        """The union of what every subscription wants; ``None`` if any wants all."""
        wanted: set[str] = set()
        for watch in self.watches.values():
            for sub in watch.subs:
                changes = sub.target.extra.get("changes")
                if changes is None:
                    return None
                wanted |= changes
        return frozenset(wanted)

    # -- helpers for backends ---------------------------------------------

    def emit_change(self, key: int, change: str, aux: int = 0) -> None:
        self.sink.dispatch(KeyChanged(key, change, aux))
