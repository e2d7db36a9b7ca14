"""PID reuse does not lend a sandboxed peer a host process's identity (issue 12, finding 1).

dbus-daemon 1.14 gives no ``ProcessFD``: the bus reports the PID that connected.
A Flatpak-like peer (a private root holding ``.flatpak-info``, uid 1000,
tests/test_sandbox.py) connects and says Hello, forks a child that keeps the
connection, and exits (tests/hostile/outliving_peer.py); a host process of the
same uid then takes its PID — forced at once with ``clone3(set_tid)``
(tests/hostile/spawn_at_pid.py) where an attacker would cycle through the PID
space. The child's first call must not be judged on the host process: it
started after wqd saw the connection appear, so the namespace and sandbox
decisions fail closed. And a peer connected before wqd watched the bus is
unverifiable for them from the start.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from policy_support import (APP, FLATPAK_ROOT, CommandPeer, as_uid, policy_config, require_root, watch,  # noqa: E402
                            world_keyring, write_rules)
from support import PYTHON, terminate  # noqa: E402

pytestmark = [pytest.mark.asyncio, pytest.mark.root, pytest.mark.bus]

HERE = Path(__file__).resolve().parent
PLUGINS = ("unix", "namespace", "sandbox", "rules")
UNVERIFIABLE = "the caller's identity cannot be established"


def socket_path(address: str) -> str:
    return dict(part.split("=", 1) for part in address.removeprefix("unix:").split(","))["path"]


async def read_json(stream, timeout: float = 30) -> dict:
    line = await asyncio.wait_for(asyncio.to_thread(stream.readline), timeout)
    assert line, "the peer closed its output"
    return json.loads(line)


def wait_comm(pid: int, comm: str) -> None:
    for _ in range(500):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == comm:
                    return
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never became {comm}")


async def test_a_reused_pid_is_not_judged_in_the_sandboxed_peers_place(tmp_path, system_bus, wqd_factory):
    require_root()
    rules = tmp_path / "rules.d"
    write_rules(rules, "10.rules", "allow keys * world\n")  # the app is denied (no app: rule); the host uid is not
    root_dir = tmp_path / "flatpak-root"
    root_dir.mkdir()
    with world_keyring("wqd-pid-reuse") as ring:
        wqd = await wqd_factory(system_bus, policy_config(rules, PLUGINS))
        app = subprocess.Popen(
            ["unshare", "-m", "sh", "-c", FLATPAK_ROOT, "sh", str(root_dir), APP, *as_uid(1000),
             PYTHON, str(HERE / "outliving_peer.py"), socket_path(system_bus.address)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
        impostor = spawned = None
        try:
            hello = await read_json(app.stdout)
            connector = hello["pid"]
            assert connector == app.pid  # unshare, sh, chroot and setpriv exec in place
            child = (await read_json(app.stdout))["child"]
            assert app.wait(10) == 0  # the connector exited and is reaped: its PID is free
            await asyncio.sleep(0.1)  # a few clock ticks: the PID's next owner starts visibly later
            impostor = subprocess.Popen([PYTHON, str(HERE / "spawn_at_pid.py"), str(connector),
                                         *as_uid(1000), "sleep", "60"], stdout=subprocess.PIPE, text=True)
            line = await asyncio.wait_for(asyncio.to_thread(impostor.stdout.readline), 10)
            if not line.strip().isdigit():
                pytest.skip(f"cannot choose a PID here (clone3 set_tid): exit {impostor.wait()}")
            spawned = int(line)
            assert spawned == connector
            wait_comm(connector, "sleep")  # a host process of uid 1000 now has the connection's PID

            app.stdin.write(json.dumps({"source": "keys", "target": str(ring)}) + "\n")
            app.stdin.flush()
            out = await read_json(app.stdout)
            assert out == {"ok": False, "error": "io.wqd.WatchQueue1.Error.AccessDenied", "text": UNVERIFIABLE}, out
            log = wqd.log_text()
            assert f"peer {hello['name']} (uid 1000, pid {connector}): identity not verified" in log
            assert "PID reused" in log
            assert f"{hello['name']} watches" not in log
            os.kill(child, 0)  # the connection's holder was alive all along
        finally:
            if spawned is not None:
                os.kill(spawned, signal.SIGKILL)  # the spawner's child, ours: its exit ends the spawner
            if impostor is not None:
                terminate(impostor)
                impostor.stdout.close()
            for f in (app.stdin, app.stdout, app.stderr):
                f.close()
            if app.poll() is None:
                app.kill()
                app.wait()
            # the child that held the connection exits once its stdin is closed


async def test_a_peer_connected_before_wqd_watched_the_bus_is_unverifiable(tmp_path, system_bus, wqd_factory):
    require_root()
    rules = tmp_path / "rules.d"
    write_rules(rules, "10.rules", "allow keys * world\n")
    with world_keyring("wqd-before-wqd") as ring:
        early = CommandPeer(system_bus.address, as_uid(1000))
        try:
            assert (await early.request("unique_name"))["ok"]  # connected before wqd runs
            wqd = await wqd_factory(system_bus, policy_config(rules, PLUGINS))
            late = CommandPeer(system_bus.address, as_uid(1000))
            try:
                out = await early.request("watch", source="keys", target=str(ring))
                assert out == {"ok": False, "error": "io.wqd.WatchQueue1.Error.AccessDenied", "text": UNVERIFIABLE}
                assert await watch(late, "keys", str(ring)) == "A"  # seen appearing: verified, allowed
            finally:
                late.close()
            assert "connected before wqd watched the bus" in wqd.log_text()
            # Decisions that read no /proc/PID still stand on the bus's word (the uid).
            wqd.stop()
            other = await wqd_factory(system_bus, policy_config(rules, ("unix", "rules")), name="wqd2")
            assert await watch(early, "keys", str(ring)) == "A"
            assert other.proc.poll() is None
        finally:
            early.close()
