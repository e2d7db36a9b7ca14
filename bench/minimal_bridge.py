"""The floor for p3: the least a Python uevent -> D-Bus bridge does.

``python -m bench.minimal_bridge ADDRESS SOURCE DEVPATH``: a pyudev netlink
monitor (``SOURCE``: ``udev`` or ``kernel``) read on the event loop, and for each
uevent of ``DEVPATH`` one unicast signal carrying what ``DeviceChanged`` carries
(action, devpath, the properties), sent at once with dbus-fast to the
destination given on stdin (``{"dest": unique name}``). No parsing beyond
pyudev's, no routing, no policy, no queue: wqd's latency minus this one is what
wqd itself adds on top of any bridge.
"""

import asyncio
import json
import sys

import pyudev
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus


async def main(address: str, source: str, devpath: str) -> None:
    bus = await MessageBus(bus_address=address).connect()
    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=source)
    monitor.filter_by("block")
    monitor.start()
    loop = asyncio.get_running_loop()
    dest: list[str] = []

    def on_uevent() -> None:
        while (device := monitor.poll(0)) is not None:
            if dest and device.device_path == devpath:
                bus.send(Message(message_type=MessageType.SIGNAL, destination=dest[0], path="/bridge",
                                 interface="io.wqd.Bench", member="BridgeChanged", signature="ssa{ss}",
                                 body=[device.action or "", device.device_path, dict(device.properties)]))

    loop.add_reader(monitor.fileno(), on_uevent)
    print(json.dumps({"name": bus.unique_name}), flush=True)
    line = await loop.run_in_executor(None, sys.stdin.readline)
    dest.append(json.loads(line)["dest"])
    print(json.dumps({"ready": True}), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # until stdin closes
    loop.remove_reader(monitor.fileno())
    bus.disconnect()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
