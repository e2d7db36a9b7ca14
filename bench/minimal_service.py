"""The floor for p5's start-up time: the least a dbus-fast service does to own a name.

``python -m bench.minimal_service ADDRESS``: import asyncio and dbus-fast, connect,
request ``io.wqd.WatchQueue1``, then wait until terminated. wqd's exec -> name
owned, minus this, is what wqd itself adds.
"""

import asyncio
import signal
import sys

from dbus_fast.aio import MessageBus


async def main(address: str) -> None:
    bus = await MessageBus(bus_address=address).connect()
    await bus.request_name("io.wqd.WatchQueue1")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    bus.disconnect()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
