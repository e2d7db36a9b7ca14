"""Peer identity: ``GetConnectionCredentials`` once per unique name, cached.

Unique names are never reused on a bus, so the cache is keyed by them and an
entry is dropped when ``NameOwnerChanged`` says the peer left. What the bus
reports is what the kernel told it when the peer connected (SO_PEERCRED,
SO_PEERSEC, SO_PEERPIDFD): decisions use that, never a later look at a PID.
The process itself is pinned and verified as ``wqd.peer`` describes, through the
bus's ``ProcessFD`` where offered (the connection negotiates fd passing for it);
on any doubt the peer stays unverified and policies fail closed.
"""

from __future__ import annotations

import asyncio
import logging
import os

from dbus_fast import Message, MessageType

from wqd.errors import AccessDenied
from wqd.peer import IdentityUnclear, PeerCredentials, boottime_ticks, inspect_process, pidfd_pid

log = logging.getLogger(__name__)
_process_fd_seen = False  # logged once: the bus hands out ProcessFD and wqd pins peers with it


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
            # First contact: the peer's process existed no later than now.
            pending = asyncio.ensure_future(self._fetch(name, boottime_ticks()))
            self._pending[name] = pending
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            if pending.cancelled():
                raise AccessDenied("the caller left the bus") from None
            raise

    async def _fetch(self, name: str, first_contact: int) -> PeerCredentials:
        try:
            reply = await self.bus.call(Message(
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus", member="GetConnectionCredentials",
                signature="s", body=[name]))
            try:
                if reply.message_type == MessageType.ERROR:
                    raise AccessDenied("the bus could not tell who the caller is")
                creds = {k: v.value for k, v in reply.body[0].items()}
                if "UnixUserID" not in creds:
                    raise AccessDenied("the bus did not report the caller's user id")
                peer = self._build(name, creds, list(reply.unix_fds or ()), first_contact)
            finally:
                for fd in reply.unix_fds or ():
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            if self._pending.get(name) is not None:  # still connected
                self._known[name] = peer
            return peer
        finally:
            self._pending.pop(name, None)

    def _build(self, name: str, creds: dict, fds: list[int], first_contact: int | None = None) -> PeerCredentials:
        """``PeerCredentials`` from a ``GetConnectionCredentials`` answer (*fds*: the reply's fds).

        The uid, groups and label are the bus's (the kernel's, at connect time). The
        process is pinned through ``ProcessFD`` when the bus offers one (then the PID
        it names must match ``ProcessID``), else through a pidfd opened for
        ``ProcessID``; a PID of 0 (the peer is in a PID namespace the bus cannot
        see) or none at all leaves the peer unverified.
        """
        global _process_fd_seen
        uid = int(creds["UnixUserID"])
        bus_gids = frozenset(int(g) for g in creds.get("UnixGroupIDs", ()))
        pid = creds.get("ProcessID")
        pid = int(pid) if pid else None
        label = creds.get("LinuxSecurityLabel")
        if isinstance(label, (bytes, bytearray, list)):
            label = bytes(label).rstrip(b"\0").decode("utf-8", "replace")
        pidfd = None
        index = creds.get("ProcessFD")
        info: dict = {}
        verified = False
        try:
            if index is not None:
                if not isinstance(index, int) or not 0 <= index < len(fds):
                    raise IdentityUnclear("ProcessFD without its file descriptor")
                pidfd = fds[index]
                fd_pid = pidfd_pid(pidfd)
                if fd_pid <= 0 or (pid is not None and fd_pid != pid):
                    raise IdentityUnclear(f"ProcessFD names pid {fd_pid}, ProcessID is {pid}")
                pid = fd_pid
                if not _process_fd_seen:
                    _process_fd_seen = True
                    log.info("the bus offers ProcessFD: peers are pinned through the bus's pidfd")
            if not pid:
                raise IdentityUnclear("the bus reported no usable process id (another PID namespace?)")
            info = inspect_process(pid, uid, pidfd, not_after=first_contact, label=label)
            verified = True
        except IdentityUnclear as exc:
            log.info("peer %s (uid %d, pid %s): identity not verified: %s", name, uid, pid, exc)
            info = {}
        return PeerCredentials(
            name, uid, bus_gids or info.get("gids", frozenset()), pid, label,
            info.get("start_time"), info.get("mnt_ns"), info.get("user_ns"), info.get("pid_ns"), verified,
            {"bus_process_fd": pidfd is not None},
            gid=info.get("gid"), uid_map=info.get("uid_map"), gid_map=info.get("gid_map"),
            sandbox=info.get("sandbox"),
        )


def daemon_uid() -> int:
    return os.geteuid()
