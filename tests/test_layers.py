"""The layer table of docs/architecture.md, where an import can check it: the hub
and the sources share ``wqd.subscription`` and never import each other."""

import subprocess
import sys

import pytest


def modules_after(*imports: str) -> set[str]:
    code = "import sys\n" + "".join(f"import {name}\n" for name in imports) + \
        "print(' '.join(m for m in sys.modules if m.startswith('wqd')))"
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
