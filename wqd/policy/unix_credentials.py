"""``unix`` rules for credentials: a peer's own uid's caches only, root any.

The source resolves every target as the caches of the caller's uid
(``CredentialsTarget.uid``) and reads them with the caller's identity, so the
kernel and sssd-kcm have already judged what it may read; these rules say the
same for the bus side, so that a policy stack without them still cannot hand
one uid's events to another: ``post`` passes an event only to its own uid (or
root), whatever subscription it was routed to.
"""

from __future__ import annotations

from wqd.events import Event, WatchTarget
from wqd.peer import PeerCredentials
from wqd.policy import ALLOW, Decision, Deny


async def watch(peer: PeerCredentials, target: WatchTarget, config: dict) -> Decision:
    if peer.is_root or target.uid == peer.uid:
        return ALLOW
    return Deny("credential caches of another uid")


def post(peer: PeerCredentials, event: Event, config: dict) -> Event | None:
    if peer.is_root or getattr(event, "uid", None) == peer.uid:
        return event
    return None


def decision_key(peer: PeerCredentials, event: Event, config: dict):
    return peer.is_root or getattr(event, "uid", None) == peer.uid  # all post reads of the peer
