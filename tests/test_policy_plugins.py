"""A third-party plugin, installed only through its ``wqd.policy`` entry point, takes
effect; what its ``post`` redacts is what the client receives on the wire."""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest

from policy_support import CommandPeer, as_uid, world_keyring
from support import PYTHON, REPO, Client, keyctl

pytestmark = [pytest.mark.asyncio, pytest.mark.root, pytest.mark.bus]

PLUGIN_PATH = str(REPO / "tests" / "plugins")  # holds wqd_test_policy-0.1.dist-info/entry_points.txt
CONFIG = """
[keys]
backend = "proc-keys"
poll_interval = 0.05

[policy]
plugins = ["unix", "redact-aux"]

[policy.redact-aux]
redact_uids = [1000]
deny_targets = ["@us"]
drop_changes = ["unlinked"]
"""


def with_plugin_path() -> dict:
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": PLUGIN_PATH + (os.pathsep + path if path else "")}


async def test_entry_point_plugin_denies_and_redacts_on_the_wire(system_bus, wqd_factory):
    with world_keyring("wqd-plugin") as ring:
        wqd = await wqd_factory(system_bus, CONFIG, env=with_plugin_path())
        root = await Client.connect(wqd.address)
        peer = CommandPeer(system_bus.address, as_uid(1000))
        try:
            root_path = await root.watch("keys", str(ring))
            out = await peer.request("watch", source="keys", target=str(ring))
            assert out["ok"], out
            peer_path = out["result"][0]
            out = await peer.request("watch", source="keys", target="@us")
            assert out == {"ok": False, "error": "io.wqd.WatchQueue1.Error.AccessDenied",
                           "text": "redact-aux: target @us is off limits"}

            with world_keyring("wqd-plugin-holder") as holder:
                key = int(keyctl("add", "user", "k", "x", str(holder)))
                keyctl("link", str(key), str(ring))
                await root.wait_signals(root_path, 1)
                keyctl("unlink", str(key), str(ring))  # dropped for everyone by the plugin
                await asyncio.sleep(0.5)  # ten proc-keys polls: the unlink is seen on its own
                keyctl("link", str(key), str(ring))
                sigs = await root.wait_signals(root_path, 2)
            assert sigs == [("KeyChanged", [ring, "linked", key])] * 2  # root: aux intact
            got = await peer.request("signals", min=2, wait=10)
            assert got["result"] == [[peer_path, "KeyChanged", [ring, "linked", 0]]] * 2  # uid 1000: aux redacted
        finally:
            peer.close()
            root.close()
        assert "unlinked" not in [s[1][1] for s in root.signals[root_path]]


async def test_without_the_entry_point_the_plugin_is_unknown(tmp_path, system_bus):
    conf = tmp_path / "wqd.conf"
    conf.write_text(CONFIG)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([PYTHON, "-m", "wqd.daemon", "--address", system_bus.address, "--config", str(conf)],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert run.returncode == 2
    assert "no policy plugin named 'redact-aux' (entry-point group wqd.policy)" in run.stderr
    check = subprocess.run([PYTHON, "-m", "wqd.daemon", "--check-config", str(conf)],
                           capture_output=True, text=True, cwd=REPO, env={**env, **with_plugin_path()}, timeout=60)
    assert check.returncode == 0, check.stderr
