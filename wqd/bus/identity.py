"""Peer identity: ``GetConnectionCredentials`` once per unique name, cached.

Unique names are never reused on a bus, so the cache is keyed by them and an
entry is dropped when ``NameOwnerChanged`` says the peer left. What the bus
reports is what the kernel told it when the peer connected (SO_PEERCRED,
SO_PEERSEC, SO_PEERPIDFD): decisions use that, never a later look at a PID.
"""

from __future__ import annotations

import asyncio
import logging
import os

from dbus_fast import Message, MessageType

from wqd.errors import AccessDenied
from wqd.peer import IdentityUnclear, PeerCredentials, inspect_process

log = logging.getLogger(__name__)


class PeerDirectory:
    def __init__(self, bus, on_gone=None) -> None:
        self.bus = bus
        self.on_gone = on_gone
        self._known: dict[str, PeerCredentials] = {}
        self._pending: dict[str, asyncio.Future] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._known

    async def start(self) -> None:
        rule = ("type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
                "member='NameOwnerChanged',path='/org/freedesktop/DBus'")
        reply = await self.bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="AddMatch", signature="s", body=[rule]))
        if reply.message_type == MessageType.ERROR:
            raise RuntimeError(f"AddMatch failed: {reply.body}")

    def name_owner_changed(self, msg: Message) -> None:
        name, _old, new = msg.body
        if name.startswith(":") and not new:
            self._known.pop(name, None)
            pending = self._pending.pop(name, None)
            if pending is not None and not pending.done():
                pending.cancel()
            if self.on_gone is not None:
                self.on_gone(name)

    async def get(self, name: str) -> PeerCredentials:
        """The credentials of *name*; raises AccessDenied when they cannot be had."""
        known = self._known.get(name)
        if known is not None:
            return known
        pending = self._pending.get(name)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(name))
            self._pending[name] = pending
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            if pending.cancelled():
                raise AccessDenied("the caller left the bus") from None
            raise

    async def _fetch(self, name: str) -> PeerCredentials:
        try:
            reply = await self.bus.call(Message(
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus", member="GetConnectionCredentials",
                signature="s", body=[name]))
            if reply.message_type == MessageType.ERROR:
                raise AccessDenied("the bus could not tell who the caller is")
            creds = {k: v.value for k, v in reply.body[0].items()}
            if "UnixUserID" not in creds:
                raise AccessDenied("the bus did not report the caller's user id")
            peer = self._build(name, creds)
            if self._pending.get(name) is not None:  # still connected
                self._known[name] = peer
            return peer
        finally:
            self._pending.pop(name, None)

    def _build(self, name: str, creds: dict) -> PeerCredentials:
        uid = int(creds["UnixUserID"])
        gids = frozenset(int(g) for g in creds.get("UnixGroupIDs", ()))
        pid = creds.get("ProcessID")
        label = creds.get("LinuxSecurityLabel")
        if isinstance(label, (bytes, bytearray)):
            label = bytes(label).rstrip(b"\0").decode("utf-8", "replace")
        pidfd = None
        fds = creds.get("ProcessFD")  # an index into the message's fds when offered
        info: dict = {}
        verified = False
        if pid:
            try:
                info = inspect_process(int(pid), uid, pidfd)
                verified = True
            except IdentityUnclear as exc:
                log.info("peer %s (pid %s): identity not verified: %s", name, pid, exc)
        if not gids:
            gids = info.get("gids", frozenset())
        return PeerCredentials(
            name, uid, gids, int(pid) if pid else None, label,
            info.get("start_time"), info.get("mnt_ns"), info.get("user_ns"), info.get("pid_ns"), verified,
            {"bus_process_fd": fds is not None},
        )


def daemon_uid() -> int:
    return os.geteuid()
