"""wqd's own D-Bus marshaller: unicast signals without a ``Message`` per send, and
every other message wqd sends (``marshal_message``).

A wqd signal's header depends only on its destination, path, member and
signature, plus the serial and the body length: so it is marshalled once per
(subscription, member) and patched per send. The body depends only on the
event: the emitter marshals it once, however many subscribers get that event.
The bytes are exactly what dbus-fast's ``Message._marshall`` produces
(tests/test_signal_marshal.py compares them).

The marshaller is wqd's own (the few types wqd's signals use), not dbus-fast's
private ``dbus_fast._private.marshaller``: wqd depends on dbus-fast's public API
where it can (see ``wqd.bus.dbus_fast_internals``). A string the bus cannot
carry (not valid UTF-8) raises ``UnicodeEncodeError`` here; the emitter answers
that with ``Lost(1)`` for that subscriber (mount strings are escaped before
they get here, ``wqd.events.bus_string``).

Every message wqd writes goes through this marshaller (``FlowControlledWriter``
marshals replies, errors and calls with ``marshal_message``), not only signals:
dbus-fast before 2.11.1 (Debian 12 ships 1.84.2) writes a string's length in
characters instead of bytes (dbus-fast PR #261), so one non-ASCII string in a reply,
say an error text naming the caller's argument, made the bus drop wqd's connection:
any user could stop the daemon with one call.

Wire format (D-Bus specification, "Message Format"): a 16-byte fixed header
(endianness, type, flags, version, body length, serial), the header fields
``a(yv)``, padding to 8 bytes, then the body.
"""

from __future__ import annotations

import struct

from dbus_fast import Variant

LITTLE_ENDIAN = ord("l")
SIGNAL = 4  # MessageType.SIGNAL
PROTOCOL_VERSION = 1
# Header field codes (D-Bus specification, "Header Fields").
FIELD_PATH = 1
FIELD_INTERFACE = 2
FIELD_MEMBER = 3
FIELD_ERROR_NAME = 4
FIELD_REPLY_SERIAL = 5
FIELD_DESTINATION = 6
FIELD_SENDER = 7
FIELD_SIGNATURE = 8
FIELD_UNIX_FDS = 9
MAX_MESSAGE = 1 << 27  # 128 MiB, header and body together (the specification's limit)

_LENGTH_SERIAL = struct.Struct("<II")
_U32 = struct.Struct("<I")
_FIXED = {"y": (1, struct.Struct("<B")), "b": (4, struct.Struct("<I")), "n": (2, struct.Struct("<h")),
          "q": (2, struct.Struct("<H")), "i": (4, struct.Struct("<i")), "u": (4, struct.Struct("<I")),
          "x": (8, struct.Struct("<q")), "t": (8, struct.Struct("<Q")), "d": (8, struct.Struct("<d")),
          "h": (4, struct.Struct("<I"))}
_ALIGN = {**{c: a for c, (a, _) in _FIXED.items()}, "s": 4, "o": 4, "g": 1, "v": 1, "a": 4, "(": 8, "{": 8}


def _split(signature: str) -> list[str]:
    """The complete types of *signature*, in order."""
    types, i = [], 0
    while i < len(signature):
        j = i
        while signature[j] == "a":
            j += 1
        if signature[j] in "({":
            depth = 0
            while True:
                depth += signature[j] in "({"
                depth -= signature[j] in ")}"
                j += 1
                if not depth:
                    break
        else:
            j += 1
        types.append(signature[i:j])
        i = j
    return types


def _pad(buf: bytearray, align: int) -> None:
    buf += b"\0" * (-len(buf) % align)


def _write(buf: bytearray, t: str, value) -> None:
    c = t[0]
    fixed = _FIXED.get(c)
    if fixed is not None:
        _pad(buf, fixed[0])
        buf += fixed[1].pack(value)
    elif c in "so":
        data = value.encode("utf-8")  # strict: a lone surrogate raises UnicodeEncodeError
        _pad(buf, 4)
        buf += _U32.pack(len(data))
        buf += data
        buf += b"\0"
    elif c == "g":
        data = value.encode("ascii")
        buf.append(len(data))
        buf += data
        buf += b"\0"
    elif c == "v":
        _write(buf, "g", value.signature)
        _write(buf, value.signature, value.value)
    elif c in "({":
        _pad(buf, 8)
        members = _split(t[1:-1])
        for member, item in zip(members, value, strict=True):
            _write(buf, member, item)
    elif c == "a":
        _pad(buf, 4)
        at = len(buf)
        buf += b"\0\0\0\0"
        element = t[1:]
        _pad(buf, _ALIGN[element[0]])
        start = len(buf)
        if element[0] == "{":
            for item in value.items():
                _write(buf, element, item)
        else:
            for item in value:
                _write(buf, element, item)
        _U32.pack_into(buf, at, len(buf) - start)
    else:
        raise ValueError(f"type {c!r} is not marshalled by wqd")


def marshal(signature: str, body) -> bytearray:
    buf = bytearray()
    for t, value in zip(_split(signature), body, strict=True):
        _write(buf, t, value)
    return buf


def _header(kind: int, fields: list) -> bytes:
    header = marshal("yyyyuua(yv)", [LITTLE_ENDIAN, kind, 0, PROTOCOL_VERSION, 0, 0, fields])
    return bytes(header + b"\0" * (-len(header) % 8))


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
    return _header(SIGNAL, fields)


def marshal_body(signature: str, body: list) -> bytes:
    return bytes(marshal(signature, body)) if signature else b""


def encode(header: bytes, body: bytes, serial: int) -> bytearray:
    """One complete message: *header* from ``signal_header``, *body* from ``marshal_body``."""
    buf = bytearray(header)
    buf += body
    _LENGTH_SERIAL.pack_into(buf, 4, len(body), serial)
    return buf


def marshal_message(msg, negotiate_unix_fd: bool = False) -> bytearray:
    """A dbus-fast ``Message`` (public attributes only) as bytes on the wire, header
    fields in the order dbus-fast writes them (tests/test_signal_marshal.py compares
    the bytes for ASCII text, and checks UTF-8 lengths against the specification)."""
    body = marshal(msg.signature, msg.body) if msg.signature else bytearray()
    fields = []
    if msg.path:
        fields.append((FIELD_PATH, Variant("o", msg.path)))
    if msg.interface:
        fields.append((FIELD_INTERFACE, Variant("s", msg.interface)))
    if msg.member:
        fields.append((FIELD_MEMBER, Variant("s", msg.member)))
    if msg.error_name:
        fields.append((FIELD_ERROR_NAME, Variant("s", msg.error_name)))
    if msg.reply_serial:
        fields.append((FIELD_REPLY_SERIAL, Variant("u", msg.reply_serial)))
    if msg.destination:
        fields.append((FIELD_DESTINATION, Variant("s", msg.destination)))
    if msg.signature:
        fields.append((FIELD_SIGNATURE, Variant("g", msg.signature)))
    if msg.unix_fds and negotiate_unix_fd:
        fields.append((FIELD_UNIX_FDS, Variant("u", len(msg.unix_fds))))
    header = marshal("yyyyuua(yv)", [LITTLE_ENDIAN, int(msg.message_type.value), int(msg.flags.value),
                                     PROTOCOL_VERSION, len(body), msg.serial, fields])
    header += b"\0" * (-len(header) % 8)
    if len(header) + len(body) > MAX_MESSAGE:
        raise ValueError(f"message of {len(header) + len(body)} bytes is over the 128 MiB limit")
    header += body
    return header
