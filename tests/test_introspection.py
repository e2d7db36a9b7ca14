"""Live introspection equals data/dbus/io.wqd.WatchQueue1.xml, both ways.

Read with the tools administrators use (busctl, gdbus) for the manager object,
and by the owner itself for a subscription object (only the owner may introspect
it). Compared member by member: methods with their in/out signatures, signals
with their signature, properties with type and access.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import xml.etree.ElementTree as ET

import pytest
from dbus_fast import MessageType

from support import BUS_NAME, MANAGER, REPO, SUB_IFACE, keyctl

pytestmark = [pytest.mark.bus]

XML = REPO / "data" / "dbus" / "io.wqd.WatchQueue1.xml"
STANDARD = {"org.freedesktop.DBus.Introspectable", "org.freedesktop.DBus.Properties", "org.freedesktop.DBus.Peer"}


def members(interface: ET.Element) -> set[tuple]:
    """(kind, name, signature[s]) for every member of an <interface>."""
    out = set()
    for m in interface.findall("method"):
        args = m.findall("arg")
        ins = "".join(a.get("type") for a in args if a.get("direction", "in") == "in")
        outs = "".join(a.get("type") for a in args if a.get("direction") == "out")
        out.add(("method", m.get("name"), ins, outs))
    for s in interface.findall("signal"):
        out.add(("signal", s.get("name"), "".join(a.get("type") for a in s.findall("arg")), ""))
    for p in interface.findall("property"):
        out.add(("property", p.get("name"), p.get("type"), p.get("access")))
    return out


def shipped() -> dict[str, set[tuple]]:
    root = ET.parse(XML).getroot()
    return {i.get("name"): members(i) for i in root.findall("interface")}


def from_xml(text: str) -> dict[str, set[tuple]]:
    root = ET.fromstring(text)
    return {i.get("name"): members(i) for i in root.findall("interface")}


def from_busctl(text: str) -> dict[str, set[tuple]]:
    """Parse `busctl introspect` output (NAME TYPE SIGNATURE RESULT/VALUE FLAGS)."""
    out: dict[str, set[tuple]] = {}
    current = None
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 3:
            continue
        name, kind, signature = fields[:3]
        signature = "" if signature == "-" else signature
        if kind == "interface":
            current = name
            out[current] = set()
        elif kind == "method":
            result = fields[3]
            out[current].add(("method", name.lstrip("."), signature, "" if result == "-" else result))
        elif kind == "signal":
            out[current].add(("signal", name.lstrip("."), signature, ""))
        elif kind == "property":
            writable = "writable" in fields[-1]
            out[current].add(("property", name.lstrip("."), signature, "readwrite" if writable else "read"))
    return out


async def run(*cmd: str) -> str:
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"{cmd}: {err.decode()}"
    return out.decode()


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


def manager_interfaces(live: dict) -> dict:
    return {k: v for k, v in live.items() if k not in STANDARD}


@pytest.mark.asyncio
async def test_busctl_introspection_equals_xml(wqd):
    need("busctl")
    text = await run("busctl", f"--address={wqd.address}", "--no-pager", "introspect", BUS_NAME, MANAGER)
    live = from_busctl(text)
    assert STANDARD <= set(live)
    assert manager_interfaces(live) == {"io.wqd.WatchQueue1": shipped()["io.wqd.WatchQueue1"]}


@pytest.mark.asyncio
async def test_gdbus_introspection_equals_xml(wqd):
    need("gdbus")
    text = await run("gdbus", "introspect", "--address", wqd.address, "--dest", BUS_NAME, "--object-path", MANAGER,
                     "--xml")
    live = from_xml(text)
    assert STANDARD <= set(live)
    assert manager_interfaces(live) == {"io.wqd.WatchQueue1": shipped()["io.wqd.WatchQueue1"]}


@pytest.mark.asyncio
async def test_busctl_tree(wqd):
    need("busctl")
    text = await run("busctl", f"--address={wqd.address}", "--no-pager", "--list", "tree", BUS_NAME)
    assert text.split() == ["/", "/io", "/io/wqd", "/io/wqd/WatchQueue1", "/io/wqd/WatchQueue1/subscription"]


@pytest.mark.asyncio
async def test_subscription_introspection_equals_xml(wqd, client):
    """The owner introspects its subscription; another connection is told there is none."""
    ring = keyctl("newring", "wqd-introspect", "@u")
    try:
        path = await client.watch("keys", ring)
        reply = await client.call(path, "org.freedesktop.DBus.Introspectable", "Introspect")
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        live = from_xml(reply.body[0])
        assert STANDARD <= set(live)
        assert manager_interfaces(live) == {SUB_IFACE: shipped()[SUB_IFACE]}
        # the subscription is listed under the owner's tree only
        reply = await client.call(path.rsplit("/", 1)[0], "org.freedesktop.DBus.Introspectable", "Introspect")
        assert re.findall(r'<node name="(\d+)"/>', reply.body[0]) == [path.rsplit("/", 1)[1]]
        if shutil.which("busctl"):
            proc = await asyncio.create_subprocess_exec(
                "busctl", f"--address={wqd.address}", "--no-pager", "introspect", BUS_NAME, path,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
            assert proc.returncode != 0 and b"no such subscription" in err, (out, err)
    finally:
        keyctl("unlink", ring, "@u")


def test_xml_covers_both_interfaces():
    """The comparison above is not vacuous: the XML has both interfaces, with members."""
    interfaces = shipped()
    assert set(interfaces) == {"io.wqd.WatchQueue1", SUB_IFACE}
    assert ("method", "Watch", "ssa{sv}", "o") in interfaces["io.wqd.WatchQueue1"]
    assert {m[0] for m in interfaces[SUB_IFACE]} == {"method", "signal", "property"}


EMITS = "org.freedesktop.DBus.Property.EmitsChangedSignal"
# wqd emits no PropertiesChanged: every property says "const" or "false" (never the default "true")
EXPECTED_EMITS = {"Version": "const", "Sources": "false", "Source": "const", "Target": "const",
                  "Delivered": "false", "Lost": "false"}


def emits(root: ET.Element) -> dict[str, str]:
    """Property name -> its EmitsChangedSignal annotation, for wqd's two interfaces."""
    out = {}
    for iface in root.findall("interface"):
        if iface.get("name") not in ("io.wqd.WatchQueue1", SUB_IFACE):
            continue
        for prop in iface.findall("property"):
            ann = [a.get("value") for a in prop.findall("annotation") if a.get("name") == EMITS]
            out[prop.get("name")] = ann[0] if ann else "true (default)"
    return out


def test_xml_annotations_tell_the_truth():
    """Delivered and Lost change without a signal; a proxy trusting the default (true)
    would show a stale cache (GDBus showed Delivered 0 while Get said 5,000)."""
    assert emits(ET.parse(XML).getroot()) == EXPECTED_EMITS


@pytest.mark.asyncio
async def test_live_annotations_equal_xml(wqd, client):
    need("gdbus")
    text = await run("gdbus", "introspect", "--address", wqd.address, "--dest", BUS_NAME, "--object-path", MANAGER,
                     "--xml")
    live = emits(ET.fromstring(text))
    path = await client.watch("keys", "@u")
    from dbus_fast import Message
    reply = await client.bus.call(Message(destination=BUS_NAME, path=path, member="Introspect",
                                          interface="org.freedesktop.DBus.Introspectable"))
    live |= emits(ET.fromstring(reply.body[0]))
    assert live == EXPECTED_EMITS


@pytest.mark.asyncio
async def test_busctl_shows_const_and_no_change_signal(wqd):
    """busctl reads the annotations: "const" on Version, no "emits-change" anywhere."""
    need("busctl")
    text = await run("busctl", f"--address={wqd.address}", "--no-pager", "introspect", BUS_NAME, MANAGER)
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith(".")}
    assert "const" in rows[".Version"].split()
    assert "emits-change" not in rows[".Sources"] and "const" not in rows[".Sources"].split()
