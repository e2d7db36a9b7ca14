"""inotify(7): the wrapper the ``credentials`` source watches cache directories
and sssd-kcm's store with.

Python's standard library has no inotify; these are the three libc calls
(``inotify_init1``, ``inotify_add_watch``, ``inotify_rm_watch``, glibc wrappers
of the syscalls of the same names, so nothing per-architecture) and the decoder
of what ``read(2)`` returns. The kernel hands out whole ``struct inotify_event``
records per read (``fs/notify/inotify/inotify_user.c``: a buffer too small for
the next record is ``EINVAL``, never half a record), so ``decode`` needs no frame
state to keep between reads.

Constants: include/uapi/linux/inotify.h.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass

from wqd.kernel import libc
from wqd.kernel.errors import check

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_MASK_ADD = 0x20000000
IN_ISDIR = 0x40000000
IN_CLOEXEC = os.O_CLOEXEC  # the header: IN_CLOEXEC is O_CLOEXEC, IN_NONBLOCK is O_NONBLOCK
IN_NONBLOCK = os.O_NONBLOCK

# struct inotify_event { __s32 wd; __u32 mask; __u32 cookie; __u32 len; char name[]; }
_EVENT = struct.Struct("=iIII")
#: Enough for one record with the longest name (NAME_MAX 255, plus its NUL).
READ_SIZE = 64 * (_EVENT.size + 256)

_init1 = libc.function("inotify_init1", ctypes.c_int, ctypes.c_int)
_add_watch = libc.function("inotify_add_watch", ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
_rm_watch = libc.function("inotify_rm_watch", ctypes.c_int, ctypes.c_int, ctypes.c_int)


@dataclass(frozen=True, slots=True)
class InotifyEvent:
    wd: int  # -1 for IN_Q_OVERFLOW
    mask: int
    cookie: int
    name: str  # "" for an event on the watched object itself


def init() -> int:
    """A non-blocking, close-on-exec inotify fd."""
    return check(_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")


def add_watch(fd: int, path: str, mask: int) -> int:
    """The watch descriptor for *path* (the same one again for the same inode)."""
    return check(_add_watch(fd, os.fsencode(path), mask), "inotify_add_watch")


def rm_watch(fd: int, wd: int) -> None:
    check(_rm_watch(fd, wd), "inotify_rm_watch")


def decode(data: bytes) -> list[InotifyEvent]:
    """The records of one ``read(2)`` of an inotify fd. A truncated tail (which
    the kernel never writes) is dropped, not guessed at."""
    out = []
    at = 0
    while at + _EVENT.size <= len(data):
        wd, mask, cookie, length = _EVENT.unpack_from(data, at)
        at += _EVENT.size
        if at + length > len(data):
            break
        name = data[at:at + length].split(b"\0", 1)[0]
        at += length
        out.append(InotifyEvent(wd, mask, cookie, os.fsdecode(name)))
    return out
