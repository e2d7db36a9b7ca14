"""``unix`` rules for ``devices``: identifying properties only to who may open the node.

Watch: every peer may watch any subsystem (or all): what a device event says
about the device's kind is no secret (sysfs is world-readable). What it may
carry is decided per event and per subscriber, in ``post``.

Everyone gets the action, the devpath and every property that is not
identifying: ``SUBSYSTEM``, ``DEVTYPE``, ``DEVNAME``, ``MAJOR``/``MINOR``,
``DRIVER``, ``MODALIAS``, ``PRODUCT``, vendor and model (``ID_VENDOR``,
``ID_VENDOR_ID``, ``ID_MODEL``, ``ID_MODEL_ID``, ``*_ENC``, ``*_FROM_DATABASE``),
``ID_BUS``, ``ID_TYPE``, ``ID_PATH``, ``ID_FS_TYPE``/``ID_FS_USAGE``/``ID_FS_VERSION``,
``ID_PART_ENTRY_TYPE``/``NUMBER``/``SCHEME``/..., ``TAGS``, ``SEQNUM``, ...

Identifying properties name *this very* device or medium (a serial number, a
filesystem's UUID or label, a world-wide name, a hardware address), so a peer
could follow a person's disk or phone across machines and time, or read
something the owner chose (a label, a partition name). They go only to root
and to a peer that may open the device node for reading: the node named by
``DEVNAME``, under ``/dev/``, a block or character device whose number is the
event's ``MAJOR``:``MINOR``, whose owner, group and mode grant the peer read
permission, decided as the kernel decides it (``acl_permission_check()``): the
owner bits if the peer's uid owns it; else, when the node has a POSIX ACL (logind's
``uaccess`` gives the seat's user one) and its mask is not empty, a named-user
entry for the peer's uid, then the owning group and named-group entries of the
peer's groups (under the mask), then the ACL's other entry; otherwise the group
bits if the node's group is the peer's primary or a supplementary group, else
the other bits. An ACL wqd cannot read or parse denies (fail closed). A device
without a node
(network interfaces, USB interfaces), and a removed device whose node is gone,
give non-root peers no identifying property (fail closed).

What is identifying is decided in one place, ``IDENTIFYING`` below: a table of
key patterns, each with the reason it names a unit or its owner, plus a check on
values: a hardware (MAC or Bluetooth) address anywhere in a value, in the
``XX:XX:XX:XX:XX:XX`` form or in an interface name built from it
(``enx001122334455``), withholds that property whatever its name. The devpath
cannot be withheld (it is the event's subject), so a path component that carries
such an address is rewritten to ``<redacted:TOKEN>`` (``/devices/virtual/net/<redacted:1f0c9a2e>``),
``TOKEN`` a keyed digest of the component with a key drawn when wqd starts: the
same device keeps one devpath while wqd runs (its add and remove still pair), and
the token tells nothing across restarts or machines.

Exception: ``SYNTH_UUID``, the tag a writer of ``/sys/.../uevent`` put on a
synthetic uevent, names an event, not a device: everyone gets it (unless its
value carries an address).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import re
import secrets
import stat
import struct
from functools import lru_cache

from wqd.events import DeviceChanged, Event, WatchTarget
from wqd.peer import PeerCredentials
from wqd.policy import ALLOW, Decision

# (how, pattern, why it identifies): "word" matches a "_"-separated word of the key,
# "key" the whole key, "prefix" its beginning. The one list of what is withheld.
IDENTIFYING = (
    ("word", "SERIAL", "serial numbers: ID_SERIAL, ID_SERIAL_SHORT, ID_USB_SERIAL*, ID_SCSI_SERIAL, "
                       "MEMORY_DEVICE_*_SERIAL_NUMBER: this very unit"),
    ("word", "UUID", "ID_FS_UUID*, ID_PART_ENTRY_UUID, ID_PART_TABLE_UUID, DM_UUID, MD_UUID: this medium"),
    ("word", "WWN", "ID_WWN, ID_WWN_WITH_EXTENSION, ID_WWN_VENDOR_EXTENSION: a disk's world-wide name"),
    ("word", "LABEL", "ID_FS_LABEL*: a name the owner chose"),
    ("word", "UNIQ", "UNIQ, HID_UNIQ: a HID's unique id, for Bluetooth its address"),
    ("word", "MAC", "ID_NET_NAME_MAC: a hardware address"),
    ("word", "ADDRESS", "hardware addresses under any name"),
    ("word", "ASSET", "MEMORY_DEVICE_*_ASSET_TAG: an inventory tag of this unit"),
    ("word", "PHYS", "PHYS, HID_PHYS: for a Bluetooth device, the adapter's address"),
    ("word", "NAME", "NAME, HID_NAME (a Bluetooth device's name, set by its owner: \"Alice's phone\"), "
                     "DM_NAME (luks-UUID), MD_NAME, ID_PART_ENTRY_NAME (chosen), ID_NET_NAME* (below)"),
    ("prefix", "ID_NET_NAME", "ID_NET_NAME, ID_NET_NAME_MAC/PATH/SLOT/ONBOARD: enx<MAC> among them"),
    ("prefix", "ID_FS_", "every ID_FS_* but the public ones (ISO 9660 volume, publisher, application ids)"),
    ("key", "DEVLINKS", "its /dev/disk/by-id, by-uuid, by-label, by-partuuid, by-partlabel links spell the above"),
    ("key", "PARTNAME", "a partition name the owner chose"),
    ("key", "MD_DEVNAME", "an md array's name, chosen"),
)
PUBLIC_KEYS = frozenset({
    "ID_FS_TYPE", "ID_FS_USAGE", "ID_FS_VERSION",  # the kind of filesystem, not which one
    "SYNTH_UUID",  # names a synthetic uevent, not a device
    "DEVNAME",  # the node's name (needed to decide; no unit in it)
    "RFKILL_NAME",  # the switch's kernel name (hci0, phy0), not a name anyone chose
})
_WORDS = frozenset(p for how, p, _ in IDENTIFYING if how == "word")
_KEYS = frozenset(p for how, p, _ in IDENTIFYING if how == "key")
_PREFIXES = tuple(p for how, p, _ in IDENTIFYING if how == "prefix")
# A hardware address: six hex octets with one separator (":", "-" or "_"), or an
# interface name made of twelve hex digits (systemd's enx/wlx/wwx..., see
# systemd.net-naming-scheme(7)).
HARDWARE_ADDRESS = re.compile(
    r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{2}([:_-])(?:[0-9A-Fa-f]{2}\1){4}[0-9A-Fa-f]{2}(?![0-9A-Fa-f])"
    r"|(?<![0-9A-Za-z])(?:en|wl|ww|ib|sl)x[0-9A-Fa-f]{12}(?![0-9A-Fa-f])")
_TOKEN_KEY = secrets.token_bytes(32)  # per wqd process: tokens are stable while it runs, and only then


@lru_cache(maxsize=4096)
def identifying(key: str) -> bool:
    """Whether the property *key* names a unit or its owner (``IDENTIFYING``)."""
    if key in PUBLIC_KEYS:
        return False
    if key in _KEYS or key.startswith(_PREFIXES):
        return True
    return not _WORDS.isdisjoint(key.split("_"))


def carries_address(value: str) -> bool:
    return HARDWARE_ADDRESS.search(value) is not None


def redacted_devpath(devpath: str) -> str:
    """*devpath* with every component that carries a hardware address replaced by a token."""
    if not carries_address(devpath):
        return devpath
    parts = devpath.split("/")
    for i, part in enumerate(parts):
        if carries_address(part):
            token = hmac.new(_TOKEN_KEY, part.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:8]
            parts[i] = f"<redacted:{token}>"
    return "/".join(parts)


_last: list = [None, None]  # (event, withheld(event)): post() sees one event for each subscriber in turn


def withheld(event: DeviceChanged) -> tuple[frozenset[str], str]:
    """The properties of *event* a peer that may not open the node does not get, and
    the devpath it gets. Computed once per event, not per subscriber: the last
    event's answer is kept (by identity: equal events hash alike, and a cache
    keyed by value would degrade to a linear scan under a storm of them)."""
    if _last[0] is event:
        return _last[1]
    keys = frozenset(k for k, v in event.properties.items()
                     if k != "DEVPATH" and (identifying(k) or carries_address(v)))
    result = keys, redacted_devpath(event.devpath)
    _last[0], _last[1] = event, result
    return result


# The xattr a POSIX ACL is stored in, and its layout (include/uapi/linux/posix_acl_xattr.h:
# a u32 version, then {u16 e_tag, u16 e_perm, u32 e_id} entries, little endian).
ACL_XATTR = "system.posix_acl_access"
ACL_VERSION = 2  # POSIX_ACL_XATTR_VERSION
_ACL_HEADER = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")
# include/uapi/linux/posix_acl.h
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
ACL_READ = 0x04


class BadAcl(ValueError):
    """An ACL xattr wqd cannot make sense of: treated as "no access"."""


def parse_acl(data: bytes) -> list[tuple[int, int, int]]:
    """(tag, perm, id) entries of a ``system.posix_acl_access`` value."""
    if len(data) < _ACL_HEADER.size or (len(data) - _ACL_HEADER.size) % _ACL_ENTRY.size:
        raise BadAcl(f"ACL of {len(data)} bytes")
    (version,) = _ACL_HEADER.unpack_from(data)
    if version != ACL_VERSION:
        raise BadAcl(f"ACL version {version}")
    return [entry for entry in _ACL_ENTRY.iter_unpack(data[_ACL_HEADER.size:])]


def acl_permits(peer: PeerCredentials, group: int, entries: list[tuple[int, int, int]],
                want: int = ACL_READ) -> bool:
    """The kernel's ``posix_acl_permission()`` for a peer that does not own the file:
    a named-user entry for its uid decides (under the mask); else any matching group
    entry (owning group or named) that grants decides yes, and matching ones that do
    not decide no; else the other entry."""
    mask = next((perm for tag, perm, _ in entries if tag == ACL_MASK), 0x7)
    for tag, perm, ident in entries:
        if tag == ACL_USER and ident == peer.uid:
            return perm & mask & want == want
    found = False
    for tag, perm, ident in entries:
        if (tag == ACL_GROUP_OBJ and peer.in_group(group)) or (tag == ACL_GROUP and peer.in_group(ident)):
            if perm & mask & want == want:
                return True
            found = True
    if found:
        return False
    return any(tag == ACL_OTHER and perm & want == want for tag, perm, _ in entries)


def mode_permits(peer: PeerCredentials, st: os.stat_result) -> bool:
    """Read permission from the group and other bits (the peer does not own the file)."""
    if peer.in_group(st.st_gid):
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)


def readable_by(peer: PeerCredentials, path: str, st: os.stat_result) -> bool:
    """Whether non-root *peer* may open *path* (``lstat`` result *st*) for reading:
    the kernel's ``acl_permission_check()``. The owner is judged by the owner bits
    alone; the ACL only when the mode's group bits (the ACL's mask) are not all
    clear (the kernel skips it otherwise, and so does this); then group or other."""
    if peer.uid == st.st_uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_mode & stat.S_IRWXG:
        try:
            data = os.getxattr(path, ACL_XATTR, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                return False
        else:
            try:
                return acl_permits(peer, st.st_gid, parse_acl(data))
            except BadAcl:
                return False
    return mode_permits(peer, st)


def may_open(peer: PeerCredentials, props: dict[str, str]) -> bool:
    """Whether *peer* may open the event's device node for reading (see the module doc)."""
    devname = props.get("DEVNAME", "")
    major, minor = props.get("MAJOR", ""), props.get("MINOR", "")
    if not devname.startswith("/dev/") or "/../" in devname + "/" or not (major.isdigit() and minor.isdigit()):
        return False
    try:
        st = os.stat(devname, follow_symlinks=False)
    except (OSError, ValueError):
        return False
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)):
        return False
    if st.st_rdev != os.makedev(int(major), int(minor)):
        return False
    return readable_by(peer, devname, st)


def redact(event: DeviceChanged) -> DeviceChanged:
    keys, devpath = withheld(event)
    props = {k: v for k, v in event.properties.items() if k not in keys}
    if "DEVPATH" in props:
        props["DEVPATH"] = redacted_devpath(props["DEVPATH"])
    return event.redact(devpath=devpath, properties=props)


async def watch(peer: PeerCredentials, target: WatchTarget, config: dict) -> Decision:
    return ALLOW


def post(peer: PeerCredentials, event: Event, config: dict) -> Event | None:
    if not isinstance(event, DeviceChanged):
        return None
    if peer.is_root:
        return event
    keys, devpath = withheld(event)
    if not keys and devpath == event.devpath and not carries_address(event.properties.get("DEVPATH", "")):
        return event
    if may_open(peer, event.properties):
        return event
    return redact(event)


def decision_key(peer: PeerCredentials, event: Event, config: dict):
    """What ``post`` reads of *peer* (see ``wqd.policy``): nothing for root or for an
    event without identifying properties; else its uid and groups (``may_open``)."""
    if not isinstance(event, DeviceChanged) or peer.is_root:
        return ()
    return (peer.uid, peer.gid, peer.gids)
