"""wqctl against the real daemon on a private bus."""

import asyncio
import json
import os
import subprocess
import sys

import pytest

from support import REPO, keyctl

pytestmark = [pytest.mark.asyncio, pytest.mark.bus]

WQCTL = [sys.executable, "-m", "wqd.cli.wqctl"]


async def run(*args, timeout=30, env=None):
    proc = await asyncio.create_subprocess_exec(*WQCTL, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                cwd=REPO, env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


async def test_status(wqd):
    code, out, err = await run("--address", wqd.address, "status")
    assert code == 0, err
    assert "wqd API version 1" in out
    assert "keys" in out and "proc-keys" in out
    code, out, _ = await run("--address", wqd.address, "status", "--json")
    assert json.loads(out)["sources"]["keys"] == "proc-keys"


async def test_watch_keys_prints_events_as_json(wqd):
    ring = keyctl("newring", "wqd-wqctl", "@u")
    try:
        proc = await asyncio.create_subprocess_exec(
            *WQCTL, "--address", wqd.address, "watch", "keys", ring, "--changes", "linked", "--json", "--count", "2",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        # wait until the subscription exists (the daemon logs it), then change the ring
        for _ in range(200):
            if f"watches keys '{ring}'" in wqd.log_text():
                break
            await asyncio.sleep(0.05)

        async def line():
            return json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))

        # One change at a time: the polling backend merges changes within an interval.
        a = keyctl("add", "user", "a", "1", ring)
        first = await line()
        keyctl("unlink", a, ring)  # filtered out by --changes
        b = keyctl("add", "user", "b", "2", ring)
        second = await line()
        await asyncio.wait_for(proc.wait(), 20)
        assert proc.returncode == 0, await proc.stderr.read()
        assert [(x["signal"], x["key"], x["change"], x["aux"]) for x in (first, second)] == [
            ("KeyChanged", int(ring), "linked", int(a)), ("KeyChanged", int(ring), "linked", int(b))]
        assert await proc.stdout.read() == b""
    finally:
        keyctl("unlink", ring, "@u")


async def test_clear_errors(wqd):
    code, _, err = await run("--address", wqd.address, "watch", "keys", "not-a-key")
    assert code == 1 and "InvalidArgument" in err
    code, _, err = await run("--address", wqd.address, "watch", "keys", "1", "--changes", "linked,bogus")
    assert code == 1 and "InvalidArgument" in err and "bogus" in err
    code, _, err = await run("--address", "unix:path=/nonexistent/bus", "status")
    assert code == 1 and "cannot connect" in err


async def test_not_running(session_bus):
    code, _, err = await run("--address", session_bus.address, "status")
    assert code == 1 and "not running" in err


async def test_no_session_bus():
    env = {k: v for k, v in os.environ.items() if k != "DBUS_SESSION_BUS_ADDRESS"}
    proc = await asyncio.create_subprocess_exec(*WQCTL, "status", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                cwd=REPO, env=env)
    _, err = await proc.communicate()
    assert proc.returncode == 2 and b"--system or --address" in err
