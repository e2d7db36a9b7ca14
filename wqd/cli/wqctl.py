"""wqctl: inspect wqd and watch kernel notifications from the command line.

    wqctl [--system | --session | --address ADDR] status
    wqctl [...] watch SOURCE [TARGET] [--changes a,b] [--actions a,b]
                [--properties A,B] [--initial] [--json] [--count N]

``watch`` prints one line per signal (``--json``: one JSON object per line) and
closes the subscription on Ctrl-C. When wqd restarts, it says so (events may have
been missed; ``--json``: a ``Restarted`` record too), subscribes again and goes on
(wqd/cli/follow.py). Exit status: 0 on success or Ctrl-C, 1 when the daemon
refuses (the error name is printed), also on re-subscribing, or does not come
back within ``--restart-wait``, or the bus connection is lost, 2 on usage errors,
3 when the subscription was ended by the daemon (``Removed``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import xml.etree.ElementTree as ET

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from wqd.bus import connection as bus_connection
from wqd.bus import names
from wqd.bus.reach import DEFAULT_TIMEOUT, BusUnreachable, describe, reach, seconds
from wqd.cli.follow import RETURN_WAIT, FollowError, Follower, Restarted


class CliError(Exception):
    def __init__(self, text: str, code: int = 1) -> None:
        super().__init__(text)
        self.code = code


def signal_args() -> dict[str, list[str]]:
    """Signal name -> argument names, from the shipped interface XML."""
    root = ET.fromstring(names.INTERFACE_XML.read_text())
    out = {}
    for sig in root.iter("signal"):
        out[sig.get("name")] = [a.get("name") for a in sig.findall("arg")]
    return out


async def connect(args) -> MessageBus:
    if not (args.address or args.system or os.environ.get("DBUS_SESSION_BUS_ADDRESS")):
        raise CliError("no session bus (DBUS_SESSION_BUS_ADDRESS is unset): use --system or --address", 2)

    async def connecting() -> MessageBus:  # dbus-fast < 5 connects the socket in MessageBus() already
        # wqd's connection, for its writer: it marshals what wqctl sends itself
        # (dbus-fast < 2.11.1 miscounts non-ASCII strings, and the bus then drops
        # the connection: `wqctl watch mounts /media/ü` on Debian 12).
        return await bus_connection.connect(args.address, args.system)

    try:
        return await reach(connecting, describe(args.address, args.system), args.timeout)
    except BusUnreachable as exc:
        raise CliError(str(exc)) from None


async def call(bus, path, iface, member, signature="", body=None) -> list:
    return (await call_message(bus, path, iface, member, signature, body)).body


async def call_message(bus, path, iface, member, signature="", body=None, destination=names.BUS_NAME) -> Message:
    """The reply (its sender: the unique name that answered), or ``CliError`` naming the error."""
    reply = await bus.call(Message(destination=destination, path=path, interface=iface, member=member,
                                   signature=signature, body=body or []))
    if reply.message_type == MessageType.ERROR:
        text = reply.body[0] if reply.body else ""
        name = reply.error_name.removeprefix(names.ERROR_PREFIX)
        if reply.error_name == "org.freedesktop.DBus.Error.ServiceUnknown":
            text = "wqd is not running on this bus (io.wqd.WatchQueue1 has no owner)"
        raise CliError(f"{name}: {text}")
    return reply


async def status(bus, args) -> int:
    props = (await call(bus, names.MANAGER_PATH, names.PROPERTIES_INTERFACE, "GetAll", "s",
                        [names.MANAGER_INTERFACE]))[0]
    version = props["Version"].value
    sources = props["Sources"].value
    if args.json:
        print(json.dumps({"version": version, "sources": sources}))
        return 0
    print(f"wqd API version {version}")
    width = max(map(len, sources), default=0)
    for name in sorted(sources):
        print(f"  {name:<{width}}  {sources[name] or 'unavailable'}")
    return 0


def _list(value: str | None) -> list[str] | None:
    return None if value is None else [v for v in value.split(",") if v]


def plain(value):
    """A signal argument without dbus-fast's Variants (``a{sv}``: CredentialsChanged's
    info), for printing and JSON."""
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def format_line(member: str, arg_names: list[str], body: list) -> str:
    parts = []
    for name, value in zip(arg_names, map(plain, body)):
        if isinstance(value, dict):
            value = " ".join(f"{k}={v}" for k, v in sorted(value.items()))
            parts.append(f"{name}={{{value}}}")
        else:
            parts.append(f"{name}={value}")
    return f"{member} " + " ".join(parts)


async def watch(bus, args) -> int:
    options = {}
    for key, value in (("changes", _list(args.changes)), ("actions", _list(args.actions)),
                       ("properties", _list(args.properties))):
        if value is not None:
            options[key] = Variant("as", value)
    if args.initial:
        options["initial"] = Variant("b", True)
    arg_names = signal_args()
    follower = Follower(bus, call_message, CliError, args.source, args.target, options, args.restart_wait)
    path = await follower.start()
    if not args.json:
        print(f"# watching {args.source} {args.target!r} ({path}); Ctrl-C to stop", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    seen = 0
    code = 0
    stopper = asyncio.ensure_future(stop.wait())
    # a bus that goes away (or drops us) ends the watch with an error, not a silent wait
    gone = asyncio.ensure_future(_disconnected(bus))
    try:
        while args.count is None or seen < args.count:
            getter = asyncio.ensure_future(follower.next())
            done, _ = await asyncio.wait([getter, stopper, gone], return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                if gone in done:
                    raise CliError(f"lost the connection to the bus ({describe(args.address, args.system)})")
                break
            try:
                msg = getter.result()
            except FollowError as exc:
                raise CliError(str(exc)) from None
            if isinstance(msg, Restarted):
                path = restarted(msg, args.json)
                continue
            body = [plain(v) for v in msg.body]
            if args.json:
                record = {"signal": msg.member, "subscription": path}
                record.update(zip(arg_names.get(msg.member, []), body))
                print(json.dumps(record), flush=True)
            else:
                print(format_line(msg.member, arg_names.get(msg.member, []), body), flush=True)
            if msg.member == "Removed":
                code = 3
                break
            if msg.member not in ("Lost",):
                seen += 1
    finally:
        stopper.cancel()
        gone.cancel()
    if code != 3 and follower.path:  # None: stopped while wqd was away, nothing to close
        try:
            await call(bus, follower.path, names.SUBSCRIPTION_INTERFACE, "Close")
        except CliError:
            pass
    return code


async def _disconnected(bus) -> None:
    """Return when the bus connection ends, however it ended (its error is dbus-fast's
    own and says no more than "connection lost" does)."""
    try:
        await bus.wait_for_disconnect()
    except Exception:  # noqa: BLE001 - every way of ending is the same news here
        pass


def restarted(event: Restarted, as_json: bool) -> str:
    """Say that wqd restarted and that events may have been missed; the new path."""
    print(f"# wqd restarted: events may have been missed; watching again ({event.path})",
          file=sys.stderr, flush=True)
    if as_json:  # in-band too, for a consumer that reads only stdout (as it reads Lost)
        print(json.dumps({"signal": "Restarted", "subscription": event.path, "previous": event.previous}),
              flush=True)
    return event.path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="wqctl", description="Inspect wqd and watch kernel notifications.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--system", action="store_true", help="talk to wqd on the system bus")
    where.add_argument("--session", action="store_true", help="talk to wqd on the session bus (default)")
    where.add_argument("--address", metavar="ADDRESS", help="talk to wqd on the bus at ADDRESS")
    p.add_argument("--timeout", type=seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"give up (exit 1) when the bus is not reached within SECONDS (default {DEFAULT_TIMEOUT:g})")
    sub = p.add_subparsers(dest="command", required=True)
    st = sub.add_parser("status", help="version, sources and their backends")
    st.add_argument("--json", action="store_true")
    w = sub.add_parser("watch", help="print events of one subscription")
    w.add_argument("source", help="keys, devices, mounts, fs-errors or credentials")
    w.add_argument("target", nargs="?", default="",
                   help="key serial, @u, @us, @p; subsystem; path prefix; mount point; cache name")
    w.add_argument("--changes", help="keys: comma-separated changes to deliver")
    w.add_argument("--actions", help="devices, mounts: comma-separated actions (mounts: attached,detached,moved)")
    w.add_argument("--properties", help="devices: comma-separated properties wanted")
    w.add_argument("--initial", action="store_true", help="devices: first an 'add' for every existing match")
    w.add_argument("--json", action="store_true", help="one JSON object per line")
    w.add_argument("--count", type=int, metavar="N", help="exit after N events")
    w.add_argument("--restart-wait", type=seconds, default=RETURN_WAIT, metavar="SECONDS",
                   help="when wqd restarts, wait up to SECONDS for it to return, then subscribe again "
                        f"(default {RETURN_WAIT:g}); exit 1 when it does not")
    return p.parse_args(argv)


async def run(args) -> int:
    bus = await connect(args)
    try:
        if args.command == "status":
            return await status(bus, args)
        return await watch(bus, args)
    finally:
        bus.disconnect()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except CliError as exc:
        print(f"wqctl: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
