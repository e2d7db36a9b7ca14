"""Strings the bus cannot carry: a mount point or source that is not valid UTF-8.

The kernel names mounts in bytes; wqd decodes them with surrogateescape, and a
D-Bus string must be UTF-8. Such strings reach the subscriber escaped as
man/io.wqd.WatchQueue1.5 says (each byte that is not valid UTF-8 as ``\\ooo``,
each backslash as ``\\\\``), and an event that cannot be marshalled at all costs
``Lost(1)`` in its place, never the events after it.
"""

from __future__ import annotations

import os
import re

import pytest

from wqd.events import bus_string
from mounts_support import RESOLVERS, mount_events, sh, start, wait_mount


def unescape(text: str) -> bytes:
    """The documented way back: ``\\\\`` is a backslash, ``\\ooo`` the byte ooo."""
    return re.sub(rb"\\(\\|[0-7]{3})", lambda m: b"\\" if m[1] == b"\\" else bytes([int(m[1], 8)]),
                  text.encode("utf-8"))


def test_escaping_is_reversible():
    for raw in (b"/mnt/\xff\xfe", b"/mnt/a\\b", b"/mnt/\\377", b"/mnt/\xc3\xbc", b"/mnt/\xc3", b"plain"):
        text = raw.decode("utf-8", "surrogateescape")
        escaped = bus_string(text)
        escaped.encode("utf-8")  # the bus can carry it
        assert unescape(escaped) == raw
    assert bus_string("/mnt/ü") == "/mnt/ü" and bus_string("plain") == "plain"


@RESOLVERS
@pytest.mark.asyncio
@pytest.mark.root
@pytest.mark.bus
async def test_a_mount_point_that_is_not_utf8_reaches_its_subscriber_escaped(system_bus, wqd_factory,
                                                                             client_factory, base, config):
    client = await start(system_bus, wqd_factory, client_factory, config)
    path = await client.watch("mounts", base)
    bad = os.path.join(base.encode(), b"\xff\xfe")
    os.mkdir(bad)
    after = os.path.join(base, "after")
    os.mkdir(after)
    sh("mount", "-t", "tmpfs", "-o", "size=1m", b"wqd-\xff\\src", bad)
    sh("mount", "-t", "tmpfs", "-o", "size=1m", "wqd-after", after)
    escaped = base + "/\\377\\376"
    attached = await wait_mount(client, path, "attached", escaped)
    assert attached[3]["source"] == "wqd-\\377\\\\src"
    assert unescape(attached[2]) == bad and unescape(attached[3]["source"]) == b"wqd-\xff\\src"
    # the event after it is not held back (it used to wait for the next event after it)
    await wait_mount(client, path, "attached", after, timeout=5)
    points = [b[2] for b in mount_events(client, path)]
    assert points.index(escaped) < points.index(after)
    sh("umount", bad)
    await wait_mount(client, path, "detached", escaped)
    sh("umount", after)
    await wait_mount(client, path, "detached", after)
    assert not [s for s in client.signals[path] if s[0] == "Lost"]
