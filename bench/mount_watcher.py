"""A subscriber to ``mounts ""`` in its own process (p7's victim, or its attacker).

``python bench/mount_watcher.py ADDRESS [COUNT] [CONNECTIONS]``: connects
*CONNECTIONS* times (default 1) and makes *COUNT* (default 1) ``Watch("mounts", "")``
calls spread over them, a few in flight on each, until one is refused; prints
``{"name": ..., "made": n, "errors": {name: count}}``. Then per JSON line on stdin:
``{"op": "dump"}`` answers ``{"events": [[t, action, mount_point], ...], "lost": n}``
(what arrived since the last dump; *t* is ``time.perf_counter()`` at arrival,
CLOCK_MONOTONIC, comparable across processes). Run it as another uid in a mount
namespace with ``nsenter ... setpriv ...`` (see ``bench.p7_hostile``). A stopped
(SIGSTOP) watcher is the attacker that never reads.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

BUS_NAME = "io.wqd.WatchQueue1"
MANAGER = "/io/wqd/WatchQueue1"
IN_FLIGHT = 16


async def main(address: str, count: int, connections: int) -> None:
    buses = [await MessageBus(bus_address=address).connect() for _ in range(connections)]
    events: list = []
    lost = 0

    def on_message(msg: Message):
        nonlocal lost
        if msg.message_type != MessageType.SIGNAL:
            return None
        if msg.member == "MountChanged":
            events.append([time.perf_counter(), msg.body[0], msg.body[2]])
        elif msg.member == "Lost":
            lost += msg.body[0]
        return None

    for bus in buses:
        bus.add_message_handler(on_message)
    made, errors, issued, refused = 0, {}, 0, False

    async def worker(bus: MessageBus) -> None:
        nonlocal made, issued, refused
        while issued < count and not refused:
            issued += 1
            reply = await bus.call(Message(destination=BUS_NAME, path=MANAGER, interface=BUS_NAME, member="Watch",
                                           signature="ssa{sv}", body=["mounts", "", {}]))
            if reply.message_type == MessageType.METHOD_RETURN:
                made += 1
            else:
                errors[reply.error_name] = errors.get(reply.error_name, 0) + 1
                refused = True

    await asyncio.gather(*(worker(b) for b in buses for _ in range(min(IN_FLIGHT, count))))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"name": buses[0].unique_name, "made": made, "errors": errors}), flush=True)
    while line := await reader.readline():
        job = json.loads(line)
        if job["op"] == "dump":
            out, events[:] = list(events), []
            print(json.dumps({"events": out, "lost": lost}), flush=True)
            lost = 0
    for bus in buses:
        bus.disconnect()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1,
                     int(sys.argv[3]) if len(sys.argv) > 3 else 1))
