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


class _Lines:
    """Line reader over a raw pipe fd with a deadline (select() on a buffered
    file object would miss lines already sitting in its buffer)."""

    def __init__(self, stream):
        self.fd = stream.fileno()
        self.buf = b""

    def readline(self, deadline):
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            r, _, _ = select.select([self.fd], [], [], max(0, left))
            if not r:
                raise AssertionError(f"timed out waiting for a line; got so far: {self.buf!r}")
            chunk = os.read(self.fd, 4096)
            if not chunk:
                raise AssertionError(f"EOF while waiting for a line; got so far: {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


def test_watch_test_oracle_decodes_the_same_event(notification_pipe, fresh_keyring,
                                                   watch_test_oracle, wq):
    """watch_test (the kernel's own sample decoder) and we watch the same keyring
    and must agree on the record that linking a key produces."""
    r, _ = notification_pipe
    wq.watch_key(fresh_keyring, r, 1)
    with subprocess.Popen([watch_test_oracle, str(fresh_keyring)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, bufsize=0) as oracle:
        try:
            deadline = time.monotonic() + 20
            ready = _Lines(oracle.stderr).readline(deadline)
            assert ready.startswith(f"watch_test: watching {fresh_keyring}"), ready
            key = wq.add_key("user", f"wqd-oracle-{uuid.uuid4().hex[:8]}", b"x", fresh_keyring)

            (rtype, subtype, info, payload), = wq.parse_records(wq.read_notes(r))
            key_id, aux = (int.from_bytes(payload[:4], "little"),
                           int.from_bytes(payload[4:], "little"))
            out = _Lines(oracle.stdout)
            lines = [out.readline(deadline).strip() for _ in range(3)]
        finally:
            oracle.kill()
    assert (rtype, subtype, key_id, aux) == (wq.WATCH_TYPE_KEY_NOTIFY, wq.NOTIFY_KEY_LINKED,
                                             fresh_keyring, key)
    # watch_test's decode of the same record, e.g.
    #   read() = 16 / NOTIFY[000]: ty=000001 sy=02 i=00000110 / KEY 2f3b1c4d change=2[linked] aux=123
    assert lines == [
        "read() = 16",
        f"NOTIFY[000]: ty={rtype:06x} sy={subtype:02x} i={info:08x}",
        f"KEY {key_id:08x} change={subtype}[linked] aux={aux}",
    ]


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
    with subprocess.Popen(["dbus-daemon", "--config-file", str(conf), "--nofork", "--nopidfile",
                           "--print-address=1"], stdout=subprocess.PIPE, bufsize=0) as bus:
        try:
            _check_bus(bus, tmp_path)
        finally:
            bus.terminate()


def _check_bus(bus, tmp_path):
    addr = _Lines(bus.stdout).readline(time.monotonic() + 30).strip()
    assert addr.startswith(f"unix:path={tmp_path}/bus"), addr
    assert (tmp_path / "bus").is_socket()
    if shutil.which("dbus-send"):
        ping = subprocess.run(["dbus-send", f"--bus={addr}", "--print-reply",
                               "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                               "org.freedesktop.DBus.GetId"],
                              capture_output=True, text=True, timeout=30)
        assert ping.returncode == 0, ping.stderr
