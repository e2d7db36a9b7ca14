"""Uevents: netlink datagrams, sysfs ``uevent`` files, and device tables. Pure, no I/O.

Two formats arrive on a ``NETLINK_KOBJECT_UEVENT`` socket:

- **kernel** (multicast group 1, ``lib/kobject_uevent.c``): ``ACTION@DEVPATH\\0``
  then ``KEY=VALUE\\0`` pairs (``ACTION``, ``DEVPATH``, ``SUBSYSTEM``, ``SEQNUM``, ...).
- **udev** (group 2, sent by systemd-udevd after processing; systemd
  ``src/libsystemd/sd-device/device-monitor.c``, ``struct monitor_netlink_header``):
  ``"libudev\\0"``, the magic ``0xfeedcafe`` in network byte order, then
  ``header_size``, ``properties_off``, ``properties_len`` and four filter words
  in host order (40 bytes), then the ``KEY=VALUE\\0`` properties at
  ``properties_off``.

Who is believed is decided exactly as libudev decides
(``device_monitor_receive_device`` in device-monitor.c, systemd 252): the
sender's credentials (``SCM_CREDENTIALS``) must say uid 0; a message on the
kernel group must come from the kernel (netlink port id 0); a unicast message
(no group) is never believed. ``Untrusted`` is raised for those: not an event, and
not a loss. A datagram from a trusted sender that cannot be parsed raises
``Malformed``: an event was lost, and the caller says so.

Properties are given as libudev gives them: ``DEVNAME`` made absolute under
``/dev/`` (the kernel sends it relative), everything else as sent, decoded as
UTF-8 with invalid bytes replaced (D-Bus strings must be valid UTF-8); udev's
``UDEV_DATABASE_VERSION`` is dropped, as sd-device drops it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

from wqd.events import DeviceChanged

# enum MonitorNetlinkGroup, src/libsystemd/sd-device/device-monitor.c
MONITOR_GROUP_NONE = 0
MONITOR_GROUP_KERNEL = 1
MONITOR_GROUP_UDEV = 2

UDEV_MONITOR_MAGIC = 0xFEEDCAFE  # device-monitor.c, sent big-endian
# struct monitor_netlink_header: char prefix[8]; unsigned magic (be32); unsigned
# header_size, properties_off, properties_len, filter_subsystem_hash,
# filter_devtype_hash, filter_tag_bloom_hi, filter_tag_bloom_lo (host order).
UDEV_HEADER = struct.Struct("=8s4xIII16x")
UDEV_PREFIX = b"libudev\0"
MIN_MESSAGE = 32  # libudev refuses anything shorter ("Invalid message length")

REQUIRED = ("ACTION", "DEVPATH", "SUBSYSTEM", "SEQNUM")  # device_new_from_nulstr insists on these

# Properties that say something about the event, not the device: left out when
# a table is compared with a fresh enumeration.
VOLATILE = frozenset({"ACTION", "SEQNUM", "SYNTH_UUID", "DEVPATH_OLD", "WQD_SYNTHETIC"})
VOLATILE_PREFIXES = ("SYNTH_ARG_",)

SYNTHETIC = "WQD_SYNTHETIC"  # property wqd adds to events it made up: "initial" or "resync"


class Untrusted(Exception):
    """The datagram does not come from the kernel or from root's udevd: ignore it."""


class Malformed(Exception):
    """A trusted sender's datagram that cannot be parsed: an event is lost."""


def parse_properties(blob: bytes) -> dict[str, str]:
    """``KEY=VALUE\\0`` pairs -> dict. Entries without ``=`` are skipped, as libudev does."""
    # NUL ends any UTF-8 sequence, so decoding first cannot merge two entries
    return _properties(blob.decode("utf-8", "replace").split("\0"), {})


def _properties(entries, props: dict[str, str]) -> dict[str, str]:
    """Add ``KEY=VALUE`` *entries* to *props* (those without ``=`` are skipped, as
    libudev does); a relative ``DEVNAME`` becomes a ``/dev`` path."""
    for entry in entries:
        key, eq, value = entry.partition("=")
        if eq and key:
            props[key] = value
    devname = props.get("DEVNAME")
    if devname is not None and not devname.startswith("/"):
        props["DEVNAME"] = "/dev/" + devname
    return props


def check_sender(groups: int, sender_port: int, sender_uid: int | None) -> None:
    """Raise ``Untrusted`` unless libudev would believe this sender."""
    if groups == MONITOR_GROUP_NONE:
        raise Untrusted("unicast netlink message")
    if groups == MONITOR_GROUP_KERNEL and sender_port != 0:
        raise Untrusted(f"kernel-group message from port {sender_port}, not the kernel")
    if sender_uid is None:
        raise Untrusted("no sender credentials")
    if sender_uid != 0:
        raise Untrusted(f"sender uid {sender_uid}")


def parse_datagram(data: bytes, groups: int, sender_port: int, sender_uid: int | None) -> DeviceChanged:
    """One datagram -> ``DeviceChanged``. Raises ``Untrusted`` or ``Malformed``."""
    check_sender(groups, sender_port, sender_uid)
    if len(data) < MIN_MESSAGE:
        raise Malformed(f"message of {len(data)} bytes")
    if data.startswith(UDEV_PREFIX):
        _prefix, magic_be, _header_size, offset, _length = _udev_header(data)
        if magic_be != UDEV_MONITOR_MAGIC:
            raise Malformed("udev message with a bad magic")
        if offset + 32 > len(data):
            raise Malformed("udev message with a bad properties offset")
        blob = data[offset:]
        props = parse_properties(blob)
        props.pop("UDEV_DATABASE_VERSION", None)  # consumed by sd-device (device_amend), not a property
    else:
        end = data.find(b"\0")
        if end < len(b"a@/d") or end + 1 >= len(data) or b"@/" not in data[:end]:
            raise Malformed("kernel message without an ACTION@DEVPATH header")
        props = parse_properties(data[end + 1:])
    for key in REQUIRED:
        if not props.get(key):
            raise Malformed(f"message without {key}")
    devpath = props["DEVPATH"]
    if not devpath.startswith("/") or "/../" in devpath + "/":
        raise Malformed(f"bad DEVPATH {devpath!r}")
    return DeviceChanged(props["ACTION"], devpath, props["SUBSYSTEM"], props)


def _udev_header(data: bytes) -> tuple:
    prefix, header_size, offset, length = UDEV_HEADER.unpack_from(data)
    (magic_be,) = struct.unpack_from(">I", data, 8)
    return prefix, magic_be, header_size, offset, length


def parse_uevent_file(text: str, devpath: str, subsystem: str) -> dict[str, str]:
    """A device's ``/sys/DEVPATH/uevent`` -> its properties, as a kernel message would carry them
    (without ``ACTION`` and ``SEQNUM``)."""
    return _properties(text.splitlines(), {"DEVPATH": devpath, "SUBSYSTEM": subsystem})


def comparable(props: Mapping[str, str]) -> dict[str, str]:
    """*props* without what describes an event rather than the device."""
    return {k: v for k, v in props.items() if k not in VOLATILE and not k.startswith(VOLATILE_PREFIXES)}


# A device table: devpath -> (subsystem, properties).
Table = Mapping[str, tuple[str, Mapping[str, str]]]


def diff(old: Table, new: Table) -> list[tuple[str, str, str, dict[str, str]]]:
    """What turns *old* into *new*: ``(action, devpath, subsystem, properties)``.

    Removals first, children before parents; then additions, parents before
    children; then changes. A removal carries the last known properties.
    """
    out: list[tuple[str, str, str, dict[str, str]]] = []
    for devpath in sorted(old.keys() - new.keys(), reverse=True):
        subsystem, props = old[devpath]
        out.append(("remove", devpath, subsystem, dict(props)))
    for devpath in sorted(new.keys() - old.keys()):
        subsystem, props = new[devpath]
        out.append(("add", devpath, subsystem, dict(props)))
    for devpath in sorted(new.keys() & old.keys()):
        subsystem, props = new[devpath]
        if comparable(props) != comparable(old[devpath][1]):
            out.append(("change", devpath, subsystem, dict(props)))
    return out


def synthesise(changes: Iterable[tuple[str, str, str, dict[str, str]]], why: str) -> list[DeviceChanged]:
    """Events for *changes* (see ``diff``), marked ``WQD_SYNTHETIC=why``."""
    events = []
    for action, devpath, subsystem, props in changes:
        props = comparable(props)
        props["ACTION"] = action
        props[SYNTHETIC] = why
        events.append(DeviceChanged(action, devpath, subsystem, props))
    return events


def netlink_drops(text: str, inode: int) -> int | None:
    """The ``Drops`` column of ``/proc/net/netlink`` for the socket with *inode*.

    The kernel counts there every message it could not queue on that socket
    (``netlink_overrun``), after the socket filter: what ``ENOBUFS`` does not say.
    ``None`` when the socket is not listed or the format is not understood.
    """
    lines = text.splitlines()
    if not lines:
        return None
    header = lines[0].split()
    try:
        drops_at, inode_at = header.index("Drops"), header.index("Inode")
    except ValueError:
        return None
    for line in lines[1:]:
        fields = line.split()
        if len(fields) <= max(drops_at, inode_at):
            continue
        try:
            if int(fields[inode_at]) == inode:
                return int(fields[drops_at])
        except ValueError:
            return None
    return None
