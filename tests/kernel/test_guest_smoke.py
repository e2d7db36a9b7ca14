"""Smoke tests proving the kernel-tier guest is what the real kernel tests need.

Run with ``tests/vm/run`` (boots the watch-queue kernel); on a kernel without
CONFIG_WATCH_QUEUE every test here skips.
"""
import fcntl
import gzip
import os
import select
import shutil
import subprocess
import time
import uuid

import pytest

pytestmark = pytest.mark.kernel


def test_notification_pipe_and_set_size(watch_queue_kernel, wq):
    r, w = os.pipe2(wq.O_NOTIFICATION_PIPE)
    try:
        assert fcntl.ioctl(r, wq.IOC_WATCH_QUEUE_SET_SIZE, 16) == 0
        with pytest.raises(OSError):        # 0 notes is rejected (EINVAL)
            fcntl.ioctl(r, wq.IOC_WATCH_QUEUE_SET_SIZE, 0)
    finally:
        os.close(r)
        os.close(w)


def test_kernel_config(watch_queue_kernel):
    if not os.path.exists("/proc/config.gz"):
        pytest.skip("no /proc/config.gz (not the tests/vm kernel)")
    config = gzip.open("/proc/config.gz", "rt").read().splitlines()
    for opt in ("CONFIG_WATCH_QUEUE=y", "CONFIG_KEY_NOTIFICATIONS=y", "CONFIG_PERSISTENT_KEYRINGS=y"):
        assert opt in config


def test_link_into_watched_keyring_gives_16_byte_record(notification_pipe, fresh_keyring, wq):
    r, _ = notification_pipe
    tag = 0x2A
    wq.watch_key(fresh_keyring, r, tag)
    key = wq.add_key("user", f"wqd-smoke-{uuid.uuid4().hex[:8]}", b"payload", fresh_keyring)

    buf = wq.read_notes(r)
    assert len(buf) == 16, buf.hex()
    (rtype, subtype, info, payload), = wq.parse_records(buf)
    assert rtype == wq.WATCH_TYPE_KEY_NOTIFY
    assert subtype == wq.NOTIFY_KEY_LINKED
    assert info & wq.WATCH_INFO_LENGTH == 16
    assert (info & wq.WATCH_INFO_ID) >> wq.WATCH_INFO_ID__SHIFT == tag
    key_id, aux = int.from_bytes(payload[:4], "little"), int.from_bytes(payload[4:], "little")
    assert key_id == fresh_keyring          # the watched keyring changed...
    assert aux == key                       # ...by linking the new key


def _readline(stream, deadline):
    while time.monotonic() < deadline:
        r, _, _ = select.select([stream], [], [], max(0, deadline - time.monotonic()))
        if r:
            return stream.readline()
    raise AssertionError("timed out waiting for watch_test output")


def test_watch_test_oracle_decodes_the_same_event(notification_pipe, fresh_keyring,
                                                   watch_test_oracle, wq):
    r, _ = notification_pipe
    wq.watch_key(fresh_keyring, r, 1)
    oracle = subprocess.Popen([watch_test_oracle, str(fresh_keyring)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, bufsize=1)
    try:
        deadline = time.monotonic() + 20
        ready = _readline(oracle.stderr, deadline)
        assert ready.startswith(f"watch_test: watching {fresh_keyring}"), ready
        key = wq.add_key("user", f"wqd-oracle-{uuid.uuid4().hex[:8]}", b"x", fresh_keyring)

        (rtype, subtype, info, payload), = wq.parse_records(wq.read_notes(r))
        ours = (rtype, subtype, int.from_bytes(payload[:4], "little"),
                int.from_bytes(payload[4:], "little"))

        lines = [_readline(oracle.stdout, deadline).strip() for _ in range(3)]
    finally:
        oracle.kill()
        oracle.wait()
    # watch_test prints: "read() = 16", "NOTIFY[000]: ty=000001 sy=02 i=00000110",
    # "KEY <id> change=2[linked] aux=<serial>"
    assert lines[0] == "read() = 16", lines
    assert lines[1] == f"NOTIFY[000]: ty={ours[0]:06x} sy={ours[1]:02x} i={info:08x}", lines
    assert lines[2] == f"KEY {ours[2]:08x} change={ours[1]}[linked] aux={ours[3]}", lines
    assert ours == (wq.WATCH_TYPE_KEY_NOTIFY, wq.NOTIFY_KEY_LINKED, fresh_keyring, key)


def test_keyctl_tool_works(watch_queue_kernel):
    if not shutil.which("keyctl"):
        pytest.skip("keyctl (keyutils) not installed on the host")
    out = subprocess.run(["keyctl", "show", "@s"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "Keyring" in out.stdout


def test_private_dbus_daemon_starts(watch_queue_kernel, tmp_path):
    if not shutil.which("dbus-daemon"):
        pytest.skip("dbus-daemon not installed on the host")
    conf = tmp_path / "bus.conf"
    conf.write_text(f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={tmp_path}/bus</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
""")
    bus = subprocess.Popen(["dbus-daemon", "--config-file", str(conf), "--nofork", "--nopidfile",
                            "--print-address=1"], stdout=subprocess.PIPE, text=True)
    try:
        addr = _readline(bus.stdout, time.monotonic() + 30).strip()
        assert addr.startswith(f"unix:path={tmp_path}/bus"), addr
        assert (tmp_path / "bus").is_socket()
        if shutil.which("dbus-send"):
            ping = subprocess.run(["dbus-send", f"--bus={addr}", "--print-reply",
                                   "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                                   "org.freedesktop.DBus.GetId"],
                                  capture_output=True, text=True, timeout=30)
            assert ping.returncode == 0, ping.stderr
    finally:
        bus.terminate()
        bus.wait(10)
