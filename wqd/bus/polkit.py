"""polkit's ``org.freedesktop.PolicyKit1.Authority``, asked over wqd's own bus connection.

The ``polkit`` policy plugin (``wqd.policy.polkit``) holds the cache, the
timeout and the default; this is only the wire: ``CheckAuthorization`` for a
``system-bus-name`` subject, without user interaction, and a fire-and-forget
``CancelCheckAuthorization``.
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

    async def check(self, unique_name: str, action_id: str, cancellation_id: str) -> bool:
        reply = await self.bus.call(Message(
            destination=POLKIT_NAME, path=POLKIT_PATH, interface=POLKIT_INTERFACE,
            member="CheckAuthorization", signature="(sa{sv})sa{ss}us",
            body=[["system-bus-name", {"name": Variant("s", unique_name)}], action_id, {},
                  CHECK_NO_INTERACTION, cancellation_id]))
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body else ""
            raise AuthorityUnavailable(f"{reply.error_name}: {text}")
        if reply.signature != "(bba{ss})":
            raise AuthorityUnavailable(f"unexpected reply signature {reply.signature!r}")
        authorized, _challenge, _details = reply.body[0]
        return bool(authorized)

    def cancel(self, cancellation_id: str) -> None:
        try:
            self.bus.send(Message(
                destination=POLKIT_NAME, path=POLKIT_PATH, interface=POLKIT_INTERFACE,
                member="CancelCheckAuthorization", signature="s", body=[cancellation_id],
                flags=MessageFlag.NO_REPLY_EXPECTED))
        except Exception:
            log.debug("CancelCheckAuthorization(%s) could not be sent", cancellation_id, exc_info=True)
