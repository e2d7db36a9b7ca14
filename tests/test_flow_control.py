"""Flow control: bursts through the replay backend never break the connection or
grow memory without bound, and every event is either delivered or counted lost.
"""

import asyncio
import os
import signal

import pytest

from support import IFACE, KEY, MANAGER, SUB_IFACE, Client, ForeignClient, feed, replay_config, start_bus
from udev import NULL_DEVPATH, trigger
from wqd.parse.watch_queue import encode_key_record

pytestmark = [pytest.mark.asyncio, pytest.mark.bus]


def vm_hwm_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def test_burst_with_a_stopped_reader_accounts_for_every_event(session_bus, wqd_factory, tmp_path):
    fifo = tmp_path / "replay"
    os.mkfifo(fifo)
    await wqd_factory(session_bus, config=replay_config(fifo, queue_length=64))
    slow = ForeignClient(session_bus.address, 0)  # its own process, so it can be stopped
    try:
        out = await slow.request("watch", source="keys", target=str(KEY))
        path = out["result"][0]
        generated = 20_000
        os.kill(slow.proc.pid, signal.SIGSTOP)
        writer = feed(fifo, generated)
        await asyncio.to_thread(writer.join, 60)
        await asyncio.sleep(1.0)
        os.kill(slow.proc.pid, signal.SIGCONT)
        d, lost, got = await accounted(slow, path, generated)
        assert d + lost == generated
        # A 64-event queue against 256-record reads must overflow: loss is exercised.
        assert lost > 0 and d > 0
        changed = [s for s in got if s[1] == "KeyChanged"]
        lost_signals = [s[2][0] for s in got if s[1] == "Lost"]
        assert len(changed) == d, "every delivered event reached the client"
        assert sum(lost_signals) == lost, "every loss was announced with Lost(count)"
        # in order: aux numbers increase, and a Lost sits exactly where a gap is
        seq = [s[2][2] for s in changed]
        assert seq == sorted(seq)
        gaps = sum(b - a - 1 for a, b in zip(seq, seq[1:])) + seq[0] + (generated - 1 - seq[-1])
        assert gaps == lost
    finally:
        slow.close()


async def test_100k_burst_bounded_memory_exact_accounting(session_bus, wqd_factory, client_factory, tmp_path):
    fifo = tmp_path / "replay"
    os.mkfifo(fifo)
    wqd = await wqd_factory(session_bus, config=replay_config(fifo))
    client = await client_factory(session_bus.address)
    path = await client.watch("keys", str(KEY))
    baseline = vm_hwm_kb(wqd.proc.pid)
    generated = 100_000
    writer = feed(fifo, generated)
    await asyncio.to_thread(writer.join, 120)

    d, lost = await taken(client, path, generated)
    assert d + lost == generated
    assert wqd.proc.poll() is None, "the daemon survived"
    assert "BlockingIOError" not in wqd.log_text()
    growth_mb = (vm_hwm_kb(wqd.proc.pid) - baseline) / 1024
    assert growth_mb < 64, f"peak RSS grew by {growth_mb:.1f} MB for a 100k burst"
    await client.wait_for(lambda: len(client.signals[path]) >= d + (1 if lost else 0), timeout=60)
    assert sum(1 for s in client.signals[path] if s[0] == "KeyChanged") == d


async def test_replay_from_a_regular_file_is_read_to_its_end(session_bus, wqd_factory, client_factory, tmp_path):
    """A regular file cannot be polled: it is read in batches from the loop, to its end."""
    capture = tmp_path / "capture.bin"
    capture.write_bytes(b"".join(encode_key_record(KEY, "linked", i) for i in range(5000)))
    wqd = await wqd_factory(session_bus, config=replay_config(capture))
    client = await client_factory(session_bus.address)
    for _ in range(200):
        if "read to its end" in wqd.log_text():
            break
        await asyncio.sleep(0.05)
    assert "read to its end" in wqd.log_text()
    assert await client.get("/io/wqd/WatchQueue1", "io.wqd.WatchQueue1", "Version") == "1"


QUOTA = 1_000_000  # the bus's quotas in these tests; a default system bus has 127 MiB


@pytest.fixture
def quota_bus(tmp_path):
    """A system-type bus with the shipped policy and small quotas (*extra* adds to its
    configuration), so that a few MB show what 127 MiB would on a default system bus."""
    if os.geteuid() != 0:
        pytest.skip("a system-type bus with clients as other uids needs root")
    made = []

    def make(extra: str = ""):
        bus = start_bus(tmp_path / f"bus{len(made)}", "system",
                        extra=f'<limit name="max_incoming_bytes">{QUOTA}</limit>'
                              f'<limit name="max_outgoing_bytes">{QUOTA}</limit>{extra}')
        made.append(bus)
        return bus

    yield make
    for bus in made:
        bus.stop()


async def replay_daemon(tmp_path, wqd_factory, bus):
    fifo = tmp_path / "replay"
    os.mkfifo(fifo)
    return await wqd_factory(bus, config=replay_config(fifo)), fifo


async def accounted(peer, path: str, generated: int) -> tuple[int, int, list]:
    """(Delivered, Lost, the signals received) once every event is one or the other."""
    for _ in range(600):
        d = (await peer.request("get", path=path, iface=SUB_IFACE, prop="Delivered"))["result"][0]
        lost = (await peer.request("get", path=path, iface=SUB_IFACE, prop="Lost"))["result"][0]
        if d + lost >= generated:
            break
        await asyncio.sleep(0.1)
    # Every event taken is counted Delivered before its signal reaches the peer, and a Lost
    # counts before its signal goes: wait for the signals to catch up with the counts.
    for _ in range(150):
        got = (await peer.request("signals", min=d, wait=60))["result"]
        mine = [s for s in got if s[0] == path]
        if (sum(1 for s in mine if s[1] not in ("Lost", "Removed")) >= d
                and sum(s[2][0] for s in mine if s[1] == "Lost") >= lost):
            break
        await asyncio.sleep(0.2)
    return d, lost, got


@pytest.mark.root
@pytest.mark.bus
async def test_a_peer_that_stops_reading_does_not_stall_the_others(tmp_path, wqd_factory, quota_bus):
    """The bus counts what it holds for a peer against wqd's own allowance: a peer
    that stops reading would, given enough events, make the bus stop reading from
    wqd, for everyone. wqd pings its peers and holds back a peer that does not
    answer; that peer loses (and is told), the others go on."""
    bus = quota_bus()
    wqd, fifo = await replay_daemon(tmp_path, wqd_factory, bus)
    normal = ForeignClient(bus.address, 0)  # a reader of its own, as fast as it can
    stalled = ForeignClient(bus.address, 0)
    try:
        mine = (await normal.request("watch", source="keys", target=str(KEY)))["result"][0]
        theirs = (await stalled.request("watch", source="keys", target=str(KEY)))["result"][0]
        os.kill(stalled.proc.pid, signal.SIGSTOP)
        generated = 20_000  # ~4 MB of signals: four times the bus's quota
        writer = feed(fifo, generated)
        observer = await Client.connect(bus.address)
        worst = 0.0
        while writer.is_alive():  # wqd answers all along
            started = asyncio.get_running_loop().time()
            await asyncio.wait_for(observer.call(MANAGER, IFACE, "ListSubscriptions"), 10)
            worst = max(worst, asyncio.get_running_loop().time() - started)
            await asyncio.sleep(0.05)
        observer.close()
        d, lost, got = await accounted(normal, mine, generated)
        assert (d, lost) == (generated, 0)  # the reader lost nothing
        assert sum(1 for s in got if s[1] == "KeyChanged") == generated
        log = wqd.log_text()
        assert "bytes of signals unread: nothing more goes to it until it reads" in log
        assert "stopped reading its signals" in log

        os.kill(stalled.proc.pid, signal.SIGCONT)
        d, lost, got = await accounted(stalled, theirs, generated)
        assert d + lost == generated and lost > 0
        assert sum(1 for s in got if s[1] == "KeyChanged") == d
        assert sum(s[2][0] for s in got if s[1] == "Lost") == lost
        print(f"stalled peer: {d} delivered, {lost} lost; ListSubscriptions worst {worst * 1000:.0f} ms")
    finally:
        stalled.close()
        normal.close()


@pytest.mark.root
@pytest.mark.bus
async def test_a_reader_that_pauses_briefly_loses_nothing(tmp_path, wqd_factory, quota_bus):
    """Paused for less than STALL_AFTER, a peer still holds the sources back: the
    events wait in the kernel (here: the FIFO) and it gets every one."""
    bus = quota_bus()
    wqd, fifo = await replay_daemon(tmp_path, wqd_factory, bus)
    slow = ForeignClient(bus.address, 0)
    try:
        path = (await slow.request("watch", source="keys", target=str(KEY)))["result"][0]
        os.kill(slow.proc.pid, signal.SIGSTOP)
        generated = 20_000
        writer = feed(fifo, generated)
        await asyncio.sleep(0.3)
        os.kill(slow.proc.pid, signal.SIGCONT)
        await asyncio.to_thread(writer.join, 60)
        d, lost, got = await accounted(slow, path, generated)
        assert (d, lost) == (generated, 0)
        assert "bytes of signals unread: nothing more goes to it until it reads" in wqd.log_text()
        assert "stopped reading" not in wqd.log_text()
    finally:
        slow.close()


@pytest.mark.root
@pytest.mark.bus
async def test_without_leave_to_ping_wqd_says_so_and_delivers(tmp_path, wqd_factory, quota_bus):
    """A bus policy that forbids the Ping (an old io.wqd.WatchQueue1.conf): wqd logs
    what that costs and delivers as before."""
    bus = quota_bus('<policy user="root"><deny send_type="method_call" send_interface="org.freedesktop.DBus.Peer"'
                    ' send_member="Ping"/></policy>')
    wqd, fifo = await replay_daemon(tmp_path, wqd_factory, bus)
    reader = ForeignClient(bus.address, 0)
    try:
        path = (await reader.request("watch", source="keys", target=str(KEY)))["result"][0]
        generated = 2_000  # ~400 KB: past the first Ping
        await asyncio.to_thread(feed(fifo, generated).join, 60)
        d, lost, got = await accounted(reader, path, generated)
        assert (d, lost) == (generated, 0)
        assert "the bus policy does not let wqd ping its subscribers" in wqd.log_text()
    finally:
        reader.close()


@pytest.mark.root
@pytest.mark.bus
async def test_a_uid_that_stalled_gets_no_grace(tmp_path, wqd_factory, quota_bus):
    """One peer of uid 1000 stops reading and, after its grace, stalls. Within the
    next minute a second peer of the same uid that stops reading stalls at once:
    opening connection after connection cannot keep the sources waiting. (The log
    says so in order: stalled before the pause is announced, no grace between.)"""
    bus = quota_bus()
    wqd = await wqd_factory(bus, config='[devices]\nbackend = "uevent"\n')
    first, second = ForeignClient(bus.address, 1000), ForeignClient(bus.address, 1000)
    # root reads every event: when its subscription has taken them all, the daemon has
    # dispatched them to uid 1000's too (a loaded host can leave the daemon thousands of
    # uevents behind the trigger, and a peer let go before they are dispatched gets them)
    observer = await Client.connect(bus.address)
    try:
        seen = await observer.watch("devices", "mem")
        paths, names = {}, {}
        for peer in (first, second):
            paths[peer] = (await peer.request("watch", source="devices", target="mem"))["result"][0]
            names[peer] = (await peer.request("unique_name"))["result"]
        generated = {first: 0, second: 0}
        marks = {}  # where the log was when each was stopped (the second paused briefly before, reading)
        for peer in (first, second):
            marks[peer] = len(wqd.log_text())
            os.kill(peer.proc.pid, signal.SIGSTOP)
            for _ in range(100):  # ~400 bytes a signal: past the 256 KiB budget soon
                await asyncio.to_thread(trigger, NULL_DEVPATH, "change", 100)
                for p in generated:
                    generated[p] += 100
                if f"{names[peer]} stopped reading its signals" in wqd.log_text()[marks[peer]:]:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"{names[peer]} never stalled:\n{wqd.log_text()}")
            # more than its queue holds (1024), now that it no longer holds the source back
            await asyncio.to_thread(trigger, NULL_DEVPATH, "change", 4000)
            for p in generated:
                generated[p] += 4000
            await taken(observer, seen, generated[peer])
        log = wqd.log_text()
        paused = "{} has".format
        stalled = "{} stopped reading".format
        # the first had its grace: paused, then (2 s later) stalled; the second stalled at once
        # (since it was stopped: it read the first's phase, paused briefly at each doubling of its budget)
        assert log.index(paused(names[first]), marks[first]) < log.index(stalled(names[first]), marks[first])
        assert log.index(stalled(names[second]), marks[second]) < log.index(paused(names[second]), marks[second])
        for peer in (first, second):
            os.kill(peer.proc.pid, signal.SIGCONT)
        for peer in (first, second):
            d, lost, got = await accounted(peer, paths[peer], generated[peer])
            assert d + lost == generated[peer] and lost > 0, (names[peer], d, lost, generated[peer])
            assert sum(s[2][0] for s in got if s[1] == "Lost") == lost
    finally:
        first.close()
        second.close()
        observer.close()


async def taken(client: Client, path: str, n: int, timeout: float = 120.0) -> tuple[int, int]:
    """(Delivered, Lost) once *path*'s subscription has taken *n* events, one or the other."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        d, lost = await client.get(path, SUB_IFACE, "Delivered"), await client.get(path, SUB_IFACE, "Lost")
        if d + lost >= n:
            return d, lost
        assert loop.time() < deadline, f"the daemon took {d + lost} of {n} events in {timeout} s"
        await asyncio.sleep(0.05)


async def jeepney_peer(address: str):
    """A raw jeepney connection, as SecretStorage and keyring use it: it reads every
    message but answers nothing by itself, Peer.Ping included."""
    jeepney = pytest.importorskip("jeepney")
    from jeepney.io.asyncio import open_dbus_connection

    conn = await open_dbus_connection(address)
    state = {"pings": 0, "signals": [], "replies": {}}

    async def read():
        while True:
            msg = await conn.receive()
            header = msg.header
            fields = header.fields
            if header.message_type == jeepney.MessageType.signal:
                state["signals"].append((fields.get(jeepney.HeaderFields.path), fields.get(jeepney.HeaderFields.member),
                                         msg.body))
            elif header.message_type == jeepney.MessageType.method_call:
                if fields.get(jeepney.HeaderFields.member) == "Ping":
                    state["pings"] += 1  # and never answered
            else:
                fut = state["replies"].pop(fields.get(jeepney.HeaderFields.reply_serial), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)

    reader = asyncio.ensure_future(read())

    async def call(path, iface, member, signature="", body=()):
        msg = jeepney.new_method_call(jeepney.DBusAddress(path, "io.wqd.WatchQueue1", iface), member,
                                      signature, tuple(body))
        fut = asyncio.get_running_loop().create_future()
        serial = next(conn.outgoing_serial)  # the counter conn.send itself takes from
        state["replies"][serial] = fut
        await conn.send(msg, serial=serial)
        reply = await asyncio.wait_for(fut, 30)
        assert reply.header.message_type == jeepney.MessageType.method_return, reply.body
        return reply.body

    async def close():
        reader.cancel()
        await conn.close()

    return state, call, close


def feed_from(fifo, first: int, n: int) -> None:
    with open(fifo, "wb", buffering=0) as f:
        f.write(b"".join(encode_key_record(KEY, "updated", first + i) for i in range(n)))


async def test_a_peer_that_never_answers_ping_gets_every_event_or_lost(session_bus, wqd_factory, tmp_path):
    """jeepney answers no Ping: after a burst it has every event or a Lost for it, with
    the Lost delivered (not held behind the pause), and it keeps getting what comes later."""
    fifo = tmp_path / "replay"
    os.mkfifo(fifo)
    wqd = await wqd_factory(session_bus, config=replay_config(fifo))
    state, call, close = await jeepney_peer(session_bus.address)
    try:
        (path,) = await call(MANAGER, IFACE, "Watch", "ssa{sv}", ("keys", str(KEY), {}))
        generated = 5_000  # ~750 KB of signals: past the budget, so it is paused, then stalled

        def counts():
            mine = [s for s in state["signals"] if s[0] == path]
            return (sum(1 for s in mine if s[1] == "KeyChanged"), sum(s[2][0] for s in mine if s[1] == "Lost"))

        async def settled(total, timeout=60):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while loop.time() < deadline:
                received, lost = counts()
                if received + lost >= total:
                    return received, lost
                await asyncio.sleep(0.1)
            raise AssertionError(f"{counts()} of {total} after {timeout} s; log:\n{wqd.log_text()[-3000:]}")

        await asyncio.to_thread(feed(fifo, generated).join, 60)
        received, lost = await settled(generated)
        assert received + lost == generated
        (delivered,) = await call(path, "org.freedesktop.DBus.Properties", "Get", "ss", (SUB_IFACE, "Delivered"))
        (lost_prop,) = await call(path, "org.freedesktop.DBus.Properties", "Get", "ss", (SUB_IFACE, "Lost"))
        assert (delivered[1], lost_prop[1]) == (received, lost), "what it got is what wqd counted"
        assert state["pings"] > 0, "it was asked and never answered"
        assert "stopped reading its signals" in wqd.log_text()
        print(f"jeepney: {received} received, {lost} lost, {state['pings']} Pings unanswered")

        await asyncio.sleep(3)  # later, well past the stall
        await asyncio.to_thread(feed_from, fifo, 100_000, 10)
        later, lost_later = await settled(generated + 10, timeout=15)
        assert (later - received, lost_later - lost) == (10, 0), "events sent later arrive, all of them"
    finally:
        await close()


async def held_for(observer: Client, name: str) -> int:
    """What the bus holds for connection *name* and has not yet written to it (dbus-daemon's
    Debug.Stats; skips where the bus has none)."""
    from dbus_fast import Message as DMessage, MessageType

    reply = await observer.bus.call(DMessage(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                             interface="org.freedesktop.DBus.Debug.Stats",
                                             member="GetConnectionStats", signature="s", body=[name]))
    if reply.message_type != MessageType.METHOD_RETURN:
        pytest.skip(f"this bus has no Debug.Stats: {reply.error_name}")
    return reply.body[0]["OutgoingBytes"].value


async def test_what_a_stopped_peer_makes_the_bus_hold_is_bounded(session_bus, wqd_factory, tmp_path):
    """A stopped peer gets windows while stalled (it might be one that reads but never
    answers Ping); what the bus then holds for it grows by one window a second at most and
    stays below its cap. Measured by the bus itself."""
    from wqd.bus.credit import PEER_BUDGET, PROBE_EVERY, PROBE_LIMIT, PROBE_WINDOW

    fifo = tmp_path / "replay"
    os.mkfifo(fifo)
    await wqd_factory(session_bus, config=replay_config(fifo))
    stopped = ForeignClient(session_bus.address, 0)
    observer = await Client.connect(session_bus.address)
    try:
        await stopped.request("watch", source="keys", target=str(KEY))
        name = (await stopped.request("unique_name"))["result"]
        os.kill(stopped.proc.pid, signal.SIGSTOP)
        loop = asyncio.get_running_loop()
        started = loop.time()
        held = []
        for round_ in range(6):  # a burst a second: its queue always overflows, windows always have events
            await asyncio.to_thread(feed_from, fifo, round_ * 2000, 2000)
            await asyncio.sleep(1)
            held.append(await held_for(observer, name))
        elapsed = loop.time() - started
        # (the peer's own socket buffer holds some of PEER_BUDGET: the bus holds the rest)
        bound = PEER_BUDGET + (elapsed / PROBE_EVERY + 1) * (PROBE_WINDOW + 1024)
        print(f"stopped peer: the bus holds {held} bytes for it, second by second (bound {bound:.0f} after "
              f"{elapsed:.1f} s, cap {PROBE_LIMIT})")
        assert max(held) <= min(bound, PROBE_LIMIT + PROBE_WINDOW)
        assert held[-1] > held[0], "it got windows while stalled (it might have been reading)"
    finally:
        os.kill(stopped.proc.pid, signal.SIGCONT)
        observer.close()
        stopped.close()


def pauses_of(log: str, name: str) -> list[int]:
    """The unread bytes wqd logged each time it paused connection *name*."""
    import re

    return [int(n) for n in re.findall(re.escape(name) + r" has (\d+) bytes of signals unread", log)]


async def test_a_new_peer_starts_with_a_small_budget_that_grows_as_it_answers(session_bus, wqd_factory, tmp_path):
    """Slow start: a connection that never reads is paused once it has START_BUDGET unread
    (not PEER_BUDGET: that much less sent to a peer that will not read it); one that reads
    and answers its Pings earns up to PEER_BUDGET, so a reader that then stops briefly is
    paused only after PEER_BUDGET. The unread bytes are wqd's own log line at each pause."""
    from wqd.bus.credit import PEER_BUDGET, START_BUDGET

    fifo = tmp_path / "replay"
    os.mkfifo(fifo)
    wqd = await wqd_factory(session_bus, config=replay_config(fifo))
    stopped = ForeignClient(session_bus.address, 0)
    reader = ForeignClient(session_bus.address, 0)
    try:
        await stopped.request("watch", source="keys", target=str(KEY))
        path = (await reader.request("watch", source="keys", target=str(KEY)))["result"][0]
        stopped_name = (await stopped.request("unique_name"))["result"]
        reader_name = (await reader.request("unique_name"))["result"]
        os.kill(stopped.proc.pid, signal.SIGSTOP)
        await asyncio.to_thread(feed_from, fifo, 0, 5000)  # ~1 MB each: the reader answers its Pings
        d, lost, _ = await accounted(reader, path, 5000)
        assert (d, lost) == (5000, 0)
        first = pauses_of(wqd.log_text(), stopped_name)
        assert first and START_BUDGET <= first[0] < START_BUDGET + 1024, first  # one signal over at most

        before = len(pauses_of(wqd.log_text(), reader_name))
        os.kill(reader.proc.pid, signal.SIGSTOP)
        try:
            await asyncio.to_thread(feed_from, fifo, 5000, 3000)
            await asyncio.sleep(0.5)  # < STALL_AFTER: it holds the sources back, loses nothing
        finally:
            os.kill(reader.proc.pid, signal.SIGCONT)
        grown = pauses_of(wqd.log_text(), reader_name)[before:]
        print(f"paused with {first} bytes unread (never read), {grown} (read, then stopped)")
        assert grown and grown[0] >= PEER_BUDGET, grown
        d, lost, _ = await accounted(reader, path, 8000)
        assert (d, lost) == (8000, 0)
    finally:
        os.kill(stopped.proc.pid, signal.SIGCONT)
        reader.close()
        stopped.close()


async def test_a_uids_stopped_connections_of_many_subscriptions_get_bounded_windows_in_turn(
        session_bus, wqd_factory, tmp_path):
    """One uid's two stopped connections of 300 subscriptions each (more than a window lets
    go, ``PROBE_SUBS``): each is probed once a period, the uid's together; what the bus holds
    for each grows by about a window a period, never more; and when they read again, every
    event is delivered or counted Lost on every subscription (the windows let the
    subscriptions go in turn: none is left behind). Measured by the bus itself."""
    from wqd.bus.credit import PEER_BUDGET, PROBE_EVERY, PROBE_SUBS, PROBE_WINDOW

    fifo = tmp_path / "replay"
    os.mkfifo(fifo)
    wqd = await wqd_factory(session_bus, config=replay_config(fifo))
    stopped = [ForeignClient(session_bus.address, 0) for _ in range(2)]
    observer = await Client.connect(session_bus.address)
    per = 300
    assert per > PROBE_SUBS
    try:
        paths, names = [], []
        for peer in stopped:
            paths.append([(await peer.request("watch", source="keys", target=str(KEY)))["result"][0]
                          for _ in range(per)])
            names.append((await peer.request("unique_name"))["result"])
        for peer in stopped:
            os.kill(peer.proc.pid, signal.SIGSTOP)
        loop = asyncio.get_running_loop()
        started = loop.time()
        held = [[], []]
        rounds, burst = 5, 200
        for round_ in range(rounds):  # every queue overflows: each window has a Lost for each sub it lets go
            await asyncio.to_thread(feed_from, fifo, round_ * burst, burst)
            await asyncio.sleep(1)
            for i, name in enumerate(names):
                held[i].append(await held_for(observer, name))
        elapsed = loop.time() - started
        bound = PEER_BUDGET + (elapsed / PROBE_EVERY + 1) * (PROBE_WINDOW + 1024)
        print(f"two stopped connections of {per} subscriptions: the bus holds {held} bytes (bound {bound:.0f})")
        for mine in held:
            assert max(mine) <= bound
            assert mine[-1] > mine[0], "each connection got windows while stalled"
        assert "stopped reading its signals" in wqd.log_text()
    finally:
        for peer in stopped:
            os.kill(peer.proc.pid, signal.SIGCONT)
    try:
        generated = rounds * burst
        for peer, mine in zip(stopped, paths):
            for path in mine[:: per // 10] + mine[-1:]:  # a sample, the last let go included
                d, lost, _ = await accounted(peer, path, generated)
                assert d + lost == generated, (path, d, lost)
    finally:
        observer.close()
        for peer in stopped:
            peer.close()
