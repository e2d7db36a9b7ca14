"""The notification-pipe record parser, fed captured bytes whole and in chunks."""

import struct

import pytest
from hypothesis import given, settings, strategies as st

from wqd.events import KEY_CHANGES, KeyChanged, SourceLoss, TargetGone
from wqd.parse.watch_queue import (
    WatchQueueParser,
    encode_key_record,
    encode_loss_record,
    encode_removal_record,
)

# Captured on a 6.1 kernel with CONFIG_WATCH_QUEUE (shared/ENVIRONMENT.md): add_key
# into a watched keyring gave "01000002 10010000 <key_id> <aux>" (type 1, subtype 2
# = linked, length 16, tag 1). Key 0x2a5f1c03 linked into keyring 0x1b0e6d7a.
REAL_LINKED = bytes.fromhex("01000002" "10010000") + struct.pack("=II", 0x1B0E6D7A, 0x2A5F1C03)
REAL_LOSS = bytes.fromhex("00000001" "08000000")  # META / LOSS, length 8
REAL_REMOVAL = bytes.fromhex("00000000" "10010000") + struct.pack("=Q", 0x1B0E6D7A)

CAPTURE = REAL_LINKED + REAL_LOSS + REAL_REMOVAL
EXPECTED = [
    KeyChanged(0x1B0E6D7A, "linked", 0x2A5F1C03),
    SourceLoss("keys", 1, None),
    TargetGone("keys", 0x1B0E6D7A, "key removed", tag=1),
]


def test_real_linked_record():
    parser = WatchQueueParser()
    assert parser.feed(REAL_LINKED, final=True) == [KeyChanged(0x1B0E6D7A, "linked", 0x2A5F1C03)]
    assert parser.stats.records == 1 and parser.stats.malformed == 0


def test_encoder_matches_the_kernel_bytes():
    assert encode_key_record(0x1B0E6D7A, "linked", 0x2A5F1C03, tag=1) == REAL_LINKED
    assert encode_loss_record() == REAL_LOSS
    assert encode_removal_record(0x1B0E6D7A, tag=1) == REAL_REMOVAL


def test_capture_whole():
    assert WatchQueueParser().feed(CAPTURE, final=True) == EXPECTED


@pytest.mark.parametrize("size", range(1, len(CAPTURE) + 1))
def test_capture_in_chunks(size):
    parser = WatchQueueParser()
    out = []
    for i in range(0, len(CAPTURE), size):
        out += parser.feed(CAPTURE[i:i + size])
    assert out == EXPECTED
    assert parser.stats.malformed == 0


@pytest.mark.parametrize("subtype,name", list(enumerate(KEY_CHANGES)))
def test_all_eight_subtypes(subtype, name):
    record = struct.pack("=II", 1 | subtype << 24, 16 | 7 << 8) + struct.pack("=II", 42, 99)
    assert WatchQueueParser().feed(record, final=True) == [KeyChanged(42, name, 99)]


def test_removal_without_id_carries_the_tag():
    record = struct.pack("=II", 0, 8 | 5 << 8)  # META / REMOVAL, no id
    assert WatchQueueParser().feed(record, final=True) == [TargetGone("keys", 0, "key removed", tag=5)]


@pytest.mark.parametrize("bad,kind", [
    (struct.pack("=II", 1 | 2 << 24, 0), "malformed"),  # length 0 < 8
    (struct.pack("=II", 1 | 2 << 24, 4), "malformed"),  # length 4 < 8
    (struct.pack("=II", 1 | 2 << 24, 8), "malformed"),  # key record shorter than 16
    (struct.pack("=II", 1 | 9 << 24, 16) + bytes(8), "malformed"),  # subtype 9 unknown for keys
    (struct.pack("=II", 77, 16) + bytes(8), "unknown"),  # unknown type, skipped by its length
    (struct.pack("=II", 0 | 5 << 24, 8), "unknown"),  # unknown meta subtype
])
def test_bad_records_are_counted_and_the_next_survives(bad, kind):
    parser = WatchQueueParser()
    out = parser.feed(bad + REAL_LINKED, final=True)
    assert out == [KeyChanged(0x1B0E6D7A, "linked", 0x2A5F1C03)]
    assert getattr(parser.stats, kind) == 1


def test_record_beyond_the_buffer_is_malformed_at_a_read_boundary():
    parser = WatchQueueParser()
    truncated = REAL_LINKED[:12]
    assert parser.feed(truncated, final=True) == []
    assert parser.stats.malformed == 1
    # and the parser is clean for the next read
    assert parser.feed(REAL_LINKED, final=True) == [KeyChanged(0x1B0E6D7A, "linked", 0x2A5F1C03)]


def test_length_field_is_seven_bits():
    # info bits above the length (e.g. flags in bits 16-23) must not change the length
    record = struct.pack("=II", 1 | 3 << 24, 16 | 1 << 8 | 0xFF << 16) + struct.pack("=II", 1, 2)
    assert WatchQueueParser().feed(record, final=True) == [KeyChanged(1, "unlinked", 2)]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512), st.integers(min_value=1, max_value=64))
def test_arbitrary_bytes_never_raise(data, chunk):
    parser = WatchQueueParser()
    for i in range(0, len(data), chunk):
        parser.feed(data[i:i + chunk])
    parser.feed(b"", final=True)
    assert parser.stats.records + parser.stats.malformed + parser.stats.unknown <= len(data) // 8 + 1


record_strategy = st.one_of(
    st.tuples(st.just("key"), st.integers(1, 2**31 - 1), st.sampled_from(KEY_CHANGES), st.integers(0, 2**32 - 1),
              st.integers(0, 255)),
    st.tuples(st.just("loss")),
    st.tuples(st.just("removal"), st.integers(1, 2**31 - 1), st.integers(0, 255)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(record_strategy, max_size=40), st.integers(min_value=1, max_value=40))
def test_valid_records_round_trip(records, chunk):
    data = b""
    expected = []
    for r in records:
        if r[0] == "key":
            _, key, change, aux, tag = r
            data += encode_key_record(key, change, aux, tag)
            expected.append(KeyChanged(key, change, aux))
        elif r[0] == "loss":
            data += encode_loss_record()
            expected.append(SourceLoss("keys", 1, None))
        else:
            _, key, tag = r
            data += encode_removal_record(key, tag)
            expected.append(TargetGone("keys", key, "key removed", tag=tag))
    parser = WatchQueueParser()
    out = []
    for i in range(0, len(data), chunk):
        out += parser.feed(data[i:i + chunk])
    assert out == expected
    assert parser.stats.malformed == 0 and parser.stats.unknown == 0
