"""Flow control: bursts through the replay backend never break the connection or
grow memory without bound, and every event is either delivered or counted lost.
"""

import asyncio
import os
import signal
import threading

import pytest

from support import SUB_IFACE, Client, ForeignClient
from wqd.parse.watch_queue import encode_key_record

pytestmark = pytest.mark.asyncio

KEY = 1234


def feed(fifo, n: int) -> threading.Thread:
    """Write *n* kernel-format records into the FIFO from a thread (the FIFO blocks)."""
    changes = ("linked", "unlinked", "updated", "setattr")

    def run():
        with open(fifo, "wb", buffering=0) as f:
            batch = bytearray()
            for i in range(n):
                batch += encode_key_record(KEY, changes[i % 4], i)
                if len(batch) >= 4096:
                    f.write(batch)
                    batch.clear()
            f.write(batch)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def replay_config(fifo, queue_length=1024):
    return f"""
        [daemon]
        queue_length = {queue_length}
        [keys]
        backend = "replay"
        replay_path = "{fifo}"
    """


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
        for _ in range(600):
            d = (await slow.request("get", path=path, iface=SUB_IFACE, prop="Delivered"))["result"][0]
            lost = (await slow.request("get", path=path, iface=SUB_IFACE, prop="Lost"))["result"][0]
            if d + lost >= generated:
                break
            await asyncio.sleep(0.1)
        assert d + lost == generated
        # A 64-event queue against 256-record reads must overflow: loss is exercised.
        assert lost > 0 and d > 0
        got = (await slow.request("signals", min=d, wait=60))["result"]
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

    async def accounted():
        d = await client.get(path, SUB_IFACE, "Delivered")
        lost = await client.get(path, SUB_IFACE, "Lost")
        return d, lost

    for _ in range(1200):
        d, lost = await accounted()
        if d + lost >= generated:
            break
        await asyncio.sleep(0.1)
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
