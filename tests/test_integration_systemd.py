"""wqd under systemd, without systemd: the protocols are sockets, so the test
plays the service manager's and journald's side with real sockets.

- sd_notify: a real AF_UNIX datagram socket as NOTIFY_SOCKET receives READY=1,
  STATUS=, WATCHDOG=1 (every WATCHDOG_USEC/2, from wqd's main process, as
  NotifyAccess=main wants: checked with SCM_CREDENTIALS) and STOPPING=1.
- journal: wqd runs in a private mount namespace where /run/systemd/journal is a
  directory of the test, with JOURNAL_STREAM naming its stderr as systemd would;
  the test decodes the native journal protocol datagrams it receives there.
- ``wqd --check-config``.
"""

from __future__ import annotations

import array
import asyncio
import os
import shutil
import signal
import socket
import struct
import subprocess
import textwrap
from pathlib import Path

import pytest

from support import BUS_NAME, PYTHON, REPO, ForeignClient, Wqd, call, keyctl, ready

from dbus_fast.aio import MessageBus

from wqd import journal

pytestmark = [pytest.mark.bus, pytest.mark.root]

UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class DatagramCollector:
    """A bound AF_UNIX datagram socket read from the event loop (SO_PASSCRED on)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self.sock.bind(str(path))
        os.chmod(path, 0o666)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.messages: list[tuple[bytes, int | None, float]] = []  # (data, sender pid, arrival time)
        self.changed = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.fileno(), self._drain)

    def _drain(self) -> None:
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(1 << 17, socket.CMSG_SPACE(UCRED.size) + socket.CMSG_SPACE(64))
            except BlockingIOError:
                break
            pid = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = UCRED.unpack(payload[:UCRED.size])[0]
                elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:  # journald's memfd path
                    fds = array.array("i", payload[: len(payload) - len(payload) % 4])
                    for fd in fds:
                        with os.fdopen(fd, "rb") as f:
                            data = f.read()
            self.messages.append((data, pid, self.loop.time()))
        self.changed.set()

    async def wait_for(self, predicate, timeout: float = 10.0):
        deadline = self.loop.time() + timeout
        while True:
            result = predicate(self.messages)
            if result:
                return result
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                raise AssertionError(f"timed out; received: {[m[0][:200] for m in self.messages]}")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


# -- sd_notify ------------------------------------------------------------------------


def notify_fields(data: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)


@pytest.mark.asyncio
async def test_ready_status_watchdog_stopping(session_bus, wqd_factory, tmp_path):
    notify = DatagramCollector(tmp_path / "notify")
    try:
        wqd = await wqd_factory(session_bus, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"})
        ready = await notify.wait_for(lambda ms: [m for m in ms if notify_fields(m[0]).get("READY") == "1"])
        data, pid, _ = ready[0]
        assert pid == wqd.proc.pid  # the main process, as NotifyAccess=main requires
        status = notify_fields(data)["STATUS"]
        assert "keys=proc-keys" in status
        # READY=1 comes after the name is owned (Type=notify stands in for Type=dbus)
        first = ready[0][0]
        assert all(b"WATCHDOG=1" not in m[0] for m in notify.messages[: notify.messages.index(ready[0])])
        assert first.startswith(b"READY=1")
        # the watchdog: every 0.1 s (half of WATCHDOG_USEC), from the main process
        pings = await notify.wait_for(lambda ms: (p := [m for m in ms if m[0] == b"WATCHDOG=1"]) and len(p) >= 5 and p)
        assert {m[1] for m in pings} == {wqd.proc.pid}
        gaps = [b[2] - a[2] for a, b in zip(pings, pings[1:])]
        assert max(gaps) < 0.5, gaps  # well inside WatchdogSec, even on a loaded machine
        assert min(gaps) > 0.05, gaps  # paced, not a busy loop
        wqd.proc.send_signal(signal.SIGTERM)
        await notify.wait_for(lambda ms: [m for m in ms if m[0].startswith(b"STOPPING=1")])
        count = len([m for m in notify.messages if m[0] == b"WATCHDOG=1"])
        assert await asyncio.to_thread(wqd.proc.wait, 10) == 0
        await asyncio.sleep(0.3)
        assert len([m for m in notify.messages if m[0] == b"WATCHDOG=1"]) == count  # no pings after stopping
    finally:
        notify.close()


@pytest.mark.asyncio
async def test_watchdog_only_for_its_pid(session_bus, wqd_factory, tmp_path):
    """WATCHDOG_PID names another process (an inherited environment): READY, but no pings."""
    notify = DatagramCollector(tmp_path / "notify")
    try:
        await wqd_factory(session_bus, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "100000",
                                            "WATCHDOG_PID": "1"})
        await notify.wait_for(lambda ms: [m for m in ms if m[0].startswith(b"READY=1")])
        await asyncio.sleep(0.4)  # four ping periods
        assert [m[0] for m in notify.messages if m[0] == b"WATCHDOG=1"] == []
    finally:
        notify.close()


@pytest.mark.asyncio
async def test_pings_stop_in_a_stall_and_resume(session_bus, wqd_factory, tmp_path):
    """While wqd cannot run (SIGSTOP), no ping arrives, so systemd would act; after SIGCONT they resume."""
    notify = DatagramCollector(tmp_path / "notify")
    try:
        wqd = await wqd_factory(session_bus, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "100000"})
        await notify.wait_for(lambda ms: len([m for m in ms if m[0] == b"WATCHDOG=1"]) >= 2)
        wqd.proc.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(0.1)
            before = len(notify.messages)
            await asyncio.sleep(0.5)
            assert len(notify.messages) == before
        finally:
            wqd.proc.send_signal(signal.SIGCONT)
        await notify.wait_for(lambda ms: len(ms) > before)
    finally:
        notify.close()


# -- journal ------------------------------------------------------------------------


def parse_journal(data: bytes) -> dict[str, str]:
    """Decode one native-protocol datagram (systemd's JOURNAL_NATIVE_PROTOCOL)."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        line = data[pos:nl]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            pos = nl + 1
        else:  # KEY\n<le64 size><value>\n: values with newlines
            key = line
            (size,) = struct.unpack_from("<Q", data, nl + 1)
            value = data[nl + 9: nl + 9 + size]
            pos = nl + 9 + size + 1
        fields[key.decode()] = value.decode(errors="replace")
    return fields


JOURNAL_SHELL = """
set -e
journal_dir=$1; shift
base=/run/systemd; [ -d "$base" ] || base=/run
mount -t tmpfs -o mode=0755 wqd-test-run "$base"
mkdir -p /run/systemd/journal
mount --bind "$journal_dir" /run/systemd/journal
exec "$@"
"""


async def start_journaled_wqd(address: str, directory: Path, config: str, prefix: tuple = ()) -> Wqd:
    """wqd with /run/systemd/journal/socket being the test's socket, and JOURNAL_STREAM = its stderr."""
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "wqd.conf"
    conf.write_text(textwrap.dedent(config))
    log = directory / "wqd.log"
    log.touch()
    st = os.stat(log)
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", JOURNAL_SHELL, "sh",
             str(directory / "journal"), *prefix,
             PYTHON, "-m", "wqd.daemon", "--address", address, "--config", str(conf), "--log-level", "debug"],
            stdout=subprocess.DEVNULL, stderr=log_file, cwd=REPO, env=env)
    return await ready(Wqd(address, proc, log))


def entries(collector: DatagramCollector) -> list[dict[str, str]]:
    return [parse_journal(m[0]) for m in collector.messages]


def with_id(message_id: str, **fields):
    def predicate(messages):
        for m in messages:
            e = parse_journal(m[0])
            if e.get("MESSAGE_ID") == message_id and all(e.get(k) == str(v) for k, v in fields.items()):
                return e
        return None
    return predicate


@pytest.fixture
def journal_tools():
    if os.geteuid() != 0:
        pytest.skip("a private mount namespace for /run/systemd/journal needs root")
    for tool in ("unshare", "setpriv", "keyctl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


@pytest.mark.asyncio
async def test_journal_structured_fields(journal_tools, system_bus, tmp_path):
    """Start, subscription created/ended, policy denial (with the peer's uid/pid), stop: each with its MESSAGE_ID."""
    # A keyring every user may View, and a rules file that denies uid 1000 keys
    # watches: the kernel would let uid 1000 watch it, the policy says no.
    ring = keyctl("newring", f"wqd-journal-{os.getpid()}", "@u")
    keyctl("setperm", ring, "0x3f010101")
    key = ring
    rules = tmp_path / "rules"
    rules.write_text("deny keys * uid:1000\nallow * * world\n")
    directory = tmp_path / "wqd"
    (directory / "journal").mkdir(parents=True)
    sink = DatagramCollector(directory / "journal" / "socket")
    wqd = None
    peer = None
    bus = None
    try:
        wqd = await start_journaled_wqd(system_bus.address, directory, f"""
            [keys]
            backend = "proc-keys"
            poll_interval = 0.05

            [policy]
            plugins = ["unix", "rules"]
            rules = ["{rules}"]
            """)
        started = await sink.wait_for(with_id(journal.DAEMON_STARTED))
        assert started["SYSLOG_IDENTIFIER"] == "wqd" and started["PRIORITY"] == "6"
        assert "ready on" in started["MESSAGE"] and started["LOGGER"] == "wqd"

        bus = await MessageBus(bus_address=system_bus.address).connect()
        reply = await call(bus, BUS_NAME, "/io/wqd/WatchQueue1", "io.wqd.WatchQueue1", "Watch", "ssa{sv}",
                           ["keys", ring, {}])
        path = reply.body[0]
        created = await sink.wait_for(with_id(journal.SUBSCRIPTION_CREATED, PEER_UID=0, PEER_PID=os.getpid()))
        assert created["OBJECT_PID"] == str(os.getpid())  # journald adds OBJECT_UID, OBJECT_COMM, ... from it
        await call(bus, BUS_NAME, path, "io.wqd.Subscription1", "Close")
        ended = await sink.wait_for(with_id(journal.SUBSCRIPTION_ENDED, PEER_UID=0))
        assert "closed" in ended["MESSAGE"]

        peer = ForeignClient(system_bus.address, 1000)
        answer = await peer.request("watch", source="keys", target=key)
        assert answer["ok"] is False and answer["error"] == "io.wqd.WatchQueue1.Error.AccessDenied", answer
        denied = await sink.wait_for(with_id(journal.POLICY_DENIED, PEER_UID=1000, PEER_PID=peer.proc.pid))
        assert denied["PRIORITY"] == "6" and key in denied["MESSAGE"]

        wqd.proc.send_signal(signal.SIGTERM)
        await sink.wait_for(with_id(journal.DAEMON_STOPPED))
        assert await asyncio.to_thread(wqd.proc.wait, 10) == 0
        # Under the journal, nothing is logged to stderr as well.
        assert "INFO" not in wqd.log_text(), wqd.log_text()
        for e in entries(sink):  # every field name is one journald keeps
            assert all(k.isupper() or k.replace("_", "").isalnum() and k.upper() == k for k in e), e
    finally:
        if peer is not None:
            peer.close()
        if bus is not None:
            bus.disconnect()
        if wqd is not None:
            code = wqd.stop()
            if code not in (0, -15):
                print(f"--- wqd log exit {code} ---\n{wqd.log_text()}\n{entries(sink)}")
        sink.close()
        keyctl("unlink", ring, "@u")


@pytest.mark.asyncio
async def test_journal_loss_message(journal_tools, session_bus, tmp_path):
    """A kernel loss record (replayed) is logged with the loss MESSAGE_ID."""
    from wqd.parse.watch_queue import encode_loss_record

    directory = tmp_path / "wqd"
    (directory / "journal").mkdir(parents=True)
    capture = tmp_path / "capture.bin"
    capture.write_bytes(encode_loss_record() * 3)
    sink = DatagramCollector(directory / "journal" / "socket")
    wqd = None
    try:
        wqd = await start_journaled_wqd(session_bus.address, directory, f"""
            [keys]
            backend = "replay"
            replay_path = "{capture}"
            """)
        lost = await sink.wait_for(with_id(journal.EVENTS_LOST))
        assert lost["PRIORITY"] == "4" and "keys lost 1 event" in lost["MESSAGE"]
    finally:
        if wqd is not None:
            wqd.stop()
        sink.close()


@pytest.mark.asyncio
async def test_stale_journal_stream_means_stderr(session_bus, wqd_factory, client_factory):
    """JOURNAL_STREAM that is not our stderr (inherited from elsewhere): plain stderr."""
    wqd = await wqd_factory(session_bus, env={"JOURNAL_STREAM": "1:1"})
    client = await client_factory(wqd.address)
    # a round trip after the name was taken: the "ready" line is written by then
    assert await client.get("/io/wqd/WatchQueue1", "io.wqd.WatchQueue1", "Version") == "1"
    assert "INFO wqd: wqd" in wqd.log_text()


def test_journal_fields_of_a_record():
    """Extras become upper-case fields; names journald would drop are not sent."""
    import logging

    record = logging.makeLogRecord({"msg": "m", "MESSAGE_ID": journal.POLICY_DENIED, "peer_uid": 1000,
                                    "peer_pid": 42, "bad-name": 1, "_TRUSTED": 1})
    assert journal.journal_fields(record) == {"MESSAGE_ID": journal.POLICY_DENIED, "PEER_UID": 1000,
                                              "PEER_PID": 42, "OBJECT_PID": 42}


def test_message_ids_are_distinct_128_bit():
    ids = list(journal.MESSAGE_IDS.values())
    assert len(set(ids)) == len(ids) == 6
    assert all(len(i) == 32 and int(i, 16) for i in ids)


# -- --check-config -------------------------------------------------------------------


def check_config(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "wqd.daemon", *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def test_check_config_valid(tmp_path):
    conf = tmp_path / "wqd.conf"
    conf.write_text("[daemon]\nqueue_length = 64\n\n[keys]\nbackend = \"proc-keys\"\n")
    result = check_config("--check-config", str(conf))
    assert result.returncode == 0 and f"{conf}: OK" in result.stdout, result.stderr


def test_check_config_reports_file_and_line(tmp_path):
    conf = tmp_path / "wqd.conf"
    conf.write_text("[daemon]\nsubscriptions_total = 10\nqueue_length = 1\n")
    result = check_config("--check-config", str(conf))
    assert result.returncode == 1
    assert f"{conf}:3: daemon.queue_length" in result.stderr


def test_check_config_uses_config_option(tmp_path):
    conf = tmp_path / "wqd.conf"
    conf.write_text("[keys]\nbogus = 1\n")
    result = check_config("--config", str(conf), "--check-config")
    assert result.returncode == 1 and f"{conf}:2: unknown setting keys.bogus" in result.stderr


def test_check_config_unknown_plugin(tmp_path):
    conf = tmp_path / "wqd.conf"
    conf.write_text("[policy]\nplugins = [\"unix\", \"no-such-plugin\"]\n")
    result = check_config("--check-config", str(conf))
    assert result.returncode == 1 and str(conf) in result.stderr and "no-such-plugin" in result.stderr


def test_check_config_syntax_error(tmp_path):
    conf = tmp_path / "wqd.conf"
    conf.write_text("[daemon\n")
    result = check_config("--check-config", str(conf))
    assert result.returncode == 1 and str(conf) in result.stderr and "line 1" in result.stderr


def test_check_config_missing_file(tmp_path):
    result = check_config("--check-config", str(tmp_path / "absent.conf"))
    assert result.returncode == 1 and "absent.conf" in result.stderr


def test_check_config_runs_the_rules_file_checks(tmp_path):
    """The policy plugins' own validation runs too: a bad rules file is reported with its line."""
    rules = tmp_path / "site.rules"
    rules.write_text("allow keys * uid:0\nallow keys\n")
    conf = tmp_path / "wqd.conf"
    conf.write_text(f"[policy]\nplugins = [\"unix\", \"rules\"]\nrules = [\"{rules}\"]\n")
    result = check_config("--check-config", str(conf))
    assert result.returncode == 1 and f"{rules}:2:" in result.stderr, result.stderr
    rules.write_text("allow keys * uid:0\n")
    result = check_config("--check-config", str(conf))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("text, line, message", [
    ('[mounts]\nnamespaces_per_uid = "x"\n', 2, "mounts.namespaces_per_uid must be 0..100000, not 'x'"),
    ("[mounts]\ncoalesce = 0.1\nresolver = \"fast\"\n", 3, "mounts.resolver must be auto, statmount or mountinfo"),
    ("[devices]\n\nreceive_buffer = 5\n", 3, "devices.receive_buffer must be 1024..1073741824 bytes, not 5"),
    ('[devices]\nbackend = "hal"\n', 2, "devices.backend must be one of auto, udev, uevent, not 'hal'"),
    ("[fs-errors]\nbogus = 1\n", 2, "unknown setting fs-errors.bogus"),
])
def test_check_config_checks_the_sources_sections(tmp_path, text, line, message):
    """The sources' own sections are checked too (the daemon would start and report
    that source unavailable, the log saying why; --check-config says it first)."""
    conf = tmp_path / "wqd.conf"
    conf.write_text(text)
    result = check_config("--check-config", str(conf))
    assert result.returncode == 1 and f"{conf}:{line}: {message}" in result.stderr, result.stderr
    conf.write_text('[mounts]\nnamespaces_per_uid = 3\n[devices]\nbackend = "uevent"\nreceive_buffer = 4096\n')
    assert check_config("--check-config", str(conf)).returncode == 0
