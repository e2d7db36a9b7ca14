#!/usr/bin/python3
"""Client-matrix member: GDBus from Python (PyGObject, Debian's python3-gi).

    /usr/bin/python3 gio_client.py --address ADDRESS TARGET

Subscribes with Gio.DBusConnection.signal_subscribe *before* calling Watch (so
nothing is missed), then calls Watch through a Gio.DBusProxy, and prints one line
per signal in the examples' format (see examples/README.md):
``subscribed PATH``, ``KeyChanged KEY CHANGE AUX``, ``Lost N``, ``Removed REASON``.
GDBus answers Peer.Ping on its worker thread.
"""

import argparse
import sys

import gi

gi.require_version("Gio", "2.0")
from gi.repository import Gio, GLib  # noqa: E402

BUS_NAME = "io.wqd.WatchQueue1"
SUBSCRIPTION_IFACE = "io.wqd.Subscription1"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("target")
    args = parser.parse_args()
    flags = Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION
    conn = Gio.DBusConnection.new_for_address_sync(args.address, flags, None, None)
    loop = GLib.MainLoop()
    status = [1]

    def on_signal(connection, sender, path, interface, member, params):
        if member == "KeyChanged":
            key, change, aux = params.unpack()
            print("KeyChanged", key, change, aux, flush=True)
        elif member == "Lost":
            print("Lost", params.unpack()[0], flush=True)
        elif member == "Removed":
            print("Removed", params.unpack()[0], flush=True)
            status[0] = 0
            loop.quit()

    # sender=None: wqd's signals are unicast to us; GDBus would otherwise compare
    # the sender with the well-known name's owner, which it looks up itself.
    conn.signal_subscribe(None, SUBSCRIPTION_IFACE, None, None, None, Gio.DBusSignalFlags.NONE, on_signal)
    manager = Gio.DBusProxy.new_sync(conn, Gio.DBusProxyFlags.DO_NOT_LOAD_PROPERTIES, None, BUS_NAME,
                                     "/io/wqd/WatchQueue1", "io.wqd.WatchQueue1", None)
    try:
        (path,) = manager.call_sync("Watch", GLib.Variant("(ssa{sv})", ("keys", args.target, {})),
                                    Gio.DBusCallFlags.NONE, -1, None).unpack()
    except GLib.Error as exc:
        print(f"Watch failed: {Gio.DBusError.get_remote_error(exc)}: {exc.message}", file=sys.stderr)
        return 1
    print("subscribed", path, flush=True)
    conn.connect("closed", lambda *a: loop.quit())
    loop.run()
    return status[0]


if __name__ == "__main__":
    sys.exit(main())
