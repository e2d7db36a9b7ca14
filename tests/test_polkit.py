"""The ``polkit`` plugin against the real polkitd on a private system bus.

polkitd (Debian's, /usr/lib/polkit-1/polkitd) runs in a private mount namespace
where /usr/share/polkit-1/actions holds the shipped ``io.wqd.policy`` and the
rules directories hold this test's JavaScript rule, so nothing on the host
changes. A monitor connection on the bus counts the ``CheckAuthorization`` calls
that really reach polkitd (cache), and SIGSTOP on polkitd makes a real
unanswered call (timeout).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal

import pytest
import pytest_asyncio
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from policy_support import CommandPeer, as_uid, policy_config, require_root, start_polkitd, watch, world_keyring, \
    write_rules
from support import call, start_bus

pytestmark = [pytest.mark.asyncio, pytest.mark.root, pytest.mark.bus]

BUS_EXTRA = """
  <policy user="polkitd"><allow own="org.freedesktop.PolicyKit1"/></policy>
  <policy user="root">
    <allow own="org.freedesktop.PolicyKit1"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  <policy context="default"><allow send_destination="org.freedesktop.PolicyKit1"/></policy>
"""


def polkit_config(rules, settings: str) -> str:
    return policy_config(rules, ("unix", "polkit", "rules"), extra=f"[policy.polkit]\n{settings}\n")


@pytest.fixture
def polkit_bus(tmp_path):
    require_root()
    if not shutil.which("dbus-daemon"):
        pytest.skip("dbus-daemon is not installed")
    bus = start_bus(tmp_path / "bus", "system", extra=BUS_EXTRA)
    yield bus
    bus.stop()


@pytest_asyncio.fixture
async def polkitd(tmp_path, polkit_bus):
    """The real polkitd, owning org.freedesktop.PolicyKit1 on the private bus."""
    proc, log = await start_polkitd(tmp_path, polkit_bus.address)
    yield proc
    os.kill(proc.pid, signal.SIGCONT)
    proc.terminate()
    proc.wait()
    log.close()


class Monitor:
    """A monitoring connection (BecomeMonitor) recording calls to polkitd."""

    def __init__(self) -> None:
        self.bus: MessageBus | None = None
        self.calls: list[tuple[str, list]] = []

    async def start(self, address: str) -> None:
        self.bus = await MessageBus(bus_address=address).connect()
        self.bus.add_message_handler(self._seen)
        reply = await call(self.bus, "org.freedesktop.DBus", "/org/freedesktop/DBus",
                           "org.freedesktop.DBus.Monitoring", "BecomeMonitor", "asu",
                           [["type='method_call',interface='org.freedesktop.PolicyKit1.Authority'"], 0])
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body

    def _seen(self, msg: Message):
        if msg.message_type == MessageType.METHOD_CALL:
            if msg.interface == "org.freedesktop.PolicyKit1.Authority":
                self.calls.append((msg.member, list(msg.body)))
            return True  # a monitor must never answer (the bus would drop it)
        return None

    def count(self, member: str) -> int:
        return sum(1 for m, _ in self.calls if m == member)

    async def settled(self, member: str, n: int, timeout: float = 5.0) -> int:
        """The count of *member* once it reached *n* (or the timeout passed), after a
        short quiet period so that a call too many would show."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.count(member) < n and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        return self.count(member)

    def close(self) -> None:
        if self.bus is not None:
            self.bus.disconnect()


@pytest_asyncio.fixture
async def monitor(polkit_bus):
    m = Monitor()
    await m.start(polkit_bus.address)
    yield m
    m.close()


async def test_real_polkitd_decides_and_answers_are_cached_per_peer(tmp_path, polkit_bus, polkitd, monitor,
                                                                    wqd_factory):
    rules = tmp_path / "rules.d"
    write_rules(rules, "10.rules", "# none\n")
    with world_keyring("wqd-polkit") as ring:
        await wqd_factory(polkit_bus, polkit_config(rules, "timeout = 5.0\ncache_ttl = 60"))
        u1000 = CommandPeer(polkit_bus.address, as_uid(1000))
        u1001 = CommandPeer(polkit_bus.address, as_uid(1001))
        root = CommandPeer(polkit_bus.address, as_uid(0))
        again = CommandPeer(polkit_bus.address, as_uid(1000))
        try:
            assert await watch(u1000, "keys", str(ring)) == "A"
            out = await u1001.request("watch", source="keys", target=str(ring))
            assert out["text"] == "not authorized by polkit (io.wqd.watch-keys)"
            assert await watch(root, "keys", str(ring)) == "A"  # polkitd authorizes uid 0
            assert await monitor.settled("CheckAuthorization", 3) == 3
            subject = monitor.calls[0][1][0]
            assert subject[0] == "system-bus-name" and subject[1]["name"].value.startswith(":")
            assert monitor.calls[0][1][1:4] == ["io.wqd.watch-keys", {}, 0]  # no user interaction

            # Cached per peer and action: the same peer asks again, polkitd is not asked.
            assert await watch(u1000, "keys", str(ring)) == "A"
            assert await watch(u1001, "keys", str(ring)) == "AccessDenied"
            assert await monitor.settled("CheckAuthorization", 3) == 3
            # Another connection of the same uid is another peer: asked afresh.
            assert await watch(again, "keys", str(ring)) == "A"
            assert await monitor.settled("CheckAuthorization", 4) == 4
            # Another action for a cached peer: asked.
            assert await watch(u1000, "mounts", "") == "AccessDenied"
            assert await monitor.settled("CheckAuthorization", 5) == 5
        finally:
            for p in (u1000, u1001, root, again):
                p.close()


async def test_a_stalled_polkitd_times_out_denies_and_is_cancelled(tmp_path, polkit_bus, polkitd, monitor,
                                                                   wqd_factory):
    rules = tmp_path / "rules.d"
    write_rules(rules, "10.rules", "# none\n")
    with world_keyring("wqd-polkit-timeout") as ring:
        wqd = await wqd_factory(polkit_bus, polkit_config(rules, "timeout = 0.5\ncache_ttl = 60"))
        peer = CommandPeer(polkit_bus.address, as_uid(1000))
        bystander = CommandPeer(polkit_bus.address, as_uid(1001))
        try:
            assert (await peer.request("unique_name"))["ok"]
            os.kill(polkitd.pid, signal.SIGSTOP)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            out = await peer.request("watch", source="keys", target=str(ring))
            elapsed = loop.time() - t0
            assert out["text"] == "polkit did not answer in time"
            assert 0.45 < elapsed < 3.0, elapsed
            # The daemon kept serving meanwhile: a call that needs no polkit is answered.
            out = await bystander.request("call", path="/io/wqd/WatchQueue1", iface="io.wqd.WatchQueue1",
                                          member="ListSubscriptions")
            assert out == {"ok": True, "result": [[]]}
            # polkitd was told to drop the check, with the id it was asked under.
            await monitor.settled("CancelCheckAuthorization", 1)
            cancels = [body for member, body in monitor.calls if member == "CancelCheckAuthorization"]
            checks = [body for member, body in monitor.calls if member == "CheckAuthorization"]
            assert [c[0] for c in cancels] == [checks[-1][4]]
            # A timeout is not cached: once polkitd runs again, the next Watch asks and is allowed.
            os.kill(polkitd.pid, signal.SIGCONT)
            assert await watch(peer, "keys", str(ring)) == "A"
        finally:
            os.kill(polkitd.pid, signal.SIGCONT)
            peer.close()
            bystander.close()
        assert "polkit did not answer within 0.5 s" in wqd.log_text()


@pytest.mark.parametrize("default, expected", [("deny", "AccessDenied"), ("abstain", "A"), ("allow", "A")])
async def test_without_polkitd_the_configured_default_applies(tmp_path, polkit_bus, wqd_factory, default, expected):
    rules = tmp_path / "rules.d"
    write_rules(rules, "10.rules", "# none\n")
    with world_keyring("wqd-nopolkit") as ring:
        wqd = await wqd_factory(polkit_bus, polkit_config(rules, f'default = "{default}"'))
        peer = CommandPeer(polkit_bus.address, as_uid(1000))
        try:
            out = await peer.request("watch", source="keys", target=str(ring))
            assert (out["error"].rsplit(".", 1)[-1] if not out["ok"] else "A") == expected
            if expected != "A":
                assert out["text"] == "polkit is not available"
        finally:
            peer.close()
        assert "polkit unavailable (org.freedesktop.DBus.Error.ServiceUnknown" in wqd.log_text()
