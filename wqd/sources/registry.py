"""The sources wqd has, in one table: the daemon opens them from it, ``wqd
--check-config`` checks their settings with it, and the policies take their
names from it. Plain imports: a source is in this table or not in wqd at all.

Each source module owns its name (``NAME``), its ``open_source(cfg)`` (a
``Source``; raising OSError, ValueError or ImportError when it cannot run here)
and its ``check_settings(table)`` (its ``[NAME]`` section; ``None`` where
``wqd.config`` reads the section itself). docs/architecture.md, "Adding a
source", walks through adding one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from wqd.sources import devices, fs_errors, keys, mounts
from wqd.subscription import Source

KEYS = keys.NAME
DEVICES = devices.NAME
MOUNTS = mounts.NAME
FS_ERRORS = fs_errors.NAME


@dataclass(frozen=True, slots=True)
class SourceKind:
    name: str  # the Watch() source argument, the [section] of its settings
    open: Callable[[object], Source]  # the wqd.config.Config -> the source
    check_settings: Callable[[dict], dict] | None  # its [section] -> checked settings; raises ValueError
    settings: dict  # the schema of its [section] (wqd.settings), for wqd.conf(5)'s check
    needs: tuple[str, ...] = ()  # what it cannot run without from wqd.kernel.libc's per-architecture table


# In the order the daemon opens them (and Sources lists them). mounts without
# statmount/listmount falls back to mountinfo by itself: it needs nothing here.
SOURCES: dict[str, SourceKind] = {kind.name: kind for kind in (
    SourceKind(KEYS, keys.open_source, None, keys.SETTINGS, needs=("keyctl",)),
    SourceKind(DEVICES, devices.open_source, devices.check_settings, devices.SCHEMA),
    SourceKind(MOUNTS, mounts.open_source, mounts.check_settings, mounts.SCHEMA),
    SourceKind(FS_ERRORS, fs_errors.open_source, fs_errors.check_settings, {}, needs=("struct statfs",)),  # none yet
)}
NAMES = frozenset(SOURCES)
