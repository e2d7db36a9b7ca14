"""Test support: private dbus-daemons, the real wqd as a subprocess, bus clients.

Everything here starts real components; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import sys
import textwrap
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from wqd.events import WatchTarget
from wqd.parse.watch_queue import encode_key_record

REPO = Path(__file__).resolve().parent.parent
BUS_NAME = "io.wqd.WatchQueue1"
MANAGER = "/io/wqd/WatchQueue1"
IFACE = "io.wqd.WatchQueue1"
SUB_IFACE = "io.wqd.Subscription1"
PYTHON = sys.executable

SESSION_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
  {extra}
</busconfig>
"""

# Mirrors Debian's /usr/share/dbus-1/system.conf default policy (deny by default),
# and includes the shipped wqd policy file rather than a copy of it.
SYSTEM_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Peer"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus" send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Debug.Stats"/>
  </policy>
  <include>{repo}/data/dbus/io.wqd.WatchQueue1.conf</include>
  {extra}
</busconfig>
"""


def terminate(proc: subprocess.Popen, grace: float = 10) -> int:
    """SIGTERM, then SIGKILL after *grace* seconds; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class PrivateBus:
    kind: str
    address: str
    proc: subprocess.Popen
    dir: Path

    def stop(self) -> None:
        terminate(self.proc, 5)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_bus(directory: Path, kind: str = "session", extra: str = "", args: tuple = ()) -> PrivateBus:
    directory.mkdir(parents=True, exist_ok=True)
    # The socket lives where other uids can reach it (pytest's tmp dirs are 0700).
    sockdir = Path(tempfile.mkdtemp(prefix="wqd-bus-", dir="/tmp"))
    os.chmod(sockdir, 0o755)
    sock = sockdir / "bus"
    conf = directory / f"{kind}.conf"
    template = SESSION_CONF if kind == "session" else SYSTEM_CONF
    conf.write_text(template.format(socket=sock, repo=REPO, extra=extra))
    proc = subprocess.Popen(
        ["dbus-daemon", f"--config-file={conf}", "--nofork", "--print-address=1", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    address = proc.stdout.readline().strip()
    if not address:
        raise RuntimeError(f"dbus-daemon did not start: {proc.stderr.read()}")
    return PrivateBus(kind, address, proc, sockdir)


async def wait_for_name(address: str, name: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Wait until *name* has an owner, from NameOwnerChanged (no sleep loop)."""
    bus = await MessageBus(bus_address=address).connect()
    try:
        owned = asyncio.get_running_loop().create_future()

        def handler(msg: Message):
            if msg.member == "NameOwnerChanged" and msg.body[0] == name and msg.body[2]:
                if not owned.done():
                    owned.set_result(True)

        bus.add_message_handler(handler)
        await call(bus, "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s",
                   [f"type='signal',member='NameOwnerChanged',arg0='{name}'"])
        reply = await call(bus, "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                           "NameHasOwner", "s", [name])
        if reply.body[0]:
            return
        exited = asyncio.ensure_future(_wait_exit(proc))
        done, _ = await asyncio.wait([owned, exited], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        exited.cancel()
        if owned not in done:
            raise RuntimeError(f"{name} did not appear on the bus" + (" (process exited)" if proc.poll() is not None else ""))
    finally:
        bus.disconnect()


async def _wait_exit(proc: subprocess.Popen) -> None:
    while proc.poll() is None:
        await asyncio.sleep(0.05)


async def call(bus: MessageBus, dest: str, path: str, iface: str | None, member: str, signature: str = "",
               body: list | None = None) -> Message:
    return await bus.call(Message(destination=dest, path=path, interface=iface, member=member,
                                  signature=signature, body=body or []))


@dataclass
class Wqd:
    address: str
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        try:
            return self.log.read_text()
        except OSError:
            return ""

    def stop(self) -> int:
        return terminate(self.proc)


async def start_wqd(address: str, directory: Path, config: str = "", args: tuple = (), env: dict | None = None,
                    wrapper: tuple[str, ...] = ()) -> Wqd:
    """Start the real daemon. *wrapper* goes before the command (e.g. setpriv to run as another uid)."""
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "wqd.conf"
    conf.write_text(textwrap.dedent(config))
    os.chmod(conf, 0o644)
    if wrapper:  # pytest's tmp dirs are 0700: give another uid a readable copy
        readable = Path(tempfile.mkdtemp(prefix="wqd-conf-", dir="/tmp"))
        os.chmod(readable, 0o755)
        conf = Path(shutil.copy(conf, readable / "wqd.conf"))
    log = directory / "wqd.log"
    with log.open("w") as log_file:  # the child keeps its own copy of the fd
        proc = subprocess.Popen(
            [*wrapper, PYTHON, "-m", "wqd.daemon", "--address", address, "--config", str(conf),
             "--log-level", "debug", *args],
            stdout=subprocess.DEVNULL, stderr=log_file, cwd=REPO, env={**os.environ, **(env or {})},
        )
    return await ready(Wqd(address, proc, log))


async def ready(wqd: Wqd) -> Wqd:
    """Wait until *wqd* owns its name; if it does not, stop it and fail with its log."""
    try:
        await wait_for_name(wqd.address, BUS_NAME, wqd.proc)
    except RuntimeError as exc:
        wqd.stop()
        raise RuntimeError(f"{exc}\n--- wqd log ---\n{wqd.log_text()}") from None
    return wqd


@dataclass
class Client:
    """An in-process bus client (same uid as the test) recording its signals."""

    bus: MessageBus
    signals: dict = field(default_factory=lambda: defaultdict(list))
    all_signals: list = field(default_factory=list)
    _waiters: list = field(default_factory=list)

    @classmethod
    async def connect(cls, address: str, bus_class=MessageBus) -> Client:
        client = cls(await bus_class(bus_address=address).connect())
        client.bus.add_message_handler(client._on_message)
        return client

    def _on_message(self, msg: Message):
        if msg.message_type == MessageType.SIGNAL and msg.sender != "org.freedesktop.DBus":
            self.signals[msg.path].append((msg.member, list(msg.body)))
            self.all_signals.append(msg)
            for fut, pred in list(self._waiters):
                if not fut.done() and pred():
                    fut.set_result(True)
        return None

    async def call(self, path: str, iface: str | None, member: str, signature: str = "", body=None) -> Message:
        return await call(self.bus, BUS_NAME, path, iface, member, signature, body)

    async def watch(self, source: str, target: str, options: dict | None = None) -> str:
        reply = await self.call(MANAGER, IFACE, "Watch", "ssa{sv}", [source, target, options or {}])
        if reply.message_type == MessageType.ERROR:
            raise BusError(reply.error_name, reply.body[0] if reply.body else "")
        return reply.body[0]

    async def get(self, path: str, iface: str, prop: str):
        reply = await self.call(path, "org.freedesktop.DBus.Properties", "Get", "ss", [iface, prop])
        if reply.message_type == MessageType.ERROR:
            raise BusError(reply.error_name, reply.body[0] if reply.body else "")
        return reply.body[0].value

    async def wait_for(self, predicate, timeout: float = 10.0) -> None:
        if predicate():
            return
        fut = asyncio.get_running_loop().create_future()
        entry = (fut, predicate)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"timed out; signals so far: {dict(self.signals)}") from None
        finally:
            self._waiters.remove(entry)

    async def wait_signals(self, path: str, n: int, timeout: float = 10.0) -> list:
        await self.wait_for(lambda: len(self.signals[path]) >= n, timeout)
        return self.signals[path]

    def close(self) -> None:
        self.bus.disconnect()


class BusError(Exception):
    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.name = name
        self.text = text


async def request_until_ok(peer, op: str, attempts: int = 100, **kw) -> dict:
    """*peer*'s request until wqd grants it: for a state wqd reaches when the bus tells
    it something (another peer left) that no signal to *peer* announces."""
    for _ in range(attempts):
        out = await peer.request(op, **kw)
        if out["ok"]:
            break
        await asyncio.sleep(0.05)
    return out


class ForeignClient:
    """A bus client in another process, as another uid (setpriv), driven by JSON lines.

    See tests/peer_client.py for the commands.
    """

    def __init__(self, address: str, uid: int, gid: int | None = None, groups: tuple[int, ...] = (),
                 wrapper: tuple[str, ...] = ()) -> None:
        gid = uid if gid is None else gid
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={gid}"]
        cmd += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
        cmd += [*wrapper, PYTHON, str(REPO / "tests" / "peer_client.py"), address]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd="/")

    async def request(self, op: str, *, reply_timeout: float = 30.0, **kw) -> dict:
        """Send one command; *kw* become its JSON fields (``signals`` takes ``min`` and ``wait``)."""
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), reply_timeout)
        if not line:
            raise RuntimeError(f"peer client died: {self.proc.stderr.read()}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if not f.closed:
                f.close()


class KeyctlError(Exception):
    pass


def keyctl(*args: str) -> str:
    """Run the real keyctl(1); its stderr is in the error when it fails."""
    proc = subprocess.run(["keyctl", *args], capture_output=True, text=True)
    if proc.returncode:
        raise KeyctlError(f"keyctl {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def variant_options(**kw) -> dict:
    out = {}
    for k, v in kw.items():
        if isinstance(v, bool):
            out[k] = Variant("b", v)
        elif isinstance(v, list):
            out[k] = Variant("as", v)
        elif isinstance(v, str):
            out[k] = Variant("s", v)
        else:
            raise TypeError(k)
    return out


# -- the replay backend fed from a FIFO (flow control, clients) --------------------

KEY = 1234  # the key serial feed() writes records for


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


# -- a source for hub tests without a daemon (test_hub_*.py) ----------------------


class PathSource:
    """The least a source is: one route per target, no kernel state."""

    name = "fs-errors"
    backend = "test"

    async def resolve(self, peer, spec, options):
        return WatchTarget("fs-errors", spec)

    def routes(self, sub):
        return (sub.target.spec,)

    def attach(self, sub):
        pass

    def detach(self, sub):
        pass

    def accepts(self, sub, event):
        return True
