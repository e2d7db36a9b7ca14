"""``unix``: discretionary access control, as the kernel would judge it.

One module per source holds the rules (``unix_keys``, ``unix_devices``,
``unix_mounts``); this plugin dispatches to them. A source without rules here
gets ``ABSTAIN`` from this plugin.
"""

from __future__ import annotations

import importlib

from wqd.events import Event, WatchTarget
from wqd.peer import PeerCredentials
from wqd.policy import ABSTAIN, Decision

# source -> module with ``async watch(peer, target, config)`` and ``post(peer, event, config)``
RULES = {
    "keys": "wqd.policy.unix_keys",
    "devices": "wqd.policy.unix_devices",
    "mounts": "wqd.policy.unix_mounts",
    "fs-errors": "wqd.policy.unix_mounts",
}


class UnixPolicy:
    name = "unix"

    def __init__(self, config: dict | None = None) -> None:
        self.config = config or {}
        self.rules = {}
        for source, module in RULES.items():
            try:
                self.rules[source] = importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name != module:
                    raise

    async def watch(self, peer: PeerCredentials, target: WatchTarget) -> Decision:
        rules = self.rules.get(target.source)
        if rules is None:
            return ABSTAIN
        return await rules.watch(peer, target, self.config)

    def post(self, peer: PeerCredentials, event: Event) -> Event | None:
        rules = self.rules.get(event.source)
        if rules is None:
            return event
        return rules.post(peer, event, self.config)
