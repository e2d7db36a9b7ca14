"""``unix`` rules for ``mounts`` and ``fs-errors``.

Mounts: own namespace only.
    A peer may watch the mount namespace it was in when it first called wqd
    (``PeerCredentials.mnt_ns``), nothing else; a peer whose namespace wqd could
    not verify is denied. A peer in a namespace other than wqd's may watch its own
    namespace unless ``[policy.unix] mounts_other_namespaces = false``. ``post`` drops
    any mount event of another namespace (a second lock behind the routing).

Mounts: redaction for peers that are not root.
    The mount point is kept: the peer can read it in its own
    ``/proc/self/mountinfo``. ``source`` and every option value are kept unless
    they look like a path (they begin with ``/`` or ``~``, or contain ``:/`` as
    remote sources do: ``host:/export/home/alice``) or name a remote account
    (``user@host:path``, as sshfs sources do); a path is kept only when, once
    resolved (``.``, ``..`` and repeated slashes taken out: ``/run/user/1000/../1001/x``
    is 1001's), it is under ``/dev/`` (device nodes name no user), under the
    peer's own home directory, or under ``/run/user/UID/`` of the peer. Any
    other path, and every ``user@host:`` source, is replaced by ``<redacted>``:
    it may be another user's (an sshfs or NFS source, an overlay ``lowerdir=``,
    a loop image under someone's home), and a mount notification need not
    reveal it. Root peers get everything.

Filesystem errors: root only by default.
    An error report says which filesystem is failing and how often; by default
    only root may watch. ``[policy.unix] fs_errors_groups = ["adm", 4]`` (names
    or gids) also lets members of those groups watch.

Settings are read from ``[policy.unix]`` (the rules get the whole ``[policy]``
table); a setting of the wrong type denies (fail closed).
"""

from __future__ import annotations

import grp
import posixpath
import pwd
import re
from functools import lru_cache

from wqd.events import Event, FilesystemError, MountChanged, WatchTarget
from wqd.peer import PeerCredentials
from wqd.policy import ALLOW, Decision, Deny
from wqd.sources.mounts import MountTarget
from wqd.sources.registry import FS_ERRORS, MOUNTS

REDACTED = "<redacted>"
# user@host:path (sshfs, scp-style): an account elsewhere, whoever's it is
_REMOTE_ACCOUNT = re.compile(r"[^\s/@:]+@[^\s/:]+:")


async def watch(peer: PeerCredentials, target: WatchTarget, config: dict) -> Decision:
    settings = config.get("unix", {})
    if not isinstance(settings, dict):
        return Deny("policy.unix settings are malformed")
    if target.source == MOUNTS:
        if peer.mnt_ns is None or target.object_id != peer.mnt_ns:
            return Deny("a peer may watch the mounts of its own mount namespace only")
        if not isinstance(target, MountTarget):
            return Deny("not a target the mounts source resolved")  # fail closed: cannot tell its namespace
        others = settings.get("mounts_other_namespaces", True)
        if target.other_namespace and others is not True:
            return Deny("watching mounts from another mount namespace is disabled")
        return ALLOW
    if target.source == FS_ERRORS:
        if peer.is_root:
            return ALLOW
        groups = settings.get("fs_errors_groups", [])
        if not isinstance(groups, list):
            return Deny("policy.unix.fs_errors_groups must be a list")
        allowed = _gids(tuple(str(g) for g in groups))
        if any(g in peer.gids or g == getattr(peer, "gid", None) for g in allowed):  # primary or supplementary
            return ALLOW
        return Deny("filesystem errors are for root (and the groups in policy.fs_errors_groups)")
    return Deny(f"no unix mount rule for source {target.source!r}")


def post(peer: PeerCredentials, event: Event, config: dict) -> Event | None:
    if isinstance(event, MountChanged):
        if peer.mnt_ns is None or event.mnt_ns != peer.mnt_ns:
            return None
        if peer.is_root:
            return event
        return redact_mount(event, peer.uid)
    if isinstance(event, FilesystemError):
        return event
    return None


def decision_key(peer: PeerCredentials, event: Event, config: dict):
    """What ``post`` reads of *peer* (see ``wqd.policy``): its mount namespace and uid
    (mounts; root sees everything); nothing for filesystem errors."""
    if isinstance(event, MountChanged):
        return (peer.mnt_ns, 0 if peer.is_root else peer.uid)
    return ()


def redact_mount(event: MountChanged, uid: int) -> MountChanged:
    info = event.info
    if not info:
        return event
    keep = _own_prefixes(uid)
    new = dict(info)
    if "source" in new:
        new["source"] = _value(new["source"], keep)
    if "options" in new:
        new["options"] = ",".join(_option(o, keep) for o in new["options"].split(","))
    return event if new == info else event.redact(info=new)


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "~")) or ":/" in value or _REMOTE_ACCOUNT.match(value) is not None


def resolve(path: str) -> str:
    """*path* without ``.``, ``..`` or repeated slashes (textually: ownership is
    decided on what the path names, not on how it is spelt)."""
    out = posixpath.normpath(path)
    return "/" + out.lstrip("/") if out.startswith("//") else out


def _value(value: str, keep: tuple[str, ...]) -> str:
    if not _looks_like_path(value):
        return value
    if value.startswith("/"):
        real = resolve(value)
        if any(real == p.rstrip("/") or real.startswith(p) for p in keep):
            return value
    return REDACTED


def _option(option: str, keep: tuple[str, ...]) -> str:
    key, eq, value = option.partition("=")
    if not eq:
        return _value(option, keep)
    # overlayfs lists paths separated by ':' (lowerdir=/a:/b): each must pass
    parts = value.split(":") if value.startswith("/") else [value]
    if all(_value(p, keep) == p for p in parts):
        return option
    return f"{key}={REDACTED}"


@lru_cache(maxsize=1024)
def _own_prefixes(uid: int) -> tuple[str, ...]:
    out = ["/dev/", f"/run/user/{uid}/"]
    try:
        home = pwd.getpwuid(uid).pw_dir
    except KeyError:
        home = ""
    home = resolve(home).rstrip("/") if home.startswith("/") else ""
    if home and home != "/":  # a home of "/" (daemon accounts) would keep every path
        out.append(home + "/")
    return tuple(out)


@lru_cache(maxsize=64)
def _gids(names: tuple[str, ...]) -> frozenset[int]:
    out = set()
    for name in names:
        if name.isdigit():
            out.add(int(name))
            continue
        try:
            out.add(grp.getgrnam(name).gr_gid)
        except KeyError:
            pass
    return frozenset(out)
