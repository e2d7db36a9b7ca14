"""wqd.kernel.libc: one loader, one per-architecture table, errors at use time.

A machine the table does not declare must not stop wqd: every module imports,
the sources that need an undeclared syscall or layout are unavailable with the
reason (``Sources`` shows ``""``; the log says why), and the others run.
Another architecture is simulated in a subprocess (fresh import state) by
replacing ``platform.machine`` before wqd is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from wqd.kernel import errors as kerr
from wqd.kernel import fanotify, libc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = textwrap.dedent("""
    import json, logging, pkgutil, platform, sys
    platform.machine = lambda: sys.argv[1]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    import wqd, wqd.daemon
    from wqd import config
    from wqd.kernel import libc
    imported = []
    for mod in pkgutil.walk_packages(wqd.__path__, "wqd."):
        __import__(mod.name)
        imported.append(mod.name)
    sources = wqd.daemon.build_sources(config.Config())
    print(json.dumps({"machine": libc.MACHINE, "imported": imported,
                      "sources": {n: [s.backend, getattr(s, "why", None)] for n, s in sources.items()}}))
""")


def run_as_machine(machine: str) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, machine], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="fs-errors opens only with CAP_SYS_ADMIN")
def test_an_undeclared_machine_makes_only_the_sources_that_need_it_unavailable():
    out, log = run_as_machine("riscv64")
    assert out["machine"] == "riscv64"
    assert "wqd.daemon" in out["imported"] and "wqd.kernel.fanotify" in out["imported"]
    sources = out["sources"]
    # keys cannot run without keyctl(2); fs-errors without struct statfs (its fsid)
    for name, what in (("keys", "keyctl"), ("fs-errors", "struct statfs")):
        backend, why = sources[name]
        assert backend == "", sources
        assert why == f"{what}: not declared for riscv64 in wqd.kernel.libc", sources
        assert f"source {name} unavailable: {why}" in log
    # devices needs nothing from the table; mounts falls back to mountinfo for ids
    assert sources["devices"][0] != "", sources
    assert sources["mounts"][0] != "", sources
    assert "statmount/listmount unavailable (listmount: not declared for riscv64 in wqd.kernel.libc)" in log \
        or sources["mounts"][0] == "mountinfo", log


@pytest.mark.skipif(os.geteuid() != 0, reason="fs-errors opens only with CAP_SYS_ADMIN")
def test_a_declared_machine_keeps_every_source():
    out, log = run_as_machine(libc.MACHINE)
    for name in ("keys", "fs-errors", "devices", "mounts"):
        assert out["sources"][name][0] != "", (out["sources"], log)
    assert "not declared" not in log


def test_undeclared_names_raise_at_use_naming_what_and_where(monkeypatch):
    monkeypatch.setattr(libc, "MACHINE", "sparc64")
    with pytest.raises(kerr.UnsupportedArchitecture) as info:
        libc.syscall("keyctl", 0)
    exc = info.value
    assert isinstance(exc, kerr.NotSupported) and isinstance(exc, OSError)
    assert (exc.what, exc.machine, exc.errno) == ("keyctl", "sparc64", 38)  # ENOSYS
    assert str(exc) == "keyctl: not declared for sparc64 in wqd.kernel.libc"
    with pytest.raises(kerr.UnsupportedArchitecture, match="struct statfs"):
        fanotify.fsid_of(0)
    with pytest.raises(kerr.UnsupportedArchitecture, match="listmount"):
        fanotify.listmount()
    with pytest.raises(kerr.UnsupportedArchitecture, match="NS_GET_MNTNS_ID"):
        fanotify.mount_namespace_id(0)
    with pytest.raises(kerr.UnsupportedArchitecture, match="add_key"):
        libc.require("add_key")


def test_aarch64_uses_the_generic_numbers(monkeypatch):
    # include/uapi/asm-generic/unistd.h
    monkeypatch.setattr(libc, "MACHINE", "aarch64")
    assert [libc.syscall_number(n) for n in ("add_key", "request_key", "keyctl", "statmount", "listmount")] \
        == [217, 218, 219, 457, 458]
    libc.require("keyctl", "struct statfs", "listmount")


def test_this_machine_calls_through_the_table():
    # keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_PROCESS_KEYRING, create=0): the real syscall
    # by its declared number; no process keyring yet, so ENOKEY (typed), not ENOSYS
    with pytest.raises(kerr.NoSuchKey):
        libc.syscall("keyctl", libc.ctypes.c_long(0), libc.ctypes.c_long(-2), libc.ctypes.c_long(0))
    # the declared struct statfs layout: glibc's fstatvfs packs the same f_fsid into one word
    fd = os.open("/", os.O_RDONLY)
    try:
        low, high = fanotify.fsid_of(fd)
        assert os.fstatvfs(fd).f_fsid == (low & 0xFFFFFFFF) | (high & 0xFFFFFFFF) << 32
    finally:
        os.close(fd)
