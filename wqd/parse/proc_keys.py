"""Pure helpers of the ``proc-keys`` fallback: parse ``/proc/keys``, diff snapshots.

What the fallback cannot see (and the watch queue can): changes that come and go
within one poll interval; ``updated`` of keys whose payload the watcher may not read
(e.g. ``logon`` keys, keyrings; the watcher is whichever subscriber's credentials
see the most of the key, see ``wqd.sources.key_backends``); ``cleared`` is inferred when a keyring with at least
two links becomes empty in one interval (otherwise each removal is ``unlinked``);
``invalidated`` only if the key is seen flagged before the garbage collector takes it
(usually it is simply gone, which ends the subscription with ``Removed``).
"""

from __future__ import annotations

from dataclasses import dataclass

# /proc/keys flag columns (security/keys/proc.c proc_keys_show), in order.
FLAG_NAMES = "IRDQUNi"


@dataclass(frozen=True, slots=True)
class ProcKey:
    serial: int
    flags: str
    perm: int
    uid: int
    gid: int
    type: str


def parse_proc_keys(text: str) -> dict[int, ProcKey]:
    """Parse ``/proc/keys``; malformed lines are skipped."""
    keys = {}
    for line in text.splitlines():
        parts = line.split(None, 8)
        if len(parts) < 8:
            continue
        try:
            serial = int(parts[0], 16)
            keys[serial] = ProcKey(serial, parts[1], int(parts[4], 16), int(parts[5]), int(parts[6]), parts[7])
        except ValueError:
            continue
    return keys


@dataclass(frozen=True, slots=True)
class KeySnapshot:
    """What one poll saw of a watched key; ``exists`` False once it is gone."""

    exists: bool
    flags: str = ""
    perm: int = 0
    uid: int = 0
    gid: int = 0
    members: tuple[int, ...] | None = None  # keyrings
    digest: bytes | None = None  # readable payloads


def diff(old: KeySnapshot, new: KeySnapshot) -> tuple[list[tuple[str, int]], bool]:
    """Changes between two snapshots of one key, as (change, aux); and whether it is gone."""
    changes: list[tuple[str, int]] = []
    if not new.exists:
        return changes, True
    if "I" in new.flags and "I" not in old.flags:
        changes.append(("instantiated", 0))
    if (new.perm, new.uid, new.gid) != (old.perm, old.uid, old.gid):
        changes.append(("setattr", 0))
    if old.members is not None and new.members is not None and old.members != new.members:
        before, after = set(old.members), set(new.members)
        removed = [k for k in old.members if k not in after]
        added = [k for k in new.members if k not in before]
        if not new.members and len(removed) >= 2:
            changes.append(("cleared", 0))
        else:
            changes.extend(("unlinked", k) for k in removed)
        changes.extend(("linked", k) for k in added)
    elif new.digest is not None and old.digest is not None and new.digest != old.digest:
        changes.append(("updated", 0))
    if "R" in new.flags and "R" not in old.flags:
        changes.append(("revoked", 0))
    if "i" in new.flags and "i" not in old.flags:
        changes.append(("invalidated", 0))
    return changes, False
