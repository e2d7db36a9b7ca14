"""LSM-style policy plugins: a ``watch`` hook and a ``post`` hook.

Like the kernel's ``security_watch_key`` and ``security_post_notification``:

- ``async watch(peer, target) -> Decision``: may *peer* watch *target*? ``ALLOW``,
  ``Deny(reason)``, or ``ABSTAIN``. Bounded in time by the stack.
- ``post(peer, event) -> Event | None``: the event as *peer* may see it (possibly
  with fields removed), or ``None`` to drop it. Synchronous and cheap: it runs per
  event per subscriber.

Plugins stack in the configured order; any deny wins; a plugin that raises denies
and is logged. With no plugin allowing, the answer is deny (fail closed).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

from wqd.events import Event, WatchTarget
from wqd.peer import PeerCredentials

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "wqd.policy"


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: str  # "allow" | "deny" | "abstain"
    reason: str = ""

    @property
    def allowed(self) -> bool:
        return self.verdict == "allow"


ALLOW = Decision("allow")
ABSTAIN = Decision("abstain")


def Deny(reason: str) -> Decision:  # noqa: N802 - reads like a constructor
    return Decision("deny", reason)


@runtime_checkable
class Policy(Protocol):
    name: str

    async def watch(self, peer: PeerCredentials, target: WatchTarget) -> Decision: ...

    def post(self, peer: PeerCredentials, event: Event) -> Event | None: ...


class PolicyStack:
    """The configured plugins, in order."""

    def __init__(self, plugins: list[Policy], timeout: float = 5.0) -> None:
        self.plugins = plugins
        self.timeout = timeout

    async def watch(self, peer: PeerCredentials, target: WatchTarget) -> Decision:
        allowed = False
        for plugin in self.plugins:
            try:
                decision = await asyncio.wait_for(plugin.watch(peer, target), self.timeout)
            except Exception:
                log.exception("policy %s failed on watch; denying", plugin.name)
                return Deny(f"policy {plugin.name} failed")
            if decision.verdict == "deny":
                return decision
            allowed |= decision.verdict == "allow"
        return ALLOW if allowed else Deny("no policy allows this")

    def post(self, peer: PeerCredentials, event: Event) -> Event | None:
        for plugin in self.plugins:
            try:
                event = plugin.post(peer, event)
            except Exception:
                log.exception("policy %s failed on post; dropping the event", plugin.name)
                return None
            if event is None:
                return None
        return event


class UnknownPolicy(Exception):
    pass


def load_plugin(name: str, config: dict | None = None) -> Policy:
    """Instantiate the plugin registered as *name* in the ``wqd.policy`` group."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            factory = ep.load()
            return factory(config or {})
    raise UnknownPolicy(f"no policy plugin named {name!r} (entry-point group {ENTRY_POINT_GROUP})")


def load_stack(names: list[str], config: dict | None = None, timeout: float = 5.0) -> PolicyStack:
    return PolicyStack([load_plugin(n, config) for n in names], timeout)
