"""fanotify(7), statmount(2), listmount(2): mount and filesystem-error notifications.

Debian 12's headers (Linux 6.1) predate the mount notifications (Linux 6.15) and
statmount/listmount (Linux 6.8), so every constant here names the upstream UAPI
header it comes from; the ones Debian's /usr/include/linux has too were checked
against it.

- include/uapi/linux/fanotify.h: FAN_*, struct fanotify_event_metadata and the
  info records (``FAN_MNT_ATTACH``/``FAN_MNT_DETACH``, ``FAN_REPORT_MNT``,
  ``FAN_MARK_MNTNS``, ``FAN_EVENT_INFO_TYPE_MNT`` are 6.15; not in Debian's).
- include/uapi/linux/mount.h: struct mnt_id_req, struct statmount, STATMOUNT_*,
  LSMT_ROOT, MOUNT_ATTR_*, MS_* (superblock flags as statmount reports them).
- include/uapi/linux/nsfs.h: NS_GET_MNTNS_ID (6.10).
- statmount/listmount numbers and the struct statfs layout: ``wqd.kernel.libc``'s
  per-architecture table (nothing here fails at import on another machine).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from dataclasses import dataclass

from wqd.kernel.errors import KernelError, check, typed
from wqd.kernel.libc import function, ioctl_number, layout, syscall

# -- include/uapi/linux/fanotify.h ------------------------------------------
# events
FAN_Q_OVERFLOW = 0x00004000
FAN_FS_ERROR = 0x00008000
FAN_MNT_ATTACH = 0x01000000
FAN_MNT_DETACH = 0x02000000
# fanotify_init() flags
FAN_CLOEXEC = 0x00000001
FAN_NONBLOCK = 0x00000002
FAN_CLASS_NOTIF = 0x00000000
FAN_REPORT_FID = 0x00000200
FAN_REPORT_MNT = 0x00004000
# fanotify_mark() flags
FAN_MARK_ADD = 0x00000001
FAN_MARK_REMOVE = 0x00000002
FAN_MARK_FILESYSTEM = 0x00000100
FAN_MARK_MNTNS = 0x00000110
# struct fanotify_event_metadata { u32 event_len; u8 vers; u8 reserved;
#   u16 metadata_len; aligned_u64 mask; s32 fd; s32 pid; }
FANOTIFY_METADATA_VERSION = 3
EVENT_METADATA = struct.Struct("=IBBHQii")  # 24 bytes, FAN_EVENT_METADATA_LEN
FAN_NOFD = -1
# struct fanotify_event_info_header { u8 info_type; u8 pad; u16 len; }
INFO_HEADER = struct.Struct("=BBH")
FAN_EVENT_INFO_TYPE_FID = 1
FAN_EVENT_INFO_TYPE_DFID_NAME = 2
FAN_EVENT_INFO_TYPE_DFID = 3
FAN_EVENT_INFO_TYPE_PIDFD = 4
FAN_EVENT_INFO_TYPE_ERROR = 5
FAN_EVENT_INFO_TYPE_RANGE = 6
FAN_EVENT_INFO_TYPE_MNT = 7
# struct fanotify_event_info_fid { hdr; __kernel_fsid_t fsid (s32[2]); struct file_handle }
# struct file_handle { u32 handle_bytes; s32 handle_type; u8 f_handle[] } (open_by_handle_at(2))
INFO_FID = struct.Struct("=ii")
FILE_HANDLE = struct.Struct("=Ii")
# struct fanotify_event_info_error { hdr; s32 error; u32 error_count; }
INFO_ERROR = struct.Struct("=iI")
# struct fanotify_event_info_pidfd { hdr; s32 pidfd; }
INFO_PIDFD = struct.Struct("=i")
# struct fanotify_event_info_mnt { hdr; u64 mnt_id; }: the u64 is 8-aligned, so 4 bytes
# of padding follow the header (the record is 16 bytes)
INFO_MNT = struct.Struct("=4xQ")

# -- include/uapi/linux/mount.h ---------------------------------------------
STATMOUNT_SB_BASIC = 0x00000001
STATMOUNT_MNT_BASIC = 0x00000002
STATMOUNT_MNT_ROOT = 0x00000008
STATMOUNT_MNT_POINT = 0x00000010
STATMOUNT_FS_TYPE = 0x00000020
STATMOUNT_MNT_NS_ID = 0x00000040
STATMOUNT_MNT_OPTS = 0x00000080
STATMOUNT_SB_SOURCE = 0x00000200
LSMT_ROOT = 0xFFFFFFFFFFFFFFFF
MNT_ID_REQ_SIZE_VER1 = 32
# struct mnt_id_req { u32 size; u32 spare; u64 mnt_id; u64 param; u64 mnt_ns_id; }
MNT_ID_REQ = struct.Struct("=IIQQQ")
# struct statmount: fixed part of 512 bytes, then char str[] (offsets index into it)
STATMOUNT_FIXED = 512
STATMOUNT_HEAD = struct.Struct("=IIQ")  # size, mnt_opts, mask                  @0
STATMOUNT_SB = struct.Struct("=IIQII")  # sb_dev_major, minor, sb_magic, sb_flags, fs_type  @16
STATMOUNT_MNT = struct.Struct("=QQIIQ")  # mnt_id, mnt_parent_id, id_old, parent_id_old, mnt_attr  @40
STATMOUNT_STR = struct.Struct("=IIQII")  # mnt_root, mnt_point, mnt_ns_id, fs_subtype, sb_source  @104
MOUNT_ATTR_RDONLY = 0x00000001
MOUNT_ATTR_NOSUID = 0x00000002
MOUNT_ATTR_NODEV = 0x00000004
MOUNT_ATTR_NOEXEC = 0x00000008
MOUNT_ATTR__ATIME = 0x00000070
MOUNT_ATTR_RELATIME = 0x00000000
MOUNT_ATTR_NOATIME = 0x00000010
MOUNT_ATTR_STRICTATIME = 0x00000020
MOUNT_ATTR_NODIRATIME = 0x00000080
MOUNT_ATTR_IDMAP = 0x00100000
MOUNT_ATTR_NOSYMFOLLOW = 0x00200000
# superblock flags in statmount.sb_flags (MS_* values)
MS_RDONLY = 1
MS_SYNCHRONOUS = 16
MS_DIRSYNC = 128
MS_LAZYTIME = 1 << 25

# -- include/uapi/linux/nsfs.h ------------------------------------------------
# NS_GET_MNTNS_ID = _IOR(0xb7, 0x5, __u64): its number depends on the
# architecture's ioctl encoding, so it is in wqd.kernel.libc's table

# statmount/listmount numbers and struct statfs: per architecture, in wqd.kernel.libc

_fanotify_init = function("fanotify_init", ctypes.c_int, ctypes.c_uint, ctypes.c_uint)
_fanotify_mark = function("fanotify_mark", ctypes.c_int, ctypes.c_int, ctypes.c_uint, ctypes.c_uint64,
                          ctypes.c_int, ctypes.c_char_p)
_fstatfs = function("fstatfs", ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
AT_FDCWD = -100


def fanotify_init(flags: int, event_f_flags: int = os.O_RDONLY) -> int:
    return check(_fanotify_init(flags, event_f_flags), "fanotify_init")


def fanotify_mark(fd: int, flags: int, mask: int, dirfd: int = AT_FDCWD, path: str | None = None) -> None:
    check(_fanotify_mark(fd, flags, mask, dirfd, None if path is None else os.fsencode(path)), "fanotify_mark")


def open_mount_notifications() -> int:
    """A non-blocking fanotify group reporting mount ids (needs CAP_SYS_ADMIN, Linux >= 6.15)."""
    return fanotify_init(FAN_CLASS_NOTIF | FAN_REPORT_MNT | FAN_CLOEXEC | FAN_NONBLOCK)


def mark_mount_namespace(fd: int, nsfd: int, remove: bool = False) -> None:
    """FAN_MARK_MNTNS: attach/detach events of the mount namespace open at *nsfd*."""
    fanotify_mark(fd, (FAN_MARK_REMOVE if remove else FAN_MARK_ADD) | FAN_MARK_MNTNS,
                  FAN_MNT_ATTACH | FAN_MNT_DETACH, nsfd, None)


def open_error_notifications() -> int:
    """A non-blocking fanotify group reporting file ids (FAN_FS_ERROR needs it; CAP_SYS_ADMIN)."""
    return fanotify_init(FAN_CLASS_NOTIF | FAN_REPORT_FID | FAN_CLOEXEC | FAN_NONBLOCK)


def mark_filesystem_errors(fd: int, dirfd: int, remove: bool = False) -> None:
    """FAN_MARK_FILESYSTEM + FAN_FS_ERROR on the filesystem of the directory open at *dirfd*."""
    fanotify_mark(fd, (FAN_MARK_REMOVE if remove else FAN_MARK_ADD) | FAN_MARK_FILESYSTEM,
                  FAN_FS_ERROR, dirfd, None)


_STATFS_FSID = struct.Struct("=ii")  # __kernel_fsid_t: int val[2]


def fsid_of(fd: int) -> tuple[int, int]:
    """The filesystem id (``__kernel_fsid_t``) fanotify reports for the filesystem of *fd*."""
    size, fsid_offset = layout("statfs")
    buf = ctypes.create_string_buffer(size)
    check(_fstatfs(fd, buf), "fstatfs")
    return _STATFS_FSID.unpack_from(buf.raw, fsid_offset)


@dataclass(frozen=True, slots=True)
class StatMount:
    """What statmount(2) told about one mount (strings ``None`` when not reported)."""

    mask: int
    mnt_id: int
    parent_id: int
    mnt_id_old: int
    parent_id_old: int
    mnt_attr: int
    sb_flags: int
    dev: tuple[int, int]
    fs_type: str | None
    mnt_root: str | None
    mnt_point: str | None
    sb_source: str | None
    mnt_opts: str | None
    mnt_ns_id: int


STATMOUNT_WANT = (STATMOUNT_SB_BASIC | STATMOUNT_MNT_BASIC | STATMOUNT_MNT_ROOT | STATMOUNT_MNT_POINT
                  | STATMOUNT_FS_TYPE | STATMOUNT_MNT_OPTS | STATMOUNT_SB_SOURCE)


def decode_statmount(buf: bytes) -> StatMount:
    """Decode a struct statmount buffer (pure; raises ValueError if it is too short)."""
    if len(buf) < STATMOUNT_FIXED:
        raise ValueError("statmount buffer shorter than its fixed part")
    size, opts_off, mask = STATMOUNT_HEAD.unpack_from(buf, 0)
    major, minor, _magic, sb_flags, fstype_off = STATMOUNT_SB.unpack_from(buf, 16)
    mnt_id, parent_id, id_old, parent_old, attr = STATMOUNT_MNT.unpack_from(buf, 40)
    root_off, point_off, ns_id, _subtype, source_off = STATMOUNT_STR.unpack_from(buf, 104)
    strings = bytes(buf[STATMOUNT_FIXED:max(size, STATMOUNT_FIXED)])

    def string(bit: int, offset: int) -> str | None:
        if not mask & bit or offset >= len(strings):
            return None
        end = strings.find(b"\0", offset)
        return os.fsdecode(strings[offset:end if end >= 0 else len(strings)])

    return StatMount(
        mask, mnt_id, parent_id, id_old, parent_old, attr, sb_flags, (major, minor),
        string(STATMOUNT_FS_TYPE, fstype_off), string(STATMOUNT_MNT_ROOT, root_off),
        string(STATMOUNT_MNT_POINT, point_off), string(STATMOUNT_SB_SOURCE, source_off),
        string(STATMOUNT_MNT_OPTS, opts_off), ns_id,
    )


def statmount(mnt_id: int, mnt_ns_id: int = 0, mask: int = STATMOUNT_WANT) -> StatMount:
    """statmount(2) of the mount with unique id *mnt_id* in namespace *mnt_ns_id* (0: ours).

    Raises ``KernelError`` (ENOENT: no such mount there, e.g. already detached;
    ``NotSupported`` on ENOSYS).
    """
    req = MNT_ID_REQ.pack(MNT_ID_REQ_SIZE_VER1, 0, mnt_id, mask, mnt_ns_id)
    size = 4096
    while True:
        buf = ctypes.create_string_buffer(size)
        try:
            syscall("statmount", ctypes.c_char_p(req), buf, ctypes.c_size_t(size), ctypes.c_uint(0))
        except KernelError as exc:
            if exc.errno == errno.EOVERFLOW and size < 1 << 20:
                size *= 4
                continue
            raise
        return decode_statmount(buf.raw)


def listmount(mnt_ns_id: int = 0, mnt_id: int = LSMT_ROOT) -> list[int]:
    """The unique ids of every mount below *mnt_id* in namespace *mnt_ns_id* (0: ours)."""
    out: list[int] = []
    last = 0
    batch = 512
    ids = (ctypes.c_uint64 * batch)()
    while True:
        req = MNT_ID_REQ.pack(MNT_ID_REQ_SIZE_VER1, 0, mnt_id, last, mnt_ns_id)
        n = syscall("listmount", ctypes.c_char_p(req), ids, ctypes.c_size_t(batch), ctypes.c_uint(0))
        out.extend(ids[:n])
        if n < batch:
            return out
        last = ids[n - 1]


def mount_namespace_id(nsfd: int) -> int:
    """NS_GET_MNTNS_ID: the 64-bit id statmount/listmount take for the namespace at *nsfd*."""
    buf = bytearray(8)
    try:
        fcntl.ioctl(nsfd, ioctl_number("NS_GET_MNTNS_ID"), buf)
    except OSError as exc:
        raise typed(exc, "NS_GET_MNTNS_ID") from None
    return struct.unpack("=Q", buf)[0]
