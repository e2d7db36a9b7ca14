"""The D-Bus service: method calls handled at the message level.

dbus-fast's ``@method()`` handlers never see the sender, and every wqd decision
depends on who the sender is, so calls on wqd's objects are taken in a message
handler: identity first (cached per unique name), then the hub and policy
(async), then the reply. Introspection is served from the shipped XML.
"""

from __future__ import annotations

import asyncio
import logging
import xml.etree.ElementTree as ET

from dbus_fast import Message, MessageType, Variant

from wqd import errors
from wqd.bus import names
from wqd.bus.connection import close_fds
from wqd.bus.emitter import SignalEmitter
from wqd.bus.identity import PeerDirectory
from wqd.hub import Hub

log = logging.getLogger(__name__)

STANDARD_INTERFACES = """\
  <interface name="org.freedesktop.DBus.Introspectable">
    <method name="Introspect"><arg name="xml_data" type="s" direction="out"/></method>
  </interface>
  <interface name="org.freedesktop.DBus.Peer">
    <method name="Ping"/>
    <method name="GetMachineId"><arg name="machine_uuid" type="s" direction="out"/></method>
  </interface>
  <interface name="org.freedesktop.DBus.Properties">
    <method name="Get"><arg name="interface_name" type="s" direction="in"/><arg name="property_name" type="s" direction="in"/><arg name="value" type="v" direction="out"/></method>
    <method name="GetAll"><arg name="interface_name" type="s" direction="in"/><arg name="properties" type="a{sv}" direction="out"/></method>
    <method name="Set"><arg name="interface_name" type="s" direction="in"/><arg name="property_name" type="s" direction="in"/><arg name="value" type="v" direction="in"/></method>
    <signal name="PropertiesChanged"><arg name="interface_name" type="s"/><arg name="changed_properties" type="a{sv}"/><arg name="invalidated_properties" type="as"/></signal>
  </interface>
"""
DOCTYPE = ('<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"\n'
           ' "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">\n')


def load_interfaces() -> dict[str, str]:
    """Interface name -> its XML (comments dropped), from the shipped XML file."""
    text = names.INTERFACE_XML.read_text()
    root = ET.fromstring(text)
    return {iface.get("name"): "  " + ET.tostring(iface, encoding="unicode").strip() + "\n"
            for iface in root.findall("interface")}


class CallError(Exception):
    def __init__(self, name: str, text: str) -> None:
        super().__init__(text)
        self.name = name
        self.text = text


def _invalid(text: str) -> CallError:
    return CallError(names.INVALID_ARGUMENT, text)


class WatchQueueService:
    def __init__(self, bus, hub: Hub) -> None:
        self.bus = bus
        self.hub = hub
        self.peers = PeerDirectory(bus, on_gone=self._peer_gone)
        self.emitter = SignalEmitter(bus, hub)
        self.interfaces = load_interfaces()
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.bus.add_message_handler(self._on_message)
        await self.peers.start()

    def _peer_gone(self, name: str) -> None:
        n = self.hub.drop_owner(name)
        if n:
            log.info("%s left the bus; %d subscription(s) freed", name, n)

    # -- message routing ----------------------------------------------------

    def _on_message(self, msg: Message):
        if msg.unix_fds and msg.message_type in (MessageType.METHOD_CALL, MessageType.SIGNAL):
            close_fds(msg)  # wqd's API takes no fds: keep nothing a peer pushes at us
        if msg.message_type == MessageType.SIGNAL:
            if msg.member == "NameOwnerChanged" and msg.sender == "org.freedesktop.DBus":
                self.peers.name_owner_changed(msg)
            return None
        if msg.message_type != MessageType.METHOD_CALL:
            return None
        path = msg.path or ""
        if not (path == "/" or path.startswith("/io")):
            return None
        if msg.interface == names.PEER_INTERFACE:
            return None  # Ping / GetMachineId: dbus-fast answers
        task = asyncio.ensure_future(self._call(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _call(self, msg: Message) -> None:
        try:
            reply = await self._dispatch(msg)
        except CallError as exc:
            reply = Message.new_error(msg, exc.name, exc.text)
        except errors.WqdError as exc:
            reply = Message.new_error(msg, names.ERROR_PREFIX + exc.dbus_suffix, str(exc))
        except Exception:
            log.exception("unexpected error in %s.%s from %s", msg.interface, msg.member, msg.sender)
            reply = Message.new_error(msg, names.FAILED, "internal error")
        if msg.flags & 0x1:  # NO_REPLY_EXPECTED
            return
        try:
            self.bus.send(reply)
        except Exception:
            log.exception("sending a reply to %s failed", msg.sender)

    async def _dispatch(self, msg: Message) -> Message:
        path, iface, member = msg.path, msg.interface, msg.member
        if iface == names.INTROSPECTABLE_INTERFACE or (iface is None and member == "Introspect"):
            if member != "Introspect" or msg.signature:
                raise CallError("org.freedesktop.DBus.Error.UnknownMethod", f"no method {member}")
            return Message.new_method_return(msg, "s", [await self._introspect(msg)])
        if path == names.MANAGER_PATH:
            return await self._manager(msg, iface, member)
        if path.startswith(names.SUBSCRIPTION_PREFIX):
            return await self._subscription(msg, iface, member)
        raise CallError("org.freedesktop.DBus.Error.UnknownObject", f"no object at {path}")

    # -- manager ------------------------------------------------------------

    def _manager_properties(self) -> dict[str, Variant]:
        return {
            "Version": Variant("s", names.API_VERSION),
            "Sources": Variant("a{ss}", {name: src.backend for name, src in self.hub.sources.items()}),
        }

    async def _manager(self, msg: Message, iface: str | None, member: str) -> Message:
        if iface == names.PROPERTIES_INTERFACE:
            return self._properties(msg, names.MANAGER_INTERFACE, self._manager_properties)
        if iface not in (None, names.MANAGER_INTERFACE):
            raise CallError("org.freedesktop.DBus.Error.UnknownInterface", f"no interface {iface}")
        peer = await self.peers.get(msg.sender)
        if member == "Watch":
            if msg.signature != "ssa{sv}":
                raise _invalid("Watch takes (s source, s target, a{sv} options)")
            source, target, raw_options = msg.body
            options = {k: v.value for k, v in raw_options.items()}
            sub = await self.hub.watch(peer, source, target, options)
            if msg.sender not in self.peers:  # left while we were deciding
                self.hub.end(sub)
                raise errors.AccessDenied("the caller left the bus")
            return Message.new_method_return(msg, "o", [names.subscription_path(sub.number)])
        if member == "ListSubscriptions":
            if msg.signature:
                raise _invalid("ListSubscriptions takes no arguments")
            paths = [names.subscription_path(s.number) for s in self.hub.owned_by(msg.sender)]
            return Message.new_method_return(msg, "ao", [paths])
        raise CallError("org.freedesktop.DBus.Error.UnknownMethod", f"no method {member}")

    # -- subscriptions ------------------------------------------------------

    def _subscription_number(self, path: str) -> int:
        tail = path[len(names.SUBSCRIPTION_PREFIX):]
        if not tail.isdigit() or len(tail) > 19:
            raise errors.NoSuchObject("no such subscription")
        return int(tail)

    async def _subscription(self, msg: Message, iface: str | None, member: str) -> Message:
        number = self._subscription_number(msg.path)
        await self.peers.get(msg.sender)
        sub = self.hub.get(number, msg.sender)  # NoSuchObject / AccessDenied
        if iface == names.PROPERTIES_INTERFACE:
            return self._properties(msg, names.SUBSCRIPTION_INTERFACE, lambda: {
                "Source": Variant("s", sub.source),
                "Target": Variant("s", sub.target.spec),
                "Delivered": Variant("t", sub.delivered),
                "Lost": Variant("t", sub.lost),
            })
        if iface not in (None, names.SUBSCRIPTION_INTERFACE):
            raise CallError("org.freedesktop.DBus.Error.UnknownInterface", f"no interface {iface}")
        if member == "Close":
            if msg.signature:
                raise _invalid("Close takes no arguments")
            self.hub.end(sub)
            return Message.new_method_return(msg)
        raise CallError("org.freedesktop.DBus.Error.UnknownMethod", f"no method {member}")

    def _properties(self, msg: Message, interface: str, values) -> Message:
        member = msg.member
        if member == "Get" and msg.signature == "ss":
            iface, prop = msg.body
            props = values() if iface in (interface, "") else {}
            if prop not in props:
                raise CallError("org.freedesktop.DBus.Error.UnknownProperty", f"no property {prop}")
            return Message.new_method_return(msg, "v", [props[prop]])
        if member == "GetAll" and msg.signature == "s":
            (iface,) = msg.body
            return Message.new_method_return(msg, "a{sv}", [values() if iface in (interface, "") else {}])
        if member == "Set" and msg.signature == "ssv":
            raise CallError("org.freedesktop.DBus.Error.PropertyReadOnly", "all properties are read-only")
        raise CallError("org.freedesktop.DBus.Error.InvalidArgs", f"bad call to Properties.{member}")

    # -- introspection ------------------------------------------------------

    async def _introspect(self, msg: Message) -> str:
        path = msg.path
        body = ""
        children: list[str] = []
        if path == "/":
            children = ["io"]
        elif path == "/io":
            children = ["wqd"]
        elif path == "/io/wqd":
            children = ["WatchQueue1"]
        elif path == names.MANAGER_PATH:
            body = STANDARD_INTERFACES + self.interfaces[names.MANAGER_INTERFACE]
            children = ["subscription"]
        elif path == names.SUBSCRIPTION_PREFIX.rstrip("/"):
            children = [str(s.number) for s in self.hub.owned_by(msg.sender)]
        elif path.startswith(names.SUBSCRIPTION_PREFIX):
            self.hub.get(self._subscription_number(path), msg.sender)
            body = STANDARD_INTERFACES + self.interfaces[names.SUBSCRIPTION_INTERFACE]
        else:
            raise CallError("org.freedesktop.DBus.Error.UnknownObject", f"no object at {path}")
        nodes = "".join(f'  <node name="{c}"/>\n' for c in children)
        return f"{DOCTYPE}<node>\n{body}{nodes}</node>\n"
