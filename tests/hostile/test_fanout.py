"""Issue 11, finding 3: fan-out blocked the loop.

One uid with thousands of subscriptions on its own mount namespace, never reading,
made every mount event cost a policy judgement and a redacted copy per
subscription, synchronously: 2,048 subscriptions gave 4.9 s + 3.6 s without any
answer to root. Now an event is judged once per distinct decision, the fan-out is
served in bounded slices, round-robin between uids.

Here, in a private mount namespace of the test's own (so the only mounts are the
storm's): uid 1000 holds its cap of ``mounts ""`` subscriptions and is stopped
(SIGSTOP: it reads nothing), a storm of real tmpfs mounts runs, uid 1001's one
subscription gets every event (or an honest ``Lost``), and root's
``ListSubscriptions`` is answered within 1 s every time.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time

import pytest

from support import IFACE, MANAGER, PYTHON, REPO, SUB_IFACE, ForeignClient
from mounts_support import SKIP_FANOTIFY, STORM, make_private_tmpfs, remove_tmpfs, settled_tally

pytestmark = [pytest.mark.asyncio, pytest.mark.root, pytest.mark.bus,
              pytest.mark.skipif(bool(SKIP_FANOTIFY), reason=str(SKIP_FANOTIFY))]

CAP = 16384  # the attacker's cap: subscriptions_per_uid, as shipped
PAIRS = 1000  # mount + umount: 2,000 events (more than a queue holds), each to CAP + 1 subscriptions
CONFIG = f"""
[daemon]
subscriptions_per_uid = {CAP}
[mounts]
backend = "fanotify"
"""

# As the attacker: Watch until refused, CONNECTIONS connections, a few calls in flight each.
SUBSCRIBE = r"""
import asyncio, json, sys
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

address, source, target, total, connections = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])

async def main():
    buses = [await MessageBus(bus_address=address).connect() for _ in range(connections)]
    made, errors, issued = 0, {}, 0

    async def worker(bus):
        nonlocal made, issued
        while issued < total:
            issued += 1
            reply = await bus.call(Message(
                destination="io.wqd.WatchQueue1", path="/io/wqd/WatchQueue1", interface="io.wqd.WatchQueue1",
                member="Watch", signature="ssa{sv}", body=[source, target, {}]))
            if reply.message_type == MessageType.METHOD_RETURN:
                made += 1
            else:
                errors[reply.error_name] = errors.get(reply.error_name, 0) + 1

    await asyncio.gather(*(worker(b) for b in buses for _ in range(16)))
    print(json.dumps({"made": made, "errors": errors}), flush=True)
    sys.stdin.readline()  # hold everything (and, once stopped, read nothing) until told

asyncio.run(main())
"""


@pytest.fixture
def namespace():
    """A private mount namespace (held by a sleeping process) with a private tmpfs for the storm."""
    d = make_private_tmpfs("wqd-fanout-")
    os.mkdir(os.path.join(d, "s"))
    holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "600"])
    try:
        for _ in range(100):  # until unshare has exec'd sleep in the new namespace
            if os.readlink(f"/proc/{holder.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"):
                break
            time.sleep(0.02)
        yield holder.pid, d
    finally:
        holder.kill()
        holder.wait()
        remove_tmpfs(d)


def inside(holder: int, uid: int, *cmd: str) -> list[str]:
    return ["nsenter", f"--mount=/proc/{holder}/ns/mnt", "setpriv", f"--reuid={uid}", f"--regid={uid}",
            "--clear-groups", *cmd]


class InsidePeer(ForeignClient):
    """tests/peer_client.py as *uid*, in the namespace of *holder*."""

    def __init__(self, address: str, holder: int, uid: int) -> None:
        self.proc = subprocess.Popen(inside(holder, uid, PYTHON, str(REPO / "tests" / "peer_client.py"), address),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd="/")


async def root_calls(client, until: asyncio.Event) -> list[float]:
    """Round trips of root's ListSubscriptions, one every 50 ms, while *until* is unset, and
    at least 5 (the victim may have had everything within a few calls: the attacker is
    still stopped at its cap after)."""
    times = []
    while not until.is_set() or len(times) < 5:
        t = time.monotonic()
        reply = await asyncio.wait_for(client.call(MANAGER, IFACE, "ListSubscriptions"), 30)
        times.append(time.monotonic() - t)
        assert reply.body[0], reply.body
        await asyncio.sleep(0.05)
    return times


async def test_attacker_at_its_cap_never_reading_starves_no_one(system_bus, wqd_factory, client_factory, namespace):
    holder, storm_dir = namespace
    wqd = await wqd_factory(system_bus, CONFIG)
    root = await client_factory(system_bus.address)
    await root.watch("keys", "@u")  # so that root's list is not empty
    victim = InsidePeer(system_bus.address, holder, 1001)
    attacker = subprocess.Popen(inside(holder, 1000, PYTHON, "-c", SUBSCRIBE, system_bus.address, "mounts", "",
                                       str(CAP + 16), "5"),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = False
    try:
        out = await victim.request("watch", source="mounts", target="")
        assert out["ok"], out
        sub = out["result"][0]
        line = await asyncio.wait_for(asyncio.to_thread(attacker.stdout.readline), 90)
        assert line, attacker.stderr.read()
        made = json.loads(line)
        assert made == {"made": CAP, "errors": {"io.wqd.WatchQueue1.Error.LimitsExceeded": 16}}, made
        os.kill(attacker.pid, signal.SIGSTOP)  # it reads nothing from now on
        stopped = True
        done = asyncio.Event()
        probe = asyncio.ensure_future(root_calls(root, done))
        target = os.path.join(storm_dir, "s")
        started = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                "nsenter", f"--mount=/proc/{holder}/ns/mnt", PYTHON, "-c", STORM, target, str(PAIRS),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            stdout, stderr = await proc.communicate()
            assert proc.returncode == 0, stderr
            took = float(stdout)
            t = await settled_tally(victim, target, PAIRS, 120)  # every event in, or a Lost and nothing more coming
            delivered_in = time.monotonic() - started
        finally:
            done.set()
            calls = await probe
        delivered = await victim.request("get", path=sub, iface=SUB_IFACE, prop="Delivered")
        print(f"\n{CAP} stopped subscriptions of uid 1000; {PAIRS} pairs in {took:.2f} s; uid 1001 had all after "
              f"{delivered_in:.2f} s: attached {t['attached']} detached {t['detached']} lost {t['lost']} "
              f"(unresolved {t['unresolved']}); "
              f"root: {len(calls)} calls, worst {max(calls) * 1000:.0f} ms")
        assert t["strays"] == []  # (a mount gone before wqd asked for its point comes unresolved: still counted)
        assert t["attached"] + t["detached"] + t["lost"] >= 2 * PAIRS  # every event, or told it was lost
        assert t["lost"] == 0  # and in fact none was: the kernel held them while wqd caught up
        assert delivered["result"][0] == t["delivered"]
        assert len(calls) >= 5 and max(calls) < 1.0, calls
        assert wqd.proc.poll() is None
    finally:
        if stopped:
            os.kill(attacker.pid, signal.SIGCONT)
        attacker.kill()
        attacker.wait()
        for f in (attacker.stdin, attacker.stdout, attacker.stderr):
            f.close()
        victim.close()
