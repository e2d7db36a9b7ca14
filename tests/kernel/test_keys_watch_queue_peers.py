"""The watch_queue backend armed for another uid by its credential helper.

A keyring of uid 1000 that grants others nothing: root cannot arm the watch, so
``KEYCTL_WATCH_KEY`` runs in uid 1000's helper (fsuid 1000, the notification pipe
inherited). Its changes must arrive; Close must release the kernel watch (a new
Watch of the same key must not meet EBUSY); the helper's real, effective and saved
uid stay 0. Runs inside the qemu guest (tests/vm/run).
"""

import asyncio
import os
import subprocess
import uuid

import pytest

from support import SUB_IFACE, ForeignClient

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio]

WQ_CONFIG = """
[keys]
backend = "watch_queue"
"""
AS_1000 = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups"]


def keyctl_1000(*args: str) -> str:
    return subprocess.run([*AS_1000, "keyctl", *args], check=True, capture_output=True, text=True).stdout.strip()


def helper_uids(wqd_pid: int) -> list[list[int]]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) != wqd_pid:
                    continue
            with open(f"/proc/{d}/status") as f:
                out.append(next([int(x) for x in line.split()[1:]] for line in f if line.startswith("Uid:")))
        except (OSError, ValueError, StopIteration):
            pass
    return out


async def test_a_peers_own_keyring_is_watched_through_its_helper(watch_queue_kernel, system_bus, wqd_factory):
    # Made in a session keyring of its own (possessed there, so its owner may set its
    # permissions), kept by a link from uid 1000's @u; others get nothing: root may not View it.
    name = f"wqd-kt-{uuid.uuid4().hex[:8]}"
    ring = keyctl_1000("session", "-", "sh", "-c",
                       f"r=$(keyctl newring {name} @s) && keyctl link $r @u && keyctl setperm $r 0x3f3f0000 "
                       "&& echo $r")
    peer = ForeignClient(system_bus.address, 1000)
    try:
        wqd = await wqd_factory(system_bus, config=WQ_CONFIG)
        for round_ in range(2):  # the second Watch meets no EBUSY: Close released the kernel watch
            out = await peer.request("watch", source="keys", target=ring)
            assert out["ok"], (round_, out)
            path = out["result"][0]
            k = keyctl_1000("add", "user", f"k{round_}", "x", ring)
            got = await peer.request("signals", min=round_ + 1, wait=10)
            assert [path, "KeyChanged", [int(ring), "linked", int(k)]] in got["result"]
            assert [0, 0, 0, 1000] in helper_uids(wqd.proc.pid)
            assert (await peer.request("call", path=path, iface=SUB_IFACE, member="Close"))["ok"]
            await asyncio.sleep(0.2)  # the release runs in the helper, after the answer
    finally:
        peer.close()
        subprocess.run([*AS_1000, "keyctl", "unlink", ring, "@u"], capture_output=True)
