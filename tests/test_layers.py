"""The layer table of docs/architecture.md, where an import can check it: the hub
and the sources share ``wqd.subscription`` and never import each other."""

import subprocess
import sys

import pytest


def modules_after(*imports: str, prefix: str = "wqd") -> set[str]:
    code = "import sys\n" + "".join(f"import {name}\n" for name in imports) + \
        f"print(' '.join(m for m in sys.modules if m.startswith({prefix!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_hub_does_not_import_the_sources():
    loaded = modules_after("wqd.hub")
    assert "wqd.subscription" in loaded
    assert not {m for m in loaded if m.startswith("wqd.sources")}


@pytest.mark.parametrize("source", ["keys", "devices", "mounts", "fs_errors"])
def test_a_source_does_not_import_the_hub(source):
    loaded = modules_after(f"wqd.sources.{source}")
    assert "wqd.subscription" in loaded
    assert not {"wqd.hub", "wqd.lanes"} & loaded
    assert not {m for m in loaded if m.startswith("wqd.bus")}


def test_the_kernel_layer_imports_no_asyncio():
    """The kernel ABI layer is plain ctypes and os (docs/architecture.md's layer
    table): every ``wqd.kernel`` module, imported alone, loads neither asyncio nor
    D-Bus nor a layer above it."""
    code = ("import pkgutil, sys, wqd.kernel\n"
            "names = [m.name for m in pkgutil.iter_modules(wqd.kernel.__path__, 'wqd.kernel.')]\n"
            "for name in names:\n"
            "    __import__(name)\n"
            "print(' '.join(names)); print(' '.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    kernel, loaded = (set(line.split()) for line in out.splitlines())
    assert {"wqd.kernel.credentials", "wqd.kernel.cred_helper", "wqd.kernel.fanotify"} <= kernel
    assert not {"asyncio", "dbus_fast"} & loaded
    above = {m for m in loaded if m.startswith("wqd.") and not m.startswith(("wqd.kernel", "wqd.errors", "wqd.parse"))}
    assert not above


def test_the_daemon_does_not_import_what_only_its_helpers_use():
    """Start-up under TCG (tests/system/README "Times"): the krb5 binding is the
    credential helpers' (they read caches as the peer), and importlib.metadata is only
    for third-party policy plugins; each cost ~0.6-0.8 s of every start there."""
    loaded = modules_after("wqd.daemon", prefix="")
    assert "wqd.sources.credentials" in loaded and "wqd.policy" in loaded
    assert not {"krb5", "importlib.metadata"} & loaded
