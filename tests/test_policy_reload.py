"""SIGHUP: configuration and rules re-read, bus and subscriptions kept, every
subscription re-checked; a revoked one ends with ``Removed("access revoked")``;
a bad file leaves the previous policy in force."""

from __future__ import annotations

import signal

import pytest

from policy_support import CommandPeer, NotifySocket, as_uid, policy_config, watch, world_keyring, write_rules
from support import SUB_IFACE, BusError, Client, keyctl

pytestmark = [pytest.mark.asyncio, pytest.mark.root, pytest.mark.bus]


@pytest.fixture
def notify(tmp_path):
    sock = NotifySocket(tmp_path)
    yield sock
    sock.close()


async def test_sighup_revokes_then_denies_and_a_bad_file_changes_nothing(tmp_path, system_bus, wqd_factory, notify):
    rules = tmp_path / "rules.d"
    write_rules(rules, "50-site.rules", "# nothing yet\n")
    with world_keyring("wqd-reload") as ring:
        wqd = await wqd_factory(system_bus, policy_config(rules, ("unix", "rules")), env=notify.env)
        await notify.next("READY")
        root = await Client.connect(wqd.address)
        peer = CommandPeer(system_bus.address, as_uid(1000))
        try:
            root_path = await root.watch("keys", str(ring))
            out = await peer.request("watch", source="keys", target=str(ring))
            assert out["ok"], out
            peer_path = out["result"][0]
            first = keyctl("add", "user", "before", "x", str(ring))
            await root.wait_signals(root_path, 1)
            got = await peer.request("signals", min=1, wait=10)
            assert [s[1:] for s in got["result"]] == [["KeyChanged", [ring, "linked", int(first)]]]

            # The administrator denies uid 1000; SIGHUP.
            write_rules(rules, "50-site.rules", "deny keys * uid:1000\n")
            wqd.proc.send_signal(signal.SIGHUP)
            assert (await notify.next("RELOADING"))["RELOADING"] == "1"
            status = await notify.next("READY")
            assert status["STATUS"] == "reloaded: 1 subscription(s) revoked"

            got = await peer.request("signals", min=2, wait=10)
            assert got["result"][1] == [peer_path, "Removed", ["access revoked"]]
            assert await watch(peer, "keys", str(ring)) == "AccessDenied"

            # Root's subscription lives on, on the same connection; uid 1000 gets nothing more.
            second = keyctl("add", "user", "after", "x", str(ring))
            sigs = await root.wait_signals(root_path, 2)
            assert sigs[1] == ("KeyChanged", [ring, "linked", int(second)])
            assert await root.get(root_path, SUB_IFACE, "Delivered") == 2

            # A bad file: the reload fails with FILE:LINE, the previous policy stays.
            write_rules(rules, "50-site.rules", "allow keys * uid:1000\nallow keys * nobody-at-all\n")
            wqd.proc.send_signal(signal.SIGHUP)
            status = await notify.next("READY")
            assert status["STATUS"].startswith(f"reload failed: {rules}/50-site.rules:2: bad subject"), status
            assert await watch(peer, "keys", str(ring)) == "AccessDenied"
            third = keyctl("add", "user", "third", "x", str(ring))
            sigs = await root.wait_signals(root_path, 3)
            assert sigs[2] == ("KeyChanged", [ring, "linked", int(third)])
            got = await peer.request("signals", wait=0.3)
            assert len(got["result"]) == 2  # nothing after Removed

            # A good file again: uid 1000 may watch once more.
            write_rules(rules, "50-site.rules", "allow keys * uid:1000\n")
            wqd.proc.send_signal(signal.SIGHUP)
            assert (await notify.next("READY"))["STATUS"] == "reloaded: 0 subscription(s) revoked"
            assert await watch(peer, "keys", str(ring)) == "A"
        finally:
            peer.close()
            root.close()
        assert wqd.proc.poll() is None
        assert "reload failed; the previous policy stays in force" in wqd.log_text()


async def test_sighup_switches_the_plugin_list(tmp_path, system_bus, wqd_factory, notify):
    """The plugin list itself is reloaded: adding a plugin that denies revokes."""
    rules = tmp_path / "rules.d"
    write_rules(rules, "10.rules", "deny keys * world\n")
    with world_keyring("wqd-reload-2") as ring:
        wqd = await wqd_factory(system_bus, policy_config(rules, ("unix",)), env=notify.env)
        await notify.next("READY")
        root = await Client.connect(wqd.address)
        try:
            path = await root.watch("keys", str(ring))
            (wqd.log.parent / "wqd.conf").write_text(policy_config(rules, ("unix", "rules")))
            wqd.proc.send_signal(signal.SIGHUP)
            assert (await notify.next("READY"))["STATUS"] == "reloaded: 1 subscription(s) revoked"
            sigs = await root.wait_signals(path, 1)
            assert sigs == [("Removed", ["access revoked"])]
        finally:
            root.close()


async def test_sighup_applies_limits_and_names_what_needs_a_restart(tmp_path, system_bus, wqd_factory, notify):
    """[daemon] limits take effect on SIGHUP (subscriptions over a lowered cap stay,
    new ones are refused); a changed source section is logged as needing a restart."""
    rules = tmp_path / "rules.d"
    write_rules(rules, "10.rules", "# none\n")
    with world_keyring("wqd-reload-3") as ring:
        wqd = await wqd_factory(system_bus, policy_config(rules, ("unix",)), env=notify.env)
        await notify.next("READY")
        root = await Client.connect(wqd.address)
        try:
            first = await root.watch("keys", str(ring))
            await root.watch("keys", "@u")
            (wqd.log.parent / "wqd.conf").write_text(
                policy_config(rules, ("unix",), "[daemon]\nsubscriptions_per_peer = 1\n")
                .replace("poll_interval = 0.05", "poll_interval = 2"))
            wqd.proc.send_signal(signal.SIGHUP)
            assert (await notify.next("READY"))["STATUS"] == "reloaded: 0 subscription(s) revoked"
            with pytest.raises(BusError) as err:
                await root.watch("keys", "@us")
            assert err.value.name == "io.wqd.WatchQueue1.Error.LimitsExceeded"
            assert await root.get(first, SUB_IFACE, "Source") == "keys"  # kept
            log = wqd.log_text()
            assert ("limits now: queue_length 1024, subscriptions_per_peer 1, subscriptions_per_uid 16384, "
                    "subscriptions_total 65536") in log
            assert "changed settings in [keys] take effect when wqd restarts" in log
        finally:
            root.close()
