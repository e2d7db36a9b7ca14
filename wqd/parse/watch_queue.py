"""Parser for records read from a notification pipe.

Record layout (include/uapi/linux/watch_queue.h)::

    struct watch_notification { u32 type:24; u32 subtype:8; u32 info; }
    info: bits 0-6 length in bytes, bits 8-15 the watch tag ("ID")
    struct key_notification { watch_notification watch; u32 key_id; u32 aux; }
    struct watch_notification_removal { watch_notification watch; u64 id; }

A loss record (META/LOSS) is a bare 8-byte header, carrying no count.

The parser never raises on input: malformed records are counted and skipped, and
parsing goes on at the next record.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from wqd.events import KEY_CHANGES, Event, KeyChanged, SourceLoss, TargetGone
from wqd.kernel.watch_queue import (
    WATCH_INFO_ID,
    WATCH_INFO_ID__SHIFT,
    WATCH_INFO_LENGTH,
    WATCH_META_LOSS_NOTIFICATION,
    WATCH_META_REMOVAL_NOTIFICATION,
    WATCH_TYPE_KEY_NOTIFY,
    WATCH_TYPE_META,
)
from wqd.parse.frames import FrameSplitter

HEADER = struct.Struct("=II")
KEY_BODY = struct.Struct("=II")
REMOVAL_ID = struct.Struct("=Q")
HEADER_SIZE = HEADER.size  # 8
KEY_RECORD_SIZE = HEADER_SIZE + KEY_BODY.size  # 16


@dataclass(slots=True)
class ParserStats:
    records: int = 0
    malformed: int = 0
    unknown: int = 0


def _record_length(buf: bytes, pos: int) -> int | None:
    # info bits 0-6; shorter than a header means no trustworthy length
    length = HEADER.unpack_from(buf, pos)[1] & WATCH_INFO_LENGTH
    return length if length >= HEADER_SIZE else None


class WatchQueueParser:
    """``feed(bytes) -> list[Event]``.

    Bytes may arrive in arbitrary chunks; an incomplete trailing record is kept
    until the next ``feed``. A notification pipe's ``read()`` always returns whole
    records, so the source passes ``final=True``: whatever is left over then is a
    truncated record, counted as malformed and dropped. A header with no
    trustworthy length is counted malformed and skipped: parsing resumes at the
    next 8 bytes (``wqd.parse.frames``).
    """

    def __init__(self) -> None:
        self._frames = FrameSplitter(HEADER_SIZE, _record_length, resync=HEADER_SIZE)
        self.stats = ParserStats()

    def feed(self, data: bytes, final: bool = False) -> list[Event]:
        frames = self._frames
        framing_errors = frames.malformed
        out: list[Event] = []
        for record in frames.feed(data, final):
            event = self._decode(record)
            if event is not None:
                out.append(event)
        self.stats.malformed += frames.malformed - framing_errors
        return out

    def _decode(self, record: memoryview) -> Event | None:
        stats = self.stats
        word, info = HEADER.unpack_from(record)
        wtype, subtype, length = word & 0xFFFFFF, word >> 24, len(record)
        if wtype == WATCH_TYPE_KEY_NOTIFY:
            if length < KEY_RECORD_SIZE or subtype >= len(KEY_CHANGES):
                stats.malformed += 1
                return None
            key, aux = KEY_BODY.unpack_from(record, HEADER_SIZE)
            stats.records += 1
            return KeyChanged(key, KEY_CHANGES[subtype], aux)
        if wtype == WATCH_TYPE_META:
            tag = (info & WATCH_INFO_ID) >> WATCH_INFO_ID__SHIFT
            if subtype == WATCH_META_LOSS_NOTIFICATION:
                stats.records += 1
                return SourceLoss(KeyChanged.source, 1, None)
            if subtype == WATCH_META_REMOVAL_NOTIFICATION:
                key = 0
                if length >= HEADER_SIZE + REMOVAL_ID.size:
                    (key,) = REMOVAL_ID.unpack_from(record, HEADER_SIZE)
                stats.records += 1
                return TargetGone(KeyChanged.source, key & 0xFFFFFFFF, "key removed", tag=tag)
            stats.unknown += 1
            return None
        stats.unknown += 1
        return None


def encode_key_record(key: int, change: str, aux: int = 0, tag: int = 1) -> bytes:
    """Build a kernel-format key notification (tests, replay captures, benchmarks)."""
    subtype = KEY_CHANGES.index(change)
    return HEADER.pack(WATCH_TYPE_KEY_NOTIFY | subtype << 24, KEY_RECORD_SIZE | tag << 8) + KEY_BODY.pack(key, aux)


def encode_loss_record(tag: int = 0) -> bytes:
    return HEADER.pack(WATCH_TYPE_META | WATCH_META_LOSS_NOTIFICATION << 24, HEADER_SIZE | tag << 8)


def encode_removal_record(key: int, tag: int = 1) -> bytes:
    return HEADER.pack(WATCH_TYPE_META | WATCH_META_REMOVAL_NOTIFICATION << 24, 16 | tag << 8) + REMOVAL_ID.pack(key)
