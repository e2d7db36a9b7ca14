"""The keys source on its preferred backend: a real notification pipe.

Runs inside the qemu guest (tests/vm/run), whose kernel has CONFIG_WATCH_QUEUE and
CONFIG_KEY_NOTIFICATIONS; skipped elsewhere with the reason. The daemon, the bus
and keyctl are the real ones, taken read-only from the host's root.
"""

import asyncio
import os
import re
import signal
import subprocess

import pytest
import pytest_asyncio

from support import IFACE, MANAGER, SUB_IFACE, BusError, Client, keyctl, variant_options
from wqd.bus.connection import FlowControlledBus

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio]

WQ_CONFIG = """
[keys]
backend = "watch_queue"
"""


def in_guest() -> bool:
    with open("/proc/1/cmdline", "rb") as f:
        return b"guest-init" in f.read()


@pytest_asyncio.fixture
async def wqd(watch_queue_kernel, session_bus, wqd_factory):
    return await wqd_factory(session_bus, config=WQ_CONFIG)


@pytest_asyncio.fixture
async def client(wqd, client_factory):
    return await client_factory(wqd.address)


@pytest.fixture
def ring(watch_queue_kernel):
    serial = keyctl("newring", "wqd-kt", "@s")  # possessed: the guest's @u is not
    yield int(serial)
    subprocess.run(["keyctl", "unlink", serial, "@s"], capture_output=True)


def add(ring, name="k", data="v"):
    return int(keyctl("add", "user", name, data, str(ring)))


def records_read(wqd) -> int:
    return sum(int(n) for n in re.findall(r"watch_queue: read \d+ bytes, (\d+) record", wqd.log_text()))


async def test_sources_reports_watch_queue(client):
    assert (await client.get(MANAGER, IFACE, "Sources"))["keys"] == "watch_queue"


CASES = {
    "linked": ("ring", lambda r, ids: ids.update(new=add(r, "n")), lambda r, ids: [(r, "linked", ids["new"])]),
    "unlinked": ("ring", lambda r, ids: keyctl("unlink", str(ids["k"]), str(r)), lambda r, ids: [(r, "unlinked", ids["k"])]),
    "cleared": ("ring", lambda r, ids: keyctl("clear", str(r)), lambda r, ids: [(r, "cleared", 0)]),
    "updated": ("key", lambda r, ids: keyctl("update", str(ids["k"]), "new"), lambda r, ids: [(ids["k"], "updated", 0)]),
    "revoked": ("key", lambda r, ids: keyctl("revoke", str(ids["k"])), lambda r, ids: [(ids["k"], "revoked", 0)]),
    "setattr": ("key", lambda r, ids: keyctl("setperm", str(ids["k"]), "0x3f3f0000"),
                lambda r, ids: [(ids["k"], "setattr", 0)]),
    "invalidated": ("key", lambda r, ids: keyctl("invalidate", str(ids["k"])),
                    lambda r, ids: [(ids["k"], "invalidated", 0)]),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_every_change_kind(case, wqd, client, ring):
    what, act, expect = CASES[case]
    ids = {"k": add(ring, "k"), "k2": add(ring, "k2")}
    path = await client.watch("keys", str(ring if what == "ring" else ids["k"]))
    act(ring, ids)
    want = [("KeyChanged", list(w)) for w in expect(ring, ids)]
    sigs = await client.wait_signals(path, len(want))
    assert sigs[:len(want)] == want
    if case == "invalidated":  # the kernel then garbage-collects the key: its removal record
        sigs = await client.wait_signals(path, len(want) + 1)
        assert sigs[len(want)] == ("Removed", ["key removed"])


async def test_garbage_collected_key_ends_with_removed(client, ring):
    k = add(ring)
    path = await client.watch("keys", str(k))
    keyctl("unlink", str(k), str(ring))  # last reference: the key is garbage-collected
    sigs = await client.wait_signals(path, 1)
    assert sigs == [("Removed", ["key removed"])]
    reply = await client.call(path, SUB_IFACE, "Close")
    assert reply.error_name == "io.wqd.WatchQueue1.Error.NoSuchObject"


async def test_loss_record_becomes_lost_for_each_subscriber(watch_queue_kernel, session_bus, wqd_factory,
                                                             client_factory, ring):
    wqd = await wqd_factory(session_bus, config=WQ_CONFIG + "queue_pages = 1\n")
    a = await client_factory(wqd.address)
    b = await client_factory(wqd.address)
    pa = await a.watch("keys", str(ring))
    pb = await b.watch("keys", str(ring))
    wqd.proc.send_signal(signal.SIGSTOP)
    try:
        for i in range(200):  # far more than one page of notes holds
            add(ring, f"x{i}")
    finally:
        wqd.proc.send_signal(signal.SIGCONT)
    for c, p in ((a, pa), (b, pb)):
        await c.wait_for(lambda c=c, p=p: any(s[0] == "Lost" for s in c.signals[p]), timeout=20)
        assert await c.get(p, SUB_IFACE, "Lost") >= 1
    # the subscriptions go on after the loss
    k = add(ring, "after")
    for c, p in ((a, pa), (b, pb)):
        await c.wait_for(lambda c=c, p=p: ("KeyChanged", [ring, "linked", k]) in c.signals[p], timeout=20)


async def test_kernel_filter_keeps_unwanted_records_out_of_the_daemon(wqd, client, ring):
    path = await client.watch("keys", str(ring), variant_options(changes=["linked"]))
    before = records_read(wqd)
    keys = [add(ring, f"f{i}") for i in range(5)]
    for k in keys:
        keyctl("unlink", str(k), str(ring))
    sentinel = add(ring, "sentinel")
    sigs = await client.wait_signals(path, 6)
    assert [s[1][2] for s in sigs] == keys + [sentinel]
    assert records_read(wqd) - before == 6, "unlinked records reached the daemon: no kernel filter"


async def test_filter_removed_when_a_subscriber_wants_everything(wqd, client, ring):
    await client.watch("keys", str(ring), variant_options(changes=["linked"]))
    path = await client.watch("keys", str(ring))
    k = add(ring)
    keyctl("unlink", str(k), str(ring))
    sigs = await client.wait_signals(path, 2)
    assert [s[1][1] for s in sigs] == ["linked", "unlinked"]


async def test_matches_the_kernels_own_watch_test(watch_test_oracle, wqd, client, ring):
    """wqd's KeyChanged signals equal, one to one, what samples/watch_queue/watch_test decodes."""
    oracle = subprocess.Popen([watch_test_oracle, str(ring)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        assert "watching" in oracle.stderr.readline()
        path = await client.watch("keys", str(ring))
        a, b = add(ring, "a"), add(ring, "b")
        keyctl("unlink", str(a), str(ring))
        keyctl("setperm", str(ring), "0x3f3f0000")
        keyctl("clear", str(ring))
        c = add(ring, "c")
        keyctl("link", str(c), str(ring))  # already linked: replaces the link, still "linked"
        n_ops = 7
        sigs = await client.wait_signals(path, n_ops)
        ours = [tuple(s[1]) for s in sigs if s[0] == "KeyChanged"]
        theirs = []
        while len(theirs) < len(ours):
            line = await asyncio.wait_for(asyncio.to_thread(oracle.stdout.readline), 10)
            m = re.match(r"KEY ([0-9a-f]{8}) change=(\d+)\[(\w+)\] aux=(\d+)", line)
            if m:
                theirs.append((int(m[1], 16), m[3], int(m[4])))
        assert ours == theirs
    finally:
        oracle.kill()
        oracle.wait()
        oracle.stdout.close()
        oracle.stderr.close()


def voluntary_switches(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError


async def test_idle_cost_watch_queue_vs_proc_keys(watch_queue_kernel, session_bus, wqd_factory, client_factory,
                                                  ring, tmp_path):
    from support import start_bus

    other_bus = start_bus(tmp_path / "bus2", "session")
    try:
        wq = await wqd_factory(session_bus, config=WQ_CONFIG, name="wq")
        pk = await wqd_factory(other_bus, config='[keys]\nbackend = "proc-keys"\n', name="pk")
        keys = [add(ring, f"idle{i}") for i in range(100)]
        for d in (wq, pk):
            c = await client_factory(d.address)
            for k in keys:
                await c.watch("keys", str(k))
        await asyncio.sleep(1)
        before = [voluntary_switches(d.proc.pid) for d in (wq, pk)]
        await asyncio.sleep(10)
        after = [voluntary_switches(d.proc.pid) for d in (wq, pk)]
        wq_wakeups, pk_wakeups = after[0] - before[0], after[1] - before[1]
        print(f"\nidle 10 s, 100 watched keys: watch_queue {wq_wakeups} voluntary context switches, "
              f"proc-keys {pk_wakeups}")
        assert wq_wakeups <= 1, "the watch-queue backend woke up on its own"
        assert pk_wakeups >= 5  # the poller: about one wakeup per second
    finally:
        other_bus.stop()


async def test_many_subscribers_share_few_kernel_watches(watch_queue_kernel, session_bus, wqd_factory):
    """1,000 subscriptions over 10 keys take 10 kernel watches: with RLIMIT_NOFILE at 40
    (the kernel counts a user's watches against it) they all fit; 50 distinct keys do not,
    and the kernel's EAGAIN comes back as LimitsExceeded."""
    wqd = await wqd_factory(session_bus, config=WQ_CONFIG, wrapper=("prlimit", "--nofile=40:40"))
    client = await Client.connect(wqd.address, bus_class=FlowControlledBus)
    ring = keyctl("newring", "wqd-many", "@s")
    try:
        keys = [add(int(ring), f"m{i}") for i in range(60)]
        paths = []
        for batch in range(10):  # the bus caps pending replies per connection
            paths += await asyncio.gather(*(client.watch("keys", str(keys[i % 10]))
                                            for i in range(batch * 100, batch * 100 + 100)))
        assert len(set(paths)) == 1000
        refused = []
        for k in keys[10:]:
            try:
                await client.watch("keys", str(k))
            except BusError as exc:
                refused.append(exc.name)
        assert refused and set(refused) == {"io.wqd.WatchQueue1.Error.LimitsExceeded"}
        assert len(refused) >= 15
        # the shared watches still deliver, to every subscriber
        keyctl("update", str(keys[0]), "again")
        await client.wait_for(lambda: sum(len(v) for v in client.signals.values()) >= 100, timeout=30)
    finally:
        client.close()
        subprocess.run(["keyctl", "unlink", ring, "@s"], capture_output=True)


async def test_key_under_construction_is_refused_without_stalling(watch_test_oracle, wqd, client, tmp_path):
    """KEYCTL_WATCH_KEY waits for construction to finish; wqd must not stall on it.

    This is also why no watcher can receive ``instantiated`` from this kernel: the
    kernel's own watch_test, pointed at the key under construction, is stuck in
    KEYCTL_WATCH_KEY until the key is instantiated, and then reports no
    ``instantiated`` record (the notification was posted before its watch existed).
    """
    if not in_guest():
        pytest.skip("rewires /etc/request-key.conf: only inside the throwaway guest")
    handler = tmp_path / "handler.sh"
    keyfile, gofile = tmp_path / "key", tmp_path / "go"
    handler.write_text(f"#!/bin/sh\necho $1 > {keyfile}.tmp && mv {keyfile}.tmp {keyfile}\n"
                       f"while [ ! -e {gofile} ]; do sleep 0.05; done\nexec keyctl instantiate $1 data $2\n")
    handler.chmod(0o755)
    conf = tmp_path / "request-key.conf"
    conf.write_text(f"create user wqd-uc:* * {handler} %k %S\n")
    subprocess.run(["mount", "--bind", str(conf), "/etc/request-key.conf"], check=True)
    requester = oracle = None
    try:
        requester = subprocess.Popen(["keyctl", "request2", "user", "wqd-uc:1", "info", "@s"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(200):
            if keyfile.exists():
                break
            await asyncio.sleep(0.05)
        serial = keyfile.read_text().strip()
        oracle = subprocess.Popen([watch_test_oracle, serial], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        with pytest.raises(BusError) as err:
            await asyncio.wait_for(client.watch("keys", serial), 10)
        assert err.value.name == "io.wqd.WatchQueue1.Error.NotSupported"
        assert "under construction" in err.value.text
        assert await client.get(MANAGER, IFACE, "Version") == "1"
        assert oracle.poll() is None  # still waiting inside KEYCTL_WATCH_KEY
        gofile.touch()
        out, _ = requester.communicate(timeout=20)
        assert out.strip() == serial
        assert await client.watch("keys", serial)
        assert "watching" in await asyncio.wait_for(asyncio.to_thread(oracle.stderr.readline), 20)
        keyctl("update", serial, "later")  # something the oracle does see
        seen = ""
        while not seen.startswith("KEY"):  # skip its "read() = N" and "NOTIFY[...]" lines
            seen = await asyncio.wait_for(asyncio.to_thread(oracle.stdout.readline), 20)
            assert seen, "watch_test ended"
        assert "change=1[updated]" in seen, seen  # the first key record: no "instantiated" before it
    finally:
        if oracle is not None:
            oracle.kill()
            oracle.communicate()
        gofile.touch()
        if requester is not None and requester.poll() is None:
            requester.kill()
            requester.communicate()
        subprocess.run(["umount", "/etc/request-key.conf"], check=False)
