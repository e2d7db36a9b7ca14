"""The baseline sender: a plain dbus-fast connection sending unicast signals.

``python -m bench.raw_emitter ADDRESS``. Prints ``{"name": unique name}`` when
connected, then for each JSON line ``{"dests": [[name, path], ...], "count": n}``
on stdin sends *n* rounds of one ``KeyChanged(u, s, u)`` to every destination
(the same member, interface, paths and body shape wqd sends) and prints
``{"sent": total, "seconds": elapsed}`` once every message is in the socket.

Flow control is the least a dbus-fast sender needs to survive a burst: stock
dbus-fast drops the connection when the socket returns ``EAGAIN``, so this sender
waits for its oldest in-flight message once ``WINDOW`` are outstanding, and
before that for the socket to drain whenever its kernel buffer is nearly full.
Nothing else sits between the loop and ``bus.send``.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import socket
import struct
import sys
import termios
import time
from collections import deque

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

INTERFACE = "io.wqd.Subscription1"
WINDOW = 64  # messages in flight, like wqd's emitter high-water mark


def unsent_bytes(fd: int) -> int:
    """Bytes the peer has not consumed yet (SIOCOUTQ == TIOCOUTQ, include/uapi/linux/sockios.h)."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]


async def send_rounds(bus: MessageBus, dests: list[list[str]], count: int) -> int:
    inflight: deque = deque()
    sent = 0
    fd = bus._fd
    sndbuf = bus._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    for i in range(count):
        for name, path in dests:
            msg = Message(message_type=MessageType.SIGNAL, destination=name, path=path, interface=INTERFACE,
                          member="KeyChanged", signature="usu", body=[424242, "linked", i + 1])
            inflight.append(bus.send(msg))
            sent += 1
            if len(inflight) >= WINDOW:
                await inflight.popleft()
                if not sent % WINDOW and unsent_bytes(fd) > sndbuf // 2:
                    while inflight:
                        await inflight.popleft()
                    while unsent_bytes(fd) > sndbuf // 4:
                        await asyncio.sleep(0.0002)
    while inflight:
        await inflight.popleft()
    return sent


async def main(address: str) -> None:
    bus = await MessageBus(bus_address=address).connect()
    print(json.dumps({"name": bus.unique_name}), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        job = json.loads(line)
        t0 = time.perf_counter()
        sent = await send_rounds(bus, job["dests"], job["count"])
        print(json.dumps({"sent": sent, "seconds": time.perf_counter() - t0}), flush=True)
    bus.disconnect()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
