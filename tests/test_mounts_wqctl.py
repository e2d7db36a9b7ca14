"""``wqctl watch mounts [PREFIX]`` against the real daemon, with real mounts."""

import asyncio
import json
import os
import subprocess
import sys

import pytest

from support import REPO
from mounts_support import BACKENDS, sh, wait_mount

pytestmark = [pytest.mark.asyncio, pytest.mark.root, pytest.mark.bus]

WQCTL = [sys.executable, "-m", "wqd.cli.wqctl"]


async def start_wqctl(address: str, *args: str):
    proc = await asyncio.create_subprocess_exec(*WQCTL, "--address", address, *args, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, cwd=REPO)
    # Human output announces the subscription on stderr once Watch has answered.
    if "--json" not in args:
        first = await asyncio.wait_for(proc.stderr.readline(), 20)
        assert first.startswith(b"# watching"), first
    return proc


async def finish(proc) -> tuple[int, str, str]:
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    return proc.returncode, out.decode(), err.decode()


@BACKENDS
async def test_wqctl_watch_mounts_lines(system_bus, wqd_factory, base, config):
    await wqd_factory(system_bus, config)
    proc = await start_wqctl(system_bus.address, "watch", "mounts", base, "--count", "2")
    target = os.path.join(base, "w")
    os.mkdir(target)
    try:
        sh("mount", "-t", "tmpfs", "-o", "size=1m", "wqd-wqctl", target)
        line = await asyncio.wait_for(proc.stdout.readline(), 20)  # mountinfo: see it before it goes
        sh("umount", target)
        code, out, err = await finish(proc)
    finally:
        subprocess.run(["umount", target], capture_output=True)
    assert code == 0, err
    lines = [line.decode().rstrip("\n"), *out.splitlines()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("MountChanged action=attached mount_id=")
    assert f"mount_point={target} info={{fstype=tmpfs options=rw," in lines[0]
    assert lines[0].endswith("source=wqd-wqctl}")
    mount_id = lines[0].split()[2]
    assert lines[1] == lines[0].replace("action=attached", "action=detached")
    assert mount_id.startswith("mount_id=") and int(mount_id.split("=")[1]) > 0


async def test_wqctl_watch_mounts_json_and_actions(system_bus, wqd_factory, client_factory, base):
    wqd = await wqd_factory(system_bus, '[mounts]\nbackend = "mountinfo"\ncoalesce = 0.02\n')
    observer = await client_factory(system_bus.address)
    seen = await observer.watch("mounts", base)
    proc = await start_wqctl(system_bus.address, "watch", "mounts", base, "--actions", "detached", "--json",
                             "--count", "1")
    for _ in range(400):  # --json prints nothing until an event: wait for the daemon to log the Watch
        if wqd.log_text().count(f"watches mounts '{base}'") >= 2:
            break
        await asyncio.sleep(0.05)
    target = os.path.join(base, "j")
    os.mkdir(target)
    sh("mount", "-t", "tmpfs", "-o", "size=1m", "wqd-json", target)
    await wait_mount(observer, seen, "attached", target)  # seen, so its detach is a change too
    sh("umount", target)
    code, out, err = await finish(proc)
    assert code == 0, err
    (record,) = [json.loads(line) for line in out.splitlines()]
    assert record["signal"] == "MountChanged" and record["action"] == "detached"
    assert record["mount_point"] == target and record["info"]["source"] == "wqd-json"
    assert record["subscription"].startswith("/io/wqd/WatchQueue1/subscription/")
