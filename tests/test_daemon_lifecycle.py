"""The daemon process: clean exit on SIGTERM/SIGINT, clear errors when it cannot serve."""

import asyncio
import signal
import subprocess
import sys

import pytest

from support import REPO, start_wqd

pytestmark = [pytest.mark.asyncio, pytest.mark.bus]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_clean_exit_on_signal(session_bus, tmp_path, sig):
    wqd = await start_wqd(session_bus.address, tmp_path / "w")
    wqd.proc.send_signal(sig)
    code = await asyncio.to_thread(wqd.proc.wait, 10)
    assert code == 0, wqd.log_text()
    assert "stopping" in wqd.log_text()


async def test_second_instance_says_why_it_cannot_serve(session_bus, wqd_factory, tmp_path):
    await wqd_factory(session_bus)
    proc = subprocess.run([sys.executable, "-m", "wqd.daemon", "--address", session_bus.address],
                          capture_output=True, text=True, timeout=30, cwd=REPO)
    assert proc.returncode == 1
    assert "cannot own io.wqd.WatchQueue1" in proc.stderr


async def test_bad_config_names_file_and_line(tmp_path):
    conf = tmp_path / "wqd.conf"
    conf.write_text("[keys]\nbackend = \"proc-keys\"\npoll_interval = -1\n")
    proc = subprocess.run([sys.executable, "-m", "wqd.daemon", "--address", "unix:path=/nonexistent",
                           "--config", str(conf)], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert proc.returncode == 2
    assert f"{conf}:3:" in proc.stderr and "keys.poll_interval" in proc.stderr


async def test_no_bus(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "wqd.daemon", "--address", "unix:path=/nonexistent/bus"],
                          capture_output=True, text=True, timeout=30, cwd=REPO)
    assert proc.returncode == 1 and "cannot connect to the bus" in proc.stderr
