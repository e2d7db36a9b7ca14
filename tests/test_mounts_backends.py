"""The mounts backends and the one mountinfo waiter, in process against the real
kernel (no bus): a private mount namespace made by ``unshare -m``, real mounts in
it, real fanotify groups and epoll sets.

- ``MountinfoWaiter`` (``wqd.sources.reader``): one call per change after a quiet
  spell, none while the owner has not read (``take``), the changes counted.
- ``FanotifyBackend`` with the mountinfo resolver serves another namespace on a
  machine whose table lacks ``NS_GET_MNTNS_ID`` (only the statmount resolver
  needs it); the statmount resolver then refuses it with ``NotSupported``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time

import pytest

from mounts_support import SKIP_FANOTIFY, sh
from wqd.errors import NotSupported
from wqd.kernel import libc
from wqd.peer import PeerCredentials, inspect_process
from wqd.sources.mount_backends import FanotifyBackend, MountinfoResolver, StatmountResolver
from wqd.sources.mounts import MountsSource
from wqd.sources.reader import MountinfoWaiter
from wqd.subscription import Subscription

pytestmark = [pytest.mark.asyncio, pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="mounting in a new mount namespace needs root")]


@pytest.fixture
def namespace():
    """A process alone in a new private mount namespace, and a directory to mount on
    (made before the namespace, so it is there in both; mounts on it stay inside)."""
    where = tempfile.mkdtemp(prefix="wqd-ns-", dir="/tmp")
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "300"])
    own = os.stat("/proc/self/ns/mnt").st_ino
    deadline = time.monotonic() + 10
    while os.stat(f"/proc/{proc.pid}/ns/mnt").st_ino == own:  # unshare has not exec'd sleep yet
        assert time.monotonic() < deadline, "unshare did not make a namespace"
        time.sleep(0.01)
    yield proc, where
    proc.kill()
    proc.wait()
    os.rmdir(where)


def mount_in(proc: subprocess.Popen, where: str, n: int) -> None:
    sh("nsenter", f"--mount=/proc/{proc.pid}/ns/mnt", "mount", "-t", "tmpfs", "-o", "size=1m", f"wqd-ns-{n}",
       where)


async def until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def test_the_waiter_calls_once_per_read_and_counts_the_changes(namespace):
    proc, where = namespace
    fd = os.open(f"/proc/{proc.pid}/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
    calls = []
    waiter = MountinfoWaiter(fd, lambda: calls.append(time.monotonic()), coalesce=0.05)
    try:
        await asyncio.sleep(0.2)
        assert calls == []  # nothing changed: no call
        mount_in(proc, where, 1)
        assert await until(lambda: len(calls) == 1)
        mount_in(proc, where, 2)  # not read yet: counted, no second call
        await asyncio.sleep(0.3)
        assert len(calls) == 1
        assert waiter.take() == 2
        assert waiter.take() == 0
        mount_in(proc, where, 3)  # read: the next change calls again
        assert await until(lambda: len(calls) == 2)
        waiter.close()
        waiter.close()  # idempotent
        mount_in(proc, where, 4)
        await asyncio.sleep(0.2)
        assert len(calls) == 2
        os.fstat(fd)  # the fd is still the caller's, open
    finally:
        waiter.close()
        os.close(fd)


class Collect:
    """The least sink: never congested, keeps what it is given."""

    congested = False

    def __init__(self) -> None:
        self.events = []

    def dispatch(self, event) -> None:
        self.events.append(event)

    def on_relief(self, callback) -> None:
        raise AssertionError("never congested")


def peer_in(proc: subprocess.Popen) -> PeerCredentials:
    return PeerCredentials(":1.7", 0, pid=proc.pid, verified=True, **inspect_process(proc.pid, 0))


@pytest.mark.skipif(bool(SKIP_FANOTIFY), reason=str(SKIP_FANOTIFY))
async def test_another_namespace_without_ns_get_mntns_id(namespace, monkeypatch):
    proc, where = namespace
    monkeypatch.delitem(libc.IOCTLS[libc.MACHINE], "NS_GET_MNTNS_ID")  # a machine the table lacks it for
    peer = peer_in(proc)
    assert peer.mnt_ns != os.stat("/proc/self/ns/mnt").st_ino

    statmount = MountsSource(FanotifyBackend(StatmountResolver))
    await statmount.start(Collect())
    target = await statmount.resolve(peer, where, {})
    assert target.other_namespace
    with pytest.raises(NotSupported, match="NS_GET_MNTNS_ID"):
        statmount.attach(Subscription(1, peer, "mounts", target))
    assert statmount.watches == {}
    await statmount.stop()

    sink = Collect()
    source = MountsSource(FanotifyBackend(MountinfoResolver))
    await source.start(sink)
    sub = Subscription(2, peer, "mounts", await source.resolve(peer, where, {}))
    source.attach(sub)
    try:
        mount_in(proc, where, 1)
        assert await until(lambda: any(e.mount_point == where for e in sink.events)), sink.events
        event = next(e for e in sink.events if e.mount_point == where)
        assert (event.action, event.mnt_ns, event.info["source"]) == ("attached", peer.mnt_ns, "wqd-ns-1")
        assert source.accepts(sub, event)
    finally:
        source.detach(sub)
        await source.stop()
    assert source.watches == {}
