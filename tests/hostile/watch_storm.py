"""Run as the attacking uid: ``watch_storm.py ADDRESS SOURCE N PARALLEL TARGET...``.

Makes N ``Watch(SOURCE, TARGET, {})`` calls, PARALLEL in flight on one
connection, each granted one closed at once (``Close``); call *i* uses the
targets in turn, each formatted with ``{i}`` (``FILE:/d/c{i}``: a distinct
cache per call). Prints JSON: how many calls got each answer (``ok``, or the
error's name), and the first text of each error.
"""

import asyncio
import collections
import json
import sys

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus


async def main(address: str, source: str, n: int, parallel: int, targets: list[str]) -> dict:
    bus = await MessageBus(bus_address=address).connect()
    answers: collections.Counter = collections.Counter()
    texts: dict[str, str] = {}
    todo = iter(range(n))

    async def call(**kw) -> Message | None:
        try:
            return await asyncio.wait_for(bus.call(Message(destination="io.wqd.WatchQueue1", **kw)), 30)
        except asyncio.TimeoutError:
            answers["no answer in 30 s"] += 1
            return None

    async def worker() -> None:
        for i in todo:
            target = targets[i % len(targets)].format(i=i)
            reply = await call(path="/io/wqd/WatchQueue1", interface="io.wqd.WatchQueue1", member="Watch",
                               signature="ssa{sv}", body=[source, target, {}])
            if reply is None:
                continue
            if reply.message_type == MessageType.ERROR:
                answers[reply.error_name] += 1
                texts.setdefault(reply.error_name, reply.body[0] if reply.body else "")
                continue
            answers["ok"] += 1
            await call(path=reply.body[0], interface="io.wqd.Subscription1", member="Close")

    await asyncio.gather(*(worker() for _ in range(parallel)))
    bus.disconnect()
    return {"answers": answers, "texts": texts}


if __name__ == "__main__":
    address, source, n, parallel, *targets = sys.argv[1:]
    print(json.dumps(asyncio.run(main(address, source, int(n), int(parallel), targets))))
