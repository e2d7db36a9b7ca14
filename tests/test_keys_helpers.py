"""The credential helpers of the keys source (wqd.sources.helper_pool), directly.

Real helper processes, real keys; root for the ones that act as uid 1000.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import pytest
import pytest_asyncio

from support import keyctl

from wqd.errors import LimitsExceeded
from wqd.kernel import errors as kerr
from wqd.kernel.credentials import Credentials
from wqd.sources.helper_pool import HelperFailed, HelperPool
from wqd.sources.keys import TokenBuckets

AS_1000 = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups"]
U1000 = Credentials(1000, 1000, (1000,))


def needs_root():
    if os.geteuid() != 0:
        pytest.skip("acting as another uid needs root")


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


async def gone(pid: int, within: float = 5.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            if status(pid)["State"].startswith("Z"):
                return True
        except FileNotFoundError:
            return True
        await asyncio.sleep(0.02)
    return False


@pytest_asyncio.fixture
async def pool():
    p = HelperPool(timeout=0.5)
    yield p
    await p.close()


@pytest.fixture
def key():
    serial = keyctl("add", "user", "wqd-helper-test", "x", "@u")
    yield int(serial)
    subprocess.run(["keyctl", "unlink", serial, "@u"], capture_output=True)


@pytest.mark.asyncio
async def test_a_stopped_helper_is_killed_at_the_deadline_and_replaced(pool, key):
    assert await pool.run(None, "exists", key) is True
    (pid,) = pool.pids()
    os.kill(pid, signal.SIGSTOP)
    t = time.monotonic()
    with pytest.raises(HelperFailed, match="0.5 s"):
        await pool.run(None, "exists", key)
    assert time.monotonic() - t < 0.5 + 2.0
    assert await gone(pid)
    assert await pool.run(None, "exists", key) is True  # the next call: a new helper
    assert pool.pids() != [pid]


@pytest.mark.asyncio
async def test_a_helper_killed_under_a_call_answers_it_at_once(key):
    pool = HelperPool(timeout=30)
    try:
        await pool.run(None, "exists", key)
        (pid,) = pool.pids()
        os.kill(pid, signal.SIGSTOP)
        call = asyncio.ensure_future(pool.run(None, "exists", key))
        await asyncio.sleep(0.2)
        t = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(HelperFailed):
            await call
        assert time.monotonic() - t < 5  # not the 30 s deadline
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_kernel_errors_come_back_as_themselves(pool):
    with pytest.raises(kerr.NoSuchKey):
        await pool.run(None, "describe", 0x7FFFFFF0)


@pytest.mark.asyncio
async def test_a_peers_helper_takes_only_the_fs_ids_and_resolves_its_own_keyrings(pool):
    needs_root()
    mine = int(subprocess.run([*AS_1000, "keyctl", "add", "user", "wqd-h", "x", "@u"], check=True,
                              capture_output=True, text=True).stdout)
    try:
        desc, _flags = await pool.run(U1000, "describe", mine)  # root has no View of it (0x3f010000)
        assert desc.uid == 1000
        (pid,) = pool.pids()
        st = status(pid)
        assert st["Uid"].split() == ["0", "0", "0", "1000"]
        assert st["Gid"].split()[3] == "1000" and st["Groups"].split() == ["1000"]
        ring = await pool.run(U1000, "resolve", "@u", 1000)
        rdesc, _ = await pool.run(U1000, "describe", ring)
        assert (rdesc.type, rdesc.description, rdesc.uid) == ("keyring", "_uid.1000", 1000)
        assert status(pid)["Uid"].split() == ["0", "0", "0", "1000"]  # still: no real-uid window was needed
        roots = await pool.run(None, "resolve", "@u", 0)
        with pytest.raises(kerr.PermissionDenied):  # root's user keyring is not uid 1000's to see
            await pool.run(U1000, "describe", roots)
    finally:
        subprocess.run([*AS_1000, "keyctl", "unlink", str(mine), "@u"], capture_output=True)


@pytest.mark.asyncio
async def test_helpers_are_bounded(key):
    needs_root()
    pool = HelperPool(timeout=5, limit=1)
    try:
        await pool.run(None, "exists", key)
        (first,) = pool.pids()
        with pytest.raises(LimitsExceeded):  # just used: not taken away (no helper per call)
            await pool.run(U1000, "exists", key)
        pool.helpers[None].last_used -= 10
        await pool.run(U1000, "exists", key)  # unused a while: it makes room
        assert await gone(first)
        (second,) = pool.pids()
        os.kill(second, signal.SIGSTOP)
        busy = asyncio.ensure_future(pool.run(U1000, "exists", key))
        await asyncio.sleep(0.1)
        with pytest.raises(LimitsExceeded):  # the busy one is not taken away from its caller
            await pool.run(None, "exists", key)
        busy.cancel()
        os.kill(second, signal.SIGCONT)
    finally:
        await pool.close()


def test_token_bucket_per_uid():
    buckets = TokenBuckets(rate=10, burst=3)
    assert [buckets.take(1000) for _ in range(4)] == [True, True, True, False]
    assert buckets.take(1001)  # another uid has its own
    time.sleep(0.25)  # 2.5 tokens back
    assert [buckets.take(1000) for _ in range(3)] == [True, True, False]
