"""``unix``: discretionary access control, as the kernel would judge it.

One module per source holds the rules, with ``async watch(peer, target, config)
-> Decision`` and ``post(peer, event, config) -> Event | None``:

- ``keys`` (``unix_keys``): the key's permission word grants View to the peer.
- ``devices`` (``unix_devices``): identifying properties only to root or to a peer
  that may open the device node.
- ``mounts`` and ``fs-errors`` (``unix_mounts``): a peer's own mount namespace
  only; filesystem errors to root.
- ``credentials`` (``unix_credentials``): a peer's own uid's caches only, root any.

A source without a rules module here is denied (fail closed), and its events
are dropped: ``unix`` never waves through what it cannot judge.
"""

from __future__ import annotations

from wqd.events import Event, WatchTarget
from wqd.peer import PeerCredentials
from wqd.policy import Decision, Deny, unix_credentials, unix_devices, unix_keys, unix_mounts
from wqd.sources.registry import CREDENTIALS, DEVICES, FS_ERRORS, KEYS, MOUNTS

# source -> module with ``async watch(peer, target, config)`` and ``post(peer, event, config)``
RULES = {
    KEYS: unix_keys,
    DEVICES: unix_devices,
    MOUNTS: unix_mounts,
    FS_ERRORS: unix_mounts,
    CREDENTIALS: unix_credentials,
}


class UnixPolicy:
    name = "unix"

    def __init__(self, context=None) -> None:
        # The rules modules get the [policy] table (their settings: [policy.unix]).
        table = context.policy if hasattr(context, "policy") else context
        self.config = dict(table or {})
        self.rules = dict(RULES)

    async def watch(self, peer: PeerCredentials, source: str, target: WatchTarget) -> Decision:
        rules = self.rules.get(source)
        if rules is None:
            return Deny(f"no unix rules for source {source!r} in this build")
        return await rules.watch(peer, target, self.config)

    def post(self, peer: PeerCredentials, event: Event) -> Event | None:
        rules = self.rules.get(event.source)
        if rules is None:
            return None
        return rules.post(peer, event, self.config)

    def decision_key(self, peer: PeerCredentials, event: Event):
        """The source's rules module's ``decision_key(peer, event, config)``; ``None``
        (judge per peer) where it has none."""
        rules = self.rules.get(event.source)
        if rules is None:
            return ()  # post drops it for everyone
        keyer = getattr(rules, "decision_key", None)
        return None if keyer is None else keyer(peer, event, self.config)
