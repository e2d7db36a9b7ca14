"""Man pages: lint-clean under mandoc, and in step with the code they document.

The API page is checked against the interface XML (every method, signal and
property) and the error names; wqd(8) against wqd's options; wqd.conf(5) against
the configuration schema.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

from support import REPO

from wqd import config
from wqd.bus import names
from wqd.daemon import parse_args

MAN = REPO / "man"
PAGES = ["wqd.8", "wqctl.1", "wqd.conf.5", "io.wqd.WatchQueue1.5"]
# Lint messages that depend on the machine, not on the page: cross-references to
# pages not installed here, and mandoc's own database being stale.
HOST_DEPENDENT = re.compile(r"referenced manual not found|outdated mandoc\.db")


def mandoc() -> str:
    path = shutil.which("mandoc")
    if path is None:
        pytest.skip("mandoc is not installed (scripts/setup installs it)")
    return path


def rendered(page: str) -> str:
    """The page as text, as man(1) shows it (no formatting escapes)."""
    out = subprocess.run([mandoc(), "-Tascii", "-Owidth=200", str(MAN / page)], capture_output=True, text=True,
                         check=True).stdout
    return re.sub(r".\x08", "", out)


def test_every_page_exists():
    assert sorted(p.name for p in MAN.iterdir() if re.search(r"\.[1-8]$", p.name)) == sorted(PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_mandoc_lint_clean(page):
    result = subprocess.run([mandoc(), "-Tlint", "-W", "style", str(MAN / page)], capture_output=True, text=True)
    messages = [m for m in (result.stdout + result.stderr).splitlines() if m and not HOST_DEPENDENT.search(m)]
    assert messages == []


def api_members() -> dict[str, set[str]]:
    root = ET.parse(REPO / "data" / "dbus" / "io.wqd.WatchQueue1.xml").getroot()
    members: dict[str, set[str]] = {"interface": set(), "method": set(), "signal": set(), "property": set(),
                                    "arg": set()}
    for iface in root.findall("interface"):
        members["interface"].add(iface.get("name"))
        for kind in ("method", "signal", "property"):
            for m in iface.findall(kind):
                members[kind].add(m.get("name"))
                members["arg"].update(a.get("name") for a in m.findall("arg"))
    return members


def api_errors() -> set[str]:
    return {getattr(names, n) for n in dir(names) if isinstance(getattr(names, n), str)
            and getattr(names, n).startswith(names.ERROR_PREFIX) and getattr(names, n) != names.ERROR_PREFIX}


def test_api_page_names_every_member():
    text = rendered("io.wqd.WatchQueue1.5")
    members = api_members()
    assert members["method"] and members["signal"] and members["property"]
    for kind in ("interface", "method", "signal", "property", "arg"):
        missing = sorted(m for m in members[kind] if not re.search(rf"(?<![\w.]){re.escape(m)}(?!\w)", text))
        assert missing == [], f"{kind}s not documented in io.wqd.WatchQueue1(5): {missing}"


def test_api_page_documents_signatures():
    """Each method and signal appears with its arguments' types and names, e.g. 'Lost(t count)'."""
    text = rendered("io.wqd.WatchQueue1.5")
    root = ET.parse(REPO / "data" / "dbus" / "io.wqd.WatchQueue1.xml").getroot()
    for element in [*root.iter("method"), *root.iter("signal")]:
        args = [a for a in element.findall("arg")]
        ins = [f"{a.get('type')} {a.get('name')}" for a in args if a.get("direction", "in") == "in"
               or element.tag == "signal"]
        outs = [f"{a.get('type')} {a.get('name')}" for a in args if element.tag == "method"
                and a.get("direction") == "out"]
        shown = ", ".join(ins + [f"-> {o}" for o in outs])
        assert f"{element.get('name')}({shown})" in text, element.get("name")
    for prop in root.iter("property"):
        assert f"{prop.get('name')} ({prop.get('type')})" in text, prop.get("name")


def test_api_page_says_what_each_property_annotation_means():
    """Each property's entry says what its EmitsChangedSignal annotation in the XML says
    ("Const." for const, "No change signal." for false), and the page says how to read them."""
    text = rendered("io.wqd.WatchQueue1.5")
    assert "org.freedesktop.DBus.Property.EmitsChangedSignal" in text
    root = ET.parse(REPO / "data" / "dbus" / "io.wqd.WatchQueue1.xml").getroot()
    for prop in root.iter("property"):
        (value,) = [a.get("value") for a in prop.findall("annotation")
                    if a.get("name") == "org.freedesktop.DBus.Property.EmitsChangedSignal"]
        entry = text.split(f"{prop.get('name')} ({prop.get('type')})", 1)[1].split("\n\n", 1)[0]
        said = "Const." if value == "const" else "no change signal"
        assert said.lower() in " ".join(entry.split()).lower(), (prop.get("name"), value, entry)


def test_api_page_documents_escaping_and_flow_control():
    text = " ".join(rendered("io.wqd.WatchQueue1.5").split())
    assert "`\\ooo', three octal digits" in text and "each backslash `\\\\'" in text
    for case in ("A client that answers Ping", "A client that never answers Ping", "A client that stops reading"):
        assert case in text, case


def test_api_page_names_every_error():
    text = rendered("io.wqd.WatchQueue1.5")
    errors = api_errors()
    assert names.ACCESS_DENIED in errors and names.FAILED in errors
    assert sorted(e for e in errors if e not in text) == []


def test_api_page_has_busctl_and_gdbus_examples():
    text = rendered("io.wqd.WatchQueue1.5")
    examples = text[text.index("EXAMPLES"):]
    for tool in ("busctl introspect", "busctl call", "busctl get-property", "gdbus introspect", "gdbus call"):
        assert tool in examples, tool


def daemon_options() -> set[str]:
    parser_help = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-m", "wqd.daemon", "--help"],
                                 capture_output=True, text=True, cwd=REPO, check=True).stdout
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", parser_help))


def test_daemon_page_names_every_option():
    options = daemon_options()
    assert {"--system", "--check-config", "--log-target"} <= options
    parse_args(["--check-config"])  # the option the page documents is the one wqd parses
    text = rendered("wqd.8")
    assert sorted(o for o in options if o not in text) == []


def test_daemon_page_lists_every_message_id():
    from wqd import journal

    text = rendered("wqd.8")
    assert sorted(k for k, v in journal.MESSAGE_IDS.items() if v not in text) == []


def test_conf_page_names_every_setting():
    text = rendered("wqd.conf.5")
    for section in sorted(config.KNOWN_SECTIONS):
        assert f"[{section}]" in text, section
    from wqd.policy import polkit
    from wqd.sources import registry

    schemas = {name: kind.settings for name, kind in registry.SOURCES.items()}
    schemas.update({section: schema for section, (schema, _prefix) in config.SECTIONS.items()})
    schemas["policy.polkit"] = polkit.SETTINGS
    missing = sorted(f"{s}.{k}" for s, schema in schemas.items() for k in schema
                     if not re.search(rf"^\s*{k} = ", text, re.M))
    assert missing == [], f"settings not documented in wqd.conf(5): {missing}"


def test_wqctl_page_names_every_command_and_option():
    from wqd.cli import wqctl

    text = rendered("wqctl.1")
    parser_help = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-m", "wqd.cli.wqctl", "watch", "--help"],
                                 capture_output=True, text=True, cwd=REPO, check=True).stdout
    for option in set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", parser_help)) - {"--help"}:
        assert option in text, option
    assert wqctl.parse_args(["status"]).command == "status"
    for command in ("status", "watch"):
        assert re.search(rf"^\s+{command}\b", text, re.M), command
