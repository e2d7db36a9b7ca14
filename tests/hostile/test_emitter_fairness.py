"""Issue 11, fair dispatch in the emitter: a uid's thousands of subscriptions get
one uid's share of the bus, not thousands of shares.

The emitter used to take one signal per *subscription* in turn: a uid with one
subscription waited behind one signal of each of the attacker's thousands of
subscriptions with something queued. It now takes turns per uid, then per peer,
then per subscription.

Measured in order positions on the wire, not in time: a root monitor
(``BecomeMonitor``) sees every message wqd sends, in the order the bus got them.
uid 1000 holds ``SUBS`` ``devices "mem"`` subscriptions on several connections
and either reads (a legitimate heavy user: it answers wqd's Pings, so it is not
paused) or is stopped (SIGSTOP, after reading ``WARM`` events: each connection
gets its 256 KiB and is paused);
root writes ``change`` to ``/dev/null``'s uevent ``EVENTS`` times, which queues
``SUBS`` x ``EVENTS`` signals for it. While those are being sent, uid 1001 makes
one ``devices "mem"`` Watch with ``"initial"``: its snapshot is queued when the
Watch is decided, and the Watch's reply is written right after. The number of
signals wqd puts on the wire between that reply and the snapshot's first signal
is how long 1001's event waited: at most one signal of each other uid with
something queued (here one) under the new emitter, about one per attacker
subscription with something queued (up to ``SUBS``) under the old one.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from support import PYTHON, ForeignClient, call, start_bus
from udev import NULL_DEVPATH, trigger

pytestmark = [pytest.mark.asyncio, pytest.mark.root, pytest.mark.bus]

SUBS = 4096
CONNECTIONS = 16  # each peer is paused at 256 KiB unread: many connections keep the attacker's share flowing
EVENTS = 40  # change uevents: SUBS x EVENTS signals for the attacker, a backlog of several seconds
BOUND = 8  # signals another uid's one subscription may wait behind (one of the attacker's, and slack)
WARM = 4  # events a stopped attacker reads first, its budgets growing to 256 KiB
WINDOW = 64  # signals after the victim's first in which the attacker's must still be flowing
CONFIG = f"""
[daemon]
subscriptions_per_uid = {SUBS}
[devices]
backend = "uevent"
"""

MONITOR_POLICY = """
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
"""

# As the attacker: SUBS Watches over CONNECTIONS connections, then read everything until stdin closes.
ATTACKER = r"""
import asyncio, json, sys
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

address, total, connections = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

async def main():
    buses = [await MessageBus(bus_address=address).connect() for _ in range(connections)]
    made, errors = 0, {}

    async def worker(bus, n):
        nonlocal made
        for _ in range(n):
            reply = await bus.call(Message(
                destination="io.wqd.WatchQueue1", path="/io/wqd/WatchQueue1", interface="io.wqd.WatchQueue1",
                member="Watch", signature="ssa{sv}", body=["devices", "mem", {}]))
            if reply.message_type == MessageType.METHOD_RETURN:
                made += 1
            else:
                errors[reply.error_name] = errors.get(reply.error_name, 0) + 1

    await asyncio.gather(*(worker(b, total // connections) for b in buses))
    print(json.dumps({"made": made, "errors": errors}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # reading all along

asyncio.run(main())
"""


@pytest.fixture
def system_bus(tmp_path):
    """The tests' system-type bus with the shipped wqd policy, and root allowed to monitor."""
    if not shutil.which("dbus-daemon"):
        pytest.skip("dbus-daemon is not installed")
    if os.geteuid() != 0:
        pytest.skip("a system-type bus with clients as other uids needs root")
    bus = start_bus(tmp_path / "system-bus", "system", extra=MONITOR_POLICY)
    yield bus
    bus.stop()


class WireMonitor:
    """Root's BecomeMonitor on wqd's messages: (type, destination, path, first string of the body)."""

    def __init__(self) -> None:
        self.bus: MessageBus | None = None
        self.seen: list[tuple] = []
        self.signals = 0
        self.changed = asyncio.Event()

    async def start(self, address: str, sender: str) -> None:
        self.bus = await MessageBus(bus_address=address).connect()
        self.bus.add_message_handler(self._seen)
        reply = await call(self.bus, "org.freedesktop.DBus", "/org/freedesktop/DBus",
                           "org.freedesktop.DBus.Monitoring", "BecomeMonitor", "asu", [[f"sender='{sender}'"], 0])
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body

    def _seen(self, msg: Message):
        if msg.message_type == MessageType.SIGNAL:
            self.signals += 1
            self.seen.append((MessageType.SIGNAL, msg.destination, msg.path, None))
        elif msg.message_type == MessageType.METHOD_RETURN:
            first = msg.body[0] if msg.body and isinstance(msg.body[0], str) else None
            self.seen.append((MessageType.METHOD_RETURN, msg.destination, None, first))
        self.changed.set()
        return True if msg.message_type == MessageType.METHOD_CALL else None  # a monitor never answers

    async def wait(self, predicate, timeout: float) -> None:
        async def until():
            while not predicate():
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(until(), timeout)

    def close(self) -> None:
        if self.bus is not None:
            self.bus.disconnect()


@pytest.mark.parametrize("attacker_reads", [True, False], ids=["reading", "stopped"])
async def test_one_subscription_of_another_uid_waits_behind_one_signal_per_uid(system_bus, wqd_factory,
                                                                               attacker_reads):
    wqd = await wqd_factory(system_bus, CONFIG)
    root = await MessageBus(bus_address=system_bus.address).connect()
    owner = (await call(root, "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                        "GetNameOwner", "s", ["io.wqd.WatchQueue1"])).body[0]
    attacker = subprocess.Popen(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", PYTHON, "-c", ATTACKER,
                                 system_bus.address, str(SUBS), str(CONNECTIONS)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd="/")
    victim = ForeignClient(system_bus.address, 1001)
    monitor = WireMonitor()
    try:
        line = await asyncio.wait_for(asyncio.to_thread(attacker.stdout.readline), 120)
        assert line, attacker.stderr.read()
        assert json.loads(line) == {"made": SUBS, "errors": {}}, line
        await monitor.start(system_bus.address, owner)
        if not attacker_reads:
            # It reads a few events first (answering Pings: each connection's budget grows from
            # START_BUDGET to PEER_BUDGET, slow start), then SIGSTOP: it reads nothing, each
            # connection gets 256 KiB and is paused.
            for _ in range(WARM):
                trigger(NULL_DEVPATH, "change")
            await monitor.wait(lambda: monitor.signals >= WARM * SUBS, 60)
            await asyncio.sleep(1)
            os.kill(attacker.pid, signal.SIGSTOP)
        base = monitor.signals
        for _ in range(EVENTS):
            trigger(NULL_DEVPATH, "change")
        # Until the attacker's backlog is being sent (and is far from done).
        await monitor.wait(lambda: monitor.signals >= base + 2 * SUBS, 60)
        out = await victim.request("watch", source="devices", target="mem", options={"initial": ["b", True]})
        assert out["ok"], out
        path = out["result"][0]
        # Until the victim's first signal is on the wire, and as many signals after it as a round of the
        # old emitter would have sent before it (so that a failure shows the figure, not a timeout).
        reply_at = None

        def far_enough() -> bool:
            nonlocal reply_at
            if reply_at is None:
                reply_at = next((i for i, (kind, _d, _p, first) in enumerate(monitor.seen)
                                 if kind == MessageType.METHOD_RETURN and first == path), None)
            if reply_at is None:
                return False
            after = [p for kind, _d, p, _f in monitor.seen[reply_at + 1:] if kind == MessageType.SIGNAL]
            return (path in after and len(after) >= after.index(path) + WINDOW) or len(after) > 2 * SUBS
        await monitor.wait(far_enough, 120)
        after = [(d, p) for kind, d, p, _f in monitor.seen[reply_at + 1:] if kind == MessageType.SIGNAL]
        waited = next((i for i, (_d, p) in enumerate(after) if p == path), None)
        others = sum(1 for _d, p in after[:(waited or 0) + WINDOW] if p != path)
        print(f"\nuid 1000 ({'reading' if attacker_reads else 'stopped'}): {SUBS} subscriptions on "
              f"{CONNECTIONS} connections, {EVENTS} events; "
              f"uid 1001's snapshot went out after {waited} signals of others, then {others - waited} of "
              f"the {WINDOW} after it were the attacker's "
              f"({monitor.signals} signals seen in all)", file=sys.stderr)
        assert waited is not None and waited <= BOUND, waited
        # The attacker's signals were still flowing around it (taking turns with the victim's snapshot):
        # the bound was measured under load.
        assert others >= BOUND, others
        assert wqd.proc.poll() is None
    finally:
        if not attacker_reads:
            os.kill(attacker.pid, signal.SIGCONT)
        monitor.close()
        victim.close()
        attacker.kill()
        attacker.wait()
        for f in (attacker.stdin, attacker.stdout, attacker.stderr):
            f.close()
        root.disconnect()
