"""Parser for what read(2) returns from a fanotify group.

Layout (include/uapi/linux/fanotify.h)::

    struct fanotify_event_metadata {       /* 24 bytes */
        u32 event_len; u8 vers; u8 reserved; u16 metadata_len;
        aligned_u64 mask; s32 fd; s32 pid;
    };
    then info records up to event_len, each
    struct fanotify_event_info_header { u8 info_type; u8 pad; u16 len; }
      type 1 FID / 3 DFID:   s32 fsid[2]; struct file_handle { u32 bytes; s32 type; u8 handle[bytes] }
      type 4 PIDFD:          s32 pidfd
      type 5 ERROR:          s32 error; u32 error_count
      type 7 MNT:            u64 mnt_id

The parser is sans-I/O: ``feed(bytes) -> list[FanotifyEvent]``. It never raises on
input: a malformed event or info record is counted and skipped. It cannot close
file descriptors; an event (or PIDFD record) that carries one says so and the
caller closes it (``FanotifyEvent.fds``).
"""

from __future__ import annotations

from dataclasses import dataclass

from wqd.kernel.fanotify import (
    EVENT_METADATA,
    FAN_EVENT_INFO_TYPE_DFID,
    FAN_EVENT_INFO_TYPE_DFID_NAME,
    FAN_EVENT_INFO_TYPE_ERROR,
    FAN_EVENT_INFO_TYPE_FID,
    FAN_EVENT_INFO_TYPE_MNT,
    FAN_EVENT_INFO_TYPE_PIDFD,
    FAN_FS_ERROR,
    FAN_MNT_ATTACH,
    FAN_MNT_DETACH,
    FAN_NOFD,
    FAN_Q_OVERFLOW,
    FANOTIFY_METADATA_VERSION,
    FILE_HANDLE,
    INFO_ERROR,
    INFO_FID,
    INFO_HEADER,
    INFO_MNT,
    INFO_PIDFD,
)
from wqd.parse.frames import FrameSplitter

METADATA_LEN = EVENT_METADATA.size  # 24
MAX_EVENT_LEN = 1 << 16  # no real event comes close; larger means a corrupt length


@dataclass(frozen=True, slots=True)
class MountInfo:
    mnt_id: int


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    error: int
    count: int


@dataclass(frozen=True, slots=True)
class FidInfo:
    info_type: int
    fsid: tuple[int, int]
    handle_type: int
    handle: bytes
    name: bytes = b""  # DFID_NAME only


@dataclass(frozen=True, slots=True)
class PidfdInfo:
    pidfd: int


@dataclass(frozen=True, slots=True)
class UnknownInfo:
    info_type: int
    data: bytes


@dataclass(frozen=True, slots=True)
class FanotifyEvent:
    mask: int
    fd: int = FAN_NOFD
    pid: int = 0
    infos: tuple = ()

    @property
    def overflow(self) -> bool:
        return bool(self.mask & FAN_Q_OVERFLOW)

    def info(self, kind: type):
        """The first info record of *kind*, or ``None``."""
        return next((i for i in self.infos if isinstance(i, kind)), None)

    @property
    def fds(self) -> list[int]:
        """File descriptors the kernel installed for this event: the caller must close them."""
        out = [self.fd] if self.fd >= 0 else []
        out += [i.pidfd for i in self.infos if isinstance(i, PidfdInfo) and i.pidfd >= 0]
        return out


def _event_length(buf: bytes, pos: int) -> int | None:
    event_len, vers, _reserved, meta_len, _mask, _fd, _pid = EVENT_METADATA.unpack_from(buf, pos)
    if event_len < METADATA_LEN or event_len > MAX_EVENT_LEN or meta_len < METADATA_LEN \
            or meta_len > event_len or vers != FANOTIFY_METADATA_VERSION:
        return None
    return event_len


@dataclass(slots=True)
class ParserStats:
    events: int = 0
    malformed: int = 0
    unknown_infos: int = 0


class FanotifyParser:
    """``feed(bytes) -> list[FanotifyEvent]``.

    Bytes may arrive in arbitrary chunks: an incomplete trailing event is kept for
    the next ``feed``. read(2) on a fanotify fd returns whole events only, so the
    source passes ``final=True``; a remainder is then counted malformed and dropped
    (file descriptors in it, if any, cannot be recovered: they stay open until exit,
    which is why wqd asks for none).
    """

    def __init__(self) -> None:
        # a header with no trustworthy length: nothing after it can be framed (resync=None)
        self._frames = FrameSplitter(METADATA_LEN, _event_length, resync=None)
        self.stats = ParserStats()

    def feed(self, data: bytes, final: bool = False) -> list[FanotifyEvent]:
        frames = self._frames
        framing_errors = frames.malformed
        out: list[FanotifyEvent] = []
        stats = self.stats
        for record in frames.feed(data, final):
            _len, _vers, _reserved, meta_len, mask, fd, pid = EVENT_METADATA.unpack_from(record)
            out.append(FanotifyEvent(mask, fd, pid, self._infos(record, meta_len, len(record))))
            stats.events += 1
        stats.malformed += frames.malformed - framing_errors
        return out

    def _infos(self, buf: memoryview, pos: int, end: int) -> tuple:
        infos = []
        stats = self.stats
        while end - pos >= INFO_HEADER.size:
            info_type, _pad, length = INFO_HEADER.unpack_from(buf, pos)
            if length < INFO_HEADER.size or length > end - pos:
                stats.malformed += 1
                break
            body = pos + INFO_HEADER.size
            info = self._info(info_type, buf, body, pos + length)
            if info is None:
                stats.malformed += 1
            else:
                if isinstance(info, UnknownInfo):
                    stats.unknown_infos += 1
                infos.append(info)
            pos += length
        return tuple(infos)

    @staticmethod
    def _info(info_type: int, buf: memoryview, pos: int, end: int):
        size = end - pos
        if info_type == FAN_EVENT_INFO_TYPE_MNT:
            return MountInfo(*INFO_MNT.unpack_from(buf, pos)) if size >= INFO_MNT.size else None
        if info_type == FAN_EVENT_INFO_TYPE_ERROR:
            return ErrorInfo(*INFO_ERROR.unpack_from(buf, pos)) if size >= INFO_ERROR.size else None
        if info_type == FAN_EVENT_INFO_TYPE_PIDFD:
            return PidfdInfo(*INFO_PIDFD.unpack_from(buf, pos)) if size >= INFO_PIDFD.size else None
        if info_type in (FAN_EVENT_INFO_TYPE_FID, FAN_EVENT_INFO_TYPE_DFID, FAN_EVENT_INFO_TYPE_DFID_NAME):
            if size < INFO_FID.size + FILE_HANDLE.size:
                return None
            fsid = INFO_FID.unpack_from(buf, pos)
            nbytes, htype = FILE_HANDLE.unpack_from(buf, pos + INFO_FID.size)
            hstart = pos + INFO_FID.size + FILE_HANDLE.size
            if nbytes > end - hstart:
                return None
            name = b""
            if info_type == FAN_EVENT_INFO_TYPE_DFID_NAME:
                rest = bytes(buf[hstart + nbytes:end])
                name = rest.split(b"\0", 1)[0]
            return FidInfo(info_type, fsid, htype, bytes(buf[hstart:hstart + nbytes]), name)
        return UnknownInfo(info_type, bytes(buf[pos:end]))


def mount_action(mask: int) -> str | None:
    """``attached``, ``detached`` or ``moved`` (both bits: a move within the namespace)."""
    both = FAN_MNT_ATTACH | FAN_MNT_DETACH
    if mask & both == both:
        return "moved"
    if mask & FAN_MNT_ATTACH:
        return "attached"
    if mask & FAN_MNT_DETACH:
        return "detached"
    return None


# -- encoders: captures for tests and benchmarks (kernel format) -------------

def _info_record(info_type: int, body: bytes) -> bytes:
    return INFO_HEADER.pack(info_type, 0, INFO_HEADER.size + len(body)) + body


def encode_event(mask: int, infos: bytes = b"", fd: int = FAN_NOFD, pid: int = 0,
                 vers: int = FANOTIFY_METADATA_VERSION) -> bytes:
    return EVENT_METADATA.pack(METADATA_LEN + len(infos), vers, 0, METADATA_LEN, mask, fd, pid) + infos


def encode_mount_event(mask: int, mnt_id: int, pid: int = 0) -> bytes:
    return encode_event(mask, _info_record(FAN_EVENT_INFO_TYPE_MNT, INFO_MNT.pack(mnt_id)), pid=pid)


def encode_error_event(fsid: tuple[int, int], error: int, count: int, handle: bytes = b"",
                       handle_type: int = 0xFF) -> bytes:
    fid = INFO_FID.pack(*fsid) + FILE_HANDLE.pack(len(handle), handle_type) + handle
    fid += b"\0" * (-len(fid) % 4)  # the kernel pads info records to 4 bytes
    infos = _info_record(FAN_EVENT_INFO_TYPE_FID, fid)
    infos += _info_record(FAN_EVENT_INFO_TYPE_ERROR, INFO_ERROR.pack(error, count))
    return encode_event(FAN_FS_ERROR, infos)


def encode_overflow() -> bytes:
    return encode_event(FAN_Q_OVERFLOW)
