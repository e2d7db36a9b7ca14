"""Sandboxed apps: identified at first contact, denied unless a rule allows their app id.

Flatpak: a real process whose root (a private mount namespace, chroot into a tmpfs
with the host's /usr, /etc, ... bound in) holds a ``.flatpak-info``. Snap: a real
process in a ``snap.NAME.APP-ID.scope`` cgroup but without the AppArmor label
(this machine has no AppArmor), so sandboxed and unconfirmed.
"""

from __future__ import annotations

import os
import signal
import uuid

import pytest

from policy_support import APP, FLATPAK_ROOT, CommandPeer, NotifySocket, as_uid, policy_config, require_root, watch, \
    world_keyring, write_rules
from support import keyctl

pytestmark = [pytest.mark.asyncio, pytest.mark.root, pytest.mark.bus]


@pytest.fixture
def notify(tmp_path):
    sock = NotifySocket(tmp_path)
    yield sock
    sock.close()


def flatpak_peer(address: str, root_dir: str, uid: int) -> CommandPeer:
    return CommandPeer(address, ["unshare", "-m", "sh", "-c", FLATPAK_ROOT, "sh", root_dir, APP, *as_uid(uid)])


async def test_flatpak_app_is_identified_and_denied_unless_allowed(tmp_path, system_bus, wqd_factory, notify):
    require_root()
    rules = tmp_path / "rules.d"
    write_rules(rules, "10.rules", "allow keys * world\n")  # 'world' does not open the door to apps
    root_dir = tmp_path / "flatpak-root"
    root_dir.mkdir()
    with world_keyring("wqd-sandbox") as ring:
        wqd = await wqd_factory(system_bus, policy_config(rules, ("unix", "sandbox", "rules")), env=notify.env)
        await notify.next("READY")
        app = flatpak_peer(system_bus.address, str(root_dir), 1000)
        plain = CommandPeer(system_bus.address, as_uid(1000))
        try:
            out = await app.request("watch", source="keys", target=str(ring))
            assert out == {"ok": False, "error": "io.wqd.WatchQueue1.Error.AccessDenied",
                           "text": f"flatpak app {APP} may not watch keys"}
            assert await watch(plain, "keys", str(ring)) == "A"  # the same uid, not sandboxed

            # The administrator allows the app, for this keyring only.
            write_rules(rules, "05-apps.rules", f"allow keys {ring} app:{APP}\ndeny keys * app:{APP}\n")
            wqd.proc.send_signal(signal.SIGHUP)
            assert (await notify.next("READY"))["STATUS"].startswith("reloaded")
            out = await app.request("watch", source="keys", target=str(ring))
            assert out["ok"], out
            path = out["result"][0]
            assert await watch(app, "keys", "@u") == "AccessDenied"  # only what the rule names
            key = keyctl("add", "user", "for-the-app", "x", str(ring))
            got = await app.request("signals", min=1, wait=10)
            assert got["result"] == [[path, "KeyChanged", [ring, "linked", int(key)]]]
        finally:
            app.close()
            plain.close()


async def test_cgroup_only_snap_is_sandboxed_but_never_allowed(tmp_path, system_bus, wqd_factory):
    require_root()
    unified = "/sys/fs/cgroup/unified" if os.path.isdir("/sys/fs/cgroup/unified") else "/sys/fs/cgroup"
    scope = os.path.join(unified, f"snap.wqdtest.wqdtest-{uuid.uuid4()}.scope")
    try:
        os.mkdir(scope)
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup here: {exc}")
    rules = tmp_path / "rules.d"
    write_rules(rules, "10.rules", "allow keys * app:wqdtest\nallow keys * world\n")
    peer = None
    try:
        with world_keyring("wqd-snap") as ring:
            await wqd_factory(system_bus, policy_config(rules, ("unix", "sandbox", "rules")))
            peer = CommandPeer(system_bus.address, as_uid(1000))
            assert (await peer.request("unique_name"))["ok"]  # connected, not yet known to wqd
            with open(os.path.join(scope, "cgroup.procs"), "w") as f:
                f.write(str(peer.proc.pid))
            out = await peer.request("watch", source="keys", target=str(ring))
            assert out == {"ok": False, "error": "io.wqd.WatchQueue1.Error.AccessDenied",
                           "text": "unidentified snap app"}
    finally:
        if peer is not None:
            with open(os.path.join(unified, "cgroup.procs"), "w") as f:
                f.write(str(peer.proc.pid))
            peer.close()
        os.rmdir(scope)
