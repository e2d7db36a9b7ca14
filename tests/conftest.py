"""Fixtures: private dbus-daemons (session- and system-type) and the real wqd."""

from __future__ import annotations

import os
import shutil

import pytest
import pytest_asyncio

import support
from wqd import krb5cache
from krb5_support import UIDS, kcm_missing, missing_tools, start_kcm, start_realm
from mounts_support import make_private_tmpfs, remove_tmpfs
from support import Client, start_bus, start_wqd
from udev import no_udevd, udevd  # noqa: F401 - the devices tests' fixtures, registered here


# -- tier markers: a test that starts a bus must say so (make test-unit / test-bus) --

# fixture -> the markers a test using it (directly or through another fixture) must carry
TIER_FIXTURES = {"session_bus": ("bus",), "system_bus": ("bus", "root")}
_current: list = [None]  # the test item being set up or run, for the start_bus check


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Before ``-m`` selects: every test using a bus fixture carries its tier markers
    (the kernel tier is its own: tests/vm/run selects it by ``kernel``)."""
    missing = []
    for item in items:
        if item.get_closest_marker("kernel") is not None:
            continue
        for fixture, markers in TIER_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                lacking = [m for m in markers if item.get_closest_marker(m) is None]
                if lacking:
                    missing.append(f"{item.nodeid} uses {fixture} but is not marked {', '.join(lacking)}")
    if missing:
        raise pytest.UsageError("tier markers missing (add pytestmark = [...] at the module top):\n  "
                                + "\n  ".join(sorted(set(missing))))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current[0] = item
    try:
        return (yield)
    finally:
        _current[0] = None


def _checked_start_bus(*args, **kwargs):
    """``support.start_bus`` called by a test module (not through the fixtures above)."""
    item = _current[0]
    if item is not None and item.get_closest_marker("bus") is None and item.get_closest_marker("kernel") is None:
        pytest.fail(f"{item.nodeid} starts a dbus-daemon but is not marked bus", pytrace=False)
    return start_bus(*args, **kwargs)


support.start_bus = _checked_start_bus  # test modules import it after this conftest


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _failed(request) -> bool:
    rep = getattr(request.node, "rep_call", None)
    return rep is None or rep.failed


@pytest.fixture
def session_bus(tmp_path):
    if not shutil.which("dbus-daemon"):
        pytest.skip("dbus-daemon is not installed")
    bus = start_bus(tmp_path / "session-bus", "session")
    yield bus
    bus.stop()


@pytest.fixture
def system_bus(tmp_path):
    """A system-type bus with the default deny policy and the shipped wqd policy."""
    if not shutil.which("dbus-daemon"):
        pytest.skip("dbus-daemon is not installed")
    if os.geteuid() != 0:
        pytest.skip("a system-type bus with clients as other uids needs root")
    bus = start_bus(tmp_path / "system-bus", "system")
    yield bus
    bus.stop()


PROC_KEYS_CONFIG = """
[keys]
backend = "proc-keys"
poll_interval = 0.05
"""


@pytest_asyncio.fixture
async def wqd_factory(tmp_path, request):
    started = []

    async def start(bus, config: str = PROC_KEYS_CONFIG, name: str = "wqd", **kw):
        wqd = await start_wqd(bus.address, tmp_path / name, config, **kw)
        started.append(wqd)
        return wqd

    yield start
    for wqd in started:
        code = wqd.stop()
        if _failed(request) or code not in (0, -15):
            print(f"--- wqd log ({wqd.log}) exit {code} ---\n{wqd.log_text()}")


@pytest_asyncio.fixture
async def wqd(session_bus, wqd_factory):
    return await wqd_factory(session_bus)


@pytest_asyncio.fixture
async def client_factory():
    clients = []

    async def connect(address: str) -> Client:
        c = await Client.connect(address)
        clients.append(c)
        return c

    yield connect
    for c in clients:
        c.close()


@pytest_asyncio.fixture
async def client(wqd, client_factory):
    return await client_factory(wqd.address)


# -- skips must say why; in the qemu guest the kernel tier must not skip at all ------

_skips: list[tuple[str, str, bool]] = []


def _in_guest() -> bool:
    try:
        with open("/proc/1/cmdline", "rb") as f:
            return b"guest-init" in f.read()
    except OSError:
        return False


def pytest_runtest_logreport(report):
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2]).removeprefix("Skipped: ").strip()
        _skips.append((report.nodeid, reason, "kernel" in report.keywords))


def pytest_sessionfinish(session, exitstatus):
    bad = [(n, r) for n, r, _ in _skips if not r or r in ("unconditional skip", "skipped")]
    if _in_guest():
        bad += [(n, f"kernel-tier test skipped inside the guest: {r}") for n, r, kernel in _skips if kernel]
    if bad:
        for nodeid, reason in bad:
            print(f"\nskip not allowed: {nodeid}: {reason or '(no reason given)'}")
        session.exitstatus = 1


@pytest.fixture
def base():
    """A private tmpfs for a mounts test's mounts: nothing propagates in or out."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    d = make_private_tmpfs("wqd-mnt-")
    yield d
    remove_tmpfs(d)


# -- Kerberos: a real MIT KDC on loopback, a real sssd-kcm (tests/krb5_support.py) --


@pytest.fixture(scope="module")
def realm():
    """Realm WQD.TEST with principals user1000(/alt) and user1001(/alt); the
    persistent keyrings of those uids emptied before and after (they outlive
    processes)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (setpriv to uids 1000/1001, a KDC, sssd_kcm's mount namespace)")
    if not krb5cache.AVAILABLE:
        pytest.skip("the krb5 binding is not installed (pip install -e '.[credentials]')")
    if missing := missing_tools():
        pytest.skip(f"MIT Kerberos tools missing: {', '.join(missing)} (krb5-kdc krb5-admin-server krb5-user)")
    realm = start_realm()
    for uid in UIDS:
        realm.kdestroy(uid, f"KEYRING:persistent:{uid}", all_caches=True)
    yield realm
    for uid in UIDS:
        realm.kdestroy(uid, f"KEYRING:persistent:{uid}", all_caches=True)
    realm.stop()


@pytest.fixture(scope="module")
def kcm(realm):
    """The realm with sssd_kcm running (its store: ``realm.kcm_store``)."""
    if reason := kcm_missing():
        pytest.skip(reason)
    start_kcm(realm)
    return realm
