"""``polkit``: ask polkitd, per source, whether the peer may watch.

Action ids (shipped in ``data/polkit-1/actions/io.wqd.policy``):
``io.wqd.watch-keys``, ``io.wqd.watch-devices``, ``io.wqd.watch-mounts``,
``io.wqd.watch-fs-errors``, ``io.wqd.watch-credentials``. The subject is the caller's unique bus name
(``system-bus-name``: polkitd takes its identity from the bus, as wqd does), with
no user interaction: a ``Watch`` never pops up a dialog.

- Asynchronous: ``CheckAuthorization`` on the daemon's own bus connection
  (``wqd.bus.polkit``), bounded by ``timeout``; a check that times out is
  cancelled (``CancelCheckAuthorization``), denies, and is not cached.
- Cached per peer and action for ``cache_ttl`` seconds (dropped when the peer
  leaves the bus); concurrent checks of the same peer and action share one call.
- When polkitd is absent (no owner of ``org.freedesktop.PolicyKit1``, not
  activatable), or answers with an error, the configured ``default`` applies:
  ``deny`` (the default), ``abstain`` or ``allow``.

Settings, ``[policy.polkit]``: ``default``, ``timeout`` (seconds, default 2),
``cache_ttl`` (seconds, default 30; 0 disables the cache).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from wqd.events import Event, WatchTarget
from wqd.peer import PeerCredentials
from wqd.policy import ABSTAIN, ALLOW, Decision, Deny, PluginContext, PluginError
from wqd.settings import SettingError, read_settings
from wqd.sources.registry import CREDENTIALS, DEVICES, FS_ERRORS, KEYS, MOUNTS

log = logging.getLogger(__name__)

ACTIONS = {  # source -> its action in data/polkit-1/actions/io.wqd.policy
    KEYS: "io.wqd.watch-keys",
    DEVICES: "io.wqd.watch-devices",
    MOUNTS: "io.wqd.watch-mounts",
    FS_ERRORS: "io.wqd.watch-fs-errors",
    CREDENTIALS: "io.wqd.watch-credentials",
}
DEFAULTS = {"deny": Deny("polkit is not available"), "abstain": ABSTAIN, "allow": ALLOW}
SETTINGS = {  # [policy.polkit] (wqd.settings)
    "default": (str, "deny", lambda v: v in DEFAULTS, "deny, abstain or allow"),
    "timeout": ((int, float), 2.0, lambda v: 0 < v <= 600, "a number of seconds in 0..600"),
    "cache_ttl": ((int, float), 30.0, lambda v: 0 <= v <= 86400, "a number of seconds in 0..86400"),
}
MAX_CACHED_PEERS = 4096  # beyond this, expired entries are swept (peers that left are forgotten anyway)


class AuthorityUnavailable(Exception):
    """polkitd is not on the bus, or answered with an error."""


class Authority(Protocol):
    """What the daemon provides as ``services["polkit"]`` (``wqd.bus.polkit.BusAuthority``)."""

    async def check(self, unique_name: str, action_id: str, cancellation_id: str) -> bool:
        """Is *unique_name* authorized for *action_id*? Raises ``AuthorityUnavailable``."""

    def cancel(self, cancellation_id: str) -> None:
        """Best effort: tell polkitd a check is no longer wanted."""


def validate_settings(settings: dict) -> dict:
    """Checked settings with defaults; raises ``PluginError`` naming the setting
    (its ``__cause__``, a ``wqd.settings.SettingError``, carries the key)."""
    try:
        checked = read_settings("policy.polkit", settings, SETTINGS)
    except SettingError as exc:
        raise PluginError(str(exc)) from exc
    return {"default": checked["default"], "timeout": float(checked["timeout"]),
            "cache_ttl": float(checked["cache_ttl"])}


class PolkitPolicy:
    name = "polkit"

    def __init__(self, context: PluginContext) -> None:
        settings = validate_settings(dict(context.settings))
        self.default = DEFAULTS[settings["default"]]
        self.timeout = settings["timeout"]
        self.cache_ttl = settings["cache_ttl"]
        self.services = context.services
        self._cache: dict[str, dict[str, tuple[bool, float]]] = {}  # peer -> action -> (authorized, expiry)
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}
        self._serial = 0
        self.calls = 0  # CheckAuthorization calls made (for logs and tests)

    async def watch(self, peer: PeerCredentials, source: str, target: WatchTarget) -> Decision:
        action = ACTIONS.get(source)
        if action is None:
            return Deny(f"no polkit action for source {source!r}")
        key = (peer.unique_name, action)
        cached = self._cache.get(peer.unique_name, {}).get(action)
        if cached is not None and time.monotonic() < cached[1]:
            return self._decision(cached[0], action)
        authority = self.services.get("polkit")
        if authority is None:
            return self.default
        shared = self._inflight.get(key)
        if shared is None:
            shared = asyncio.ensure_future(self._check(authority, peer.unique_name, action))
            self._inflight[key] = shared
            shared.add_done_callback(lambda _f, key=key: self._inflight.pop(key, None))
        try:
            authorized = await asyncio.shield(shared)
        except AuthorityUnavailable as exc:
            log.warning("polkit unavailable (%s): default %s for %s", exc, self.default.verdict, peer.unique_name)
            return self.default
        except asyncio.TimeoutError:
            return Deny("polkit did not answer in time")
        return self._decision(authorized, action)

    async def _check(self, authority: Authority, unique_name: str, action: str) -> bool:
        self._serial += 1
        cancellation_id = f"wqd-{self._serial}"
        self.calls += 1
        try:
            authorized = await asyncio.wait_for(authority.check(unique_name, action, cancellation_id), self.timeout)
        except asyncio.TimeoutError:
            log.warning("polkit did not answer within %.1f s for %s %s; denying", self.timeout, unique_name, action)
            authority.cancel(cancellation_id)
            raise
        if self.cache_ttl > 0:
            now = time.monotonic()
            if len(self._cache) >= MAX_CACHED_PEERS:
                self._cache = {n: a for n, a in self._cache.items() if any(e > now for _, e in a.values())}
            self._cache.setdefault(unique_name, {})[action] = (authorized, now + self.cache_ttl)
        return authorized

    @staticmethod
    def _decision(authorized: bool, action: str) -> Decision:
        return ALLOW if authorized else Deny(f"not authorized by polkit ({action})")

    def forget(self, unique_name: str) -> None:
        self._cache.pop(unique_name, None)

    def post(self, peer: PeerCredentials, event: Event) -> Event | None:
        return event

    def decision_key(self, peer: PeerCredentials, event: Event):
        return ()  # post passes every event through, whoever the peer
