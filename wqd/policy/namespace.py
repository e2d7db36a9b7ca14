"""``namespace``: nothing crosses a namespace boundary that cannot be translated.

After the kdbus review (seeds/002): metadata is dropped whenever it crosses a
PID or user namespace boundary it cannot be translated across, and a peer whose
identity cannot be established gets nothing.

- A peer whose process could not be pinned and verified at first contact
  (``PeerCredentials.verified`` false: e.g. the bus reported PID 0 because the
  peer lives in a PID namespace the bus cannot see, the PID was reused, or,
  without ``ProcessFD``, the peer connected before wqd watched the bus: see
  ``wqd.peer``) is denied, as is one whose namespaces could not be read.
- A peer in a user or PID namespace other than wqd's ("foreign") gets no
  ``devices`` and no ``fs-errors`` (there are no device namespaces: a uevent or a
  superblock error is host-wide information), and ``mounts`` only of its own
  mount namespace.
- Every peer gets mount events of its own mount namespace only.
- For a foreign user namespace, ids in mount options (``uid=``, ``gid=``,
  ``resuid=``...) are translated through the peer's ``uid_map``/``gid_map``; an
  id with no mapping there is dropped from the options.
- Keys: key events carry key serials only, which are global; nothing to do.
"""

from __future__ import annotations

import re

from wqd.events import DeviceChanged, Event, FilesystemError, MountChanged, WatchTarget
from wqd.peer import PeerCredentials, map_to_inside, own_namespaces
from wqd.policy import ABSTAIN, Decision, Deny, PluginContext
from wqd.sources.registry import DEVICES, FS_ERRORS, MOUNTS

HOST_WIDE = frozenset({DEVICES, FS_ERRORS})
_ID_OPTION = re.compile(r"([a-z_]*)(uid|gid)=(\d+)")


def target_mnt_ns(target: WatchTarget) -> int | None:
    """The mount namespace a mounts target is in (the mounts source resolves it as
    the target's ``object_id``)."""
    return target.object_id or None


def translate_options(options: str, peer: PeerCredentials) -> str:
    """Mount options with uid/gid values mapped into the peer's user namespace."""
    out = []
    for opt in options.split(","):
        m = _ID_OPTION.fullmatch(opt)
        if m is None:
            out.append(opt)
            continue
        prefix, kind, value = m.groups()
        inside = map_to_inside(int(value), peer.uid_map if kind == "uid" else peer.gid_map)
        if inside is not None:
            out.append(f"{prefix}{kind}={inside}")
    return ",".join(out)


class NamespacePolicy:
    name = "namespace"

    def __init__(self, context: PluginContext | None = None) -> None:
        own = own_namespaces()
        self.own_user = own["user"]
        self.own_pid = own["pid"]

    def foreign(self, peer: PeerCredentials) -> bool:
        return peer.user_ns != self.own_user or peer.pid_ns != self.own_pid

    def watch(self, peer: PeerCredentials, source: str, target: WatchTarget) -> Decision:
        if not peer.verified:
            return Deny("the caller's identity cannot be established")
        if peer.user_ns is None or peer.pid_ns is None or peer.mnt_ns is None:
            return Deny("the caller's namespaces cannot be established")
        foreign = self.foreign(peer)
        if foreign and source in HOST_WIDE:
            return Deny(f"{source} are not visible from another user or PID namespace")
        if source == MOUNTS and target_mnt_ns(target) != peer.mnt_ns:
            return Deny("mounts of another mount namespace")
        return ABSTAIN

    def post(self, peer: PeerCredentials, event: Event) -> Event | None:
        if isinstance(event, MountChanged):
            if peer.mnt_ns is None or event.mnt_ns != peer.mnt_ns:
                return None
            if peer.user_ns != self.own_user:
                info = event.info
                changed = {k: translate_options(v, peer) for k, v in info.items() if "option" in k}
                if any(info[k] != v for k, v in changed.items()):
                    return event.redact(info={**info, **changed})
            return event
        if isinstance(event, (DeviceChanged, FilesystemError)) and (peer.user_ns is None or self.foreign(peer)):
            return None
        return event

    def decision_key(self, peer: PeerCredentials, event: Event):
        """What ``post`` reads of *peer*: its mount namespace and, from another user
        namespace, its id maps (mounts); whether it is foreign (the rest)."""
        if isinstance(event, MountChanged):
            own = peer.user_ns == self.own_user
            return (peer.mnt_ns, own, None if own else (peer.uid_map, peer.gid_map))
        if isinstance(event, (DeviceChanged, FilesystemError)):
            return peer.user_ns is None or self.foreign(peer)
        return ()
