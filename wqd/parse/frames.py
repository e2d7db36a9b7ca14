"""Length-prefixed records in a byte stream: the one frame loop of wqd's parsers.

Both record streams wqd reads from the kernel carry each record's length in its
header: a notification pipe's ``struct watch_notification`` (``watch_queue``) and
a fanotify group's ``struct fanotify_event_metadata`` (``fanotify``).
``FrameSplitter.feed(bytes) -> list[memoryview]`` returns every whole record,
keeps an incomplete trailing one for the next ``feed``, and counts what cannot be
framed in ``malformed``. It is sans-I/O and never raises on input; the parser
that owns it decodes the records, and decides what a header it cannot trust
costs (``resync``).
"""

from __future__ import annotations

from collections.abc import Callable

# length(buf, pos) -> the record's length, or None: a header it cannot trust
LengthOf = Callable[[bytes, int], "int | None"]


class FrameSplitter:
    """Split a byte stream into records of ``length(buf, pos)`` bytes each.

    *header* bytes must be buffered before *length* is asked. A length of
    ``None`` (or shorter than the header, which could never advance) is
    malformed: with *resync* set, skip that many bytes and try again there (the
    watch queue's records are word-aligned, so the next header may be good);
    with ``None``, nothing after it can be framed, so everything buffered is dropped.

    A record longer than what is buffered waits for more bytes. The kernel's
    read(2) on both fds returns whole records only, so a parser fed from it
    passes ``final=True``: a remainder then is a truncated record, counted
    malformed and dropped.

    Records are ``memoryview``\\ s of an immutable buffer: zero-copy, valid for as
    long as the caller keeps them.
    """

    __slots__ = ("_header", "_length", "_resync", "_rest", "malformed")

    def __init__(self, header: int, length: LengthOf, resync: int | None = None) -> None:
        self._header = header
        self._length = length
        self._resync = resync
        self._rest = b""
        self.malformed = 0

    @property
    def pending(self) -> int:
        """Bytes of an incomplete record kept for the next ``feed``."""
        return len(self._rest)

    def feed(self, data: bytes, final: bool = False) -> list[memoryview]:
        buf = self._rest + data if self._rest else bytes(data)
        view = memoryview(buf)
        header = self._header
        length_of = self._length
        out: list[memoryview] = []
        pos = 0
        end = len(buf)
        while end - pos >= header:
            length = length_of(buf, pos)
            if length is None or length < header:
                self.malformed += 1
                if self._resync is None:
                    pos = end
                    break
                pos += self._resync
                continue
            if end - pos < length:
                break  # incomplete: wait for more bytes (or drop it if final)
            out.append(view[pos:pos + length])
            pos += length
        rest = buf[pos:]
        if final and rest:
            self.malformed += 1
            rest = b""
        self._rest = rest
        return out
