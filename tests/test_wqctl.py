"""wqctl against the real daemon on a private bus."""

import asyncio
import json
import os
import signal
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


async def _subscribed(wqd, ring) -> bool:
    """Whether *wqd* logs a subscription to keys RING within 20 s."""
    for _ in range(400):
        if f"watches keys '{ring}'" in wqd.log_text():
            return True
        await asyncio.sleep(0.05)
    return False


async def _watch_ring(wqd, ring, *extra):
    """A running `wqctl watch keys RING --json`, once wqd has its subscription."""
    proc = await asyncio.create_subprocess_exec(
        *WQCTL, "--address", wqd.address, "watch", "keys", ring, "--changes", "linked", "--json", *extra,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    if await _subscribed(wqd, ring):
        return proc
    proc.kill()
    raise AssertionError(f"wqctl did not subscribe: {(await proc.communicate())[1].decode()}")


def _kill(wqd):
    """What systemd's watchdog does to a stuck daemon: SIGKILL (here), no goodbye."""
    wqd.proc.kill()
    wqd.proc.wait(10)


async def test_watch_follows_a_daemon_restart(session_bus, wqd_factory):
    first = await wqd_factory(session_bus)
    ring = keyctl("newring", "wqd-wqctl-restart", "@u")
    proc = await _watch_ring(first, ring)
    try:
        async def line(stream):
            return (await asyncio.wait_for(stream.readline(), 30)).decode()

        a = keyctl("add", "user", "a", "1", ring)
        before = json.loads(await line(proc.stdout))
        _kill(first)
        keyctl("add", "user", "missed", "x", ring)  # no daemon: this one is lost, and wqctl must say so
        await asyncio.sleep(0.3)
        assert proc.returncode is None, "wqctl exited when wqd went away"
        second = await wqd_factory(session_bus, name="wqd2")
        notice = await line(proc.stderr)
        assert "wqd restarted" in notice and "missed" in notice, notice
        restarted = json.loads(await line(proc.stdout))
        assert restarted["signal"] == "Restarted" and restarted["previous"] == before["subscription"]
        assert await _subscribed(second, ring), "no subscription in the new daemon"
        b = keyctl("add", "user", "b", "2", ring)
        after = json.loads(await line(proc.stdout))
        assert (before["key"], before["aux"]) == (int(ring), int(a))
        assert (after["signal"], after["key"], after["change"], after["aux"]) == (
            "KeyChanged", int(ring), "linked", int(b))
        assert after["subscription"] == restarted["subscription"]
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert b"Traceback" not in await proc.stderr.read()
    finally:
        if proc.returncode is None:
            proc.kill()
        keyctl("unlink", ring, "@u")


async def test_watch_exits_when_the_daemon_does_not_come_back(session_bus, wqd_factory):
    first = await wqd_factory(session_bus)
    ring = keyctl("newring", "wqd-wqctl-gone", "@u")
    try:
        proc = await _watch_ring(first, ring, "--restart-wait", "1")
        _kill(first)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 1, err
        assert "did not come back within 1 s" in err.decode() and b"Traceback" not in err
        assert out == b""
    finally:
        keyctl("unlink", ring, "@u")


async def test_watch_exits_when_resubscribing_is_refused(session_bus, wqd_factory):
    first = await wqd_factory(session_bus)
    ring = keyctl("newring", "wqd-wqctl-refused", "@u")
    proc = await _watch_ring(first, ring)
    _kill(first)
    keyctl("revoke", ring)  # the key is gone when the new daemon is asked to watch it again
    keyctl("unlink", ring, "@u")
    await wqd_factory(session_bus, name="wqd2")
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    text = err.decode()
    assert proc.returncode == 1, text
    assert "wqd restarted, but watching keys" in text and "again failed" in text, text
    assert "Traceback" not in text and out == b""


async def test_watch_exits_when_the_bus_goes_away(session_bus, wqd_factory):
    first = await wqd_factory(session_bus)
    ring = keyctl("newring", "wqd-wqctl-nobus", "@u")
    try:
        proc = await _watch_ring(first, ring)
        session_bus.stop()
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 1, err
        assert "lost the connection to the bus" in err.decode() and b"Traceback" not in err
    finally:
        keyctl("unlink", ring, "@u")
