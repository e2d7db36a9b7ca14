"""``KEYRING:persistent:UID`` credential caches on the notification pipe.

On the host (no watch queue) the credentials source's keys source runs on the
``proc-keys`` poller, so tests/test_credentials_bus.py can check KEYRING: only
there, and its idle test leaves KEYRING: out. Here, inside the qemu guest
(tests/vm/run) with a watch-queue kernel, the same real MIT KDC runs on the
guest's loopback (the ``realm`` fixture of tests/conftest.py), uid 1000's
kinit / kinit -R / kinit of another principal / kswitch / kdestroy go into its
persistent keyring, and the daemon's keys backend is ``watch_queue``: uid 1000
gets exactly its changes, uid 1001 is denied and hears nothing, and an idle
daemon with the KEYRING: watch in place does not wake up (nothing polls).
"""

from __future__ import annotations

import asyncio

import pytest

from support import ForeignClient
from test_credentials_bus import context_switches, names, signals, steps, subscribed, watch

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio]

OWNER, OTHER = 1000, 1001


def config(realm) -> str:
    return f"""
[credentials]
kcm_store = "{realm.directory}/no-kcm/secrets.ldb"

[keys]
backend = "watch_queue"
"""


async def test_keyring_caches_on_the_notification_pipe(watch_queue_kernel, realm, system_bus, wqd_factory):
    mine, theirs = names(realm, OWNER, "kt")["KEYRING"], names(realm, OTHER, "kt")["KEYRING"]
    wqd = await wqd_factory(system_bus, config(realm), env={"KRB5_CONFIG": str(realm.krb5_conf)})
    owner, spy = ForeignClient(system_bus.address, OWNER), ForeignClient(system_bus.address, OTHER)
    try:
        (sources,) = (await owner.request("get", path="/io/wqd/WatchQueue1", iface="io.wqd.WatchQueue1",
                                          prop="Sources"))["result"]
        assert sources["credentials"] == "inotify+keys/watch_queue"  # no polling backend
        assert (await spy.request("match", rule="type='signal'"))["ok"]
        denied = await watch(spy, mine)
        assert denied.get("error") == "io.wqd.WatchQueue1.Error.AccessDenied", denied
        assert (await watch(spy, theirs))["ok"]

        path = await subscribed(owner, mine)
        expected = []
        for act, changes in steps(realm, "KEYRING", mine):
            await asyncio.to_thread(act)
            expected += changes
            got = await signals(owner, path, len(expected), wait=60)
            assert [(m, b[0], b[1], b[2]["principal"]) for m, b in got] == \
                [("CredentialsChanged", mine, c, p) for c, p in expected]
        realm.kinit(OWNER, mine)  # a ticket again, for the idle count
        expected.append(("created", f"user{OWNER}@WQD.TEST"))
        assert len(await signals(owner, path, len(expected), wait=60)) == len(expected)
        await asyncio.sleep(2)  # trailing records read
        before = context_switches(wqd.proc.pid)
        await asyncio.sleep(4)
        woke = context_switches(wqd.proc.pid) - before
        print(f"idle with a KEYRING: watch on the notification pipe: {woke} context switches in 4 s")
        assert woke <= 4, f"{woke} wake-ups in 4 s idle"
        assert len(await signals(owner, path, 0, wait=0)) == len(expected)
        assert (await spy.request("signals", min=0, wait=0))["result"] == []
    finally:
        owner.close()
        spy.close()
        realm.kdestroy(OWNER, mine, all_caches=True)
        realm.kdestroy(OTHER, theirs, all_caches=True)
