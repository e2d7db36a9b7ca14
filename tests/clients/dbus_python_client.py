#!/usr/bin/python3
"""Client-matrix member: libdbus, through dbus-python (Debian's python3-dbus).

    /usr/bin/python3 dbus_python_client.py --address ADDRESS TARGET

Receives with add_signal_receiver (which adds a match rule; wqd's signals are
unicast and would come without it, but dbus-python routes only what it matched),
calls Watch on a dbus.Interface, and prints the examples' line format (see
examples/README.md). libdbus answers Peer.Ping itself, in dispatch, on the main
loop that also delivers our signals.
"""

import argparse
import sys

import dbus
import dbus.mainloop.glib
from gi.repository import GLib

BUS_NAME = "io.wqd.WatchQueue1"
SUBSCRIPTION_IFACE = "io.wqd.Subscription1"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("target")
    args = parser.parse_args()
    dbus.mainloop.glib.DBusGMainLoop(set_as_default=True)
    bus = dbus.bus.BusConnection(args.address)
    loop = GLib.MainLoop()
    status = [1]

    def on_signal(*body, member=None):
        if member == "KeyChanged":
            key, change, aux = body
            print("KeyChanged", int(key), str(change), int(aux), flush=True)
        elif member == "Lost":
            print("Lost", int(body[0]), flush=True)
        elif member == "Removed":
            print("Removed", str(body[0]), flush=True)
            status[0] = 0
            loop.quit()

    # Before Watch, so that nothing is missed; by interface, as this connection
    # has one subscription.
    bus.add_signal_receiver(on_signal, dbus_interface=SUBSCRIPTION_IFACE, member_keyword="member")
    manager = dbus.Interface(bus.get_object(BUS_NAME, "/io/wqd/WatchQueue1", introspect=False),
                             "io.wqd.WatchQueue1")
    try:
        path = manager.Watch("keys", args.target, dbus.Dictionary({}, signature="sv"))
    except dbus.DBusException as exc:
        print(f"Watch failed: {exc.get_dbus_name()}: {exc.get_dbus_message()}", file=sys.stderr)
        return 1
    print("subscribed", str(path), flush=True)
    bus.call_on_disconnection(lambda conn: loop.quit())
    loop.run()
    return status[0]


if __name__ == "__main__":
    sys.exit(main())
