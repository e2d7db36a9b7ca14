"""Helpers of the mounts and fs-errors tests (tests/test_mounts*.py, test_fs_errors.py,
tests/hostile/): backends as test parameters, private tmpfs bases, peers in a mount
namespace of their own, the mount storm. The ``base`` fixture is in conftest.py."""

from __future__ import annotations

import os
import subprocess
import tempfile

import pytest

from support import PYTHON, REPO, ForeignClient


FANOTIFY = '[mounts]\nbackend = "fanotify"\n'


MOUNTINFO = '[mounts]\nbackend = "mountinfo"\ncoalesce = 0.02\n'



# fanotify events, mount ids named by mountinfo diffs (as where statmount is filtered)
FANOTIFY_MOUNTINFO = '[mounts]\nbackend = "fanotify"\nresolver = "mountinfo"\n'



def fanotify_mounts_work() -> str | None:
    if os.geteuid() != 0:
        return "mounting needs root"
    from wqd.kernel.errors import KernelError
    from wqd.sources.mount_backends import probe_fanotify

    try:
        probe_fanotify()
    except KernelError as exc:
        return f"no fanotify mount events here (Linux >= 6.15, CAP_SYS_ADMIN): {exc}"
    return None


SKIP_FANOTIFY = fanotify_mounts_work()


BACKENDS = pytest.mark.parametrize("config", [
    pytest.param(FANOTIFY, id="fanotify", marks=pytest.mark.skipif(bool(SKIP_FANOTIFY), reason=str(SKIP_FANOTIFY))),
    pytest.param(MOUNTINFO, id="mountinfo", marks=pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")),
])


RESOLVERS = pytest.mark.parametrize("config", [
    pytest.param(FANOTIFY, id="fanotify", marks=pytest.mark.skipif(bool(SKIP_FANOTIFY), reason=str(SKIP_FANOTIFY))),
    pytest.param(FANOTIFY_MOUNTINFO, id="fanotify-mountinfo-resolver",
                 marks=pytest.mark.skipif(bool(SKIP_FANOTIFY), reason=str(SKIP_FANOTIFY))),
    pytest.param(MOUNTINFO, id="mountinfo", marks=pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")),
])



def backend_of(config: str) -> str:
    return "mountinfo" if 'backend = "mountinfo"' in config else "fanotify"



def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)



# wqd as its unit runs it: ProtectSystem=/PrivateTmp= put it in a private copy (a
# slave) of the namespace it was started from, which no peer is in.
SANDBOXED = ("unshare", "-m", "--propagation", "slave")


def in_namespace_of(pid: int, *cmd: str) -> None:
    sh("nsenter", f"--mount=/proc/{pid}/ns/mnt", *cmd)


def make_private_tmpfs(prefix: str) -> str:
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    sh("mount", "-t", "tmpfs", "-o", "size=4m", "wqd-test-base", d)
    sh("mount", "--make-private", d)
    return d



def remove_tmpfs(d: str) -> None:
    subprocess.run(["umount", "-R", "-l", d], capture_output=True)
    os.rmdir(d)



class NamespacePeer(ForeignClient):
    """A peer client in a new private mount namespace: ``unshare -m`` as root, then
    ``setpriv`` to *uid* (setpriv first, as ForeignClient does, would leave unshare
    without the privilege to make the namespace)."""

    def __init__(self, address: str, uid: int) -> None:
        cmd = ["unshare", "-m", "--propagation", "private",
               "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
               PYTHON, str(REPO / "tests" / "peer_client.py"), address]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd="/")

    def inside(self, *cmd: str) -> None:
        """Run *cmd* as root in this peer's mount namespace."""
        sh("nsenter", f"--mount=/proc/{self.proc.pid}/ns/mnt", *cmd)

    async def mounts(self, n: int, wait: float = 10) -> list:
        return await peer_mounts(self, n, wait)



async def peer_mounts(peer: ForeignClient, n: int, wait: float = 10) -> list:
    """The MountChanged bodies *peer* received, waiting up to *wait* s for *n* signals."""
    got = await peer.request("signals", min=n, wait=wait)
    return [body for _path, member, body in got["result"] if member == "MountChanged"]



def mount_events(client, path: str) -> list:
    return [body for member, body in client.signals[path] if member == "MountChanged"]



async def wait_mount(client, path: str, action: str, mount_point: str, timeout: float = 10.0) -> list:
    def found():
        return next((b for b in mount_events(client, path) if b[0] == action and b[2] == mount_point), None)

    await client.wait_for(lambda: found() is not None, timeout)
    return found()



async def start(system_bus, wqd_factory, client_factory, config: str):
    await wqd_factory(system_bus, config)
    client = await client_factory(system_bus.address)
    return client


STORM = """
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
target, n = sys.argv[1].encode(), int(sys.argv[2])
start = time.monotonic()
for i in range(n):
    if libc.mount(b"wqd-storm", target, b"tmpfs", 0, b"size=64k") != 0:
        raise OSError(ctypes.get_errno(), "mount")
    if libc.umount2(target, 0) != 0:
        raise OSError(ctypes.get_errno(), "umount2")
print(time.monotonic() - start)
"""



def tally(signals: list, target: str) -> dict:
    """Counts of the storm's events (its mount point, or unresolved) and of strays.

    A private namespace still changes from outside in one way: removing a directory
    that is a mount point here (another process cleaning up its temporary mount)
    detaches that mount here too. Those are real events of this namespace, but not
    the storm's, so they are counted apart.
    """
    out = {"attached": 0, "detached": 0, "moved": 0, "lost": 0, "unresolved": 0, "strays": [], "delivered": 0}
    for _path, member, body in signals:
        if member == "MountChanged":
            out["delivered"] += 1
            if body[2] in (target, ""):
                out[body[0]] += 1
                out["unresolved"] += not body[2]
            else:
                out["strays"].append(body)
        elif member == "Lost":
            out["lost"] += body[0]
    return out


async def settled_tally(peer, target: str, pairs: int, rounds: int) -> dict:
    """``tally`` of *peer*'s signals once every event of a storm of *pairs* mounts
    is in, or the backend said it lost some and nothing more came for a second."""
    previous = None
    for _ in range(rounds):
        got = await peer.request("signals", min=2 * pairs, wait=1.0)
        t = tally(got["result"], target)
        if t["attached"] + t["detached"] >= 2 * pairs or (t["lost"] and t == previous):
            break
        previous = t
    return t
