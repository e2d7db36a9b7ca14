"""keyctl(2), add_key(2): the operations wqd needs on keys and keyrings.

Constants from include/uapi/linux/keyctl.h.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from wqd.kernel.libc import syscall

# Special key IDs (include/uapi/linux/keyctl.h)
KEY_SPEC_THREAD_KEYRING = -1
KEY_SPEC_PROCESS_KEYRING = -2
KEY_SPEC_SESSION_KEYRING = -3
KEY_SPEC_USER_KEYRING = -4
KEY_SPEC_USER_SESSION_KEYRING = -5
KEY_SPEC_GROUP_KEYRING = -6

# keyctl commands (include/uapi/linux/keyctl.h)
KEYCTL_GET_KEYRING_ID = 0
KEYCTL_UPDATE = 2
KEYCTL_REVOKE = 3
KEYCTL_SETPERM = 5
KEYCTL_DESCRIBE = 6
KEYCTL_CLEAR = 7
KEYCTL_LINK = 8
KEYCTL_UNLINK = 9
KEYCTL_READ = 11
KEYCTL_INVALIDATE = 21
KEYCTL_GET_PERSISTENT = 22
KEYCTL_CAPABILITIES = 31
KEYCTL_WATCH_KEY = 32

# KEYCTL_CAPABILITIES bits (include/uapi/linux/keyctl.h)
KEYCTL_CAPS0_PERSISTENT_KEYRINGS = 0x02
KEYCTL_CAPS1_NOTIFICATIONS = 0x04

# Permission bits (include/linux/key.h, mirrored in keyutils): four 8-bit groups,
# possessor << 24 | user << 16 | group << 8 | other.
KEY_VIEW = 0x01
KEY_READ = 0x02
KEY_WRITE = 0x04
KEY_SEARCH = 0x08
KEY_LINK = 0x10
KEY_SETATTR = 0x20


def _l(value: int) -> ctypes.c_long:
    return ctypes.c_long(value)


def keyctl(cmd: int, *args) -> int:
    return syscall("keyctl", _l(cmd), *(a if isinstance(a, ctypes._SimpleCData | ctypes.Array) else _l(a) for a in args))


def get_keyring_id(special: int, create: bool = False) -> int:
    """Resolve a special key ID (``KEY_SPEC_*``) to a serial."""
    return keyctl(KEYCTL_GET_KEYRING_ID, special, int(create))


def get_persistent(uid: int, dest_keyring: int = KEY_SPEC_PROCESS_KEYRING) -> int:
    """The persistent keyring of *uid* (-1: the caller's), linked into *dest_keyring*."""
    return keyctl(KEYCTL_GET_PERSISTENT, uid, dest_keyring)


def capabilities() -> bytes:
    buf = ctypes.create_string_buffer(8)
    n = keyctl(KEYCTL_CAPABILITIES, buf, 8)
    return buf.raw[:n]


def _read_buffer(cmd: int, key: int) -> bytes:
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        n = keyctl(cmd, key, buf, size)
        if n <= size:
            return buf.raw[:n]
        size = n


@dataclass(frozen=True, slots=True)
class KeyDescription:
    """KEYCTL_DESCRIBE: ``type;uid;gid;perm;description``."""

    serial: int
    type: str
    uid: int
    gid: int
    perm: int
    description: str


def describe(key: int) -> KeyDescription:
    raw = _read_buffer(KEYCTL_DESCRIBE, key).rstrip(b"\0").decode("utf-8", "replace")
    ktype, uid, gid, perm, desc = raw.split(";", 4)
    # The kernel prints uid/gid as signed decimal; -1 means "none".
    return KeyDescription(key, ktype, int(uid) & 0xFFFFFFFF, int(gid) & 0xFFFFFFFF, int(perm, 16), desc)


def read(key: int) -> bytes:
    """The payload of a key, or the serials of a keyring (``read_keyring_serials``)."""
    return _read_buffer(KEYCTL_READ, key)


def read_keyring_serials(keyring: int) -> list[int]:
    data = read(keyring)
    return list(struct.unpack(f"={len(data) // 4}i", data[: len(data) // 4 * 4]))


def watch_key(key: int, watch_queue_fd: int, tag: int) -> None:
    """KEYCTL_WATCH_KEY: watch *key* through the notification pipe; tag -1 removes."""
    keyctl(KEYCTL_WATCH_KEY, key, watch_queue_fd, tag)


def add_key(ktype: str, description: str, payload: bytes | None, keyring: int) -> int:
    p = ctypes.c_char_p(payload) if payload is not None else ctypes.c_char_p(None)
    return syscall(
        "add_key", ctypes.c_char_p(ktype.encode()), ctypes.c_char_p(description.encode()), p,
        _l(len(payload) if payload is not None else 0), _l(keyring),
    )


def update(key: int, payload: bytes) -> None:
    keyctl(KEYCTL_UPDATE, key, ctypes.c_char_p(payload), len(payload))


def unlink(key: int, keyring: int) -> None:
    keyctl(KEYCTL_UNLINK, key, keyring)


def link(key: int, keyring: int) -> None:
    keyctl(KEYCTL_LINK, key, keyring)


def setperm(key: int, perm: int) -> None:
    keyctl(KEYCTL_SETPERM, key, perm)
