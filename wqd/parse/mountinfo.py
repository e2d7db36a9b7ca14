"""Mount tables: /proc/PID/mountinfo parsed and diffed, and statmount(2) results.

A mountinfo line (Documentation/filesystems/proc.rst, fs/proc_namespace.c)::

    36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    id par dev root  mount point  mount opts optional.. - fstype source super opts

Paths, source and type escape space, tab, newline and backslash as ``\\ooo``
octal; those are unescaped here. Options stay as the kernel escapes them (statmount
reports them escaped as well), so both backends give the same ``options``.

``options`` is the mount options followed by the superblock options not already
among them, e.g. ``rw,nosuid,nodev,relatime,size=1024k,mode=755``: what
``/proc/mounts`` shows, in the order mountinfo shows it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from wqd.kernel.fanotify import (
    MOUNT_ATTR__ATIME,
    MOUNT_ATTR_IDMAP,
    MOUNT_ATTR_NOATIME,
    MOUNT_ATTR_NODEV,
    MOUNT_ATTR_NODIRATIME,
    MOUNT_ATTR_NOEXEC,
    MOUNT_ATTR_NOSUID,
    MOUNT_ATTR_NOSYMFOLLOW,
    MOUNT_ATTR_RDONLY,
    MOUNT_ATTR_RELATIME,
    MS_DIRSYNC,
    MS_LAZYTIME,
    MS_RDONLY,
    MS_SYNCHRONOUS,
    StatMount,
)

_OCTAL = re.compile(r"\\([0-7]{3})")


def unescape(field_: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field_)


def combine_options(mount_options: list[str], super_options: list[str]) -> str:
    seen = set(mount_options)
    return ",".join([*mount_options, *(o for o in super_options if o and o not in seen)])


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One mount as wqd reports it. ``mount_id`` is mountinfo's id or statmount's unique id."""

    mount_id: int
    parent_id: int
    device: str  # "major:minor"
    root: str  # the mount's root within its filesystem (a bind mount's origin)
    mount_point: str
    fstype: str
    source: str
    options: str

    def info(self) -> dict[str, str]:
        return {"fstype": self.fstype, "source": self.source, "options": self.options}

    def same_object(self, other: MountEntry) -> bool:
        """Same filesystem and root: the same mount seen twice (possibly moved)."""
        return (self.device, self.root, self.fstype, self.source) == (other.device, other.root, other.fstype, other.source)


def parse_line(line: str) -> MountEntry | None:
    """One mountinfo line, or ``None`` when it is malformed."""
    fields = line.rstrip("\n").split(" ")  # single spaces; an empty source stays a field
    try:
        sep = fields.index("-", 6)
    except ValueError:
        return None
    if sep + 2 >= len(fields):
        return None
    try:
        mount_id, parent_id = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    mount_opts = fields[5].split(",")
    super_opts = fields[sep + 3].split(",") if sep + 3 < len(fields) else []
    return MountEntry(
        mount_id, parent_id, fields[2], unescape(fields[3]), unescape(fields[4]),
        unescape(fields[sep + 1]), unescape(fields[sep + 2]), combine_options(mount_opts, super_opts),
    )


class MountinfoParser:
    """``feed(bytes)`` the file in any chunks, then ``finish() -> {mount_id: MountEntry}``.

    Malformed lines are counted in ``malformed`` and skipped. The table keeps the
    file's order (the namespace's mount order).
    """

    def __init__(self) -> None:
        self._partial = b""
        self._table: dict[int, MountEntry] = {}
        self.malformed = 0

    def feed(self, data: bytes) -> None:
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            self._line(raw)

    def _line(self, raw: bytes) -> None:
        if not raw.strip():
            return
        entry = parse_line(raw.decode("utf-8", "surrogateescape"))
        if entry is None:
            self.malformed += 1
        else:
            self._table[entry.mount_id] = entry

    def finish(self) -> dict[int, MountEntry]:
        if self._partial:
            self._line(self._partial)
            self._partial = b""
        table, self._table = self._table, {}
        return table


def parse_mountinfo(data: bytes | str) -> dict[int, MountEntry]:
    parser = MountinfoParser()
    parser.feed(data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data)
    return parser.finish()


@dataclass(slots=True)
class MountDiff:
    attached: list[MountEntry] = field(default_factory=list)
    detached: list[MountEntry] = field(default_factory=list)
    moved: list[tuple[MountEntry, MountEntry]] = field(default_factory=list)  # (old, new)
    changed: list[tuple[MountEntry, MountEntry]] = field(default_factory=list)  # options, parent...

    @property
    def size(self) -> int:
        """How many entries differ in any way."""
        return len(self.attached) + len(self.detached) + len(self.moved) + len(self.changed)

    def actions(self) -> list[tuple[str, MountEntry, str | None]]:
        """(action, entry, moved from) to report: detached (children first), moved, attached."""
        return ([("detached", e, None) for e in self.detached]
                + [("moved", new, old.mount_point) for old, new in self.moved]
                + [("attached", e, None) for e in self.attached])


def diff(old: dict[int, MountEntry], new: dict[int, MountEntry]) -> MountDiff:
    """What changed between two tables keyed by mount id.

    Same id, same filesystem and root, another mount point: ``moved``. Same id but
    another filesystem: the id was reused (mountinfo ids are), so ``detached`` and
    ``attached``.
    """
    out = MountDiff()
    for mid in reversed(old):
        if mid not in new:
            out.detached.append(old[mid])
    for mid, entry in new.items():
        before = old.get(mid)
        if before is None:
            out.attached.append(entry)
        elif before == entry:
            continue
        elif not before.same_object(entry):
            out.detached.append(before)
            out.attached.append(entry)
        elif before.mount_point != entry.mount_point:
            out.moved.append((before, entry))
        else:
            out.changed.append((before, entry))
    return out


# -- statmount(2) -> MountEntry ---------------------------------------------

_MOUNT_FLAGS = ((MOUNT_ATTR_NOSUID, "nosuid"), (MOUNT_ATTR_NODEV, "nodev"), (MOUNT_ATTR_NOEXEC, "noexec"))
_SB_FLAGS = ((MS_SYNCHRONOUS, "sync"), (MS_DIRSYNC, "dirsync"), (MS_LAZYTIME, "lazytime"))


def mount_options(attr: int) -> list[str]:
    """MOUNT_ATTR_* as mountinfo spells them, in its order (fs/proc_namespace.c show_mnt_opts)."""
    out = ["ro" if attr & MOUNT_ATTR_RDONLY else "rw"]
    out += [name for bit, name in _MOUNT_FLAGS if attr & bit]
    atime = attr & MOUNT_ATTR__ATIME
    if atime == MOUNT_ATTR_NOATIME:
        out.append("noatime")
    if attr & MOUNT_ATTR_NODIRATIME:
        out.append("nodiratime")
    if atime == MOUNT_ATTR_RELATIME:
        out.append("relatime")
    if attr & MOUNT_ATTR_NOSYMFOLLOW:
        out.append("nosymfollow")
    if attr & MOUNT_ATTR_IDMAP:
        out.append("idmapped")
    return out


def super_options(sb_flags: int, fs_options: str | None) -> list[str]:
    out = ["ro" if sb_flags & MS_RDONLY else "rw"]
    out += [name for bit, name in _SB_FLAGS if sb_flags & bit]
    if fs_options:
        out += fs_options.split(",")
    return out


def entry_from_statmount(sm: StatMount) -> MountEntry:
    return MountEntry(
        sm.mnt_id, sm.parent_id, f"{sm.dev[0]}:{sm.dev[1]}", sm.mnt_root or "", sm.mnt_point or "",
        sm.fs_type or "", sm.sb_source or "", combine_options(mount_options(sm.mnt_attr),
                                                             super_options(sm.sb_flags, sm.mnt_opts)),
    )
