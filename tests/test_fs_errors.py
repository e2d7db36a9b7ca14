"""The ``fs-errors`` source: an ext4 image on a loop device, errors injected through
/sys/fs/ext4/loopN/trigger_fs_error, reported as FilesystemError by the real daemon."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from support import IFACE, MANAGER, PYTHON, REPO, BusError, ForeignClient, variant_options
from mounts_support import SANDBOXED, NamespacePeer, in_namespace_of, sh

pytestmark = [pytest.mark.asyncio, pytest.mark.root, pytest.mark.bus]

EFSCORRUPTED = 117  # EUCLEAN: what ext4's trigger_fs_error reports


class Ext4:
    def __init__(self, directory: str) -> None:
        self.image = os.path.join(directory, "fs.img")
        self.mount_point = os.path.join(directory, "ext4")
        os.mkdir(self.mount_point)
        with open(self.image, "wb") as f:
            f.truncate(8 << 20)
        sh("mkfs.ext4", "-q", "-F", self.image)
        self.loop = subprocess.run(["losetup", "--find", "--show", self.image], check=True, capture_output=True,
                                   text=True).stdout.strip()
        try:
            sh("mount", "-o", "errors=continue", self.loop, self.mount_point)
        except subprocess.CalledProcessError:
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)
            raise
        self.trigger = f"/sys/fs/ext4/{os.path.basename(self.loop)}/trigger_fs_error"

    def error(self) -> None:
        with open(self.trigger, "w") as f:
            f.write("1\n")

    def close(self) -> None:
        subprocess.run(["umount", "-R", self.mount_point], capture_output=True)
        subprocess.run(["losetup", "-d", self.loop], capture_output=True)


@pytest.fixture
def ext4(base):
    for tool in ("mkfs.ext4", "losetup"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            pytest.skip(f"{tool} is not installed")
    try:
        fs = Ext4(base)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot loop-mount an ext4 image here: {exc.stderr}")
    if not os.path.exists(fs.trigger):
        fs.close()
        pytest.skip(f"no {fs.trigger}: this kernel's ext4 cannot inject errors")
    yield fs
    fs.close()


@pytest.fixture
def bound(ext4):
    """A bind mount of the ext4 filesystem, next to its first mount point."""
    path = ext4.mount_point + "-bind"
    os.mkdir(path)
    sh("mount", "--bind", ext4.mount_point, path)
    yield path
    subprocess.run(["umount", path], capture_output=True)


async def errors_of(client, path: str, n: int = 1) -> list:
    await client.wait_for(lambda: len([s for s in client.signals[path] if s[0] == "FilesystemError"]) >= n)
    return [body for member, body in client.signals[path] if member == "FilesystemError"]


async def test_injected_error_is_reported(system_bus, wqd_factory, client_factory, ext4):
    await wqd_factory(system_bus)
    client = await client_factory(system_bus.address)
    assert (await client.get(MANAGER, IFACE, "Sources"))["fs-errors"] == "fanotify"
    path = await client.watch("fs-errors", ext4.mount_point)
    ext4.error()
    ((mount_point, error, count),) = await errors_of(client, path)
    assert (mount_point, error) == (ext4.mount_point, EFSCORRUPTED) and count >= 1
    # The next report counts only what came after (the kernel merges while it waits).
    ext4.error()
    ext4.error()
    reports = await errors_of(client, path, 2)
    assert reports[1][0] == ext4.mount_point and reports[1][1] == EFSCORRUPTED and 1 <= reports[1][2] <= 2


async def test_every_mount_point_of_the_filesystem(system_bus, wqd_factory, client_factory, ext4, bound):
    await wqd_factory(system_bus)
    client = await client_factory(system_bus.address)
    a = await client.watch("fs-errors", ext4.mount_point)
    b = await client.watch("fs-errors", bound + "/")  # normalised
    ext4.error()
    assert (await errors_of(client, a))[0][:2] == [ext4.mount_point, EFSCORRUPTED]
    assert (await errors_of(client, b))[0][:2] == [bound, EFSCORRUPTED]
    await client.call(a, "io.wqd.Subscription1", "Close")
    ext4.error()
    assert len(await errors_of(client, b, 2)) == 2  # b still marked though a left


def sb_marks(pid: int) -> int:
    """How many filesystem (superblock) marks the fanotify groups of process *pid* hold."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[fanotify]":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                n += sum(line.startswith("fanotify sdev:") for line in f)
        except FileNotFoundError:
            continue
    return n


async def test_unmount_ends_the_subscription(system_bus, wqd_factory, client_factory, ext4, bound):
    """An unmounted mount point ends its subscriptions with Removed("unmounted"); wqd
    holds nothing that makes umount fail, and its mark goes with the last subscription
    (removed through another mount of the filesystem while one is left)."""
    wqd = await wqd_factory(system_bus)
    client = await client_factory(system_bus.address)
    a = await client.watch("fs-errors", ext4.mount_point)
    b = await client.watch("fs-errors", bound)
    assert sb_marks(wqd.proc.pid) == 1  # one mark serves both mount points
    sh("umount", ext4.mount_point)  # not busy: wqd keeps no fd there
    await client.wait_for(lambda: ("Removed", ["unmounted"]) in client.signals[a])
    ext4.error()
    assert (await errors_of(client, b))[0][:2] == [bound, EFSCORRUPTED]  # the bind mount still reports
    assert sb_marks(wqd.proc.pid) == 1
    assert (await client.call(MANAGER, IFACE, "ListSubscriptions")).body == [[b]]
    sh("umount", bound)
    await client.wait_for(lambda: ("Removed", ["unmounted"]) in client.signals[b])
    assert (await client.call(MANAGER, IFACE, "ListSubscriptions")).body == [[]]
    assert sb_marks(wqd.proc.pid) == 0
    # Mounted again: a new subscription works, the old ones stay ended.
    sh("mount", "-o", "errors=continue", ext4.loop, ext4.mount_point)
    c = await client.watch("fs-errors", ext4.mount_point)
    ext4.error()
    assert (await errors_of(client, c))[0][:2] == [ext4.mount_point, EFSCORRUPTED]
    assert not any(m == "FilesystemError" for m, _ in client.signals[a])


async def test_mark_removed_through_a_remaining_mount(system_bus, wqd_factory, client_factory, ext4, bound):
    """The only watched mount point is unmounted while the filesystem stays mounted
    elsewhere: the subscription ends and wqd removes its mark through the other mount."""
    wqd = await wqd_factory(system_bus)
    client = await client_factory(system_bus.address)
    a = await client.watch("fs-errors", ext4.mount_point)
    assert sb_marks(wqd.proc.pid) == 1
    sh("umount", ext4.mount_point)
    await client.wait_for(lambda: ("Removed", ["unmounted"]) in client.signals[a])
    assert os.path.ismount(bound) and sb_marks(wqd.proc.pid) == 0


async def test_root_only_by_default_and_groups_setting(system_bus, wqd_factory, client_factory, ext4):
    config = "[policy.unix]\nfs_errors_groups = [4242]\n"
    await wqd_factory(system_bus, config)
    stranger = ForeignClient(system_bus.address, 1000)
    member = ForeignClient(system_bus.address, 1001, groups=(4242,))
    try:
        denied = await stranger.request("watch", source="fs-errors", target=ext4.mount_point)
        assert denied["error"] == "io.wqd.WatchQueue1.Error.AccessDenied", denied
        allowed = await member.request("watch", source="fs-errors", target=ext4.mount_point)
        assert allowed["ok"], allowed
        ext4.error()
        got = await member.request("signals", min=1, wait=10)
        assert [(s[1], s[2][:2]) for s in got["result"]] == [("FilesystemError", [ext4.mount_point, EFSCORRUPTED])]
    finally:
        stranger.close()
        member.close()


async def test_bad_targets(system_bus, wqd_factory, client_factory, ext4):
    await wqd_factory(system_bus)
    client = await client_factory(system_bus.address)
    os.mkdir(os.path.join(ext4.mount_point, "sub"))
    cases = {
        os.path.join(ext4.mount_point, "sub"): "InvalidArgument",  # a directory, not a mount point
        "relative": "InvalidArgument",
        "": "InvalidArgument",
        "/proc": "NotSupported",  # mounted, but proc has no file handles to report errors with
    }
    for target, error in cases.items():
        with pytest.raises(BusError) as err:
            await client.watch("fs-errors", target)
        assert err.value.name == f"io.wqd.WatchQueue1.Error.{error}", (target, err.value.text)
    with pytest.raises(BusError) as err:
        await client.watch("fs-errors", ext4.mount_point, variant_options(changes=["x"]))
    assert err.value.name.endswith("InvalidArgument")


async def test_other_namespace_not_supported(system_bus, wqd_factory, ext4):
    await wqd_factory(system_bus)
    peer = NamespacePeer(system_bus.address, 0)
    try:
        out = await peer.request("watch", source="fs-errors", target=ext4.mount_point)
        assert out["error"] == "io.wqd.WatchQueue1.Error.NotSupported", out
        assert "host's mount namespace" in out["text"]
    finally:
        peer.close()


async def test_sandboxed_wqd_watches_the_hosts_mount_points(system_bus, wqd_factory, client_factory, ext4, bound):
    """wqd under its unit runs in a private copy of the namespace it was started
    from (ProtectSystem=, PrivateTmp=): a peer of that namespace still watches its
    own mount point, although in wqd's own view that path is another filesystem
    (a tmpfs over it here, as PrivateTmp= puts one over /tmp); an unmount from the
    host's namespace, which does not reach wqd's copy (base is a private mount),
    ends the subscription, and the mark goes with it."""
    wqd = await wqd_factory(system_bus, wrapper=SANDBOXED)
    in_namespace_of(wqd.proc.pid, "mount", "-t", "tmpfs", "-o", "size=1m", "wqd-private-view", ext4.mount_point)
    client = await client_factory(system_bus.address)
    path = await client.watch("fs-errors", ext4.mount_point)
    ext4.error()
    ((mount_point, error, count),) = await errors_of(client, path)
    assert (mount_point, error) == (ext4.mount_point, EFSCORRUPTED) and count >= 1
    assert sb_marks(wqd.proc.pid) == 1
    sh("umount", ext4.mount_point)
    await client.wait_for(lambda: ("Removed", ["unmounted"]) in client.signals[path])
    assert sb_marks(wqd.proc.pid) == 0


async def test_wqctl_watch_fs_errors(system_bus, wqd_factory, ext4):
    await wqd_factory(system_bus)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wqd.cli.wqctl", "--address", system_bus.address, "watch", "fs-errors",
        ext4.mount_point, "--count", "1", stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    first = await asyncio.wait_for(proc.stderr.readline(), 20)
    assert first.startswith(b"# watching fs-errors"), first
    ext4.error()
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err
    (line,) = out.decode().splitlines()
    assert line.startswith(f"FilesystemError mount_point={ext4.mount_point} error={EFSCORRUPTED} count=")
    assert int(line.rsplit("=", 1)[1]) >= 1


async def test_unavailable_without_cap_sys_admin():
    """As an ordinary user the source cannot run: open_source refuses, so the daemon
    reports it unavailable ("" in Sources) and Watch says NotSupported."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another uid")
    script = ("import sys\nfrom wqd.config import Config\nfrom wqd.sources.fs_errors import open_source\n"
              "try:\n    open_source(Config())\nexcept PermissionError as exc:\n    print('refused', exc.strerror)\n")
    out = subprocess.run(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", PYTHON, "-c", script],
                         capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "refused filesystem error notifications need CAP_SYS_ADMIN"
