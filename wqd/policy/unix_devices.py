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
give non-root peers no identifying property (fail closed). The list:

- any key with a ``_``-separated word ``SERIAL``, ``UUID``, ``WWN``, ``LABEL``,
  ``UNIQ`` or ``MAC``: ``ID_SERIAL``, ``ID_SERIAL_SHORT``, ``ID_USB_SERIAL*``,
  ``ID_SCSI_SERIAL``, ``MEMORY_DEVICE_*_SERIAL_NUMBER``, ``ID_FS_UUID``,
  ``ID_FS_UUID_ENC``, ``ID_FS_UUID_SUB*``, ``ID_PART_ENTRY_UUID``,
  ``ID_PART_TABLE_UUID``, ``ID_PART_GPT_AUTO_ROOT_UUID``, ``DM_UUID``, ``MD_UUID``,
  ``ID_WWN``, ``ID_WWN_WITH_EXTENSION``, ``ID_WWN_VENDOR_EXTENSION``,
  ``ID_FS_LABEL``, ``ID_FS_LABEL_ENC``, ``HID_UNIQ``, ``UNIQ``, ``ID_NET_NAME_MAC``;
- every ``ID_FS_*`` but ``ID_FS_TYPE``, ``ID_FS_USAGE`` and ``ID_FS_VERSION``
  (ISO 9660 volume, publisher, application and system ids, ...);
- ``DEVLINKS`` (its ``/dev/disk/by-id``, ``by-uuid``, ``by-label``,
  ``by-partuuid``, ``by-partlabel`` links spell the above out);
- ``PARTNAME`` and ``ID_PART_ENTRY_NAME`` (partition names the owner chose),
  ``DM_NAME`` (``luks-UUID``), ``MD_NAME``, ``MD_DEVNAME``.

Exception: ``SYNTH_UUID``, the tag a writer of ``/sys/.../uevent`` put on a
synthetic uevent, names an event, not a device: everyone gets it.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from functools import lru_cache

from wqd.events import DeviceChanged, Event, WatchTarget
from wqd.peer import PeerCredentials
from wqd.policy import ALLOW, Decision

IDENTIFYING_WORDS = frozenset({"SERIAL", "UUID", "WWN", "LABEL", "UNIQ", "MAC"})
IDENTIFYING_KEYS = frozenset({"DEVLINKS", "PARTNAME", "ID_PART_ENTRY_NAME", "DM_NAME", "MD_NAME", "MD_DEVNAME"})
PUBLIC_FS_KEYS = frozenset({"ID_FS_TYPE", "ID_FS_USAGE", "ID_FS_VERSION"})
PUBLIC_KEYS = frozenset({"SYNTH_UUID"})


@lru_cache(maxsize=4096)
def identifying(key: str) -> bool:
    if key in PUBLIC_KEYS:
        return False
    if key in IDENTIFYING_KEYS:
        return True
    if key.startswith("ID_FS_") and key not in PUBLIC_FS_KEYS:
        return True
    return not IDENTIFYING_WORDS.isdisjoint(key.split("_"))


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
    props = event.properties
    return event.redact(properties={k: v for k, v in props.items() if not identifying(k)})


async def watch(peer: PeerCredentials, target: WatchTarget, config: dict) -> Decision:
    return ALLOW


def post(peer: PeerCredentials, event: Event, config: dict) -> Event | None:
    if not isinstance(event, DeviceChanged):
        return None
    if peer.is_root:
        return event
    props = event.properties
    if not any(identifying(k) for k in props):
        return event
    if may_open(peer, props):
        return event
    return redact(event)


def decision_key(peer: PeerCredentials, event: Event, config: dict):
    """What ``post`` reads of *peer* (see ``wqd.policy``): nothing for root or for an
    event without identifying properties; else its uid and groups (``may_open``)."""
    if not isinstance(event, DeviceChanged) or peer.is_root:
        return ()
    return (peer.uid, peer.gid, peer.gids)
