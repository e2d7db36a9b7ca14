"""A bus connection that outlives the process that made it: ``outliving_peer.py SOCKET``.

Connects to the bus at the unix socket SOCKET, authenticates (EXTERNAL, the uid
taken from the socket) and says Hello, so the bus records this process's PID for
the connection; then forks a child that keeps the socket, and exits. The PID is
free for another process once the parent is reaped. Blocking I/O, no event loop:
nothing survives the fork but the socket.

stdout, one JSON line each: ``{"name", "pid"}`` after Hello (from the parent),
``{"child"}`` from the child, then one ``{"ok", "error", "text"}`` per request.
stdin (read by the child): one JSON line per Watch call, ``{"source", "target"}``.
"""

import json
import os
import socket
import sys

from dbus_fast import Message, MessageType
from dbus_fast._private.unmarshaller import Unmarshaller  # a blocking reader for a test helper

BUS = dict(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus", interface="org.freedesktop.DBus")


def say(**kw) -> None:
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def line(stream) -> bytes:
    out = b""
    while not out.endswith(b"\r\n"):
        out += stream.read(1)
    return out


def reply_to(stream, serial: int) -> Message:
    while True:
        msg = Unmarshaller(stream, negotiate_unix_fd=False).unmarshall()
        if msg is not None and msg.reply_serial == serial:
            return msg


def main(path: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    stream = sock.makefile("rb", buffering=0)
    sock.sendall(b"\0AUTH EXTERNAL\r\n")
    assert line(stream).startswith(b"DATA"), "bus refused EXTERNAL"
    sock.sendall(b"DATA\r\n")
    assert line(stream).startswith(b"OK"), "bus did not authenticate us"
    sock.sendall(b"BEGIN\r\n")
    sock.sendall(Message(member="Hello", serial=1, **BUS)._marshall(False))
    name = reply_to(stream, 1).body[0]
    say(name=name, pid=os.getpid())
    if os.fork():
        os._exit(0)  # the connector is gone; its child holds the connection
    say(child=os.getpid())
    serial = 1
    for request in sys.stdin:
        req = json.loads(request)
        serial += 1
        sock.sendall(Message(destination="io.wqd.WatchQueue1", path="/io/wqd/WatchQueue1",
                             interface="io.wqd.WatchQueue1", member="Watch", signature="ssa{sv}",
                             body=[req["source"], req["target"], {}], serial=serial)._marshall(False))
        reply = reply_to(stream, serial)
        if reply.message_type == MessageType.ERROR:
            say(ok=False, error=reply.error_name, text=reply.body[0] if reply.body else "")
        else:
            say(ok=True, result=reply.body)


if __name__ == "__main__":
    main(sys.argv[1])
