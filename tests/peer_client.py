"""A bus client for tests, run as another uid: JSON-line commands on stdin.

Commands (one JSON object a line), each answered with one line
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": NAME, "text": ...}``:

- ``{"op": "watch", "source", "target", "options": {name: [signature, value]}}``
- ``{"op": "call", "path", "iface", "member", "signature", "body"}``
- ``{"op": "get", "path", "iface", "prop"}``
- ``{"op": "match", "rule"}``: AddMatch (e.g. a catch-all eavesdropping rule)
- ``{"op": "signals", "min": N, "wait": S}``: signals received so far
  (waiting up to S seconds for at least N), as [path, member, body].
"""

import asyncio
import json
import sys

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.auth import UID_NOT_SPECIFIED, AuthExternal


def authenticator():
    """In a user namespace (``unshare -U``) our uid is not the one the bus sees:
    let the bus take it from the socket (EXTERNAL without a uid)."""
    with open("/proc/self/uid_map") as f:
        initial = f.read().split() == ["0", "0", "4294967295"]
    return None if initial else AuthExternal(UID_NOT_SPECIFIED)


def plain(value):
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value


async def main(address: str) -> None:
    bus = await MessageBus(bus_address=address, auth=authenticator()).connect()
    signals = []
    changed = asyncio.Event()

    def on_message(msg):
        if msg.message_type == MessageType.SIGNAL and msg.sender != "org.freedesktop.DBus":
            signals.append([msg.path, msg.member, plain(msg.body)])
            changed.set()

    bus.add_message_handler(on_message)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def call(dest, path, iface, member, signature="", body=None):
        reply = await bus.call(Message(destination=dest, path=path, interface=iface, member=member,
                                       signature=signature, body=body or []))
        if reply.message_type == MessageType.ERROR:
            return {"ok": False, "error": reply.error_name, "text": reply.body[0] if reply.body else ""}
        return {"ok": True, "result": plain(reply.body)}

    while line := await reader.readline():
        req = json.loads(line)
        op = req["op"]
        if op == "watch":
            options = {k: Variant(sig, val) for k, (sig, val) in req.get("options", {}).items()}
            out = await call("io.wqd.WatchQueue1", "/io/wqd/WatchQueue1", "io.wqd.WatchQueue1", "Watch",
                             "ssa{sv}", [req["source"], req["target"], options])
        elif op == "call":
            out = await call(req.get("dest", "io.wqd.WatchQueue1"), req["path"], req.get("iface"), req["member"],
                             req.get("signature", ""), req.get("body"))
        elif op == "get":
            out = await call("io.wqd.WatchQueue1", req["path"], "org.freedesktop.DBus.Properties", "Get", "ss",
                             [req["iface"], req["prop"]])
        elif op == "match":
            out = await call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch",
                             "s", [req["rule"]])
        elif op == "signals":
            deadline = loop.time() + req.get("wait", req.get("timeout", 0))
            while len(signals) < req.get("min", 0) and loop.time() < deadline:
                changed.clear()
                try:
                    await asyncio.wait_for(changed.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            out = {"ok": True, "result": list(signals)}
        elif op == "unique_name":
            out = {"ok": True, "result": bus.unique_name}
        else:
            out = {"ok": False, "error": "test.UnknownOp", "text": op}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    bus.disconnect()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
