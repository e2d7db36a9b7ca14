"""Fixtures for the "kernel" test tier (tests that need a kernel with CONFIG_WATCH_QUEUE).

These tests are meant to run inside the qemu guest started by ``tests/vm/run``.
On a kernel without the watch queue (e.g. the development host, where
``pipe2(O_NOTIFICATION_PIPE)`` fails with ENOPKG) every test that uses
``watch_queue_kernel`` is skipped with the reason.

Self-contained on purpose: stdlib + pytest only, no marker registration here
(the ``kernel`` marker is registered in pyproject.toml).
"""
import ctypes
import errno
import fcntl
import os
import select
import struct
import types
import uuid

import pytest

# <linux/watch_queue.h>
O_NOTIFICATION_PIPE = os.O_EXCL                  # "Same as O_EXCL"
IOC_WATCH_QUEUE_SET_SIZE = 0x5760                # _IO('W', 0x60)
IOC_WATCH_QUEUE_SET_FILTER = 0x5761              # _IO('W', 0x61)
WATCH_TYPE_META = 0
WATCH_TYPE_KEY_NOTIFY = 1
WATCH_INFO_LENGTH = 0x0000007F
WATCH_INFO_ID = 0x0000FF00
WATCH_INFO_ID__SHIFT = 8
NOTIFY_KEY_INSTANTIATED, NOTIFY_KEY_UPDATED, NOTIFY_KEY_LINKED, NOTIFY_KEY_UNLINKED = 0, 1, 2, 3
NOTIFY_KEY_CLEARED, NOTIFY_KEY_REVOKED, NOTIFY_KEY_INVALIDATED, NOTIFY_KEY_SETATTR = 4, 5, 6, 7

# <linux/keyctl.h>, x86_64 syscall numbers
SYS_add_key, SYS_keyctl = 248, 250
KEY_SPEC_SESSION_KEYRING = -3
KEYCTL_UNLINK = 9
KEYCTL_WATCH_KEY = 32

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(ret):
    if ret == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def keyctl(op, *args):
    """keyctl(2) via syscall(2); integer arguments only."""
    return _check(_libc.syscall(ctypes.c_long(SYS_keyctl), ctypes.c_long(op),
                                *(ctypes.c_long(a) for a in args)))


def add_key(key_type, description, payload, keyring):
    """add_key(2) via syscall(2); returns the key serial."""
    buf = ctypes.create_string_buffer(payload) if payload is not None else None
    return _check(_libc.syscall(ctypes.c_long(SYS_add_key), key_type.encode(), description.encode(),
                                buf, ctypes.c_size_t(len(payload) if payload else 0),
                                ctypes.c_long(keyring)))


def watch_key(key, fd, tag):
    return keyctl(KEYCTL_WATCH_KEY, key, fd, tag)


def parse_records(buf):
    """Split a read() of a notification pipe into (type, subtype, info, payload) tuples."""
    out = []
    while buf:
        word, info = struct.unpack_from("<II", buf)
        length = info & WATCH_INFO_LENGTH
        assert 8 <= length <= len(buf), f"bad record length {length} in {buf.hex()}"
        out.append((word & 0xFFFFFF, word >> 24, info, buf[8:length]))
        buf = buf[length:]
    return out


def read_notes(fd, timeout=10.0):
    """Read one batch of records from a notification pipe, or fail after timeout s."""
    r, _, _ = select.select([fd], [], [], timeout)
    assert r, f"no notification within {timeout} s"
    return os.read(fd, 4096)


def _probe():
    try:
        r, w = os.pipe2(O_NOTIFICATION_PIPE)
    except OSError as e:
        if e.errno == errno.ENOPKG:
            return "kernel lacks CONFIG_WATCH_QUEUE (pipe2(O_NOTIFICATION_PIPE) -> ENOPKG); " \
                   "run this tier with tests/vm/run"
        if e.errno == errno.EINVAL:
            return "kernel too old for notification pipes (pipe2(O_NOTIFICATION_PIPE) -> EINVAL)"
        raise
    try:
        fcntl.ioctl(r, IOC_WATCH_QUEUE_SET_SIZE, 1)
        try:
            watch_key(KEY_SPEC_SESSION_KEYRING, r, 0)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                return f"kernel lacks CONFIG_KEY_NOTIFICATIONS (KEYCTL_WATCH_KEY -> {e.strerror})"
            raise
    finally:
        os.close(r)
        os.close(w)
    return None


_probe_result = []


@pytest.fixture(scope="session")
def watch_queue_kernel():
    """Skip unless the running kernel has notification pipes and key notifications."""
    if not _probe_result:
        _probe_result.append(_probe())
    if _probe_result[0]:
        pytest.skip(_probe_result[0])
    return os.uname().release


@pytest.fixture
def notification_pipe(watch_queue_kernel):
    """(read_fd, write_fd) of a fresh notification pipe sized for 256 notes."""
    r, w = os.pipe2(O_NOTIFICATION_PIPE | os.O_CLOEXEC)
    try:
        fcntl.ioctl(r, IOC_WATCH_QUEUE_SET_SIZE, 256)
        yield r, w
    finally:
        os.close(r)
        os.close(w)


@pytest.fixture
def fresh_keyring(watch_queue_kernel):
    """Serial of a new, empty keyring linked into the session keyring (unlinked after)."""
    serial = add_key("keyring", f"wqd-test-{uuid.uuid4().hex[:12]}", None, KEY_SPEC_SESSION_KEYRING)
    yield serial
    try:
        keyctl(KEYCTL_UNLINK, serial, KEY_SPEC_SESSION_KEYRING)
    except OSError:
        pass


@pytest.fixture
def watch_test_oracle(watch_queue_kernel):
    """Path of the kernel sample watch_test (patched to take a key serial as argv[1])."""
    path = os.environ.get("WQD_WATCH_TEST")
    if not path or not os.access(path, os.X_OK):
        pytest.skip("WQD_WATCH_TEST is not set to the watch_test oracle (tests/vm/run sets it)")
    return path


@pytest.fixture(scope="session")
def wq():
    """The constants and helpers above (add_key, keyctl, watch_key, parse_records,
    read_notes, NOTIFY_KEY_*, ...) as a namespace, so test modules need no import
    of this conftest."""
    return types.SimpleNamespace(**{k: v for k, v in globals().items()
                                    if not k.startswith("_") and k not in ("pytest", "types")})
