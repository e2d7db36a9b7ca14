"""The credentials source against a hostile user (issue 17): what a uid can make
wqd do by repeating a call, by making every KCM watcher re-read, by spamming
the directory where others' FILE: caches live.

Real daemon on a system-type bus, a real MIT KDC on loopback and a real
sssd_kcm (tests/krb5_support.py), clients and attackers as uids 1000/1001
(setpriv). What wqd does is counted from its own debug log: every helper read
of a cache is a line ``credentials: helper read N as uid U: CACHE``.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from krb5_support import Realm  # noqa: E402
from support import PYTHON, ForeignClient  # noqa: E402

from test_credential_helper import RootProbe, run_as_1000, sigcont_all  # noqa: E402

pytestmark = [pytest.mark.asyncio, pytest.mark.bus, pytest.mark.root]

VICTIM, ATTACKER = 1000, 1001
RATE, BURST = 20, 40  # [credentials] watch_rate / watch_burst: the defaults
INTERVAL = 0.25  # [credentials] read_interval in these tests
READ = re.compile(r"credentials: helper read \d+ as uid (\d+): (.*)$", re.M)
STARTED = re.compile(r"credential helper \d+ started for Credentials\(uid=(\d+)")  # wqd.sources.helper_pool


def config(realm: Realm, extra: str = "", interval: float = INTERVAL) -> str:
    return f"""
[credentials]
kcm_store = "{realm.kcm_store}"
read_interval = {interval}
{extra}
"""


async def start(wqd_factory, system_bus, realm: Realm, extra: str = "", interval: float = INTERVAL):
    return await wqd_factory(system_bus, config(realm, extra, interval), env={"KRB5_CONFIG": str(realm.krb5_conf)})


def helper_reads(wqd, uid: int) -> int:
    return sum(1 for m in READ.finditer(wqd.log_text()) if int(m.group(1)) == uid)


async def subscribed(peer: ForeignClient, target: str) -> str:
    reply = await peer.request("watch", source="credentials", target=target)
    assert reply["ok"], (target, reply)
    return reply["result"][0]


async def signals_of(peer: ForeignClient, path: str, n: int, wait: float = 15) -> list:
    out = await peer.request("signals", min=n, wait=wait)
    assert out["ok"], out
    return [(b[1], b[2]["principal"]) for p, member, b in out["result"] if p == path and member == "CredentialsChanged"]


def as_uid(realm: Realm, uid: int, script: str, ccache: str) -> subprocess.Popen:
    """*script* (sh) as *uid* with the realm's krb5.conf, until killed."""
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "KRB5_CONFIG": str(realm.krb5_conf), "KRB5CCNAME": ccache,
           "LANG": "C"}
    return subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "sh", "-c", script],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")


def stop(proc: subprocess.Popen) -> tuple[str, str]:
    proc.terminate()
    try:
        return proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


async def test_a_watch_storm_is_paced_per_uid_and_root_stays_answered(realm, system_bus, wqd_factory,
                                                                    client_factory):
    """uid 1000 makes 10,000 credentials Watch(+Close) calls, 32 in flight, on
    one cache and on a distinct cache per call: at most the burst plus the rate
    are granted, each granted or refused call costs at most the reads it is
    entitled to, no process is forked per call, root waits < 1 s."""
    home = realm.user_dir(VICTIM)
    wqd = await start(wqd_factory, system_bus, realm)
    root = await client_factory(system_bus.address)
    probe = RootProbe(root)
    t = time.monotonic()
    try:
        out = await run_as_1000("watch_storm.py", system_bus.address, "credentials", "10000", "32",
                                f"FILE:{home}/krb5cc-storm", f"FILE:{home}/c{{i}}", timeout=300)
    finally:
        took = time.monotonic() - t
        worst = await probe.stop()
    answers, reads = out["answers"], helper_reads(wqd, VICTIM)
    started = STARTED.findall(wqd.log_text())  # every helper the pool started, as whom
    print(f"10000 credentials Watch+Close from uid 1000 in {took:.1f} s: {answers}; {reads} helper reads; "
          f"root worst {worst * 1000:.0f} ms over {len(probe.latencies)} calls; helpers started: {started}")
    assert sum(answers.values()) == 10000
    assert set(answers) <= {"ok", "io.wqd.WatchQueue1.Error.LimitsExceeded"}, answers
    granted = answers.get("ok", 0)
    assert 1 <= granted <= BURST + RATE * took + 5
    assert out["texts"]["io.wqd.WatchQueue1.Error.LimitsExceeded"] == \
        f"too many credentials Watch calls from uid {VICTIM}; at most {RATE} a second"
    assert reads <= 2 * granted  # the judging read of each granted call, and the first read of its new watch
    assert started == [str(VICTIM)], started  # one helper for uid 1000's credentials, not one per call
    assert worst < 1.0, f"root waited {worst:.2f} s"
    assert not probe.failures, probe.failures
    assert wqd.proc.poll() is None


async def test_one_uid_watches_at_most_caches_per_uid_distinct_caches(realm, system_bus, wqd_factory):
    """Each distinct cache is an inotify watch of the daemon's (its
    ``max_user_watches``, shared by every uid) and a read on each wake: uid 1000
    gets ``caches_per_uid`` of them, then LimitsExceeded before any read;
    joining one it watches already is free; uid 1001 is not affected; leaving
    gives the room back."""
    home = realm.user_dir(VICTIM)
    wqd = await start(wqd_factory, system_bus, realm, "caches_per_uid = 8\nwatch_burst = 1000")
    attacker, other = ForeignClient(system_bus.address, VICTIM), ForeignClient(system_bus.address, ATTACKER)
    try:
        for i in range(8):
            await subscribed(attacker, f"FILE:{home}/c{i}")
        before = helper_reads(wqd, VICTIM)
        for i in range(8, 40):
            out = await attacker.request("watch", source="credentials", target=f"FILE:{home}/c{i}")
            assert out.get("error") == "io.wqd.WatchQueue1.Error.LimitsExceeded", out
        assert out["text"] == f"uid {VICTIM} watches 8 credential caches already ([credentials] caches_per_uid)"
        assert helper_reads(wqd, VICTIM) == before  # refused before the helper read anything
        await subscribed(attacker, f"FILE:{home}/c3")  # a second subscription of a watched cache
        await subscribed(other, f"FILE:{realm.user_dir(ATTACKER)}/mine")
        attacker.close()
        again = ForeignClient(system_bus.address, VICTIM)
        try:
            for _ in range(100):  # until wqd has seen the first connection go
                out = await again.request("watch", source="credentials", target=f"FILE:{home}/c9")
                if out["ok"]:
                    break
                await asyncio.sleep(0.05)
            assert out["ok"], out
        finally:
            again.close()
    finally:
        attacker.close()
        other.close()


@pytest.mark.parametrize("interval", [INTERVAL, 0])
async def test_a_kinit_loop_of_another_uid_does_not_amplify_kcm_reads(interval, kcm, system_bus, wqd_factory):
    """sssd-kcm's store is one file: every kinit of any uid wakes every KCM:
    watch. uid 1001 runs kinit/kdestroy against sssd_kcm in a loop while
    watching KCM: and 16 other KCM: names of its own; uid 1000 watches KCM: and
    goes through its own sequence. uid 1000 gets exactly its changes, each
    within a bound of its command; wqd reads uid 1000's cache at most once per
    read_interval (plus once per own change), not once per store event, and
    uid 1001's 17 watches at most once per interval together, not 17 times
    (each read is work for sssd_kcm, which serves every uid).

    With ``read_interval = 0`` (reads back to back, as before the pacing) the
    attack makes the victim's cache be read ~20 times a second, so reads land
    between the two writes of its kinit -R and inside sssd-kcm's kdestroy: the
    sequence must still be exact (``destroyed`` is confirmed after
    ``credentials.SETTLE``); only the read bound is not asserted there."""
    realm = kcm
    realm.kdestroy(VICTIM, "KCM:", all_caches=True)
    realm.kdestroy(ATTACKER, "KCM:", all_caches=True)
    wqd = await start(wqd_factory, system_bus, realm, interval=interval)
    victim, attacker = ForeignClient(system_bus.address, VICTIM), ForeignClient(system_bus.address, ATTACKER)
    loop_proc = None
    try:
        path = await subscribed(victim, "KCM:")
        for name in ["KCM:", *(f"KCM:{ATTACKER}:wqd{i}" for i in range(16))]:
            await subscribed(attacker, name)
        loop_proc = as_uid(realm, ATTACKER, f"n=0; while :; do echo {realm.password(f'user{ATTACKER}')} | "
                           f"kinit -l 10m user{ATTACKER} >/dev/null && kdestroy; n=$((n+1)); echo $n; done",
                           "KCM:")
        await asyncio.sleep(1)  # the loop going
        start_reads, t0 = helper_reads(wqd, VICTIM), time.monotonic()
        start_attacker = helper_reads(wqd, ATTACKER)
        me, alt = f"user{VICTIM}@WQD.TEST", f"user{VICTIM}/alt@WQD.TEST"
        steps = [
            (lambda: realm.kinit(VICTIM, "KCM:"), ("created", me)),
            (lambda: realm.renew(VICTIM, "KCM:"), ("renewed", me)),
            (lambda: realm.kinit(VICTIM, "KCM:", principal=f"user{VICTIM}/alt"), ("switched", alt)),
            (lambda: realm.kswitch(VICTIM, "KCM:", me), ("switched", me)),
            (lambda: realm.kdestroy(VICTIM, "KCM:"), ("switched", alt)),
            (lambda: realm.kdestroy(VICTIM, "KCM:", all_caches=True), ("destroyed", alt)),
        ]
        expected, delays = [], []
        for act, change in steps:
            await asyncio.to_thread(act)
            done = time.monotonic()
            expected.append(change)
            got = await signals_of(victim, path, len(expected))
            delays.append(time.monotonic() - done)
            assert got == expected
        await asyncio.sleep(3)  # the attack goes on: no more changes of uid 1000's
        assert await signals_of(victim, path, 0, wait=0) == expected
        took = time.monotonic() - t0
        reads = helper_reads(wqd, VICTIM) - start_reads
        attacker_reads = helper_reads(wqd, ATTACKER) - start_attacker
    finally:
        out, _err = stop(loop_proc) if loop_proc is not None else ("", "")
        victim.close()
        attacker.close()
        realm.kdestroy(VICTIM, "KCM:", all_caches=True)
        realm.kdestroy(ATTACKER, "KCM:", all_caches=True)
    kinits = int(out.split()[-1]) if out.split() else 0
    print(f"uid {ATTACKER}: {kinits} kinit+kdestroy in {took:.1f} s; uid {VICTIM}: {reads} helper reads "
          f"(bound {took / (interval or INTERVAL) + len(steps) + 2:.0f}), delays {[round(d, 2) for d in delays]} s; "
          f"uid {ATTACKER}: {attacker_reads} helper reads")
    assert kinits >= 10, "the attack did not run"
    assert max(delays) < INTERVAL + 3.0  # the pace, plus a loaded machine's read and bus round trip
    if interval:
        assert reads <= took / interval + len(steps) + 2  # one pass per interval (a pass: its one KCM: watch)
        assert attacker_reads <= took / interval + 17  # a read per interval, the first pass all 17 at once


async def test_spamming_the_directory_of_a_file_cache_costs_the_owner_bounded_reads(realm, system_bus,
                                                                                    wqd_factory, client_factory):
    """uid 1001 creates, renames and unlinks files as fast as it can in the
    sticky world-writable directory where uid 1000's FILE: cache lives (as
    /tmp does). Only events of the cache's own name wake its watch; an inotify
    queue overflow wakes every watch, paced. uid 1000 gets exactly its changes,
    its reads stay bounded, root waits < 1 s."""
    shared = realm.directory / "spam"
    shared.mkdir(exist_ok=True)
    shared.chmod(0o1777)
    name = f"FILE:{shared}/krb5cc_{VICTIM}"
    realm.kdestroy(VICTIM, name)
    wqd = await start(wqd_factory, system_bus, realm)
    root = await client_factory(system_bus.address)
    victim = ForeignClient(system_bus.address, VICTIM)
    spam = subprocess.Popen(
        ["setpriv", f"--reuid={ATTACKER}", f"--regid={ATTACKER}", "--clear-groups", PYTHON, "-c",
         "import os, sys\n"
         "d, n = sys.argv[1], 0\n"
         "while True:\n"
         f"    a, b = f'{{d}}/krb5cc_{VICTIM}.s{{n % 64}}', f'{{d}}/x{{n % 64}}'\n"
         "    os.close(os.open(a, os.O_CREAT | os.O_WRONLY, 0o600))\n"
         "    os.rename(a, b)\n"
         "    os.unlink(b)\n"
         "    n += 1\n"
         "    if n % 1000 == 0:\n"
         "        print(n, flush=True)\n", str(shared)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    probe = None
    try:
        path = await subscribed(victim, name)
        await asyncio.sleep(0.5)
        probe = RootProbe(root)
        start_reads, t0 = helper_reads(wqd, VICTIM), time.monotonic()
        me, alt = f"user{VICTIM}@WQD.TEST", f"user{VICTIM}/alt@WQD.TEST"
        steps = [
            (lambda: realm.kinit(VICTIM, name), ("created", me)),
            (lambda: realm.renew(VICTIM, name), ("renewed", me)),
            (lambda: realm.kinit(VICTIM, name, principal=f"user{VICTIM}/alt"), ("switched", alt)),
            (lambda: realm.kdestroy(VICTIM, name), ("destroyed", alt)),
        ]
        expected = []
        for act, change in steps:
            await asyncio.to_thread(act)
            expected.append(change)
            assert await signals_of(victim, path, len(expected)) == expected
        await asyncio.sleep(2)
        assert await signals_of(victim, path, 0, wait=0) == expected
        took = time.monotonic() - t0
        reads = helper_reads(wqd, VICTIM) - start_reads
    finally:
        worst = await probe.stop() if probe is not None else 0.0
        out, err = stop(spam)
        victim.close()
        realm.kdestroy(VICTIM, name)
    rounds = int(out.split()[-1]) if out.split() else 0
    overflowed = wqd.log_text().count("inotify queue overflowed")
    print(f"uid {ATTACKER}: {rounds} create+rename+unlink in the cache's directory over {took:.1f} s; uid {VICTIM}: "
          f"{reads} helper reads; queue overflows {overflowed}; root worst {worst * 1000:.0f} ms")
    assert rounds >= 1000, f"the spam did not run: {err}"
    assert reads <= took / INTERVAL + 3 * len(steps) + 2
    assert worst < 1.0, f"root waited {worst:.2f} s"
    assert not probe.failures, probe.failures


async def test_nothing_wqd_runs_for_credentials_is_in_reach_of_the_peer(realm, system_bus, wqd_factory,
                                                                        client_factory):
    """uid 1000 keeps its credential helper reading (a Watch at a time, each
    read done with the helper's effective uid 1000) while it tries SIGSTOP,
    SIGKILL, tgkill, ptrace, /proc/PID/mem, renice and CPU pinning on wqd and
    every process under it: none works (real and saved uid stay 0), root stays
    answered, and uid 1001's cache change still arrives."""
    home = realm.user_dir(VICTIM)
    theirs = f"FILE:{realm.user_dir(ATTACKER)}/krb5cc-reach"
    realm.kdestroy(ATTACKER, theirs)
    wqd = await start(wqd_factory, system_bus, realm, "watch_burst = 100000\nwatch_rate = 100000")
    root = await client_factory(system_bus.address)
    attacker, victim = ForeignClient(system_bus.address, VICTIM), ForeignClient(system_bus.address, ATTACKER)
    probe = RootProbe(root)
    try:
        victim_path = await subscribed(victim, theirs)
        attack = asyncio.get_running_loop().create_task(run_as_1000("credential_attacker.py", str(wqd.proc.pid), "3"))
        answers = []
        while not attack.done():
            out = await attacker.request("watch", source="credentials", target=f"FILE:{home}/reach")
            answers.append(out.get("error", "ok"))
            if out["ok"]:
                await attacker.request("call", path=out["result"][0], iface="io.wqd.Subscription1", member="Close")
        result = await attack
        realm.kinit(ATTACKER, theirs)
        assert await signals_of(victim, victim_path, 1) == [("created", f"user{ATTACKER}@WQD.TEST")]
    finally:
        worst = await probe.stop()
        sigcont_all(wqd.proc.pid)  # had a SIGSTOP landed, the rest would hang, not fail
        attacker.close()
        victim.close()
        realm.kdestroy(ATTACKER, theirs)
    print(f"attack: {result['tries']} tries on {len(result['seen'])} processes; {len(answers)} Watch calls "
          f"meanwhile; root worst {worst * 1000:.0f} ms")
    assert result["won"] == [], result["won"]
    helpers = [p for p, u in result["seen"].items() if u[3] == VICTIM]
    assert helpers, f"the attacker never saw its helper: {result['seen']}"
    assert set(answers) == {"ok"}, answers
    assert worst < 1.0, f"root waited {worst:.2f} s"
    assert not probe.failures, probe.failures
    assert wqd.proc.poll() is None
