"""The shipped system-bus policy on a real system-type dbus-daemon.

The bus (tests/support.py SYSTEM_CONF) has the default deny-all policy of a real
system bus and includes data/dbus/io.wqd.WatchQueue1.conf itself. wqd runs as
root; the other peers are busctl/gdbus processes as uid 1000 (setpriv), the
tools an administrator would use.
"""

from __future__ import annotations

import asyncio
import pwd
import shutil

import pytest

from support import BUS_NAME, IFACE, MANAGER, SUB_IFACE

pytestmark = [pytest.mark.asyncio, pytest.mark.bus, pytest.mark.root]

UID = 1000


@pytest.fixture(autouse=True)
def tools():
    for tool in ("setpriv", "busctl", "gdbus"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    try:
        pwd.getpwuid(UID)
    except KeyError:
        pytest.skip(f"uid {UID} has no passwd entry (dbus-daemon refuses unknown uids; scripts/setup adds one)")


async def as_uid(address: str, *cmd: str, uid: int = UID) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd="/",
        env={"PATH": "/usr/bin:/bin", "DBUS_SYSTEM_BUS_ADDRESS": address, "HOME": "/"})
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


async def busctl(address: str, *args: str, uid: int = UID) -> tuple[int, str, str]:
    return await as_uid(address, "busctl", f"--address={address}", "--no-pager", *args, uid=uid)


async def request_name(address: str, uid: int = UID) -> tuple[int, str, str]:
    """RequestName(io.wqd.WatchQueue1, DO_NOT_QUEUE) with gdbus, which prints the D-Bus error name."""
    return await as_uid(address, "gdbus", "call", "--system", "--dest", "org.freedesktop.DBus",
                        "--object-path", "/org/freedesktop/DBus", "--method", "org.freedesktop.DBus.RequestName",
                        BUS_NAME, "4", uid=uid)


async def test_root_daemon_owns_the_name(system_bus, wqd_factory):
    await wqd_factory(system_bus)  # waits for NameOwnerChanged: root may own the name
    code, out, err = await busctl(system_bus.address, "status", BUS_NAME)
    assert code == 0, err
    assert "UID=0" in out.split()


async def test_other_uid_cannot_own(system_bus, wqd_factory):
    await wqd_factory(system_bus)
    code, out, err = await request_name(system_bus.address)
    assert code != 0 and "org.freedesktop.DBus.Error.AccessDenied" in err, (out, err)


async def test_other_uid_cannot_own_a_free_name(system_bus):
    """Even with no wqd running, uid 1000 cannot take the name (no squatting before activation)."""
    code, out, err = await request_name(system_bus.address)
    assert code != 0 and "org.freedesktop.DBus.Error.AccessDenied" in err, (out, err)
    # root may: the allow is for root, not for everyone
    code, out, err = await request_name(system_bus.address, uid=0)
    assert code == 0 and out.strip() == "(uint32 1,)", (out, err)  # PRIMARY_OWNER


async def test_other_uid_can_watch(system_bus, wqd_factory):
    await wqd_factory(system_bus)
    # @u of uid 1000: resolved by wqd as that uid; the unix policy lets a user watch its own keyring
    code, out, err = await busctl(system_bus.address, "call", BUS_NAME, MANAGER, IFACE, "Watch", "ssa{sv}",
                                  "keys", "@u", "0")
    assert code == 0, err
    kind, path = out.split()
    assert kind == "o" and path.startswith('"/io/wqd/WatchQueue1/subscription/')


async def test_other_uid_can_introspect_and_read_properties(system_bus, wqd_factory):
    await wqd_factory(system_bus)
    code, out, err = await busctl(system_bus.address, "introspect", BUS_NAME, MANAGER)
    assert code == 0, err
    assert ".Watch" in out and ".ListSubscriptions" in out and ".Sources" in out
    code, out, err = await busctl(system_bus.address, "get-property", BUS_NAME, MANAGER, IFACE, "Version")
    assert code == 0 and out.split() == ["s", '"1"'], (out, err)
    code, out, err = await busctl(system_bus.address, "call", BUS_NAME, MANAGER, "org.freedesktop.DBus.Peer", "Ping")
    assert code == 0, err
    code, out, err = await as_uid(system_bus.address, "gdbus", "introspect", "--system", "--dest", BUS_NAME,
                                  "--object-path", MANAGER)
    assert code == 0 and "Watch(" in out, err


async def test_subscription_interface_reaches_the_daemon(system_bus, wqd_factory):
    """Calls on io.wqd.Subscription1 pass the bus; the daemon itself refuses a non-owner."""
    await wqd_factory(system_bus)
    code, out, err = await busctl(system_bus.address, "call", BUS_NAME, MANAGER + "/subscription/1",
                                  SUB_IFACE, "Close")
    assert code != 0 and "no such subscription" in err, (out, err)


async def test_other_interfaces_are_refused_by_the_bus(system_bus, wqd_factory):
    """Only the listed interfaces pass: anything else is stopped by the bus's default deny."""
    wqd = await wqd_factory(system_bus)
    code, out, err = await as_uid(system_bus.address, "gdbus", "call", "--system", "--dest", BUS_NAME,
                                  "--object-path", MANAGER, "--method", "io.wqd.Internal1.Anything")
    assert code != 0 and "org.freedesktop.DBus.Error.AccessDenied" in err, (out, err)
    assert "io.wqd.Internal1" not in wqd.log_text()  # never reached wqd
