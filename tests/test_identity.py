"""Peer identity without races: pidfd pinning, uid and start-time verification, ProcessFD,
PID 0 from a foreign PID namespace, and the sandbox and namespace facts read once."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time

import pytest
from dbus_fast import MessageType
from dbus_fast.aio import MessageBus

from policy_support import CommandPeer, as_uid, policy_config, require_root, watch, world_keyring, write_rules
from support import REPO, SYSTEM_CONF, PrivateBus, call
from wqd.bus.identity import PeerDirectory
from wqd.peer import (IdentityUnclear, PeerCredentials, boottime_ticks, inspect_process, map_to_inside,
                      open_namespace, own_namespaces, parse_flatpak_info, parse_id_map, reopen, snap_from_cgroup,
                      snap_from_label)

pytestmark = [pytest.mark.bus, pytest.mark.root]  # one test needs a system bus


@pytest.fixture
def child():
    """A real process as uid 1000 (or ourselves when not root); killed at teardown."""
    started = []

    def start(uid: int | None = None) -> subprocess.Popen:
        cmd = ["sleep", "60"]
        if uid is not None and uid != os.geteuid():
            cmd = [*as_uid(uid), *cmd]
        proc = subprocess.Popen(cmd)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def uid_under_test() -> int:
    return 1000 if os.geteuid() == 0 else os.geteuid()


def wait_exec(proc: subprocess.Popen, comm: str = "sleep") -> None:
    """Until setpriv has exec'd *comm* (then uid and start time are final)."""
    for _ in range(200):
        with open(f"/proc/{proc.pid}/comm") as f:
            if f.read().strip() == comm:
                return
        time.sleep(0.01)
    raise AssertionError("child did not exec")


def test_a_live_process_is_pinned_verified_and_read(child):
    uid = uid_under_test()
    proc = child(uid)
    wait_exec(proc)
    info = inspect_process(proc.pid, uid, not_after=boottime_ticks())
    with open(f"/proc/{proc.pid}/stat", "rb") as f:
        assert info["start_time"] == int(f.read().rsplit(b")", 1)[1].split()[19])
    assert info["gid"] == uid  # setpriv --regid
    own = own_namespaces()
    assert (info["mnt_ns"], info["user_ns"], info["pid_ns"]) == (own["mnt"], own["user"], own["pid"])
    assert info["uid_map"] == ((0, 0, 4294967295),)
    assert info["sandbox"] is None


def test_wrong_uid_or_a_later_start_means_doubt(child):
    uid = uid_under_test()
    before = boottime_ticks()
    time.sleep(0.05)  # a few clock ticks
    proc = child(uid)
    wait_exec(proc)
    with pytest.raises(IdentityUnclear, match="bus said"):
        inspect_process(proc.pid, uid + 1)
    # A process that started after the peer's first message is not the peer: PID reuse.
    with pytest.raises(IdentityUnclear, match="PID reused"):
        inspect_process(proc.pid, uid, not_after=before)


def test_an_exited_process_cannot_be_pinned(child):
    proc = child()
    pid = proc.pid
    proc.kill()
    proc.wait()
    with pytest.raises(IdentityUnclear):
        inspect_process(pid, os.geteuid())


def test_process_fd_from_the_bus_is_used_and_checked(child):
    """GetConnectionCredentials' ProcessFD (dbus-daemon 1.14 has none: a real pidfd stands in)."""
    uid = uid_under_test()
    proc = child(uid)
    wait_exec(proc)
    directory = PeerDirectory(bus=None)
    pidfd = os.pidfd_open(proc.pid)
    try:
        creds = {"UnixUserID": uid, "ProcessID": proc.pid, "ProcessFD": 0, "UnixGroupIDs": [uid]}
        peer = directory._build(":1.42", creds, [pidfd], boottime_ticks())
        assert peer.verified and peer.pid == proc.pid and peer.extra["bus_process_fd"]
        # The PID comes from the pidfd when the bus gives no ProcessID.
        peer = directory._build(":1.43", {"UnixUserID": uid, "ProcessFD": 0}, [pidfd], boottime_ticks())
        assert peer.verified and peer.pid == proc.pid
        # A ProcessID that is not the pidfd's process: doubt.
        peer = directory._build(":1.44", {**creds, "ProcessID": os.getpid()}, [pidfd], boottime_ticks())
        assert not peer.verified and peer.start_time is None and peer.mnt_ns is None
        # An index with no fd behind it: doubt.
        peer = directory._build(":1.45", {**creds, "ProcessFD": 3}, [pidfd], boottime_ticks())
        assert not peer.verified
        # The process exits: its pidfd says so (Pid: -1), nothing is read.
        proc.kill()
        proc.wait()
        peer = directory._build(":1.46", creds, [pidfd], boottime_ticks())
        assert not peer.verified
    finally:
        os.close(pidfd)


def test_without_process_fd_the_appearance_of_the_name_decides(child):
    """No ProcessFD: the process must have started by the time wqd saw the name appear,
    and a name wqd did not see appear (connected before wqd watched) is unverifiable."""
    uid = uid_under_test()
    before = boottime_ticks()
    time.sleep(0.05)
    proc = child(uid)
    wait_exec(proc)
    time.sleep(0.05)
    directory = PeerDirectory(bus=None)
    creds = {"UnixUserID": uid, "ProcessID": proc.pid}
    assert directory._build(":1.70", creds, [], boottime_ticks()).verified  # appeared after it started
    late = directory._build(":1.71", creds, [], before)  # appeared before it started: PID reused
    assert not late.verified and late.mnt_ns is None and late.sandbox is None
    unseen = directory._build(":1.72", creds, [], None)
    assert not unseen.verified and unseen.start_time is None
    # A ProcessFD pins the connector itself: no appearance needed.
    pidfd = os.pidfd_open(proc.pid)
    try:
        pinned = directory._build(":1.73", {**creds, "ProcessFD": 0}, [pidfd], None)
        assert pinned.verified and pinned.extra["bus_process_fd"]
    finally:
        os.close(pidfd)


def test_pid_zero_or_none_leaves_the_peer_unverified():
    directory = PeerDirectory(bus=None)
    for creds in ({"UnixUserID": 0, "ProcessID": 0}, {"UnixUserID": 0}):
        peer = directory._build(":1.50", creds, [])
        assert not peer.verified and peer.pid is None and peer.user_ns is None


def test_reopen_and_open_namespace_check_the_recorded_process(child):
    uid = uid_under_test()
    proc = child(uid)
    wait_exec(proc)
    info = inspect_process(proc.pid, uid)
    peer = PeerCredentials(":1.60", uid, frozenset(), proc.pid, None, info["start_time"], info["mnt_ns"],
                           info["user_ns"], info["pid_ns"], True)
    with reopen(peer) as pinned:
        assert pinned.alive()
    fd = open_namespace(peer, "mnt")
    try:
        assert os.fstat(fd).st_ino == own_namespaces()["mnt"]
    finally:
        os.close(fd)
    impostor = dataclasses.replace(peer, start_time=peer.start_time + 1)  # as if the PID had been reused
    with pytest.raises(IdentityUnclear):
        reopen(impostor)
    with pytest.raises(IdentityUnclear):
        open_namespace(dataclasses.replace(peer, mnt_ns=peer.mnt_ns + 1), "mnt")
    with pytest.raises(IdentityUnclear):
        reopen(dataclasses.replace(peer, verified=False))


def test_parsers():
    assert parse_flatpak_info(b"[Application]\nname=org.gnome.Maps\nruntime=runtime/x\n\n[Instance]\n") == \
        "org.gnome.Maps"
    assert parse_flatpak_info(b"[Runtime]\nname=org.gnome.Platform\n") is None
    assert parse_flatpak_info(b"[Application]\nname=../../evil\n") is None
    assert snap_from_label("snap.firefox.firefox (enforce)") == "firefox"
    assert snap_from_label("snap.lxd.hook.configure (complain)") == "lxd"
    assert snap_from_label("unconfined") is None and snap_from_label(None) is None
    assert snap_from_label("snapd.firefox (enforce)") is None
    cgroup = b"12:pids:/user.slice\n0::/user.slice/user-1000.slice/user@1000.service/app.slice/" \
             b"snap.hello-world.hello-world-4d7b2c4e.scope\n"
    assert snap_from_cgroup(cgroup) == "hello-world"
    assert snap_from_cgroup(b"0::/user.slice/snapper.service\n") is None
    id_map = parse_id_map(b"         0       1000          1\n         1     100000      65536\n")
    assert id_map == ((0, 1000, 1), (1, 100000, 65536))
    assert [map_to_inside(v, id_map) for v in (1000, 100000, 165535, 165536, 0)] == [0, 1, 65536, None, None]


# -- a bus in its own PID namespace: every peer outside shows PID 0 -------------------


@pytest.fixture
def pidns_bus(tmp_path):
    require_root()
    if not shutil.which("dbus-daemon"):
        pytest.skip("dbus-daemon is not installed")
    directory = tmp_path / "pidns-bus"
    directory.mkdir()
    sockdir = tmp_path / "sock"
    sockdir.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(sockdir, 0o755)
    conf = directory / "system.conf"
    conf.write_text(SYSTEM_CONF.format(socket=sockdir / "bus", repo=REPO, extra=""))
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc",
         "dbus-daemon", f"--config-file={conf}", "--nofork", "--print-address=1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    address = proc.stdout.readline().strip()
    if not address:
        proc.kill()
        proc.wait()
        pytest.skip(f"dbus-daemon did not start in a PID namespace: {proc.stderr.read()}")
    bus = PrivateBus("system", address, proc, sockdir)
    yield bus
    proc.kill()  # unshare --fork ignores SIGTERM; --kill-child takes dbus-daemon with it
    proc.wait()
    bus.stop()


@pytest.mark.asyncio
async def test_a_peer_the_bus_sees_as_pid_0_is_denied_by_namespace(tmp_path, pidns_bus, wqd_factory):
    rules = tmp_path / "rules.d"
    write_rules(rules, "10.rules", "allow keys * world\n")
    with world_keyring("wqd-pid0") as ring:
        wqd = await wqd_factory(pidns_bus, policy_config(rules, ("unix", "namespace", "rules")))
        peer = CommandPeer(pidns_bus.address, as_uid(0))
        try:
            out = await peer.request("watch", source="keys", target=str(ring))
            assert out == {"ok": False, "error": "io.wqd.WatchQueue1.Error.AccessDenied",
                           "text": "the caller's identity cannot be established"}
        finally:
            peer.close()
        assert "identity not verified: the bus reported no usable process id" in wqd.log_text()
        # Without the namespace plugin the uid (the kernel's, via the bus) still counts.
        wqd.stop()
        other = await wqd_factory(pidns_bus, policy_config(rules, ("unix", "rules")), name="wqd2")
        peer = CommandPeer(pidns_bus.address, as_uid(0))
        try:
            assert await watch(peer, "keys", str(ring)) == "A"
        finally:
            peer.close()
        assert other.proc.poll() is None


# -- fd passing: negotiated for ProcessFD, but nothing a peer pushes is kept ----------


@pytest.mark.asyncio
async def test_fds_sent_to_the_daemon_are_closed(system_bus, wqd_factory):
    from dbus_fast import Message as DBusMessage

    wqd = await wqd_factory(system_bus)
    bus = await MessageBus(bus_address=system_bus.address, negotiate_unix_fd=True).connect()
    r, w = os.pipe()
    try:
        owner = await call(bus, "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                           "GetNameOwner", "s", ["io.wqd.WatchQueue1"])
        daemon = owner.body[0]

        def open_fds() -> int:
            return len(os.listdir(f"/proc/{wqd.proc.pid}/fd"))

        ping = await call(bus, "io.wqd.WatchQueue1", "/io/wqd/WatchQueue1", "org.freedesktop.DBus.Peer", "Ping")
        assert ping.message_type == MessageType.METHOD_RETURN
        before = open_fds()
        for i in range(20):
            bus.send(DBusMessage.new_signal("/x", "org.example.Junk", "Fd", "h", [0], unix_fds=[r]))
            bus.send(DBusMessage(destination=daemon, path="/x", interface="org.example.Junk", member="Fd",
                                 message_type=MessageType.SIGNAL, signature="h", body=[0], unix_fds=[w]))
            reply = await bus.call(DBusMessage(destination="io.wqd.WatchQueue1", path="/io/wqd/WatchQueue1",
                                               interface="io.wqd.WatchQueue1", member="Watch", signature="h",
                                               body=[0], unix_fds=[r]))
            assert reply.message_type == MessageType.ERROR
        ping = await call(bus, "io.wqd.WatchQueue1", "/io/wqd/WatchQueue1", "org.freedesktop.DBus.Peer", "Ping")
        assert ping.message_type == MessageType.METHOD_RETURN
        assert open_fds() <= before
    finally:
        os.close(r)
        os.close(w)
        bus.disconnect()
