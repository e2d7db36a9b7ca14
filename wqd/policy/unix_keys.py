"""``unix`` rules for keys.

A peer may watch a key if the key's permission word grants View to the peer as a
non-possessor: the user bits if the peer owns the key, else the group bits if the
key's group is one of the peer's groups, else the other bits. Root may watch any
key the daemon can reach. Key events carry nothing beyond the serials the
watcher could already see, so ``post`` passes them through.
"""

from __future__ import annotations

from wqd.events import Event, WatchTarget
from wqd.peer import PeerCredentials
from wqd.policy import ALLOW, Decision, Deny

KEY_VIEW = 0x01  # include/linux/key.h: KEY_USR_VIEW >> 16, KEY_GRP_VIEW >> 8, KEY_OTH_VIEW


def key_grants_view(target: WatchTarget, uid: int, gids: frozenset[int]) -> bool:
    if target.perm is None or target.uid is None:
        return False
    perm = target.perm
    if uid == target.uid:
        return bool((perm >> 16) & KEY_VIEW)
    if target.gid in gids:
        return bool((perm >> 8) & KEY_VIEW)
    return bool(perm & KEY_VIEW)


async def watch(peer: PeerCredentials, target: WatchTarget, config: dict) -> Decision:
    if peer.is_root or key_grants_view(target, peer.uid, peer.gids):
        return ALLOW
    return Deny("the key does not grant View to the caller")


def post(peer: PeerCredentials, event: Event, config: dict) -> Event | None:
    return event


def decision_key(peer: PeerCredentials, event: Event, config: dict):
    return ()  # post passes key events through
