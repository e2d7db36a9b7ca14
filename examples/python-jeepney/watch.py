#!/usr/bin/env python3
"""Watch a kernel key or keyring through wqd, with jeepney (blocking I/O).

    python3 watch.py [--address ADDRESS | --system] [--answer-ping] [TARGET]

TARGET is a key serial in decimal, "@u", "@us" or "@p" (the default). The output is
the same as the other examples':

    subscribed /io/wqd/WatchQueue1/subscription/7
    KeyChanged 123456 linked 654321      (key, change, aux)
    Lost 17                              (17 events you will not get, here in the stream)
    Removed key removed                  (the subscription has ended; the program exits)

jeepney, unlike GDBus, libdbus, sd-bus and dbus-fast, does not answer
org.freedesktop.DBus.Peer.Ping by itself. wqd sends its subscribers a Ping every
32 KiB of signals and reads the answer as "it has read everything before this";
a peer that never answers looks, to wqd, like one that stopped reading:

- with --answer-ping this client answers each Ping from its read loop, right
  where it is in the stream, so the answer means what wqd takes it to mean; it
  then gets every event it keeps up with, and a Lost signal for any it did not.
- without it, a quiet subscription works as well, but past 256 KiB of unanswered
  signals (~1,300 KeyChanged) wqd stops sending to it and, two seconds later,
  drops what it cannot hold, counted in the subscription's Lost property. How
  and when such a peer is resumed and told Lost is in io.wqd.WatchQueue1(5),
  "Flow control"; wqd 0.1.0 never resumed it: it stayed deaf, with no Lost.

Answer the Ping in any jeepney client that may receive many signals.
"""

import argparse
import os
import sys

from jeepney import DBusAddress, HeaderFields, MessageType, new_method_call, new_method_return
from jeepney.io.blocking import open_dbus_connection

BUS_NAME = "io.wqd.WatchQueue1"
MANAGER = DBusAddress("/io/wqd/WatchQueue1", bus_name=BUS_NAME, interface="io.wqd.WatchQueue1")
SUBSCRIPTION_IFACE = "io.wqd.Subscription1"
PEER_IFACE = "org.freedesktop.DBus.Peer"


def show(*fields) -> None:
    print(*fields, flush=True)  # flush: the output is often a pipe


def watch(conn, target: str, changes: list[str], answer_ping: bool) -> int:
    options = {"changes": ("as", changes)} if changes else {}
    call = new_method_call(MANAGER, "Watch", "ssa{sv}", ("keys", target, options))
    # One read loop for everything, instead of send_and_get_reply(), which drops
    # what comes before the reply: a signal or a Ping may well.
    serial = next(conn.outgoing_serial)
    conn.send(call, serial=serial)
    while True:
        msg = conn.receive()
        kind = msg.header.message_type
        fields = msg.header.fields
        if kind in (MessageType.method_return, MessageType.error) and fields.get(HeaderFields.reply_serial) == serial:
            if kind == MessageType.error:
                text = msg.body[0] if msg.body else ""
                print(f"Watch failed: {fields.get(HeaderFields.error_name)}: {text}", file=sys.stderr)
                return 1
            show("subscribed", msg.body[0])
        elif kind == MessageType.method_call:
            if answer_ping and fields.get(HeaderFields.interface) == PEER_IFACE and fields.get(HeaderFields.member) == "Ping":
                conn.send(new_method_return(msg))  # empty reply: "read up to here"
        elif kind == MessageType.signal and fields.get(HeaderFields.interface) == SUBSCRIPTION_IFACE:
            # Unicast to this connection, which has one subscription: no AddMatch,
            # and no need to compare the path.
            member = fields.get(HeaderFields.member)
            if member == "KeyChanged":
                key, change, aux = msg.body
                show("KeyChanged", key, change, aux)
            elif member == "Lost":
                show("Lost", msg.body[0])
            elif member == "Removed":
                show("Removed", msg.body[0])
                return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", nargs="?", default="@p", help="key serial, @u, @us or @p (default)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--address", default="", help="a bus address (default: the session bus)")
    where.add_argument("--system", action="store_true", help="the system bus")
    parser.add_argument("--changes", default="", help="only these changes, comma-separated (e.g. linked,unlinked)")
    parser.add_argument("--answer-ping", action="store_true",
                        help="answer org.freedesktop.DBus.Peer.Ping (recommended; see the module docstring)")
    args = parser.parse_args()
    if args.address:
        bus = args.address
    elif args.system or not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        bus = "SYSTEM"
    else:
        bus = "SESSION"
    try:
        with open_dbus_connection(bus) as conn:
            return watch(conn, args.target, [c for c in args.changes.split(",") if c], args.answer_ping)
    except KeyboardInterrupt:
        return 130
    except ConnectionError:  # the bus went away
        return 1


if __name__ == "__main__":
    sys.exit(main())
