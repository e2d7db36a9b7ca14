"""The fanotify event parser, fed bytes captured from this machine's kernel (6.18).

Captured with wqd.kernel.fanotify on a FAN_REPORT_MNT group marked FAN_MARK_MNTNS:
``mount -t tmpfs``, ``mount --move``, ``umount``; and on a FAN_REPORT_FID group
marked FAN_MARK_FILESYSTEM + FAN_FS_ERROR on an ext4 loop mount, after three
writes to /sys/fs/ext4/loop0/trigger_fs_error.
"""

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from wqd.kernel.fanotify import FAN_FS_ERROR, FAN_MNT_ATTACH, FAN_MNT_DETACH, FAN_Q_OVERFLOW
from wqd.parse.fanotify import (
    ErrorInfo,
    FanotifyParser,
    FidInfo,
    MountInfo,
    PidfdInfo,
    UnknownInfo,
    encode_error_event,
    encode_event,
    encode_mount_event,
    encode_overflow,
    mount_action,
)

MOUNT_CAPTURE = bytes.fromhex(
    "28000000030018000000000100000000ffffffffae6000000700100000000000a400008000000000"
    "28000000030018000000000300000000ffffffffaf6000000700100000000000a400008000000000"
    "28000000030018000000000200000000ffffffffb16000000700100000000000a400008000000000"
)
ERROR_CAPTURE = bytes.fromhex(
    "38000000030018000080000000000000ffffffffb9480000"
    "010014002d461252bc89bfba00000000ff000000"
    "05000c007500000003000000"
)
MOUNT_ID = 0x800000A4


def parse_chunks(data: bytes, sizes) -> list:
    parser = FanotifyParser()
    out = []
    pos = 0
    for size in sizes:
        out += parser.feed(data[pos:pos + size])
        pos += size
    out += parser.feed(data[pos:], final=True)
    assert parser.stats.malformed == 0
    return out


def test_captured_mount_events_whole():
    parser = FanotifyParser()
    events = parser.feed(MOUNT_CAPTURE, final=True)
    assert [mount_action(e.mask) for e in events] == ["attached", "moved", "detached"]
    assert [e.info(MountInfo) for e in events] == [MountInfo(MOUNT_ID)] * 3
    assert [e.pid for e in events] == [0x60AE, 0x60AF, 0x60B1]
    assert all(e.fd == -1 and e.fds == [] for e in events)
    assert parser.stats.events == 3 and parser.stats.malformed == 0


def test_captured_mount_events_in_odd_chunks():
    whole = FanotifyParser().feed(MOUNT_CAPTURE, final=True)
    for size in (1, 3, 7, 13, 24, 39, 41):
        assert parse_chunks(MOUNT_CAPTURE, [size] * (len(MOUNT_CAPTURE) // size)) == whole


def test_captured_fs_error():
    (event,) = FanotifyParser().feed(ERROR_CAPTURE, final=True)
    assert event.mask == FAN_FS_ERROR
    assert event.info(ErrorInfo) == ErrorInfo(117, 3)  # EFSCORRUPTED, three merged
    fid = event.info(FidInfo)
    assert fid.fsid == struct.unpack("=ii", bytes.fromhex("2d461252bc89bfba"))
    assert fid.handle_type == 0xFF and fid.handle == b""  # FILEID_INVALID: the superblock
    assert parse_chunks(ERROR_CAPTURE, [5, 11, 17]) == [event]


def test_encoders_round_trip():
    data = encode_mount_event(FAN_MNT_ATTACH, 7) + encode_overflow() + encode_error_event((1, -2), 5, 9, b"\1\2\3")
    a, o, e = FanotifyParser().feed(data, final=True)
    assert a.info(MountInfo) == MountInfo(7) and mount_action(a.mask) == "attached"
    assert o.overflow and o.infos == ()
    assert e.info(ErrorInfo) == ErrorInfo(5, 9)
    assert e.info(FidInfo).fsid == (1, -2) and e.info(FidInfo).handle == b"\1\2\3"
    assert mount_action(FAN_MNT_DETACH) == "detached" and mount_action(FAN_Q_OVERFLOW) is None


def test_fds_the_caller_must_close():
    pidfd = struct.pack("=BBHi", 4, 0, 8, 42)
    (event,) = FanotifyParser().feed(encode_event(0x20, pidfd, fd=17), final=True)
    assert event.info(PidfdInfo) == PidfdInfo(42)
    assert event.fds == [17, 42]


def test_unknown_info_kept_and_counted():
    parser = FanotifyParser()
    (event,) = parser.feed(encode_event(FAN_MNT_ATTACH, struct.pack("=BBH", 99, 0, 8) + b"abcd"), final=True)
    assert event.infos == (UnknownInfo(99, b"abcd"),)
    assert parser.stats.unknown_infos == 1


def test_malformed_info_record_skipped_event_kept():
    parser = FanotifyParser()
    short_mnt = struct.pack("=BBH", 7, 0, 8) + b"\0" * 4  # too short for a u64 id
    bad_len = struct.pack("=BBH", 1, 0, 200)  # runs past the event
    events = parser.feed(encode_event(FAN_MNT_ATTACH, short_mnt) + encode_event(FAN_MNT_DETACH, bad_len + b"\0" * 4)
                         + encode_mount_event(FAN_MNT_DETACH, 3), final=True)
    assert [e.infos for e in events] == [(), (), (MountInfo(3),)]
    assert parser.stats.malformed == 2


def test_bad_header_drops_the_unframeable_rest():
    parser = FanotifyParser()
    good = encode_mount_event(FAN_MNT_ATTACH, 1)
    assert len(parser.feed(good + encode_mount_event(FAN_MNT_ATTACH, 2)[:4] + b"\xff" * 40)) == 1
    assert parser.stats.malformed == 1
    assert parser.feed(encode_event(FAN_MNT_ATTACH, vers=2) + good, final=True) == []  # wrong version
    assert parser.feed(good, final=True)[0].info(MountInfo) == MountInfo(1)  # and it goes on


def test_truncated_tail_is_malformed_when_final():
    parser = FanotifyParser()
    assert parser.feed(MOUNT_CAPTURE[:50], final=True)[0].info(MountInfo) == MountInfo(MOUNT_ID)
    assert parser.stats.malformed == 1
    assert len(parser.feed(MOUNT_CAPTURE, final=True)) == 3


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_never_raises_on_garbage(data):
    parser = FanotifyParser()
    parser.feed(data)
    parser.feed(data, final=True)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([FAN_MNT_ATTACH, FAN_MNT_DETACH, FAN_MNT_ATTACH | FAN_MNT_DETACH]),
                          st.integers(0, 2**64 - 1)), max_size=20),
       st.lists(st.integers(1, 64), max_size=30))
def test_any_chunking_gives_the_same_events(records, cuts):
    data = b"".join(encode_mount_event(mask, mid) for mask, mid in records)
    events = parse_chunks(data, cuts)
    assert [(e.mask, e.info(MountInfo).mnt_id) for e in events] == records
