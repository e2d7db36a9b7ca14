"""polkit's ``org.freedesktop.PolicyKit1.Authority``, asked over wqd's own bus connection.

The ``polkit`` policy plugin (``wqd.policy.polkit``) holds the cache, the
timeout and the default; this is only the wire: ``CheckAuthorization`` for a
``system-bus-name`` subject, without user interaction, and a fire-and-forget
``CancelCheckAuthorization``.

Only polkit answers for polkit: each check first asks the bus daemon which
connection owns ``org.freedesktop.PolicyKit1`` (starting it by activation if
none does), sends the call to that unique name, and takes the reply only from
it (``FlowControlledBus.call_from``); a reply forged by any other peer is
ignored and the real one awaited.
"""

from __future__ import annotations

import logging

from dbus_fast import Message, MessageFlag, MessageType, Variant

from wqd.policy.polkit import AuthorityUnavailable

log = logging.getLogger(__name__)

POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_INTERFACE = "org.freedesktop.PolicyKit1.Authority"
CHECK_NO_INTERACTION = 0  # PolkitCheckAuthorizationFlags: 1 would be AllowUserInteraction


class BusAuthority:
    def __init__(self, bus) -> None:
        self.bus = bus
        self._owner = POLKIT_NAME  # the connection the last check went to: cancels go there too

    async def owner(self) -> str:
        """The unique name owning polkit's bus name now (activating it if need be)."""
        reply = await self.bus.call_bus("GetNameOwner", "s", [POLKIT_NAME])
        if reply.message_type == MessageType.ERROR and reply.error_name == "org.freedesktop.DBus.Error.NameHasNoOwner":
            started = await self.bus.call_bus("StartServiceByName", "su", [POLKIT_NAME, 0])
            if started.message_type == MessageType.ERROR:
                raise AuthorityUnavailable(f"{started.error_name}: {_text(started)}")
            reply = await self.bus.call_bus("GetNameOwner", "s", [POLKIT_NAME])
        if reply.message_type == MessageType.ERROR:
            raise AuthorityUnavailable(f"{reply.error_name}: {_text(reply)}")
        if reply.signature != "s" or not reply.body[0].startswith(":"):
            raise AuthorityUnavailable(f"GetNameOwner answered {reply.signature!r}")
        return reply.body[0]

    async def check(self, unique_name: str, action_id: str, cancellation_id: str) -> bool:
        owner = await self.owner()
        self._owner = owner
        reply = await self.bus.call_from(Message(
            destination=owner, path=POLKIT_PATH, interface=POLKIT_INTERFACE,
            member="CheckAuthorization", signature="(sa{sv})sa{ss}us",
            body=[["system-bus-name", {"name": Variant("s", unique_name)}], action_id, {},
                  CHECK_NO_INTERACTION, cancellation_id]), owner)
        if reply.message_type == MessageType.ERROR:
            raise AuthorityUnavailable(f"{reply.error_name}: {_text(reply)}")
        if reply.signature != "(bba{ss})":
            raise AuthorityUnavailable(f"unexpected reply signature {reply.signature!r}")
        authorized, _challenge, _details = reply.body[0]
        return bool(authorized)

    def cancel(self, cancellation_id: str) -> None:
        try:
            self.bus.send(Message(
                destination=self._owner, path=POLKIT_PATH, interface=POLKIT_INTERFACE,
                member="CancelCheckAuthorization", signature="s", body=[cancellation_id],
                flags=MessageFlag.NO_REPLY_EXPECTED))
        except Exception:
            log.debug("CancelCheckAuthorization(%s) could not be sent", cancellation_id, exc_info=True)


def _text(reply: Message) -> str:
    return reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
