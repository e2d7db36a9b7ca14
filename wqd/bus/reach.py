"""Reaching the bus within a bound, for wqd and wqctl.

A wrong address, or a socket whose owner accepts and never speaks (a stopped or
wedged bus, or anything else listening there), would otherwise leave the caller
in the SASL handshake or waiting for the ``Hello`` reply forever. ``reach``
bounds the whole of connect + authenticate + ``Hello`` and turns every way it
can fail into one ``BusUnreachable`` whose text is a single line naming the
address.

dbus-fast before 5.0 (Debian 12 has 1.84.2) connects the socket, blocking, in
``MessageBus()``, where no event-loop timer can interrupt it. That connect
returns at once for a listening unix socket, but blocks for as long as the
listener's backlog stays full (a stopped bus that many clients tried): so for
the connect, sockets get the bound as their default timeout: such a socket is
non-blocking underneath, and its connect gives up in time (a full backlog:
at once, with EAGAIN). dbus-fast 5 makes its sockets non-blocking itself, where
the default does not matter.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 25.0  # seconds: libdbus's and busctl's default reply timeout
SYSTEM_BUS_DEFAULT = "unix:path=/var/run/dbus/system_bus_socket"  # D-Bus specification


class BusUnreachable(Exception):
    """The bus could not be reached within the bound; the text names the address."""


def seconds(text: str) -> float:
    """argparse type of ``--connect-timeout`` / ``--timeout``: seconds in (0, 3600]."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be seconds in 0..3600, not {text!r}")
    return value


def describe(address: str | None, system: bool) -> str:
    """The address a connection will try: *address*, else the system or session bus's."""
    if address:
        return address
    if system:
        return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or SYSTEM_BUS_DEFAULT
    return os.environ.get("DBUS_SESSION_BUS_ADDRESS") or "the session bus (DBUS_SESSION_BUS_ADDRESS is unset)"


async def reach(connecting: Callable[[], Awaitable[T]], where: str, timeout: float) -> T:
    """``await connecting()`` (construct, connect, authenticate, Hello) within *timeout* seconds."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # see above: dbus-fast < 5's blocking connect
    try:
        return await asyncio.wait_for(connecting(), timeout)
    except TimeoutError:  # before OSError: TimeoutError is one
        raise BusUnreachable(f"cannot connect to the bus at {where}: no answer within {timeout:g} s") from None
    except Exception as exc:  # OSError, AuthError, InvalidAddressError, EOF mid-handshake, ...
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise BusUnreachable(f"cannot connect to the bus at {where}: {text}") from None
    finally:
        socket.setdefaulttimeout(previous)
