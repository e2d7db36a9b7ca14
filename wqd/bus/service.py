"""The D-Bus service: method calls handled at the message level.

dbus-fast's ``@method()`` handlers never see the sender, and every wqd decision
depends on who the sender is, so calls on wqd's objects are taken in a message
handler: identity first (cached per unique name), then the hub and policy
(async), then the reply. Introspection is served from the shipped XML.

Every method call that reaches wqd is answered here, on any path, no-reply
calls included: none is left to dbus-fast's default handlers (which log a
traceback for what they cannot answer). Objects are addressed by canonical
paths only (``.../subscription/1``, never ``/0001``); a call without an
interface is looked up across the object's interfaces, as the D-Bus
specification says (two candidates would be an error, naming the interface
fixes it). Error texts are bounded (``MAX_ERROR_TEXT``) and echo at most
``ECHO`` characters of anything the caller sent. A peer's bad calls (unknown
objects, members, signatures) are logged once, and their count when it leaves.
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


MAX_ERROR_TEXT = 300  # bytes of UTF-8 in an error's text at most
ECHO = 64  # characters of a caller's string an error text may repeat
BAD_CALL_PEERS = 1024  # peers whose bad calls are counted one by one; beyond, together
# What each interface answers, by member: the in-signature (checked by the handlers).
METHODS = {
    names.INTROSPECTABLE_INTERFACE: {"Introspect": ""},
    names.PEER_INTERFACE: {"Ping": "", "GetMachineId": ""},
    names.PROPERTIES_INTERFACE: {"Get": "ss", "GetAll": "s", "Set": "ssv"},
    names.MANAGER_INTERFACE: {"Watch": "ssa{sv}", "ListSubscriptions": ""},
    names.SUBSCRIPTION_INTERFACE: {"Close": ""},
}
_COMMON = (names.INTROSPECTABLE_INTERFACE, names.PEER_INTERFACE)
NODE_INTERFACES = {  # the interfaces of each kind of object
    "tree": _COMMON,  # /, /io, /io/wqd, .../subscription: children only
    "manager": _COMMON + (names.PROPERTIES_INTERFACE, names.MANAGER_INTERFACE),
    "subscription": _COMMON + (names.PROPERTIES_INTERFACE, names.SUBSCRIPTION_INTERFACE),
}
UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"
UNKNOWN_INTERFACE = "org.freedesktop.DBus.Error.UnknownInterface"


def echo(text) -> str:
    """A caller's string as an error text may name it: at most ECHO characters."""
    text = str(text)
    return text if len(text) <= ECHO else text[:ECHO] + "..."


def bounded(text: str) -> str:
    """*text* cut to MAX_ERROR_TEXT bytes of UTF-8 (whole characters)."""
    data = text.encode("utf-8", "replace")
    if len(data) <= MAX_ERROR_TEXT:
        return text
    return data[:MAX_ERROR_TEXT - 3].decode("utf-8", "ignore") + "..."


def machine_id() -> str:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path) as f:
                value = f.read(64).strip()
        except OSError:
            continue
        if len(value) == 32:
            return value
    raise errors.NotSupported("this machine has no machine id")


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
        self._bad_calls: dict[str, int] = {}  # peer -> bad calls so far (dropped when it leaves)
        self._bad_untracked = 0  # bad calls of peers beyond BAD_CALL_PEERS

    async def start(self) -> None:
        self.bus.add_message_handler(self._on_message)
        await self.peers.start()

    def _peer_gone(self, name: str) -> None:
        # after the calls it sent before leaving have been looked at (their tasks' first steps)
        asyncio.get_running_loop().call_soon(self._forget_bad_calls, name)
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
        # Every call is wqd's to answer, whatever its path or interface.
        task = asyncio.ensure_future(self._call(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _call(self, msg: Message) -> None:
        try:
            reply = await self._dispatch(msg)
        except CallError as exc:
            self._bad_call(msg, exc.name)
            reply = Message.new_error(msg, exc.name, bounded(exc.text))
        except errors.WqdError as exc:
            name = names.ERROR_PREFIX + exc.dbus_suffix
            if name in (names.INVALID_ARGUMENT, names.NO_SUCH_OBJECT):  # malformed, or naming nothing
                self._bad_call(msg, name)
            reply = Message.new_error(msg, name, bounded(self._unechoed(msg, str(exc))))
        except Exception:
            log.exception("unexpected error in %s.%s from %s", echo(msg.interface), echo(msg.member), msg.sender)
            reply = Message.new_error(msg, names.FAILED, "internal error")
        if msg.flags & 0x1:  # NO_REPLY_EXPECTED
            return
        try:
            self.bus.send(reply)
        except Exception:
            log.exception("sending a reply to %s failed", msg.sender)

    @staticmethod
    def _unechoed(msg: Message, text: str) -> str:
        """*text* with any long string argument of *msg* it repeats cut to ``echo`` length."""
        body = msg.body if isinstance(msg.body, list) else []
        for arg in body:
            if isinstance(arg, str) and len(arg) > ECHO and len(text) > ECHO:
                for form in (repr(arg), arg):
                    text = text.replace(form, repr(echo(arg)) if form is not arg else echo(arg))
        return text

    def _forget_bad_calls(self, name: str) -> None:
        bad = self._bad_calls.pop(name, 0)
        if bad > 1:
            log.info("%s left after %d bad calls", name, bad)

    def _bad_call(self, msg: Message, error: str) -> None:
        """Log a peer's first bad call; count the rest (logged when it leaves)."""
        sender = msg.sender or "?"
        n = self._bad_calls.get(sender)
        if n is not None:
            self._bad_calls[sender] = n + 1
            return
        if len(self._bad_calls) >= BAD_CALL_PEERS:
            self._bad_untracked += 1
            if self._bad_untracked & (self._bad_untracked - 1) == 0:
                log.info("%d bad calls from peers beyond the first %d that made any", self._bad_untracked,
                         BAD_CALL_PEERS)
            return
        self._bad_calls[sender] = 1
        log.info("%s: %s%s.%s(%s) on %s answered %s; its further bad calls are counted",
                 sender, "no-reply call " if msg.flags & 0x1 else "", echo(msg.interface or ""), echo(msg.member),
                 echo(msg.signature), echo(msg.path), error)

    @staticmethod
    def _node(path: str) -> str | None:
        if path in ("/", "/io", "/io/wqd", names.SUBSCRIPTION_PREFIX.rstrip("/")):
            return "tree"
        if path == names.MANAGER_PATH:
            return "manager"
        if path.startswith(names.SUBSCRIPTION_PREFIX):
            return "subscription"  # the number is checked (canonical, existing, owned) by the handler
        return None

    @staticmethod
    def _resolve(node: str | None, iface: str | None, member: str) -> str:
        """The interface a call is for (D-Bus specification, "Message Format": without an
        interface the member is looked up across the object's interfaces)."""
        ifaces = NODE_INTERFACES[node] if node is not None else (names.PEER_INTERFACE,)
        if iface is None:
            found = [i for i in ifaces if member in METHODS[i]]
            if len(found) == 1:
                return found[0]
            if found:
                raise CallError(UNKNOWN_METHOD, f"{echo(member)} is ambiguous here: name its interface")
            if node is None:
                raise CallError(UNKNOWN_OBJECT, "no such object")
            raise CallError(UNKNOWN_METHOD, f"no method {echo(member)}")
        if iface not in ifaces:
            if node is None:
                raise CallError(UNKNOWN_OBJECT, "no such object")
            raise CallError(UNKNOWN_INTERFACE, f"no interface {echo(iface)}")
        if member not in METHODS[iface]:
            raise CallError(UNKNOWN_METHOD, f"no method {echo(member)}")
        return iface

    async def _dispatch(self, msg: Message) -> Message:
        path, member = msg.path or "", msg.member or ""
        node = self._node(path)
        iface = self._resolve(node, msg.interface, member)
        if iface == names.PEER_INTERFACE:  # the connection's, on any path
            if msg.signature:
                raise CallError("org.freedesktop.DBus.Error.InvalidArgs", f"{member} takes no arguments")
            if member == "Ping":
                return Message.new_method_return(msg)
            return Message.new_method_return(msg, "s", [machine_id()])
        if iface == names.INTROSPECTABLE_INTERFACE:
            if msg.signature:
                raise CallError("org.freedesktop.DBus.Error.InvalidArgs", "Introspect takes no arguments")
            return Message.new_method_return(msg, "s", [await self._introspect(msg)])
        if node == "manager":
            return await self._manager(msg, iface, member)
        return await self._subscription(msg, iface, member)

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
            raise CallError(UNKNOWN_INTERFACE, f"no interface {echo(iface)}")
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
        raise CallError(UNKNOWN_METHOD, f"no method {echo(member)}")

    # -- subscriptions ------------------------------------------------------

    def _subscription_number(self, path: str) -> int:
        tail = path[len(names.SUBSCRIPTION_PREFIX):]
        if not (tail.isascii() and tail.isdigit()) or tail[0] == "0" or len(tail) > 19:  # canonical only
            raise errors.NoSuchObject("no such subscription")
        return int(tail)

    async def _subscription(self, msg: Message, iface: str | None, member: str) -> Message:
        number = self._subscription_number(msg.path)
        await self.peers.get(msg.sender)
        sub = self.hub.get(number, msg.sender)  # NoSuchObject / AccessDenied
        if iface == names.PROPERTIES_INTERFACE:
            self.hub.settle(sub)  # what its stalled uid's parked lane counted for it (Hub.settle)
            return self._properties(msg, names.SUBSCRIPTION_INTERFACE, lambda: {
                "Source": Variant("s", sub.source),
                "Target": Variant("s", sub.target.spec),
                "Delivered": Variant("t", sub.delivered),
                "Lost": Variant("t", sub.lost),
            })
        if iface not in (None, names.SUBSCRIPTION_INTERFACE):
            raise CallError(UNKNOWN_INTERFACE, f"no interface {echo(iface)}")
        if member == "Close":
            if msg.signature:
                raise _invalid("Close takes no arguments")
            self.hub.end(sub)
            return Message.new_method_return(msg)
        raise CallError(UNKNOWN_METHOD, f"no method {echo(member)}")

    def _properties(self, msg: Message, interface: str, values) -> Message:
        member = msg.member
        if member == "Get" and msg.signature == "ss":
            iface, prop = msg.body
            props = values() if iface in (interface, "") else {}
            if prop not in props:
                raise CallError("org.freedesktop.DBus.Error.UnknownProperty", f"no property {echo(prop)}")
            return Message.new_method_return(msg, "v", [props[prop]])
        if member == "GetAll" and msg.signature == "s":
            (iface,) = msg.body
            return Message.new_method_return(msg, "a{sv}", [values() if iface in (interface, "") else {}])
        if member == "Set" and msg.signature == "ssv":
            raise CallError("org.freedesktop.DBus.Error.PropertyReadOnly", "all properties are read-only")
        raise CallError("org.freedesktop.DBus.Error.InvalidArgs", f"bad call to Properties.{echo(member)}")

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
            raise CallError(UNKNOWN_OBJECT, "no such object")
        nodes = "".join(f'  <node name="{c}"/>\n' for c in children)
        return f"{DOCTYPE}<node>\n{body}{nodes}</node>\n"
