"""The credentials source over the bus: a real MIT KDC on loopback, a real
sssd_kcm, the real daemon, clients as uids 1000 and 1001 on a system-type bus.

For FILE:, DIR: and KCM: caches, uid 1000 watching its cache gets exactly the
CredentialsChanged that kinit / kinit -R / kinit of another principal / kswitch /
kdestroy make, each with the principal and times a read as uid 1000 finds; uid
1001 is denied 1000's cache and, eavesdropping with a catch-all match while
watching its own, receives nothing. ``expiring`` comes once, from a timer; an
idle daemon with watches in place does not wake up.
"""

from __future__ import annotations

import asyncio
import glob
import os
import time

import pytest

from krb5_support import Realm
from mounts_support import in_namespace_of
from support import ForeignClient

pytestmark = [pytest.mark.asyncio, pytest.mark.bus, pytest.mark.root]

OWNER, OTHER = 1000, 1001
LEAD = 3  # [credentials] expiring_lead in these tests, seconds


def config(realm: Realm, lead: int = LEAD) -> str:
    return f"""
[credentials]
kcm_store = "{realm.kcm_store}"
expiring_lead = {lead}

[keys]
poll_interval = 0.1
"""


async def start(wqd_factory, system_bus, realm: Realm, lead: int = LEAD):
    return await wqd_factory(system_bus, config(realm, lead), env={"KRB5_CONFIG": str(realm.krb5_conf)})


def names(realm: Realm, uid: int, tag: str) -> dict[str, str]:
    home = realm.user_dir(uid)
    return {"FILE": f"FILE:{home}/krb5cc-{tag}", "DIR": f"DIR:{home}/dir-{tag}", "KCM": "KCM:",
            "KEYRING": f"KEYRING:persistent:{uid}"}


def clean(realm: Realm, uid: int, name: str) -> None:
    realm.kdestroy(uid, name, all_caches=not name.startswith("FILE:"))


async def signals(peer: ForeignClient, path: str, n: int, wait: float = 15) -> list:
    out = await peer.request("signals", min=n, wait=wait)
    assert out["ok"], out
    return [(member, body) for p, member, body in out["result"] if p == path]


async def watch(peer: ForeignClient, target: str) -> dict:
    return await peer.request("watch", source="credentials", target=target)


async def subscribed(peer: ForeignClient, target: str) -> str:
    """The path of *peer*'s new subscription to *target*, which must be granted."""
    reply = await watch(peer, target)
    assert reply["ok"], (target, reply)
    return reply["result"][0]


def steps(realm: Realm, kind: str, name: str) -> list:
    """(what to do, the changes it makes as (change, principal)) in order."""
    me, alt = f"user{OWNER}", f"user{OWNER}/alt"
    at = "@WQD.TEST"
    seq = [
        (lambda: realm.kinit(OWNER, name), [("created", me + at)]),
        (lambda: realm.renew(OWNER, name), [("renewed", me + at)]),
        (lambda: realm.kinit(OWNER, name, principal=alt), [("switched", alt + at)]),
    ]
    if kind == "FILE":  # one cache: another principal replaces it; kinit again refreshes
        seq += [(lambda: (time.sleep(1.1), realm.kinit(OWNER, name, principal=alt)), [("refreshed", alt + at)]),
                (lambda: realm.kdestroy(OWNER, name), [("destroyed", alt + at)])]
    elif kind in ("DIR", "KEYRING"):  # the destroyed primary stays named as primary
        seq += [(lambda: realm.kswitch(OWNER, name, me), [("switched", me + at)]),
                (lambda: realm.kdestroy(OWNER, name), [("destroyed", me + at)])]
    else:  # sssd-kcm makes the remaining cache the default at once
        seq += [(lambda: realm.kswitch(OWNER, name, me), [("switched", me + at)]),
                (lambda: realm.kdestroy(OWNER, name), [("switched", alt + at)]),
                (lambda: realm.kdestroy(OWNER, name, all_caches=True), [("destroyed", alt + at)])]
    return seq


@pytest.mark.parametrize("kind", ["FILE", "DIR", "KCM", "KEYRING"])
async def test_the_owner_gets_exactly_the_changes_and_the_other_uid_nothing(kind, request, realm, system_bus,
                                                                          wqd_factory):
    if kind == "KCM":
        request.getfixturevalue("kcm")
    mine, theirs = names(realm, OWNER, kind.lower())[kind], names(realm, OTHER, kind.lower())[kind]
    clean(realm, OWNER, mine)
    clean(realm, OTHER, theirs)
    if kind == "KCM":  # root's own KCM caches: a read that is not really uid 1000's would see this
        realm.kinit(0, "KCM:", principal=f"user{OTHER}/alt")
        request.addfinalizer(lambda: realm.kdestroy(0, "KCM:", all_caches=True))
    wqd = await start(wqd_factory, system_bus, realm)
    owner, spy = ForeignClient(system_bus.address, OWNER), ForeignClient(system_bus.address, OTHER)
    try:
        (sources,) = (await owner.request("get", path="/io/wqd/WatchQueue1", iface="io.wqd.WatchQueue1",
                                          prop="Sources"))["result"]
        # +kcm once sssd_kcm's store directory exists (the kcm fixture made it)
        # (the host kernel has no watch queue: KEYRING: runs on the proc-keys poller)
        assert sources["credentials"] in (("inotify+kcm+keys/proc-keys",) if kind == "KCM" else
                                          ("inotify+keys/proc-keys", "inotify+kcm+keys/proc-keys"))

        assert (await spy.request("match", rule="type='signal'"))["ok"]
        denied = await watch(spy, {"KCM": "KCM:1000"}.get(kind, mine))
        assert (denied["ok"], denied.get("error")) == (False, "io.wqd.WatchQueue1.Error.AccessDenied"), denied
        assert (await watch(spy, theirs))["ok"]  # its own: allowed, and quiet

        path = await subscribed(owner, mine)
        expected = []
        for act, changes in steps(realm, kind, mine):
            act()
            expected += changes
            got = await signals(owner, path, len(expected))
            assert [(m, b[0], b[1], b[2]["principal"]) for m, b in got] == \
                [("CredentialsChanged", mine, c, p) for c, p in expected]
            now = realm.read_as(OWNER, "read_cache", mine)
            info = got[-1][1][2]
            if now is not None:  # the times are the TGT's, as the owner reads them
                assert (info["expires"], info["renew_until"]) == (now["expires"], now["renew_until"])
                assert info["renew_until"] > info["expires"] > time.time()
        await asyncio.sleep(0.5)  # trailing store events re-read, find nothing new
        assert len(await signals(owner, path, 0, wait=0)) == len(expected)
        assert (await spy.request("signals", min=0, wait=0))["result"] == []
    finally:
        owner.close()
        spy.close()
        clean(realm, OWNER, mine)
        clean(realm, OTHER, theirs)


async def test_the_default_cache_is_the_callers_from_krb5_conf(realm, system_bus, wqd_factory):
    """TARGET "": the realm's krb5.conf sets no default_ccache_name, so MIT's
    FILE:/tmp/krb5cc_%{uid} for the caller's uid."""
    default = f"FILE:/tmp/krb5cc_{OWNER}"
    clean(realm, OWNER, default)
    await start(wqd_factory, system_bus, realm)
    owner = ForeignClient(system_bus.address, OWNER)
    try:
        path = await subscribed(owner, "")
        realm.kinit(OWNER, default)
        got = await signals(owner, path, 1)
        assert [(b[0], b[1]) for _, b in got] == [(default, "created")]
    finally:
        owner.close()
        clean(realm, OWNER, default)


async def test_a_cache_the_caller_may_not_read_is_denied(realm, system_bus, wqd_factory):
    """The read as the peer decides: a 0600 cache of another uid in a directory the
    caller may search, and a directory it may not search."""
    shared = realm.directory / "shared"
    shared.mkdir(exist_ok=True)
    shared.chmod(0o1777)
    name = f"FILE:{shared}/krb5cc_{OWNER}"
    realm.kinit(OWNER, name)
    await start(wqd_factory, system_bus, realm)
    spy = ForeignClient(system_bus.address, OTHER)
    try:
        for target in (name, f"DIR:{realm.user_dir(OWNER)}/dir-x", f"FILE:{realm.user_dir(OWNER)}/absent",
                       f"KEYRING:persistent:{OWNER}"):
            out = await watch(spy, target)
            assert (out["ok"], out.get("error")) == (False, "io.wqd.WatchQueue1.Error.AccessDenied"), (target, out)
        out = await watch(spy, "KEYRING:session:krb")  # the caller process's own keyring: wqd cannot see it
        assert out.get("error") == "io.wqd.WatchQueue1.Error.NotSupported", out
    finally:
        spy.close()
        realm.kdestroy(OWNER, name)


async def test_expiring_comes_once_lead_seconds_before_the_ticket_ends(realm, system_bus, wqd_factory):
    name = names(realm, OWNER, "expiring")["FILE"]
    clean(realm, OWNER, name)
    await start(wqd_factory, system_bus, realm)
    owner = ForeignClient(system_bus.address, OWNER)
    try:
        path = await subscribed(owner, name)
        realm.kinit(OWNER, name, lifetime=f"{LEAD + 4}s")
        (created,) = await signals(owner, path, 1)
        expires = created[1][2]["expires"]
        assert created[1][1] == "created" and 0 < expires - time.time() <= LEAD + 4
        got = await signals(owner, path, 2, wait=LEAD + 10)
        arrived = time.time()
        assert [b[1] for _, b in got] == ["created", "expiring"]
        assert got[1][1][2]["expires"] == expires
        assert expires - LEAD - 0.5 <= arrived <= expires - LEAD + 2.5  # timer at expires - lead
        await asyncio.sleep(max(0.0, expires + 1 - time.time()))  # past the end: not sent again
        assert [b[1] for _, b in await signals(owner, path, 0, wait=0)] == ["created", "expiring"]
    finally:
        owner.close()
        clean(realm, OWNER, name)


def context_switches(pid: int) -> int:
    """Voluntary and involuntary context switches of every thread of *pid* (as
    bench/p4_idle.py counts wake-ups)."""
    total = 0
    for status in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(status) as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass  # a thread that ended
    return total


async def test_an_idle_daemon_with_watches_does_not_wake_up(kcm, system_bus, wqd_factory):
    realm = kcm
    caches = names(realm, OWNER, "idle")
    del caches["KEYRING"]  # on the host it runs on the proc-keys poller, which polls (the kernel tier has the pipe)
    for name in caches.values():
        clean(realm, OWNER, name)
    wqd = await start(wqd_factory, system_bus, realm)
    owner = ForeignClient(system_bus.address, OWNER)
    try:
        for name in caches.values():
            realm.kinit(OWNER, name)
            await subscribed(owner, name)
        await asyncio.sleep(1.5)  # replies sent, trailing store events read
        before = context_switches(wqd.proc.pid)
        await asyncio.sleep(4)
        woke = context_switches(wqd.proc.pid) - before
        print(f"idle: {woke} context switches in 4 s")
        assert woke <= 4, f"{woke} wake-ups in 4 s idle"
        assert (await owner.request("signals", min=0, wait=0))["result"] == []
    finally:
        owner.close()
        for name in caches.values():
            clean(realm, OWNER, name)


async def test_a_removed_directory_ends_the_watch_after_its_last_change(realm, system_bus, wqd_factory):
    """/run/user/UID goes at logout: the cache is destroyed, and nothing can wake
    the watch again, so its subscription ends (Removed) instead of going quiet."""
    directory = realm.user_dir(OWNER) / "run"
    directory.mkdir()
    os.chown(directory, OWNER, OWNER)
    name = f"FILE:{directory}/krb5cc"
    realm.kinit(OWNER, name)
    await start(wqd_factory, system_bus, realm)
    owner = ForeignClient(system_bus.address, OWNER)
    try:
        path = await subscribed(owner, name)
        realm.as_uid(OWNER, "rm", "-r", str(directory))
        got = await signals(owner, path, 2)
        assert [(m, b[:2]) for m, b in got] == [("CredentialsChanged", [name, "destroyed"]),
                                                 ("Removed", ["the cache's directory was removed"])]
    finally:
        owner.close()


async def test_two_peers_of_one_uid_share_a_watch_and_both_get_the_change(realm, system_bus, wqd_factory):
    """Watch calls racing for one cache: the second waits for the first to arm it."""
    name = names(realm, OWNER, "shared")["FILE"]
    clean(realm, OWNER, name)
    await start(wqd_factory, system_bus, realm)
    peers = [ForeignClient(system_bus.address, OWNER) for _ in range(2)]
    try:
        paths = await asyncio.gather(*(subscribed(p, name) for p in peers))
        realm.kinit(OWNER, name)
        for peer, path in zip(peers, paths):
            assert [b[1] for _, b in await signals(peer, path, 1)] == ["created"]
    finally:
        for peer in peers:
            peer.close()
        clean(realm, OWNER, name)


async def test_an_unprivileged_instance_reads_no_other_uids_caches(tmp_path, realm, wqd_factory):
    """wqd running as uid 1000 can only read as uid 1000: a Watch by uid 1001 is
    NotSupported, not answered with uid 1000's caches (its KCM:, its files)."""
    from support import start_bus

    own = f'<policy user="{OWNER}"><allow own="io.wqd.WatchQueue1"/></policy>'
    bus = start_bus(tmp_path / "bus1000", "system", extra=own)
    try:
        await wqd_factory(bus, config(realm), env={"KRB5_CONFIG": str(realm.krb5_conf)},
                          wrapper=("setpriv", f"--reuid={OWNER}", f"--regid={OWNER}", "--clear-groups"))
        spy = ForeignClient(bus.address, OTHER)
        try:
            for target in ("", "KCM:", f"FILE:/tmp/krb5cc_{OTHER}"):
                out = await watch(spy, target)
                assert out.get("error") == "io.wqd.WatchQueue1.Error.NotSupported", (target, out)
                assert f"uid {OWNER}" in out["text"]
        finally:
            spy.close()
    finally:
        bus.stop()


async def test_peers_of_one_uid_with_other_groups_never_share_reads(realm, system_bus, wqd_factory):
    """Reads are keyed by the whole credential set (uid, gid, groups), not the
    uid: a cache of root's readable by group 2000 only, watched by two peers of
    uid 1000, one in group 2000. While the file is also world-readable both
    may watch it; once it is replaced by a group-only one, the peer outside the
    group is read as itself, denied, and its subscription ends (Removed) rather
    than getting the change through the other peer's groups."""
    shared = realm.directory / "grouped"
    shared.mkdir(exist_ok=True)
    shared.chmod(0o755)
    name = f"FILE:{shared}/krb5cc"

    def install(principal: str, mode: int) -> None:
        staging = f"{shared}/staging"
        realm.kinit(0, f"FILE:{staging}", principal=principal)
        os.chown(staging, 0, 2000)
        os.chmod(staging, mode)
        os.rename(staging, f"{shared}/krb5cc")

    install(f"user{OWNER}", 0o644)
    await start(wqd_factory, system_bus, realm)
    member = ForeignClient(system_bus.address, OWNER, groups=(2000,))
    outsider = ForeignClient(system_bus.address, OWNER)
    try:
        member_path = await subscribed(member, name)
        outsider_path = await subscribed(outsider, name)
        install(f"user{OWNER}/alt", 0o640)
        got = await signals(member, member_path, 1)
        assert [(m, b[1], b[2]["principal"]) for m, b in got] == \
            [("CredentialsChanged", "switched", f"user{OWNER}/alt@WQD.TEST")]
        assert await signals(outsider, outsider_path, 1) == [("Removed", ["access revoked"])]
    finally:
        member.close()
        outsider.close()
        realm.kdestroy(0, name)


#: wqd as its unit runs it: a mount namespace of its own (a slave copy, as
#: ProtectSystem=/PrivateTmp= make) and no CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH
#: (the unit's CapabilityBoundingSet= keeps neither).
UNIT_LIKE = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search",
             "unshare", "-m", "--propagation", "slave")


async def test_a_sandboxed_wqd_watches_the_callers_paths(realm, system_bus, wqd_factory):
    """Under its unit wqd's /tmp is PrivateTmp='s and /home, /run/user are hidden:
    a FILE:/DIR: path looked up in wqd's own namespace is another directory (an
    empty tmpfs over the caller's here) and, without CAP_DAC_*, root cannot
    search the caller's 0700 directory. The caller still gets its changes: the
    helper looks the path up from the host's root, and adds the directory's
    inotify watch as the caller. Fails with paths of wqd's own namespace
    (the watch is refused: no such directory) or a watch added as root."""
    home = realm.user_dir(OWNER)
    mine = {"FILE": f"FILE:{home}/krb5cc-sandboxed", "DIR": f"DIR:{home}/dir-sandboxed"}
    for name in mine.values():
        clean(realm, OWNER, name)
    wqd = await wqd_factory(system_bus, config(realm), env={"KRB5_CONFIG": str(realm.krb5_conf)},
                            wrapper=UNIT_LIKE)
    in_namespace_of(wqd.proc.pid, "mount", "-t", "tmpfs", "-o", "size=1m", "wqd-private-view", str(home))
    owner, spy = ForeignClient(system_bus.address, OWNER), ForeignClient(system_bus.address, OTHER)
    try:
        paths = {kind: await subscribed(owner, name) for kind, name in mine.items()}
        seen = 0  # signals of both subscriptions so far (``signals`` waits for that many in all)
        for kind, name in mine.items():
            denied = await watch(spy, name)  # the other uid still may not: the kernel says so, as it
            assert denied.get("error") == "io.wqd.WatchQueue1.Error.AccessDenied", (kind, denied)
            realm.kinit(OWNER, name)
            got = await signals(owner, paths[kind], seen + 1)
            assert [(b[0], b[1], b[2]["principal"]) for _, b in got] == \
                [(name, "created", f"user{OWNER}@WQD.TEST")], kind
            realm.kdestroy(OWNER, name)
            got = await signals(owner, paths[kind], seen + 2)
            assert [b[1] for _, b in got] == ["created", "destroyed"], kind
            seen += 2
    finally:
        owner.close()
        spy.close()
        for name in mine.values():
            clean(realm, OWNER, name)
