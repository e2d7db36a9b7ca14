"""wqd and wqctl give up on a bus they cannot reach, within their bound, and say so.

Four kinds of unreachable bus, each a real unix socket (or its absence):
- a path with no socket at all: fails at once;
- a socket that accepts and never speaks (a wedged bus, or anything listening
  there): without the bound, wqd waits in the SASL handshake forever;
- a socket that completes the handshake and then never answers ``Hello``;
- a listener that never accepts, its backlog full (a stopped bus many clients
  tried): dbus-fast < 5's blocking connect waits there forever.
Each time: exit status 1, one line on stderr naming the address, and no longer
than the bound plus the interpreter's start-up (measured, with margin for a
loaded machine).
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import uuid

import pytest

from support import PYTHON, REPO

BOUND = 1.5  # seconds given to --connect-timeout / --timeout
STARTUP_MARGIN = 20.0  # importing wqd on 2 shared cores; the bound itself is BOUND


class SilentBus:
    """A listening unix socket that accepts every connection and never writes (or,
    with *handshake*, answers SASL like dbus-daemon, then never answers Hello)."""

    def __init__(self, path, handshake: bool = False) -> None:
        self.path = str(path)
        self.handshake = handshake
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(16)
        self.accepted: list[socket.socket] = []
        self.began = threading.Event()  # a client sent BEGIN: it now waits for Hello's reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"unix:path={self.path}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)
            if self.handshake:
                threading.Thread(target=self._sasl, args=(conn,), daemon=True).start()

    def _sasl(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                buf += data
                while b"\r\n" in buf:
                    line, buf = buf.split(b"\r\n", 1)
                    line = line.lstrip(b"\0")
                    if line.startswith(b"AUTH"):
                        conn.sendall(b"OK " + uuid.uuid4().hex.encode() + b"\r\n")
                    elif line.startswith(b"NEGOTIATE_UNIX_FD"):
                        conn.sendall(b"AGREE_UNIX_FD\r\n")
                    elif line.startswith(b"BEGIN"):
                        self.began.set()
                        return  # the Hello that follows is never answered
        except OSError:
            return

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


class StoppedBus:
    """A listening unix socket that never accepts, its backlog filled by the test:
    a new connect then waits (blocking) or fails with EAGAIN (non-blocking)."""

    def __init__(self, path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(0)
        self.queued = []
        while True:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            try:
                client.connect(self.path)
            except BlockingIOError:
                client.close()
                break
            self.queued.append(client)
            assert len(self.queued) < 64, "the backlog never filled"

    @property
    def address(self) -> str:
        return f"unix:path={self.path}"

    def close(self) -> None:
        for client in self.queued:
            client.close()
        self.sock.close()


@pytest.fixture
def stopped_bus(tmp_path):
    bus = StoppedBus(tmp_path / "stopped")
    yield bus
    bus.close()


@pytest.fixture
def silent_bus(tmp_path):
    bus = SilentBus(tmp_path / "silent")
    yield bus
    bus.close()


@pytest.fixture
def hello_less_bus(tmp_path):
    bus = SilentBus(tmp_path / "hello-less", handshake=True)
    yield bus
    bus.close()


def run(args: list[str], wait: float) -> tuple[int, str, float]:
    start = time.monotonic()
    try:
        proc = subprocess.run([PYTHON, *args], cwd=REPO, capture_output=True, text=True, timeout=wait)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{args[1]} was still waiting for the bus after {wait:.0f} s")
    return proc.returncode, proc.stderr, time.monotonic() - start


def wqd(tmp_path, *args: str, config: str = "") -> list[str]:
    conf = tmp_path / "wqd.conf"
    conf.write_text(config)
    return ["-m", "wqd.daemon", "--config", str(conf), "--log-level", "warning", "--log-target", "stderr", *args]


def wqctl(*args: str) -> list[str]:
    return ["-m", "wqd.cli.wqctl", *args]


def assert_one_line_naming(err: str, address: str, *words: str) -> str:
    lines = [line for line in err.splitlines() if "cannot connect to the bus" in line]
    assert len(lines) == 1, err
    assert address in lines[0] and all(w in lines[0] for w in words), err
    assert "Traceback" not in err, err
    return lines[0]


def test_wqd_gives_up_on_a_socket_that_never_speaks(tmp_path, silent_bus):
    code, err, took = run(wqd(tmp_path, "--address", silent_bus.address, "--connect-timeout", str(BOUND)),
                          BOUND + STARTUP_MARGIN + 30)
    assert code == 1, err
    line = assert_one_line_naming(err, silent_bus.address, f"no answer within {BOUND:g} s")
    assert line.startswith("wqd: ")
    assert silent_bus.accepted, "wqd never connected: the test proved nothing"
    assert BOUND <= took < BOUND + STARTUP_MARGIN


def test_wqd_gives_up_when_hello_is_never_answered(tmp_path, hello_less_bus):
    code, err, took = run(wqd(tmp_path, "--address", hello_less_bus.address, "--connect-timeout", str(BOUND)),
                          BOUND + STARTUP_MARGIN + 30)
    assert code == 1, err
    assert_one_line_naming(err, hello_less_bus.address, "no answer within")
    assert hello_less_bus.began.is_set(), "the handshake did not complete: Hello was never waited for"
    assert BOUND <= took < BOUND + STARTUP_MARGIN


def test_wqd_gives_up_on_a_listener_whose_backlog_is_full(tmp_path, stopped_bus):
    """dbus-fast < 5 connects blocking in MessageBus(), out of reach of asyncio's
    timers: the bound holds there too (run by scripts/test on the lowest dbus-fast)."""
    code, err, took = run(wqd(tmp_path, "--address", stopped_bus.address, "--connect-timeout", str(BOUND)),
                          BOUND + STARTUP_MARGIN + 30)
    assert code == 1, err
    assert_one_line_naming(err, stopped_bus.address)
    assert took < BOUND + STARTUP_MARGIN


def test_wqctl_gives_up_on_a_listener_whose_backlog_is_full(stopped_bus):
    code, err, took = run(wqctl("--address", stopped_bus.address, "--timeout", str(BOUND), "status"),
                          BOUND + STARTUP_MARGIN + 30)
    assert code == 1, err
    assert_one_line_naming(err, stopped_bus.address)
    assert took < BOUND + STARTUP_MARGIN


def test_wqd_takes_the_bound_from_its_configuration(tmp_path, silent_bus):
    code, err, took = run(wqd(tmp_path, "--address", silent_bus.address,
                              config=f"[daemon]\nconnect_timeout = {BOUND}\n"), BOUND + STARTUP_MARGIN + 30)
    assert code == 1, err
    assert_one_line_naming(err, silent_bus.address, f"no answer within {BOUND:g} s")
    assert BOUND <= took < BOUND + STARTUP_MARGIN


def test_the_command_line_bound_overrides_the_configuration(tmp_path, silent_bus):
    code, err, _ = run(wqd(tmp_path, "--address", silent_bus.address, "--connect-timeout", str(BOUND),
                           config="[daemon]\nconnect_timeout = 3600\n"), BOUND + STARTUP_MARGIN + 30)
    assert code == 1, err
    assert_one_line_naming(err, silent_bus.address, f"no answer within {BOUND:g} s")


def test_wqd_says_so_at_once_where_no_socket_is(tmp_path):
    address = f"unix:path={tmp_path}/no-such-socket"
    code, err, took = run(wqd(tmp_path, "--address", address), STARTUP_MARGIN + 30)
    assert code == 1, err
    assert_one_line_naming(err, address, "No such file or directory")
    assert took < STARTUP_MARGIN  # the default bound (25 s) is not waited for


def test_a_bad_connect_timeout_is_refused(tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text("[daemon]\nconnect_timeout = 0\n")
    proc = subprocess.run([PYTHON, "-m", "wqd.daemon", "--check-config", str(conf)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "daemon.connect_timeout must be 0..3600" in proc.stderr, proc.stderr
    proc = subprocess.run([PYTHON, *wqd(tmp_path, "--connect-timeout", "-1")], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--connect-timeout" in proc.stderr, proc.stderr


def test_wqctl_gives_up_on_a_socket_that_never_speaks(silent_bus):
    code, err, took = run(wqctl("--address", silent_bus.address, "--timeout", str(BOUND), "status"),
                          BOUND + STARTUP_MARGIN + 30)
    assert code == 1, err
    line = assert_one_line_naming(err, silent_bus.address, f"no answer within {BOUND:g} s")
    assert line.startswith("wqctl: ")
    assert silent_bus.accepted
    assert BOUND <= took < BOUND + STARTUP_MARGIN


def test_wqctl_gives_up_when_hello_is_never_answered(hello_less_bus):
    code, err, took = run(wqctl("--address", hello_less_bus.address, "--timeout", str(BOUND), "watch", "keys", "@u"),
                          BOUND + STARTUP_MARGIN + 30)
    assert code == 1, err
    assert_one_line_naming(err, hello_less_bus.address, "no answer within")
    assert hello_less_bus.began.is_set()
    assert BOUND <= took < BOUND + STARTUP_MARGIN


def test_wqctl_says_so_at_once_where_no_socket_is(tmp_path):
    address = f"unix:path={tmp_path}/no-such-socket"
    code, err, took = run(wqctl("--address", address, "status"), STARTUP_MARGIN + 30)
    assert code == 1, err
    assert_one_line_naming(err, address, "No such file or directory")
    assert took < STARTUP_MARGIN


def test_wqctl_names_the_system_bus_address_it_tried(tmp_path):
    address = f"unix:path={tmp_path}/no-system-bus"
    start = time.monotonic()
    proc = subprocess.run([PYTHON, *wqctl("--system", "status")], cwd=REPO, capture_output=True, text=True,
                          timeout=STARTUP_MARGIN + 30, env={"DBUS_SYSTEM_BUS_ADDRESS": address, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1, proc.stderr
    assert_one_line_naming(proc.stderr, address)
    assert time.monotonic() - start < STARTUP_MARGIN
