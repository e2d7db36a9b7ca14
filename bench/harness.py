"""What every benchmark needs: a private bus, the real daemon, clients, a baseline sender.

Everything is real: a system-type ``dbus-daemon`` with the shipped policy (from
``tests/support.py``), the daemon as a subprocess with the ``replay`` keys backend
fed through a FIFO, and dbus-fast clients in this process. The baseline sender
(``bench.raw_emitter``) is a separate process too, so wqd and its baseline stand
in the same place: sender process -> bus daemon -> this process.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import support  # noqa: E402  (tests/support.py: private buses; shared with the test suite)

from wqd.parse.watch_queue import encode_key_record  # noqa: E402

BUS_NAME = support.BUS_NAME
MANAGER = support.MANAGER
IFACE = support.IFACE
SUB_IFACE = support.SUB_IFACE
PYTHON = sys.executable
DBUS = "org.freedesktop.DBus"
# The daemon runs as installed: byte-compiled (pip compiles at install time), so a
# developer's PYTHONDONTWRITEBYTECODE must not make every start recompile wqd.
DAEMON_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def replay_config(fifo: Path, extra: str = "") -> str:
    return f'[keys]\nbackend = "replay"\nreplay_path = "{fifo}"\n{textwrap.dedent(extra)}'


def key_records(serial: int, count: int) -> bytes:
    """*count* kernel-format ``linked`` records for key *serial* (aux = sequence number)."""
    return b"".join(encode_key_record(serial, "linked", i + 1) for i in range(count))


class Rig:
    """A private system-type bus in *directory*; daemons and clients on it; cleanup on exit."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.bus: support.PrivateBus | None = None
        self.daemons: list[Daemon] = []
        self.clients: list[MessageBus] = []
        self.procs: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return self.bus.address

    async def __aenter__(self) -> Rig:
        self.bus = support.start_bus(self.dir / "bus", "system")
        return self

    async def __aexit__(self, *exc) -> None:
        for c in self.clients:
            c.disconnect()
        for p in self.procs:
            stop_process(p)
        for d in self.daemons:
            d.stop()
        if self.bus is not None:
            self.bus.stop()

    def fifo(self, name: str = "replay.fifo") -> Path:
        path = self.dir / name
        if not path.exists():
            os.mkfifo(path)
        return path

    async def connect(self) -> MessageBus:
        bus = await MessageBus(bus_address=self.address).connect()
        self.clients.append(bus)
        return bus

    async def start_wqd(self, config: str = "", name: str = "wqd", log_level: str = "warning") -> Daemon:
        """Start the daemon; returns once it owns its name (``ready_s``: exec -> owned)."""
        directory = self.dir / name
        directory.mkdir(parents=True, exist_ok=True)
        conf = directory / "wqd.conf"
        conf.write_text(config)
        # WQD_BENCH_PROFILE=DIR: the daemon runs under cProfile and writes DIR/<name>-<pid>.prof when it
        # stops (SIGTERM ends its loop and main returns): where its time goes during a benchmark.
        profile = os.environ.get("WQD_BENCH_PROFILE")
        run = ["-m", "wqd.daemon"]
        if profile:
            run = ["-m", "cProfile", "-o", f"{profile}/{name}-{os.getpid()}-{time.monotonic_ns()}.prof", *run]
        return await self.start_service(
            [PYTHON, *run, "--address", self.address, "--config", str(conf), "--log-level", log_level],
            directory / "wqd.log")

    async def start_service(self, argv: list[str], log: Path) -> Daemon:
        """Run *argv* and wait until it owns ``io.wqd.WatchQueue1`` (from ``NameOwnerChanged``)."""
        watcher = await MessageBus(bus_address=self.address).connect()
        try:
            owned = asyncio.get_running_loop().create_future()

            def on_owner(msg: Message):
                if msg.member == "NameOwnerChanged" and msg.body[0] == BUS_NAME and msg.body[2]:
                    if not owned.done():
                        owned.set_result(time.perf_counter())

            watcher.add_message_handler(on_owner)
            await call(watcher, DBUS, "/org/freedesktop/DBus", DBUS, "AddMatch", "s",
                       [f"type='signal',member='NameOwnerChanged',arg0='{BUS_NAME}'"])
            with log.open("w") as log_file:
                t0 = time.perf_counter()
                proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log_file, cwd=REPO, env=DAEMON_ENV)
            daemon = Daemon(proc, log)
            self.daemons.append(daemon)
            exited = asyncio.ensure_future(asyncio.to_thread(proc.wait))
            done, _ = await asyncio.wait([owned, exited], timeout=30, return_when=asyncio.FIRST_COMPLETED)
            if owned not in done:
                exited.cancel()
                daemon.stop()
                raise RuntimeError(f"{argv[2]} did not come up:\n{daemon.log_text()}")
            daemon.ready_s = owned.result() - t0
            daemon.exited = exited
            return daemon
        finally:
            watcher.disconnect()

    async def start_helper(self, module: str, *args: str) -> Helper:
        """A bench helper process (``bench.raw_emitter``, ``bench.caller``, ...) speaking JSON lines."""
        proc = subprocess.Popen([PYTHON, "-m", module, self.address, *args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, cwd=REPO)
        self.procs.append(proc)
        helper = Helper(proc)
        ready = await helper.read()
        helper.unique_name = ready["name"]
        return helper

    async def start_raw_emitter(self) -> Helper:
        return await self.start_helper("bench.raw_emitter")


def stop_process(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            f.close()
    return proc.returncode


@dataclass
class Daemon:
    proc: subprocess.Popen
    log: Path
    ready_s: float = 0.0
    exited: asyncio.Future | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log.read_text()
        except OSError:
            return ""

    def stop(self) -> int:
        code = stop_process(self.proc)
        if self.exited is not None:
            self.exited.cancel()
        return code

    def status(self) -> dict[str, int]:
        """Wakeup and memory counters summed over the daemon's threads (/proc/PID/task/*/status)."""
        out = {"voluntary_ctxt_switches": 0, "nonvoluntary_ctxt_switches": 0}
        base = Path(f"/proc/{self.pid}")
        for task in (base / "task").iterdir():
            for line in (task / "status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in out:
                    out[key] += int(value)
        for line in (base / "status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "VmRSS":
                out["rss_bytes"] = int(value.split()[0]) * 1024
        return out


@dataclass
class Helper:
    """A helper process driven by JSON lines: the raw emitter (the baseline) or the caller."""

    proc: subprocess.Popen
    unique_name: str = ""

    async def read(self) -> dict:
        line = await asyncio.to_thread(self.proc.stdout.readline)
        if not line:
            raise RuntimeError("a bench helper process exited")
        return json.loads(line)

    def request(self, **job) -> None:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()

    def send(self, dests: list[tuple[str, str]], count: int) -> None:
        """Raw emitter: start sending *count* rounds of one KeyChanged to each of *dests* ((name, path))."""
        self.request(dests=dests, count=count)


async def call(bus: MessageBus, dest: str, path: str, iface: str | None, member: str, signature: str = "",
               body: list | None = None) -> Message:
    return await bus.call(Message(destination=dest, path=path, interface=iface, member=member,
                                  signature=signature, body=body or []))


async def watch(bus: MessageBus, source: str, target: str, options: dict | None = None) -> str:
    reply = await call(bus, BUS_NAME, MANAGER, IFACE, "Watch", "ssa{sv}", [source, target, options or {}])
    if reply.message_type == MessageType.ERROR:
        raise RuntimeError(f"Watch({source!r}, {target!r}) failed: {reply.error_name}: {reply.body}")
    return reply.body[0]


async def get_property(bus: MessageBus, path: str, iface: str, prop: str):
    reply = await call(bus, BUS_NAME, path, "org.freedesktop.DBus.Properties", "Get", "ss", [iface, prop])
    if reply.message_type == MessageType.ERROR:
        raise RuntimeError(f"Get {prop} failed: {reply.error_name}: {reply.body}")
    return reply.body[0].value


@dataclass
class Tally:
    """Counts signals of *member* arriving on any number of connections."""

    member: str = "KeyChanged"
    count: int = 0
    lost: int = 0
    target: int = 0
    done: asyncio.Future | None = None
    first_at: float = 0.0
    last_at: float = 0.0
    times: list | None = None  # per-signal arrival times, when wanted

    def attach(self, bus: MessageBus) -> None:
        bus.add_message_handler(self._on_message)

    def expect(self, n: int) -> asyncio.Future:
        self.count = self.lost = 0
        self.target = n
        self.first_at = self.last_at = 0.0
        self.done = asyncio.get_running_loop().create_future()
        return self.done

    def _on_message(self, msg: Message):
        if msg.message_type != MessageType.SIGNAL:
            return None
        member = msg.member
        if member == self.member:
            now = time.perf_counter()
            if not self.count:
                self.first_at = now
            self.count += 1
            self.last_at = now
            if self.times is not None:
                self.times.append((now, msg))
        elif member == "Lost":
            self.lost += msg.body[0]
        else:
            return None
        if self.count + self.lost >= self.target and self.done is not None and not self.done.done():
            self.done.set_result(self.last_at)
        return None


async def write_all(path: Path, data: bytes) -> None:
    """Write *data* into a FIFO without blocking the loop."""
    loop = asyncio.get_running_loop()
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view[:65536])
                view = view[n:]
            except BlockingIOError:
                writable = loop.create_future()
                loop.add_writer(fd, lambda: writable.done() or writable.set_result(None))
                try:
                    await writable
                finally:
                    loop.remove_writer(fd)
    finally:
        os.close(fd)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of *values*."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        return float("nan")
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


@dataclass
class Result:
    """What one benchmark module returns: its JSON keys, details, and series for the plots."""

    values: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    series: dict = field(default_factory=dict)


async def measure_rate(tally: Tally, expected: int, start, timeout: float = 300.0) -> dict:
    """Run *start()* (sync or async) and wait for *expected* signals; signals/s from start to the last one."""
    done = tally.expect(expected)
    t0 = time.perf_counter()
    started = start()
    if asyncio.iscoroutine(started):
        await started
    try:
        t1 = await asyncio.wait_for(done, timeout)
    except asyncio.TimeoutError:
        raise RuntimeError(f"only {tally.count} of {expected} signals arrived ({tally.lost} lost)") from None
    return {"signals": tally.count, "lost": tally.lost, "seconds": t1 - t0, "rate": tally.count / (t1 - t0)}


def cpu_seconds(pid: int) -> float:
    """CPU time process *pid* has used so far, in seconds, at nanosecond resolution:
    the scheduler's run time of each of its threads (``/proc/PID/task/TID/schedstat``,
    first field), summed. ``/proc/PID/stat``'s utime + stime count in clock ticks
    (10 ms): over a round of a few thousand signals that is a handful of ticks, and
    every sender came out at the same multiple of 10 ms / N. Falls back to it (and
    says so in ``CPU_CLOCK``) where the kernel has no schedstat."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            except FileNotFoundError:  # the thread ended meanwhile
                continue
        return total / 1e9
    except (FileNotFoundError, ValueError, IndexError):
        global CPU_CLOCK
        CPU_CLOCK = "clock ticks (/proc/PID/stat)"
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


CPU_CLOCK = "ns (/proc/PID/task/*/schedstat)"


async def compare_throughput(raw: Helper, dests: list[tuple[str, str]], rounds_per_event: int,
                             records: bytes, fifo: Path, tally: Tally, rounds: int,
                             wqd_pid: int | None = None, bus_pid: int | None = None) -> dict:
    """Interleaved pairs of rounds: the raw emitter, then wqd fed by the FIFO.

    Each round delivers ``len(dests) * rounds_per_event`` signals either way. The
    ratio is the median of the per-pair ratios (the two rounds of a pair see the
    same machine load); the rates are medians too. With *wqd_pid* and *bus_pid*,
    CPU time per signal of each sender and of the bus daemon is recorded as well
    (``cpu_seconds``: nanosecond run time), per round and as the total over all
    rounds divided by all their signals: unlike rates, it hardly moves with the
    machine's load.
    """
    expected = len(dests) * rounds_per_event
    raw_runs, wqd_runs = [], []

    async def timed(start, pid: int | None) -> dict:
        before = (cpu_seconds(pid) if pid else 0.0, cpu_seconds(bus_pid) if bus_pid else 0.0)
        out = await measure_rate(tally, expected, start)
        if pid:
            out["sender_cpu_s"] = cpu_seconds(pid) - before[0]
            out["sender_cpu_us_per_signal"] = out["sender_cpu_s"] / expected * 1e6
        if bus_pid:
            out["bus_cpu_s"] = cpu_seconds(bus_pid) - before[1]
            out["bus_cpu_us_per_signal"] = out["bus_cpu_s"] / expected * 1e6
        return out

    for _ in range(rounds):
        raw_runs.append(await timed(lambda: raw.send(dests, rounds_per_event), raw.proc.pid if wqd_pid else None))
        await raw.read()
        wqd_runs.append(await timed(lambda: write_all(fifo, records), wqd_pid))
    raw_rate = median([r["rate"] for r in raw_runs])
    wqd_rate = median([r["rate"] for r in wqd_runs])
    out = {
        "raw_rate": raw_rate, "wqd_rate": wqd_rate,
        "ratio": median([w["rate"] / r["rate"] for w, r in zip(wqd_runs, raw_runs)]),
        "raw_runs": raw_runs, "wqd_runs": wqd_runs, "signals_per_round": expected,
        "wqd_lost": sum(r["lost"] for r in wqd_runs),
    }
    signals = expected * rounds
    if wqd_pid:
        out["wqd_cpu_us_per_signal"] = sum(r["sender_cpu_s"] for r in wqd_runs) / signals * 1e6
        out["raw_cpu_us_per_signal"] = sum(r["sender_cpu_s"] for r in raw_runs) / signals * 1e6
        out["cpu_clock"] = CPU_CLOCK
    if bus_pid:
        out["bus_cpu_us_per_signal"] = sum(r["bus_cpu_s"] for r in wqd_runs + raw_runs) / (2 * signals) * 1e6
    return out
