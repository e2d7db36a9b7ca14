"""Notification pipes: pipe2(O_NOTIFICATION_PIPE) and the watch-queue ioctls.

Constants and struct layouts from include/uapi/linux/watch_queue.h.
"""

from __future__ import annotations

import fcntl
import os
import struct

from wqd.kernel.errors import typed

# include/uapi/linux/watch_queue.h
O_NOTIFICATION_PIPE = os.O_EXCL  # "#define O_NOTIFICATION_PIPE O_EXCL"
IOC_WATCH_QUEUE_SET_SIZE = 0x5760  # _IO('W', 0x60): set the size in pages
IOC_WATCH_QUEUE_SET_FILTER = 0x5761  # _IO('W', 0x61): set the filter

WATCH_TYPE_META = 0
WATCH_TYPE_KEY_NOTIFY = 1

WATCH_META_REMOVAL_NOTIFICATION = 0
WATCH_META_LOSS_NOTIFICATION = 1

WATCH_INFO_LENGTH = 0x0000007F
WATCH_INFO_ID = 0x0000FF00
WATCH_INFO_ID__SHIFT = 8

# struct watch_notification { u32 type:24, subtype:8; u32 info; }
WATCH_NOTIFICATION = struct.Struct("=II")
# struct watch_notification_type_filter { u32 type, info_filter, info_mask, subtype_filter[8]; }
TYPE_FILTER = struct.Struct("=III8I")
# struct watch_notification_filter { u32 nr_filters; u32 __reserved; filters[] }
FILTER_HEADER = struct.Struct("=II")

# Queue size wqd asks for, in pages (each page holds 4096/8 = 512 note slots;
# the kernel accepts up to 16 pages: kernel/watch_queue.c watch_queue_set_size).
DEFAULT_PAGES = 4


def open_notification_pipe() -> tuple[int, int]:
    """Return (read_fd, write_fd) of a new notification pipe, non-blocking.

    Raises ``NotPackaged`` (ENOPKG) when the kernel has no CONFIG_WATCH_QUEUE.
    """
    try:
        return os.pipe2(O_NOTIFICATION_PIPE | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise typed(exc, "pipe2(O_NOTIFICATION_PIPE)") from None


def set_size(fd: int, pages: int) -> None:
    try:
        fcntl.ioctl(fd, IOC_WATCH_QUEUE_SET_SIZE, pages)
    except OSError as exc:
        raise typed(exc, "IOC_WATCH_QUEUE_SET_SIZE") from None


def build_filter(filters: list[tuple[int, set[int]]]) -> bytes:
    """Encode (type, subtypes) pairs as struct watch_notification_filter."""
    out = bytearray(FILTER_HEADER.pack(len(filters), 0))
    for wtype, subtypes in filters:
        words = [0] * 8
        for s in subtypes:
            words[s // 32] |= 1 << (s % 32)
        out += TYPE_FILTER.pack(wtype, 0, 0, *words)
    return bytes(out)


def set_filter(fd: int, filters: list[tuple[int, set[int]]] | None) -> None:
    """Install a type/subtype filter; ``None`` removes it (all records pass)."""
    try:
        if filters is None:
            fcntl.ioctl(fd, IOC_WATCH_QUEUE_SET_FILTER, 0)
        else:
            fcntl.ioctl(fd, IOC_WATCH_QUEUE_SET_FILTER, build_filter(filters))
    except OSError as exc:
        raise typed(exc, "IOC_WATCH_QUEUE_SET_FILTER") from None
