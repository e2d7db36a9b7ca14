"""A method caller in its own process: ``ListSubscriptions`` round trips (p6).

``python -m bench.caller ADDRESS``: connects, subscribes to one key (so the list
is not empty), prints ``{"name": ...}``. Then per JSON line on stdin:
``{"op": "calls", "count": n}`` makes *n* sequential calls;
``{"op": "until_stop"}`` calls until the line ``{"op": "stop"}`` arrives, back to
back, or with ``"every": s`` one call starting every *s* seconds (a fixed offered
load: two phases compared get the same number of samples, and the caller's own
load on the machine is the same in both).
Each answers ``{"calls": [[start, ms], ...]}``: when each call started
(``time.perf_counter()``) and its round trip in milliseconds. Being a separate process,
its timings are not held up by the process receiving the signal storm.
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


async def list_subscriptions(bus: MessageBus) -> tuple[float, float]:
    """(start, ms): *start* is ``time.perf_counter()``, CLOCK_MONOTONIC, comparable across processes."""
    t0 = time.perf_counter()
    reply = await bus.call(Message(destination=BUS_NAME, path=MANAGER, interface=BUS_NAME,
                                   member="ListSubscriptions"))
    ms = (time.perf_counter() - t0) * 1000
    if reply.message_type != MessageType.METHOD_RETURN or not reply.body[0]:
        raise RuntimeError(f"ListSubscriptions failed: {reply.body}")
    return t0, ms


async def main(address: str) -> None:
    bus = await MessageBus(bus_address=address).connect()
    reply = await bus.call(Message(destination=BUS_NAME, path=MANAGER, interface=BUS_NAME, member="Watch",
                                   signature="ssa{sv}", body=["keys", "1", {}]))
    if reply.message_type != MessageType.METHOD_RETURN:
        raise RuntimeError(f"Watch failed: {reply.body}")
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue = asyncio.Queue()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"name": bus.unique_name}), flush=True)

    async def read_lines() -> None:
        while line := await reader.readline():
            await lines.put(json.loads(line))
        await lines.put(None)

    feeder = asyncio.ensure_future(read_lines())
    while (job := await lines.get()) is not None:
        out = []
        if job["op"] == "calls":
            for _ in range(job["count"]):
                out.append(await list_subscriptions(bus))
        elif job["op"] == "until_stop":
            every = job.get("every")
            start = time.perf_counter()
            while lines.empty():
                out.append(await list_subscriptions(bus))
                if every:  # the next call at its slot (at once if this one took longer)
                    await asyncio.sleep(max(0.0, start + len(out) * every - time.perf_counter()))
            await lines.get()  # the stop line
        print(json.dumps({"calls": out}), flush=True)
    feeder.cancel()
    bus.disconnect()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
