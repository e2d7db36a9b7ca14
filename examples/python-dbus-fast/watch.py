#!/usr/bin/env python3
"""Watch a kernel key or keyring through wqd, with dbus-fast (asyncio).

    python3 watch.py [--address ADDRESS | --system] [--changes linked,unlinked] [TARGET]

TARGET is a key serial in decimal, "@u" (your user keyring), "@us" (your user
session keyring) or "@p" (your persistent keyring, the default). One line per
signal, in the order wqd sent them:

    subscribed /io/wqd/WatchQueue1/subscription/7
    KeyChanged 123456 linked 654321      (key, change, aux)
    Lost 17                              (17 events you will not get, here in the stream)
    Removed key removed                  (the subscription has ended; the program exits)

dbus-fast answers org.freedesktop.DBus.Peer.Ping by itself, from the same loop that
reads your signals: wqd uses those answers to know that you keep up (see
io.wqd.WatchQueue1(5), "Flow control").
"""

import argparse
import asyncio
import os
import sys

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

BUS_NAME = "io.wqd.WatchQueue1"
MANAGER = "/io/wqd/WatchQueue1"
MANAGER_IFACE = "io.wqd.WatchQueue1"
SUBSCRIPTION_IFACE = "io.wqd.Subscription1"


def show(*fields) -> None:
    print(*fields, flush=True)  # flush: the output is often a pipe


async def watch(args) -> int:
    if args.address:
        bus = MessageBus(bus_address=args.address)
    else:
        bus = MessageBus(bus_type=BusType.SYSTEM if args.system else BusType.SESSION)
    await bus.connect()
    done = asyncio.get_running_loop().create_future()

    def on_message(msg: Message):
        # wqd sends its signals unicast, to this connection only: no AddMatch is
        # needed. This connection has one subscription, so every Subscription1
        # signal is about it. (Checking msg.path against Watch's answer instead
        # would race: a signal read in the same batch as the reply is handled
        # before the awaiting coroutine below resumes.)
        if msg.message_type != MessageType.SIGNAL or msg.interface != SUBSCRIPTION_IFACE:
            return None
        if msg.member == "KeyChanged":
            key, change, aux = msg.body
            show("KeyChanged", key, change, aux)
        elif msg.member == "Lost":
            show("Lost", msg.body[0])
        elif msg.member == "Removed":
            show("Removed", msg.body[0])
            if not done.done():
                done.set_result(0)
        return None

    bus.add_message_handler(on_message)  # before Watch: nothing is missed

    options = {"changes": Variant("as", args.changes.split(","))} if args.changes else {}
    reply = await bus.call(Message(destination=BUS_NAME, path=MANAGER, interface=MANAGER_IFACE,
                                   member="Watch", signature="ssa{sv}", body=["keys", args.target, options]))
    if reply.message_type == MessageType.ERROR:
        # e.g. io.wqd.WatchQueue1.Error.AccessDenied: a named error, with a short text
        print(f"Watch failed: {reply.error_name}: {reply.body[0] if reply.body else ''}", file=sys.stderr)
        bus.disconnect()
        return 1
    show("subscribed", reply.body[0])
    gone = asyncio.ensure_future(bus.wait_for_disconnect())  # wqd or the bus went away
    await asyncio.wait([done, gone], return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    bus.disconnect()
    return done.result() if done.done() else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", nargs="?", default="@p", help="key serial, @u, @us or @p (default)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--address", default="", help="a bus address (default: the session bus)")
    where.add_argument("--system", action="store_true", help="the system bus")
    parser.add_argument("--changes", default="", help="only these changes, comma-separated (e.g. linked,unlinked)")
    args = parser.parse_args()
    if not args.address and not args.system and not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        args.system = True  # no session bus here: wqd's own home is the system bus
    try:
        return asyncio.run(watch(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
