"""The dbus-fast private parts wqd uses (wqd.bus.dbus_fast_internals) are all there.

A dbus-fast release that renames or drops one of them fails here, naming it,
instead of wqd failing at import or, worse, on the first full socket.
"""

import ast
from pathlib import Path

import pytest
from dbus_fast.aio import MessageBus

from wqd.bus import dbus_fast_internals as internals

WQD = Path(__file__).resolve().parent.parent / "wqd"


@pytest.mark.asyncio
async def test_every_private_item_wqd_uses_exists():
    bus = MessageBus(bus_address="unix:path=/nonexistent")  # never connected: attributes only
    writer = internals.MessageWriter(bus)
    gone = internals.missing(bus, writer)
    assert not gone, ("the installed dbus-fast no longer has " + ", ".join(gone)
                      + ": wqd.bus.dbus_fast_internals must be adapted to it")


def test_a_missing_attribute_is_named():
    """The guard itself: an attribute that is not there is reported by name."""
    internals.WRITER_ATTRIBUTES["no_such_attribute_xyz"] = "a test"
    try:
        assert "_MessageWriter.no_such_attribute_xyz" in internals.missing()
    finally:
        del internals.WRITER_ATTRIBUTES["no_such_attribute_xyz"]


def test_no_other_module_touches_dbus_fast_privates():
    """Private dbus-fast names appear only in the internals module: no ``dbus_fast._private``
    imports, no ``_Name`` imported from dbus_fast, no ``bus._x`` / ``msg._marshall`` elsewhere."""
    private_attrs = set(internals.BUS_ATTRIBUTES) | {"_marshall", "_method_return_handlers", "_name_owners"}
    offenders = []
    for path in WQD.rglob("*.py"):
        if path.name == "dbus_fast_internals.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dbus_fast"):
                if "._" in "." + node.module or any(a.name.startswith("_") for a in node.names):
                    offenders.append(f"{path.relative_to(WQD)}:{node.lineno} imports from {node.module}")
            elif isinstance(node, ast.Import):
                offenders += [f"{path.relative_to(WQD)}:{node.lineno} imports {a.name}" for a in node.names
                              if a.name.startswith("dbus_fast") and "._" in a.name]
            elif isinstance(node, ast.Attribute) and node.attr in private_attrs:
                offenders.append(f"{path.relative_to(WQD)}:{node.lineno} uses .{node.attr}")
    assert not offenders, "dbus-fast private parts outside wqd/bus/dbus_fast_internals.py:\n" + "\n".join(offenders)
