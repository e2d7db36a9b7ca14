"""D-Bus activation: the first call to io.wqd.WatchQueue1 starts wqd.

- A session-type bus whose <servicedir> holds the shipped activation file (as
  `scripts/install` lays it out, Exec= pointing at the installed wqd): the bus
  execs wqd itself.
- The same with an Exec= line that names no bus and hides
  DBUS_SESSION_BUS_ADDRESS: wqd finds its bus from DBUS_STARTER_ADDRESS.
- A system-type bus in systemd-activation mode with the shipped system-services
  file and bus policy: the bus asks systemd for wqd.service (SystemdService=),
  by an ActivationRequest signal to org.freedesktop.systemd1. systemd is not
  PID 1 here, so the test owns that name and does what systemd does for the
  unit: it runs the installed unit's ExecStart= with a NOTIFY_SOCKET and waits
  for READY=1. The caller is uid 1000.
"""

from __future__ import annotations

import asyncio
import configparser
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from support import BUS_NAME, IFACE, MANAGER, REPO, call, start_bus

pytestmark = [pytest.mark.asyncio, pytest.mark.bus]

NAME = "io.wqd.WatchQueue1"
CONFIG = """[keys]
backend = "proc-keys"
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """scripts/install with PREFIX=<tmp>/usr; the commands run with this test's interpreter."""
    prefix = tmp_path_factory.mktemp("prefix") / "usr"
    result = subprocess.run([str(REPO / "scripts" / "install"), "", str(prefix)], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "INSTALL_PYTHON": sys.executable}, timeout=120)
    assert result.returncode == 0, result.stderr
    return prefix


@pytest.fixture
def buses():
    if not shutil.which("dbus-daemon"):
        pytest.skip("dbus-daemon is not installed")
    started = []
    yield started
    for bus in started:
        bus.stop()


def service_file(path: Path, exec_line: str, **extra: str) -> None:
    lines = ["[D-BUS Service]", f"Name={NAME}", f"Exec={exec_line}", *(f"{k}={v}" for k, v in extra.items())]
    path.write_text("\n".join(lines) + "\n")


def read_ini(path: Path, section: str) -> configparser.SectionProxy:
    ini = configparser.ConfigParser(interpolation=None, strict=False)
    ini.optionxform = str
    ini.read(path)
    return ini[section]


async def name_owner_pid(bus: MessageBus) -> int:
    reply = await call(bus, "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                       "GetConnectionUnixProcessID", "s", [NAME])
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    return reply.body[0]


async def has_owner(bus: MessageBus) -> bool:
    reply = await call(bus, "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                       "NameHasOwner", "s", [NAME])
    return reply.body[0]


async def terminate(pid: int) -> None:
    """SIGTERM a process we did not start (the bus did) and wait for it through a pidfd."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
    try:
        signal.pidfd_send_signal(fd, signal.SIGTERM)
        await asyncio.wait_for(gone, 10)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def activate_and_check(address: str) -> int:
    """Call wqd by name before it runs; return the pid of the process that answered."""
    bus = await MessageBus(bus_address=address).connect()
    try:
        assert not await has_owner(bus)
        reply = await call(bus, BUS_NAME, MANAGER, "org.freedesktop.DBus.Properties", "Get", "ss", [IFACE, "Version"])
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        assert reply.body[0].value == "1"
        return await name_owner_pid(bus)
    finally:
        bus.disconnect()


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


async def test_session_activation_with_shipped_file(installed, buses, tmp_path):
    services = tmp_path / "services"
    services.mkdir()
    (tmp_path / "wqd.conf").write_text(CONFIG)
    shipped = read_ini(installed / "share" / "dbus-1" / "services" / f"{NAME}.service", "D-BUS Service")
    assert shipped["Exec"].startswith(f"{installed}/bin/wqd ")
    service_file(services / f"{NAME}.service", f"{shipped['Exec']} --config {tmp_path}/wqd.conf --log-level warning",
                 SystemdService=shipped["SystemdService"])
    bus = start_bus(tmp_path / "bus", "session", extra=f"<servicedir>{services}</servicedir>")
    buses.append(bus)
    pid = await activate_and_check(bus.address)
    try:
        argv = cmdline(pid)
        assert f"{installed}/bin/wqd" in argv and "--session" in argv
    finally:
        await terminate(pid)


async def test_activation_without_bus_options_uses_starter_address(buses, tmp_path):
    """Exec= names no bus and DBUS_SESSION_BUS_ADDRESS is removed: wqd serves DBUS_STARTER_ADDRESS."""
    services = tmp_path / "services"
    services.mkdir()
    (tmp_path / "wqd.conf").write_text(CONFIG)
    wqd = REPO / ".venv" / "bin" / "wqd"
    if not wqd.exists():
        pytest.skip("the venv has no wqd command (scripts/setup installs it)")
    service_file(services / f"{NAME}.service",
                 f"/usr/bin/env -u DBUS_SESSION_BUS_ADDRESS {wqd} --config {tmp_path}/wqd.conf --log-level warning")
    bus = start_bus(tmp_path / "bus", "session", extra=f"<servicedir>{services}</servicedir>")
    buses.append(bus)
    pid = await activate_and_check(bus.address)
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not any(e.startswith(b"DBUS_SESSION_BUS_ADDRESS=") for e in environ)
        assert any(e.startswith(b"DBUS_STARTER_ADDRESS=") for e in environ)
        assert not {"--address", "--session", "--system"} & set(cmdline(pid))
    finally:
        await terminate(pid)


class StandInSystemd:
    """Owns org.freedesktop.systemd1 and starts wqd.service on ActivationRequest, as systemd would."""

    def __init__(self, bus: MessageBus, address: str, unit: Path, config: Path, notify_path: Path) -> None:
        self.bus = bus
        self.address = address
        self.unit = unit
        self.config = config
        self.requests: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.ready = asyncio.get_running_loop().create_future()
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self.notify.bind(str(notify_path))
        self.notify_path = notify_path
        asyncio.get_running_loop().add_reader(self.notify.fileno(), self._on_notify)
        bus.add_message_handler(self._on_message)

    def _on_notify(self) -> None:
        while True:
            try:
                data = self.notify.recv(4096)
            except BlockingIOError:
                return
            if b"READY=1" in data.split(b"\n") and not self.ready.done():
                self.ready.set_result(data)

    def _on_message(self, msg: Message):
        if (msg.message_type == MessageType.SIGNAL and msg.interface == "org.freedesktop.systemd1.Activator"
                and msg.member == "ActivationRequest"):
            self.requests.append(msg.body[0])
            if msg.body[0] == "wqd.service":
                self._start_unit()

    def _start_unit(self) -> None:
        service = read_ini(self.unit, "Service")
        argv = shlex.split(service["ExecStart"]) + ["--config", str(self.config), "--log-level", "warning"]
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.address, "NOTIFY_SOCKET": str(self.notify_path)}
        self.procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.notify.fileno())
        self.notify.close()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.mark.root
async def test_systemd_activation_on_system_bus(installed, buses, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("a system-type bus with a uid-1000 caller needs root")
    if shutil.which("setpriv") is None or shutil.which("busctl") is None:
        pytest.skip("setpriv and busctl are needed")
    try:
        pwd.getpwuid(1000)
    except KeyError:
        pytest.skip("uid 1000 has no passwd entry (scripts/setup adds one)")
    system_services = installed / "share" / "dbus-1" / "system-services"
    assert read_ini(system_services / f"{NAME}.service", "D-BUS Service")["SystemdService"] == "wqd.service"
    (tmp_path / "wqd.conf").write_text(CONFIG)
    bus = start_bus(tmp_path / "bus", "system", args=("--systemd-activation",), extra=(
        f"<servicedir>{system_services}</servicedir>"
        '<policy user="root"><allow own="org.freedesktop.systemd1"/></policy>'))
    buses.append(bus)
    address = bus.address

    manager = await MessageBus(bus_address=address).connect()
    systemd = StandInSystemd(manager, address, installed / "lib" / "systemd" / "system" / "wqd.service",
                             tmp_path / "wqd.conf", tmp_path / "notify")
    try:
        reply = await manager.request_name("org.freedesktop.systemd1")
        assert reply.value == 1, reply  # PRIMARY_OWNER
        assert not await has_owner(manager)
        caller = await asyncio.create_subprocess_exec(
            "setpriv", "--reuid=1000", "--regid=1000", "--clear-groups",
            "busctl", f"--address={address}", "--no-pager", "get-property", BUS_NAME, MANAGER, IFACE, "Version",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd="/")
        out, err = await asyncio.wait_for(caller.communicate(), 60)
        assert caller.returncode == 0, err.decode()
        assert out.decode().split() == ["s", '"1"']
        assert systemd.requests == ["wqd.service"]
        ready = await asyncio.wait_for(systemd.ready, 10)
        assert b"STATUS=serving" in ready
        pid = await name_owner_pid(manager)
        assert pid == systemd.procs[0].pid
        assert "--system" in cmdline(pid)  # the unit's ExecStart, unchanged
    finally:
        systemd.close()
        manager.disconnect()
