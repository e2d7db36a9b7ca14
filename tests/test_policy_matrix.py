"""Sources x peers through the real daemon, the full built-in stack and a rules file.

Peers (real processes on a system-type bus): root, uid 1000, uid 1001, uid 1000
with a supplementary group named in a rule (dbus-daemon accepts only uids it can
look up: scripts/setup makes 1000 and 1001), ``unshare -U -r`` as root and as uid
1000 (user namespace), ``unshare -m`` as root (mount namespace). Every Watch is
answered exactly as configured, and after real events (keys linked into real
keyrings, real tmpfs mounts) denied peers have received nothing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile

import pytest

from policy_support import (CommandPeer, as_uid, policy_config, require_root, sh, spare_group, userns_python, watch,
                            world_keyring, write_rules)
from support import IFACE, MANAGER, Client, keyctl

pytestmark = [pytest.mark.asyncio, pytest.mark.root, pytest.mark.bus]

A, D, N = "A", "AccessDenied", "NotSupported"
PEERS = ("root", "u1000", "u1001", "member", "userns-root", "userns-1000", "mntns-root")


@pytest.fixture
def base(tmp_path):
    """A private tmpfs for the test's mounts (nothing propagates in or out), with an
    ext4 image mounted at ``ext4`` in it (a filesystem that can report errors)."""
    require_root()
    if not shutil.which("mkfs.ext4"):
        pytest.skip("mkfs.ext4 (e2fsprogs) is not installed")
    d = tempfile.mkdtemp(prefix="wqd-matrix-", dir="/tmp")
    sh("mount", "-t", "tmpfs", "-o", "size=1m", "wqd-matrix-base", d)
    try:
        sh("mount", "--make-private", d)
        image = tmp_path / "ext4.img"
        with open(image, "wb") as f:
            f.truncate(8 << 20)
        sh("mkfs.ext4", "-q", "-F", str(image))
        os.mkdir(os.path.join(d, "ext4"))
        sh("mount", "-o", "loop", str(image), os.path.join(d, "ext4"))
        yield d
    finally:
        subprocess.run(["umount", "-R", "-l", d], capture_output=True)
        os.rmdir(d)


async def test_sources_by_peers(tmp_path, system_bus, wqd_factory, base):
    group = spare_group()
    with world_keyring("wqd-matrix-1") as k1, world_keyring("wqd-matrix-2") as k2:
        rules = tmp_path / "rules.d"
        write_rules(rules, "10-matrix.rules", f"""\
            # uid 1001 gets nothing at all
            deny  *    *    uid:1001
            # the second keyring: members of {group.gr_name} only
            allow keys {k2} group:{group.gr_name}
            deny  keys {k2} world
            """)
        config = policy_config(rules, extra=f"""
            [policy.unix]
            fs_errors_groups = ["{group.gr_name}"]

            [mounts]
            backend = "fanotify"
            """)
        wqd = await wqd_factory(system_bus, config)
        sources = await sources_or_skip(wqd.address, "mounts")

        peers = start_peers(system_bus.address, group)
        try:
            await _matrix(peers, sources, k1, k2, base)
        finally:
            for p in peers.values():
                p.close()


async def sources_or_skip(address: str, needed: str) -> dict:
    """wqd's ``Sources``; skips the test when *needed* is unavailable here."""
    me = await Client.connect(address)
    try:
        sources = await me.get(MANAGER, IFACE, "Sources")
    finally:
        me.close()
    if not sources.get(needed):
        pytest.skip(f"the {needed} source is not available here: {sources}")
    return sources


def start_peers(a: str, group) -> dict[str, CommandPeer]:
    return {
        "root": CommandPeer(a, as_uid(0)),
        "u1000": CommandPeer(a, as_uid(1000)),
        "u1001": CommandPeer(a, as_uid(1001)),
        "member": CommandPeer(a, as_uid(1000, (group.gr_gid,))),
        "userns-root": CommandPeer(a, ["unshare", "-U", "-r"]),
        "userns-1000": CommandPeer(a, [*as_uid(1000), "unshare", "-U", "-r"], userns_python()),
        "mntns-root": CommandPeer(a, ["unshare", "-m", "--propagation", "private", *as_uid(0)]),
    }


async def test_devices_by_peers(tmp_path, system_bus, wqd_factory):
    """devices: no namespace boundary crossed (namespace plugin), rules apply, unix lets the rest watch."""
    require_root()
    group = spare_group()
    rules = tmp_path / "rules.d"
    write_rules(rules, "10-matrix.rules", "deny * * uid:1001\n")
    wqd = await wqd_factory(system_bus, policy_config(rules))
    await sources_or_skip(wqd.address, "devices")
    peers = start_peers(system_bus.address, group)
    try:
        got = {name: await watch(peer, "devices", "mem") for name, peer in peers.items()}
        assert got == {"root": A, "u1000": A, "u1001": D, "member": A, "userns-root": D, "userns-1000": D,
                       "mntns-root": A}, watch.texts
        with open("/sys/devices/virtual/mem/null/uevent", "w") as f:
            f.write("change")
        allowed = [n for n, v in got.items() if v == A]
        for name in allowed:
            out = await peers[name].request("signals", min=1, wait=15)
            assert [(m, body[0], body[1]) for _, m, body in out["result"]][:1] == \
                [("DeviceChanged", "change", "/devices/virtual/mem/null")], (name, out)
        await asyncio.sleep(0.3)
        for name in set(peers) - set(allowed):
            assert (await peers[name].request("signals"))["result"] == [], name
    finally:
        for p in peers.values():
            p.close()


async def _matrix(peers, sources, k1, k2, base):
    expected = {
        # peer:          keys k1, keys k2, mounts base, fs-errors base
        "root":          (A, D, A, A),
        "u1000":         (A, D, A, D),
        "u1001":         (D, D, D, D),
        "member":        (A, A, A, A),
        "userns-root":   (A, D, A, D),  # namespace: no fs-errors across a user namespace
        "userns-1000":   (A, D, A, D),
        "mntns-root":    (A, D, A, N),  # fs-errors: wqd's own mount namespace only
    }
    columns = (("keys", str(k1)), ("keys", str(k2)), ("mounts", base), ("fs-errors", os.path.join(base, "ext4")))
    got = {}
    for name, peer in peers.items():
        got[name] = tuple([await watch(peer, source, target) for source, target in columns])
    assert got == expected, watch.texts

    # Events: keys linked into both keyrings, a host mount, a mount inside the mntns peer.
    key1 = int(keyctl("add", "user", "m1", "x", str(k1)))
    key2 = int(keyctl("add", "user", "m2", "x", str(k2)))
    host = os.path.join(base, "host")
    inner = os.path.join(base, "inner")
    os.mkdir(host)
    os.mkdir(inner)
    sh("mount", "-t", "tmpfs", "-o", "size=1m,uid=1000,gid=1000,mode=755", "wqd-matrix", host)
    sh("nsenter", f"--mount=/proc/{peers['mntns-root'].proc.pid}/ns/mnt",
       "mount", "-t", "tmpfs", "-o", "size=1m", "wqd-matrix-inner", inner)
    try:
        want = {  # peer -> signals it must get (in any order)
            "root": 2, "u1000": 2, "member": 3, "userns-root": 2, "userns-1000": 2, "mntns-root": 2,
        }
        received = {}
        for name, n in want.items():
            out = await peers[name].request("signals", min=n, wait=15)
            received[name] = out["result"]
        await asyncio.sleep(0.5)  # let anything that should not come, come
        for name in peers:
            out = await peers[name].request("signals")
            received[name] = out["result"]
    finally:
        subprocess.run(["umount", host], capture_output=True)
    assert received["u1001"] == [], "a denied peer received signals"
    assert {n: len(received[n]) for n in want} == want, received

    def keys(name):
        return sorted((body[0], body[1], body[2]) for _, member, body in received[name] if member == "KeyChanged")

    def mounts(name):
        return [body for _, member, body in received[name] if member == "MountChanged" and body[0] == "attached"]

    for name in ("root", "u1000", "userns-root", "userns-1000", "mntns-root"):
        assert keys(name) == [(k1, "linked", key1)], name
    assert keys("member") == sorted([(k1, "linked", key1), (k2, "linked", key2)])

    # Host mount: host-namespace peers see it; ids in options are translated for user namespaces.
    for name in ("root", "u1000", "member", "userns-root", "userns-1000"):
        points = [m[2] for m in mounts(name)]
        assert points == [host], (name, received[name])
    opts = {name: mounts(name)[0][3].get("options", "") for name in ("root", "userns-root", "userns-1000")}
    assert "uid=1000" in opts["root"] and "gid=1000" in opts["root"], opts
    assert "uid=0" in opts["userns-1000"].split(",") and "uid=1000" not in opts["userns-1000"], opts
    assert "uid=" not in opts["userns-root"] and "gid=" not in opts["userns-root"], opts
    # The mount-namespace peer sees its own mount only, and nobody else sees it.
    assert [m[2] for m in mounts("mntns-root")] == [inner]
    assert all(inner not in [m[2] for m in mounts(n)] for n in peers if n != "mntns-root")
