"""The ``mounts`` source with real mounts, through the real daemon on a system-type bus.

Every mount is made under a private tmpfs of the test's own (``base``), and
subscribers watch that prefix, so other mounts on the machine do not matter.
Both backends: ``fanotify`` (FAN_MNT_ATTACH/DETACH on the namespace) and
``mountinfo`` (POLLPRI on /proc/PID/mountinfo, diffed).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from support import IFACE, MANAGER, PYTHON, REPO, SUB_IFACE, BusError, ForeignClient, request_until_ok, \
    variant_options
from mounts_support import (SANDBOXED, in_namespace_of, BACKENDS, FANOTIFY, MOUNTINFO, RESOLVERS, SKIP_FANOTIFY, backend_of, mount_events,
                            NamespacePeer, peer_mounts, sh, start, wait_mount)

pytestmark = [pytest.mark.asyncio, pytest.mark.root, pytest.mark.bus]


@pytest.fixture
def peers(system_bus):
    made = []

    def make(uid: int = 0, namespace: bool = True):
        peer = NamespacePeer(system_bus.address, uid) if namespace else ForeignClient(system_bus.address, uid)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


@RESOLVERS
async def test_tmpfs_mount_and_umount(system_bus, wqd_factory, client_factory, base, config):
    client = await start(system_bus, wqd_factory, client_factory, config)
    sources = await client.get(MANAGER, IFACE, "Sources")
    assert sources["mounts"] == backend_of(config)
    path = await client.watch("mounts", base)
    target = os.path.join(base, "t")
    os.mkdir(target)
    sh("mount", "-t", "tmpfs", "-o", "size=1m,nosuid,nodev", "wqd-src", target)
    attached = await wait_mount(client, path, "attached", target)
    _, mount_id, _, info = attached
    assert info["fstype"] == "tmpfs" and info["source"] == "wqd-src"
    options = info["options"].split(",")
    assert {"rw", "nosuid", "nodev", "size=1024k"} <= set(options), options
    if backend_of(config) == "mountinfo":  # mountinfo's own id for the mount
        with open("/proc/self/mountinfo") as f:
            line = next(line for line in f if f" {target} " in line)
        assert mount_id == int(line.split()[0])
    else:  # the kernel's 64-bit unique id (they start above 2**31)
        assert mount_id > 2**31
    sh("umount", target)
    detached = await wait_mount(client, path, "detached", target)
    assert detached == ["detached", mount_id, target, info]
    assert await client.get(path, SUB_IFACE, "Lost") == 0


@RESOLVERS
async def test_bind_and_move(system_bus, wqd_factory, client_factory, base, config):
    client = await start(system_bus, wqd_factory, client_factory, config)
    path = await client.watch("mounts", base)
    src, bound, moved = (os.path.join(base, n) for n in ("src", "bound", "moved"))
    for d in (src, bound, moved):
        os.mkdir(d)
    sh("mount", "-t", "tmpfs", "-o", "size=1m", "wqd-bind-src", src)
    await wait_mount(client, path, "attached", src)
    sh("mount", "--bind", src, bound)
    attached = await wait_mount(client, path, "attached", bound)
    assert attached[3]["fstype"] == "tmpfs" and attached[3]["source"] == "wqd-bind-src"
    sh("mount", "--move", bound, moved)
    event = await wait_mount(client, path, "moved", moved)
    assert event[1] == attached[1]  # the same mount, now elsewhere
    assert event[3]["moved_from"] == bound and event[3]["fstype"] == "tmpfs"
    sh("umount", moved)
    detached = await wait_mount(client, path, "detached", moved)
    assert detached[1] == attached[1]
    sh("umount", src)
    await wait_mount(client, path, "detached", src)
    actions = [(b[0], b[2]) for b in mount_events(client, path)]
    assert actions == [("attached", src), ("attached", bound), ("moved", moved), ("detached", moved),
                       ("detached", src)]


@BACKENDS
async def test_actions_option_and_prefix(system_bus, wqd_factory, client_factory, base, config):
    client = await start(system_bus, wqd_factory, client_factory, config)
    inside, outside = os.path.join(base, "in"), os.path.join(base, "out")
    for d in (inside, outside):
        os.mkdir(d)
    only_detached = await client.watch("mounts", inside, variant_options(actions=["detached"]))
    everything_in = await client.watch("mounts", inside + "/")  # normalised
    assert await client.get(everything_in, SUB_IFACE, "Target") == inside + "/"
    for d in (outside, inside):
        sh("mount", "-t", "tmpfs", "-o", "size=1m", "wqd-x", d)
    await wait_mount(client, everything_in, "attached", inside)  # mountinfo: a mount must live to be seen
    for d in (inside, outside):
        sh("umount", d)
    await wait_mount(client, only_detached, "detached", inside)
    await wait_mount(client, everything_in, "detached", inside)
    assert [b[0] for b in mount_events(client, only_detached)] == ["detached"]
    assert [(b[0], b[2]) for b in mount_events(client, everything_in)] == [("attached", inside), ("detached", inside)]
    with pytest.raises(BusError) as err:
        await client.watch("mounts", base, variant_options(actions=["mounted"]))
    assert err.value.name.endswith("InvalidArgument")
    for bad in ("relative/path", "~/x"):
        with pytest.raises(BusError) as err:
            await client.watch("mounts", bad)
        assert err.value.name.endswith("InvalidArgument")


@BACKENDS
async def test_own_namespace_only(system_bus, wqd_factory, client_factory, peers, base, config):
    """A root peer and a uid-1000 peer, each in its own private namespace: each sees
    its own namespace's mounts; the host subscriber sees neither's, nor they the host's."""
    host = await start(system_bus, wqd_factory, client_factory, config)
    host_path = await host.watch("mounts", base)
    inner_root, inner_user = peers(0), peers(1000)
    watched = {}
    for name, peer in (("root", inner_root), ("user", inner_user)):
        out = await peer.request("watch", source="mounts", target=base)
        assert out["ok"], out
        watched[name] = out["result"][0]
    targets = {name: os.path.join(base, name) for name in ("host", "root", "user")}
    for d in targets.values():
        os.mkdir(d)
    sh("mount", "-t", "tmpfs", "-o", "size=1m", "wqd-host", targets["host"])
    inner_root.inside("mount", "-t", "tmpfs", "-o", "size=1m", "wqd-inner-root", targets["root"])
    inner_user.inside("mount", "-t", "tmpfs", "-o", "size=1m", "wqd-inner-user", targets["user"])
    await wait_mount(host, host_path, "attached", targets["host"])
    for name, peer in (("root", inner_root), ("user", inner_user)):
        events = await peer.mounts(1)
        assert [(b[0], b[2], b[3]["source"]) for b in events] == [("attached", targets[name], f"wqd-inner-{name}")]
    # Then each unmounts its own; the last event each side sees is its own detach.
    sh("umount", targets["host"])
    inner_root.inside("umount", targets["root"])
    inner_user.inside("umount", targets["user"])
    await wait_mount(host, host_path, "detached", targets["host"])
    for name, peer in (("root", inner_root), ("user", inner_user)):
        events = await peer.mounts(2)
        assert [(b[0], b[2]) for b in events] == [("attached", targets[name]), ("detached", targets[name])]
    assert [(b[0], b[2]) for b in mount_events(host, host_path)] == [
        ("attached", targets["host"]), ("detached", targets["host"])]


async def test_other_namespaces_can_be_denied(system_bus, wqd_factory, client_factory, peers, base):
    config = MOUNTINFO + "\n[policy.unix]\nmounts_other_namespaces = false\n"
    host = await start(system_bus, wqd_factory, client_factory, config)
    await host.watch("mounts", base)  # wqd's own namespace: still fine
    out = await peers(0).request("watch", source="mounts", target="")
    assert out["error"] == "io.wqd.WatchQueue1.Error.AccessDenied", out
    same_ns = await peers(1000, namespace=False).request("watch", source="mounts", target=base)
    assert same_ns["ok"], same_ns



@BACKENDS
async def test_sandboxed_wqd_serves_the_namespace_it_was_started_from(system_bus, wqd_factory, peers, base,
                                                                       config):
    """A peer in the namespace wqd was started from is in wqd's "own" namespace (not
    denied as another one by mounts_other_namespaces = false, not counted against
    namespaces_per_uid = 0), and sees that namespace's mounts, not wqd's private ones."""
    wqd = await wqd_factory(system_bus, config + "namespaces_per_uid = 0\n"
                            "\n[policy.unix]\nmounts_other_namespaces = false\n", wrapper=SANDBOXED)
    assert os.stat(f"/proc/{wqd.proc.pid}/ns/mnt").st_ino != os.stat("/proc/self/ns/mnt").st_ino
    peer = peers(1000, namespace=False)
    out = await peer.request("watch", source="mounts", target=base)
    assert out["ok"], out
    private, host = os.path.join(base, "private"), os.path.join(base, "host")
    os.mkdir(private)
    os.mkdir(host)
    in_namespace_of(wqd.proc.pid, "mount", "-t", "tmpfs", "-o", "size=1m", "wqd-private", private)
    sh("mount", "-t", "tmpfs", "-o", "size=1m", "wqd-host", host)
    events = await peer_mounts(peer, 1)
    assert [(b[0], b[2], b[3]["source"]) for b in events] == [("attached", host, "wqd-host")]
    sh("umount", host)
    events = await peer_mounts(peer, 2)
    assert [(b[0], b[2]) for b in events] == [("attached", host), ("detached", host)]


@BACKENDS
async def test_other_namespaces_are_capped(system_bus, wqd_factory, client_factory, peers, base, config):
    """Anyone can make mount namespaces, and each watched one costs wqd a fanotify
    group (128 per user) or fds: one uid may not use them all up."""
    await start(system_bus, wqd_factory, client_factory,
                config + "namespaces_per_uid = 2\nnamespaces_total = 3\n")
    a, b, c = peers(1000), peers(1000), peers(1000)
    assert (await a.request("watch", source="mounts", target=""))["ok"]
    assert (await b.request("watch", source="mounts", target=""))["ok"]
    out = await c.request("watch", source="mounts", target="")
    assert out["error"] == "io.wqd.WatchQueue1.Error.LimitsExceeded", out
    assert "uid 1000 already has 2 other mount namespaces watched" in out["text"]
    # another uid still gets in, up to the total
    assert (await peers(1001).request("watch", source="mounts", target=""))["ok"]
    out = await peers(0).request("watch", source="mounts", target="")
    assert out["error"] == "io.wqd.WatchQueue1.Error.LimitsExceeded", out
    assert "already watches 3 other mount namespaces" in out["text"]
    # wqd's own namespace is never counted, nor refused
    assert (await peers(1000, namespace=False).request("watch", source="mounts", target=""))["ok"]
    # one of uid 1000's namespaces released: its third gets in
    a.close()
    out = await request_until_ok(c, "watch", source="mounts", target="")
    assert out["ok"], out


async def test_redacted_for_non_root(system_bus, wqd_factory, client_factory, peers, base):
    """A non-root peer gets no path it does not own in source or options; root gets all."""
    host = await start(system_bus, wqd_factory, client_factory, MOUNTINFO)
    root_path = await host.watch("mounts", base)
    user = peers(1000, namespace=False)
    out = await user.request("watch", source="mounts", target=base)
    assert out["ok"], out
    lower, upper, work, merged = (os.path.join(base, n) for n in ("lower", "upper", "work", "merged"))
    tmp = os.path.join(base, "tmp")
    for d in (lower, tmp, merged):
        os.mkdir(d)
    sh("mount", "-t", "tmpfs", "-o", "size=1m", "/srv/alice/private-data", tmp)
    os.makedirs(upper.replace(base, tmp))
    os.makedirs(work.replace(base, tmp))
    options = f"lowerdir={lower},upperdir={upper.replace(base, tmp)},workdir={work.replace(base, tmp)}"
    sh("mount", "-t", "overlay", "-o", options, "overlay", merged)
    try:
        seen_by_root = await wait_mount(host, root_path, "attached", merged)
        assert f"lowerdir={lower}" in seen_by_root[3]["options"]
        events = await peer_mounts(user, 2)
        by_point = {b[2]: b for b in events}
        assert by_point[tmp][3]["source"] == "<redacted>"
        assert by_point[tmp][3]["options"] == (await wait_mount(host, root_path, "attached", tmp))[3]["options"]
        overlay = by_point[merged][3]
        assert overlay["source"] == "overlay" and overlay["fstype"] == "overlay"
        assert "lowerdir=<redacted>" in overlay["options"] and base not in overlay["options"]
    finally:
        subprocess.run(["umount", merged], capture_output=True)


async def test_eavesdropper_receives_nothing(system_bus, wqd_factory, client_factory, peers, base):
    host = await start(system_bus, wqd_factory, client_factory, FANOTIFY if not SKIP_FANOTIFY else MOUNTINFO)
    path = await host.watch("mounts", base)
    spy = peers(1001, namespace=False)
    for rule in ("type='signal',eavesdrop='true'", "type='signal'", "eavesdrop='true'"):
        await spy.request("match", rule=rule)  # the bus may refuse eavesdropping: either way, nothing arrives
    target = os.path.join(base, "spied")
    os.mkdir(target)
    sh("mount", "-t", "tmpfs", "-o", "size=1m", "wqd-spied", target)
    sh("umount", target)
    await wait_mount(host, path, "detached", target)
    got = await spy.request("signals", min=1, wait=1.0)
    assert [s for s in got["result"] if s[1] in ("MountChanged", "Lost", "Removed")] == []


async def test_ordinary_user_instance_falls_back_to_mountinfo():
    """Without CAP_SYS_ADMIN FAN_MARK_MNTNS is refused: ``auto`` picks mountinfo."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another uid")
    script = ("from wqd.config import Config, parse\nfrom wqd.sources.mounts import open_source\n"
              "print(open_source(Config()).backend)\n"
              "try:\n    open_source(parse('[mounts]\\nbackend = \"fanotify\"\\n'))\n"
              "except OSError as exc:\n    print('fanotify refused:', exc.strerror)\n")
    out = subprocess.run(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", PYTHON, "-c", script],
                         capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.splitlines() == ["mountinfo", "fanotify refused: fanotify_mark: Operation not permitted"]
