"""Peer identity: ``GetConnectionCredentials`` once per unique name, cached.

Unique names are never reused on a bus, so the cache is keyed by them and an
entry is dropped when ``NameOwnerChanged`` says the peer left. What the bus
reports is what the kernel told it when the peer connected (SO_PEERCRED,
SO_PEERSEC, SO_PEERPIDFD): decisions use that, never a later look at a PID.
The process itself is pinned and verified as ``wqd.peer`` describes, through the
bus's ``ProcessFD`` where offered (the connection negotiates fd passing for it),
else against the moment wqd saw the unique name appear (``NameOwnerChanged``
with no old owner, recorded here); on any doubt the peer stays unverified and
policies fail closed. Only the bus daemon's own reply counts
(``FlowControlledBus.call_bus``): a peer's forged answer is ignored.
"""

from __future__ import annotations

import asyncio
import logging
import os

from dbus_fast import MessageType

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
        # unique name -> when wqd saw it appear (boottime ticks, as /proc/PID/stat's
        # starttime); a name connected before wqd's match rule took effect is absent.
        self._appeared: dict[str, int] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._known

    async def start(self) -> None:
        rule = ("type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
                "member='NameOwnerChanged',path='/org/freedesktop/DBus'")
        reply = await self.bus.call_bus("AddMatch", "s", [rule])
        if reply.message_type == MessageType.ERROR:
            raise RuntimeError(f"AddMatch failed: {reply.body}")

    def name_owner_changed(self, msg) -> None:
        """A ``NameOwnerChanged`` signal, already checked to come from the bus daemon."""
        if msg.signature != "sss":
            return
        name, old, new = msg.body
        if not name.startswith(":"):
            return
        if new and not old:
            # The connection exists, so its connector had started by now: the only
            # moment a process behind it is known to be the connector (wqd.peer).
            self._appeared[name] = boottime_ticks()
        elif not new:
            self._appeared.pop(name, None)
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
            pending = asyncio.ensure_future(self._fetch(name, self._appeared.get(name)))
            self._pending[name] = pending
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            if pending.cancelled():
                raise AccessDenied("the caller left the bus") from None
            raise

    async def _fetch(self, name: str, appeared: int | None) -> PeerCredentials:
        try:
            reply = await self.bus.call_bus("GetConnectionCredentials", "s", [name])
            try:
                if reply.message_type == MessageType.ERROR:
                    raise AccessDenied("the bus could not tell who the caller is")
                if reply.signature != "a{sv}":
                    raise AccessDenied("the bus could not tell who the caller is")
                creds = {k: v.value for k, v in reply.body[0].items()}
                if not isinstance(creds.get("UnixUserID"), int):
                    raise AccessDenied("the bus did not report the caller's user id")
                try:
                    peer = self._build(name, creds, list(reply.unix_fds or ()), appeared)
                except (TypeError, ValueError):
                    raise AccessDenied("the bus could not tell who the caller is") from None
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

    def _build(self, name: str, creds: dict, fds: list[int], appeared: int | None = None) -> PeerCredentials:
        """``PeerCredentials`` from a ``GetConnectionCredentials`` answer (*fds*: the reply's fds).

        The uid, groups and label are the bus's (the kernel's, at connect time). The
        process is pinned through ``ProcessFD`` when the bus offers one (then the PID
        it names must match ``ProcessID``), else through a pidfd opened for
        ``ProcessID``, and then only if wqd saw the name appear (*appeared*) and the
        process started no later than that; a PID of 0 (the peer is in a PID
        namespace the bus cannot see) or none at all leaves the peer unverified.
        """
        global _process_fd_seen
        uid = int(creds["UnixUserID"])
        bus_gids = frozenset(int(g) for g in creds.get("UnixGroupIDs", ()) if isinstance(g, int))
        pid = creds.get("ProcessID")
        pid = int(pid) if isinstance(pid, int) and pid > 0 else None
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
            if pidfd is None and appeared is None:
                # No pidfd from the bus and no moment to check a start time against:
                # the PID may already belong to another process (wqd.peer).
                raise IdentityUnclear("connected before wqd watched the bus, and the bus gives no ProcessFD")
            info = inspect_process(pid, uid, pidfd, not_after=appeared, label=label)
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

