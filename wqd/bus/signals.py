"""Unicast signals marshalled without building a ``Message`` per send.

A wqd signal's header depends only on its destination, path, member and
signature, plus the serial and the body length: so it is marshalled once per
(subscription, member) and patched per send. The body depends only on the
event: the emitter marshals it once, however many subscribers get that event.
The bytes are exactly what dbus-fast's ``Message._marshall`` produces
(tests/test_signal_marshal.py compares them).

Wire format (D-Bus specification, "Message Format"): a 16-byte fixed header
(endianness, type, flags, version, body length, serial), the header fields
``a(yv)``, padding to 8 bytes, then the body.
"""

from __future__ import annotations

import struct

from dbus_fast import Variant
from dbus_fast._private.marshaller import Marshaller

LITTLE_ENDIAN = ord("l")
SIGNAL = 4  # MessageType.SIGNAL
PROTOCOL_VERSION = 1
# Header field codes (D-Bus specification, "Header Fields").
FIELD_PATH = 1
FIELD_INTERFACE = 2
FIELD_MEMBER = 3
FIELD_DESTINATION = 6
FIELD_SIGNATURE = 8

_LENGTH_SERIAL = struct.Struct("<II")


def signal_header(destination: str, path: str, interface: str, member: str, signature: str) -> bytes:
    """The marshalled header of a signal, body length and serial left 0, padded to 8."""
    fields = [
        (FIELD_PATH, Variant("o", path)),
        (FIELD_INTERFACE, Variant("s", interface)),
        (FIELD_MEMBER, Variant("s", member)),
        (FIELD_DESTINATION, Variant("s", destination)),
    ]
    if signature:
        fields.append((FIELD_SIGNATURE, Variant("g", signature)))
    header = bytes(Marshaller("yyyyuua(yv)", [LITTLE_ENDIAN, SIGNAL, 0, PROTOCOL_VERSION, 0, 0, fields]).marshall())
    return header + b"\0" * (-len(header) % 8)


def marshal_body(signature: str, body: list) -> bytes:
    return bytes(Marshaller(signature, body).marshall()) if signature else b""


def encode(header: bytes, body: bytes, serial: int) -> bytearray:
    """One complete message: *header* from ``signal_header``, *body* from ``marshal_body``."""
    buf = bytearray(header)
    buf += body
    _LENGTH_SERIAL.pack_into(buf, 4, len(body), serial)
    return buf
