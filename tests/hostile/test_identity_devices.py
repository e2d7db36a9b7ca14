"""Device redaction by meaning (issue 12, finding 3), with real uevents.

- A network interface named after a MAC address (``enx<12 hex>``, a veth made
  here: real ``add``/``remove`` uevents) reaches a peer of uid 1000 with its
  devpath's interface component replaced by a stable token and no ``INTERFACE``;
  root gets it as it is.
- A loop device of the test's own gets a synthetic ``change`` uevent carrying a
  name, a serial and an address-shaped value (``SYNTH_ARG_*``): withheld from a
  uid that may not open the node, given once the node's mode lets it read.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from support import ForeignClient  # noqa: E402
from udev import LoopDevice  # noqa: E402

pytestmark = [pytest.mark.asyncio, pytest.mark.root, pytest.mark.bus]

CONFIG = '[devices]\nbackend = "uevent"\n'


def sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


async def device_events(peer: ForeignClient, n: int, devpath_part: str, action: str, wait: float = 10) -> list:
    """DeviceChanged bodies of *action* whose devpath contains *devpath_part*, waiting up to
    *wait* s for *n*."""
    deadline = time.monotonic() + wait
    while True:
        got = (await peer.request("signals", min=0, wait=0))["result"]
        events = [body for _path, member, body in got
                  if member == "DeviceChanged" and body[0] == action and devpath_part in body[1]]
        remaining = deadline - time.monotonic()
        if len(events) >= n or remaining <= 0:
            return events
        await peer.request("signals", min=len(got) + 1, wait=remaining)  # until the next signal


async def root_events(client, path: str, devpath_part: str, n: int, action: str | None = None) -> list:
    def found():
        return [b for m, b in client.signals[path]
                if m == "DeviceChanged" and devpath_part in b[1] and action in (None, b[0])]
    await client.wait_for(lambda: len(found()) >= n, 10)
    return found()


async def test_mac_named_interface_is_redacted_in_devpath_and_properties(system_bus, wqd_factory, client_factory):
    mac_name = "enx" + secrets.token_hex(6)
    peer_name = "wqd" + secrets.token_hex(4)
    await wqd_factory(system_bus, CONFIG)
    root = await client_factory(system_bus.address)
    root_path = await root.watch("devices", "net")
    user = ForeignClient(system_bus.address, 1000)
    try:
        assert (await user.request("watch", source="devices", target="net"))["ok"]
        made = sh("ip", "link", "add", peer_name, "type", "veth", "peer", "name", mac_name)
        if made.returncode:
            pytest.skip(f"cannot make a veth pair here: {made.stderr.strip()}")
        try:
            (add,) = [b for b in await root_events(root, root_path, "/" + mac_name, 1) if b[0] == "add"]
        finally:
            sh("ip", "link", "del", peer_name)
        await root_events(root, root_path, "/" + mac_name, 2)  # and its remove
        assert add[1].endswith("/net/" + mac_name) and add[2]["INTERFACE"] == mac_name

        await device_events(user, 1, "/<redacted:", "remove")  # the user's copy of the remove has come
        seen = [b for _p, m, b in (await user.request("signals"))["result"] if m == "DeviceChanged"]
        mine = [b for b in seen if mac_name in b[1] or mac_name in repr(b[2])]
        assert mine == [], mine  # the address appears nowhere, in no property and no devpath
        redacted = [b for b in seen if b[1].startswith(add[1].rsplit("/", 1)[0] + "/<redacted:")]
        assert [b[0] for b in redacted] == ["add", "remove"], seen
        assert redacted[0][1] == redacted[1][1]  # one token for the device while wqd runs: add and remove pair
        assert "INTERFACE" not in redacted[0][2] and "IFINDEX" in redacted[0][2]
        # The other end of the pair has an ordinary name: nothing withheld.
        plain = [b for b in seen if b[1].endswith("/net/" + peer_name)]
        assert plain and plain[0][2]["INTERFACE"] == peer_name
    finally:
        user.close()


async def test_synthetic_identifying_properties_follow_node_permission(system_bus, wqd_factory, client_factory):
    await wqd_factory(system_bus, CONFIG)
    root = await client_factory(system_bus.address)
    root_path = await root.watch("devices", "block")
    user = ForeignClient(system_bus.address, 1000)
    try:
        assert (await user.request("watch", source="devices", target="block"))["ok"]
        with LoopDevice() as loop:
            node = loop.node
            os.chown(node, 0, 0)
            os.chmod(node, 0o600)
            args = "NAME=AlicesDisk SERIAL=X1234 PEER=wlx00c0ffee1234 COLOR=red"
            for mode in (0o600, 0o604):
                os.chmod(node, mode)
                with open(f"/sys{loop.devpath}/uevent", "w") as f:
                    f.write(f"change {uuid.uuid4()} {args}")
                n = 2 if mode == 0o604 else 1
                await root_events(root, root_path, loop.devpath, n, "change")
                changes = await device_events(user, n, loop.devpath, "change")
                assert len(changes) == n, changes
                props = changes[-1][2]
                assert props["SYNTH_ARG_COLOR"] == "red" and "SYNTH_UUID" in props
                hidden = {"SYNTH_ARG_NAME", "SYNTH_ARG_SERIAL", "SYNTH_ARG_PEER"}
                if mode == 0o600:
                    assert hidden.isdisjoint(props), props
                else:  # uid 1000 may read the node now: it may know what the node is
                    assert hidden <= props.keys() and props["SYNTH_ARG_PEER"] == "wlx00c0ffee1234"
        changes = [b for m, b in root.signals[root_path] if m == "DeviceChanged" and b[0] == "change"]
        assert all(changes[-1][2].get(k) for k in ("SYNTH_ARG_NAME", "SYNTH_ARG_SERIAL", "SYNTH_ARG_PEER"))
    finally:
        user.close()
