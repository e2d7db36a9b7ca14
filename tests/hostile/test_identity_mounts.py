"""Mount redaction decides on what a path names, not on how it is spelt (issue 12, finding 4).

Real tmpfs mounts whose sources are spelt as a user would to fool a textual
prefix test (``/run/user/1000/../1001/secret.img`` is 1001's) or that name a
remote account (``alice@host:/x``, as sshfs sources do), watched through the
real daemon by uids 1000 and 1001.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from support import ForeignClient  # noqa: E402
from mounts_support import MOUNTINFO, peer_mounts, sh, start, wait_mount  # noqa: E402

pytestmark = [pytest.mark.asyncio, pytest.mark.root, pytest.mark.bus]

SOURCES = {  # mount point name -> (source, what 1000 sees, what 1001 sees)
    "dotdot": ("/run/user/1000/../1001/secret.img", "<redacted>", "/run/user/1000/../1001/secret.img"),
    "dot": ("/run/user/1001/./../1000/disk.img", "/run/user/1001/./../1000/disk.img", "<redacted>"),
    "slashes": ("//run/user/1000//x", "//run/user/1000//x", "<redacted>"),
    "sshfs": ("alice@fileserver:/home/alice", "<redacted>", "<redacted>"),
    "sshfs-relative": ("bob@fileserver:projects", "<redacted>", "<redacted>"),
}


async def test_mount_sources_resolved_and_remote_accounts_hidden(system_bus, wqd_factory, client_factory, base):
    host = await start(system_bus, wqd_factory, client_factory, MOUNTINFO)
    root_path = await host.watch("mounts", base)
    u1000, u1001 = ForeignClient(system_bus.address, 1000), ForeignClient(system_bus.address, 1001)
    points = {name: os.path.join(base, name) for name in SOURCES}
    try:
        for peer in (u1000, u1001):
            out = await peer.request("watch", source="mounts", target=base)
            assert out["ok"], out
        for name, (source, _, _) in SOURCES.items():
            os.mkdir(points[name])
            sh("mount", "-t", "tmpfs", "-o", "size=1m", source, points[name])
        for name, (source, _, _) in SOURCES.items():
            seen = await wait_mount(host, root_path, "attached", points[name])
            assert seen[3]["source"] == source  # root sees it as mounted
        for peer, column in ((u1000, 1), (u1001, 2)):
            by_point = {b[2]: b[3] for b in await peer_mounts(peer, len(SOURCES)) if b[0] == "attached"}
            got = {name: by_point[points[name]]["source"] for name in SOURCES}
            assert got == {name: row[column] for name, row in SOURCES.items()}, got
    finally:
        for point in points.values():
            subprocess.run(["umount", point], capture_output=True)
        u1000.close()
        u1001.close()
