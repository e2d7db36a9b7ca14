"""The uevent parser (captured datagrams), the device table diff, and the unix device rules."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, strategies as st

from wqd.events import DeviceChanged
from wqd.parse.uevent import (
    MONITOR_GROUP_KERNEL, MONITOR_GROUP_NONE, MONITOR_GROUP_UDEV, Malformed, Untrusted, comparable, diff,
    netlink_drops, parse_datagram, parse_uevent_file, synthesise,
)
from wqd.peer import PeerCredentials
from wqd.policy import unix_devices

# Captured on this machine kind (Debian 12, systemd-udevd 252) after
# `echo change > /sys/devices/virtual/mem/null/uevent`: the kernel's and udevd's copies.
KERNEL_NULL = (b"change@/devices/virtual/mem/null\x00ACTION=change\x00DEVPATH=/devices/virtual/mem/null\x00"
               b"SUBSYSTEM=mem\x00SYNTH_UUID=0\x00MAJOR=1\x00MINOR=3\x00DEVNAME=null\x00DEVMODE=0666\x00"
               b"SEQNUM=3272\x00")
UDEV_NULL = (b"libudev\x00\xfe\xed\xca\xfe(\x00\x00\x00(\x00\x00\x00\xba\x00\x00\x00\xc3e\xcd\x83\x00\x00\x00\x00"
             b"\x00\x00\x00\x00\x00\x00\x00\x00UDEV_DATABASE_VERSION=1\x00ACTION=change\x00"
             b"DEVPATH=/devices/virtual/mem/null\x00SUBSYSTEM=mem\x00SYNTH_UUID=0\x00DEVNAME=/dev/null\x00"
             b"DEVMODE=0666\x00SEQNUM=3272\x00MAJOR=1\x00MINOR=3\x00USEC_INITIALIZED=2893393232\x00")
NULL_PROPS = {"ACTION": "change", "DEVPATH": "/devices/virtual/mem/null", "SUBSYSTEM": "mem", "SYNTH_UUID": "0",
              "MAJOR": "1", "MINOR": "3", "DEVNAME": "/dev/null", "DEVMODE": "0666", "SEQNUM": "3272"}


def test_kernel_message():
    event = parse_datagram(KERNEL_NULL, MONITOR_GROUP_KERNEL, 0, 0)
    assert event == DeviceChanged("change", "/devices/virtual/mem/null", "mem", NULL_PROPS)
    assert event.route == "mem"
    assert event.body() == ["change", "/devices/virtual/mem/null", NULL_PROPS]


def test_udev_message():
    event = parse_datagram(UDEV_NULL, MONITOR_GROUP_UDEV, 2896095868, 0)
    assert event.action == "change" and event.devpath == "/devices/virtual/mem/null" and event.subsystem == "mem"
    assert event.properties == {**NULL_PROPS, "USEC_INITIALIZED": "2893393232"}  # no UDEV_DATABASE_VERSION


@pytest.mark.parametrize("data,groups,port,uid,why", [
    (KERNEL_NULL, MONITOR_GROUP_KERNEL, 4242, 0, "port"),  # the kernel group, but not from the kernel
    (UDEV_NULL, MONITOR_GROUP_UDEV, 77, 1000, "uid"),  # not root's udevd
    (UDEV_NULL, MONITOR_GROUP_UDEV, 77, None, "credentials"),  # no SCM_CREDENTIALS
    (UDEV_NULL, MONITOR_GROUP_NONE, 77, 0, "unicast"),  # unicast: never believed
])
def test_untrusted_senders(data, groups, port, uid, why):
    with pytest.raises(Untrusted, match=why):
        parse_datagram(data, groups, port, uid)


def _udev(props: bytes, offset: int = 40, magic: int = 0xFEEDCAFE) -> bytes:
    header = b"libudev\x00" + struct.pack(">I", magic) + struct.pack("=III", 40, offset, len(props)) + bytes(16)
    return header + props


@pytest.mark.parametrize("data", [
    b"short",
    b"change@/devices/x\x00",  # nothing after the header
    b"no-header-here-at-all\x00ACTION=add\x00DEVPATH=/devices/x\x00",
    b"add@/devices/x\x00ACTION=add\x00DEVPATH=/devices/x\x00SEQNUM=1\x00",  # no SUBSYSTEM
    b"add@/devices/x\x00ACTION=add\x00DEVPATH=../x\x00SUBSYSTEM=a\x00SEQNUM=1\x00",
    b"add@/devices/x\x00ACTION=add\x00DEVPATH=/devices/../etc\x00SUBSYSTEM=a\x00SEQNUM=1\x00",
    _udev(b"ACTION=add\x00DEVPATH=/devices/x\x00SUBSYSTEM=a\x00SEQNUM=1\x00", magic=0xDEADBEEF),
    _udev(b"ACTION=add\x00DEVPATH=/devices/x\x00SUBSYSTEM=a\x00SEQNUM=1\x00", offset=4000),
])
def test_malformed(data):
    with pytest.raises(Malformed):
        parse_datagram(data, MONITOR_GROUP_UDEV if data.startswith(b"libudev") else MONITOR_GROUP_KERNEL, 0, 0)


def test_bad_utf8_is_replaced_and_entries_without_equals_skipped():
    data = (b"add@/devices/x\x00ACTION=add\x00DEVPATH=/devices/x\x00SUBSYSTEM=usb\x00SEQNUM=9\x00"
            b"ID_MODEL=caf\xe9\x00JUNK\x00=novalue\x00")
    event = parse_datagram(data, MONITOR_GROUP_KERNEL, 0, 0)
    assert event.properties["ID_MODEL"] == "caf\ufffd"
    assert "JUNK" not in event.properties and "" not in event.properties


@given(st.binary(max_size=300), st.sampled_from([MONITOR_GROUP_KERNEL, MONITOR_GROUP_UDEV]))
def test_any_bytes_parse_or_raise_named_errors(data, groups):
    try:
        event = parse_datagram(data, groups, 0, 0)
    except (Malformed, Untrusted):
        return
    assert event.devpath.startswith("/")
    "".join(event.properties).encode()  # D-Bus-safe strings


@given(st.dictionaries(st.from_regex(r"[A-Z_]{1,12}", fullmatch=True), st.text(alphabet=st.characters(
    blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20), max_size=8))
def test_udev_round_trip(extra):
    props = {"ACTION": "add", "DEVPATH": "/devices/virtual/block/loop9", "SUBSYSTEM": "block", "SEQNUM": "12",
             **{k: v for k, v in extra.items() if k not in ("ACTION", "DEVPATH", "SUBSYSTEM", "SEQNUM", "DEVNAME",
                                                             "UDEV_DATABASE_VERSION")}}
    blob = b"".join(f"{k}={v}".encode() + b"\x00" for k, v in props.items())
    event = parse_datagram(_udev(blob), MONITOR_GROUP_UDEV, 5, 0)
    assert event.properties == props


def test_uevent_file():
    text = "MAJOR=7\nMINOR=3\nDEVNAME=loop3\nDEVTYPE=disk\nDISKSEQ=12\n"
    props = parse_uevent_file(text, "/devices/virtual/block/loop3", "block")
    assert props == {"DEVPATH": "/devices/virtual/block/loop3", "SUBSYSTEM": "block", "MAJOR": "7", "MINOR": "3",
                     "DEVNAME": "/dev/loop3", "DEVTYPE": "disk", "DISKSEQ": "12"}
    # a kernel event of the same device differs only in what describes the event
    event = {**props, "ACTION": "change", "SEQNUM": "99", "SYNTH_UUID": "0"}
    assert comparable(event) == comparable(props)


def test_diff_and_synthesise():
    old = {"/devices/a": ("block", {"DEVPATH": "/devices/a", "X": "1", "SEQNUM": "5", "ACTION": "add"}),
           "/devices/a/a1": ("block", {"DEVPATH": "/devices/a/a1"}),
           "/devices/b": ("block", {"DEVPATH": "/devices/b", "X": "1"})}
    new = {"/devices/a": ("block", {"DEVPATH": "/devices/a", "X": "1"}),  # only volatile keys differ
           "/devices/b": ("block", {"DEVPATH": "/devices/b", "X": "2"}),
           "/devices/c": ("block", {"DEVPATH": "/devices/c"}),
           "/devices/c/c1": ("block", {"DEVPATH": "/devices/c/c1"})}
    changes = diff(old, new)
    assert [(a, d) for a, d, _s, _p in changes] == [
        ("remove", "/devices/a/a1"), ("add", "/devices/c"), ("add", "/devices/c/c1"), ("change", "/devices/b")]
    events = synthesise(changes, "resync")
    assert all(e.properties["WQD_SYNTHETIC"] == "resync" and e.properties["ACTION"] == e.action for e in events)
    assert all("SEQNUM" not in e.properties for e in events)
    assert diff(new, new) == []


def test_netlink_drops():
    text = ("sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode\n"
            "000000007daa054a 0   0          00000000 0        0        0     2        0        4       \n"
            "00000000d2794aa1 15  1234       00000001 0        0        0     2        417      99123   \n")
    assert netlink_drops(text, 99123) == 417
    assert netlink_drops(text, 4) == 0
    assert netlink_drops(text, 5) is None
    assert netlink_drops("garbage\n1 2 3\n", 4) is None
    assert netlink_drops("", 4) is None


# -- unix rules for devices ------------------------------------------------------

@pytest.mark.parametrize("key", [
    "ID_SERIAL", "ID_SERIAL_SHORT", "ID_USB_SERIAL", "ID_SCSI_SERIAL", "MEMORY_DEVICE_0_SERIAL_NUMBER",
    "ID_FS_UUID", "ID_FS_UUID_ENC", "ID_FS_UUID_SUB", "ID_PART_ENTRY_UUID", "ID_PART_TABLE_UUID", "DM_UUID",
    "ID_WWN", "ID_WWN_WITH_EXTENSION", "ID_FS_LABEL", "ID_FS_LABEL_ENC", "HID_UNIQ", "UNIQ", "ID_NET_NAME_MAC",
    "ID_FS_VOLUME_ID", "ID_FS_PUBLISHER_ID", "DEVLINKS", "PARTNAME", "ID_PART_ENTRY_NAME", "DM_NAME",
    "ID_NET_NAME", "ID_NET_NAME_PATH", "ID_NET_NAME_SLOT", "NAME", "HID_NAME", "PHYS", "HID_PHYS",
    "MEMORY_DEVICE_0_ASSET_TAG", "MEMORY_DEVICE_12_SERIAL_NUMBER", "ID_WWN_VENDOR_EXTENSION", "MD_DEVNAME",
    "SYNTH_ARG_NAME", "SYNTH_ARG_SERIAL", "ID_BLUETOOTH_ADDRESS",
])
def test_identifying(key):
    assert unix_devices.identifying(key)


@pytest.mark.parametrize("key", [
    "ACTION", "DEVPATH", "SUBSYSTEM", "DEVTYPE", "DEVNAME", "MAJOR", "MINOR", "SEQNUM", "SYNTH_UUID",
    "ID_VENDOR", "ID_VENDOR_ID", "ID_MODEL", "ID_MODEL_ID", "ID_MODEL_ENC", "ID_VENDOR_FROM_DATABASE",
    "ID_BUS", "ID_TYPE", "ID_PATH", "ID_FS_TYPE", "ID_FS_USAGE", "ID_FS_VERSION", "ID_PART_ENTRY_TYPE",
    "PRODUCT", "DRIVER", "MODALIAS", "TAGS", "ID_MACHINE_THING", "INTERFACE", "IFINDEX", "ID_PATH_TAG",
    "RFKILL_NAME", "ID_NET_DRIVER", "ID_NET_NAMING_SCHEME", "MEMORY_DEVICE_0_PART_NUMBER",
])
def test_not_identifying(key):
    assert not unix_devices.identifying(key)


def _peer(uid: int, gid: int | None = None, gids=()) -> PeerCredentials:
    return PeerCredentials(":1.9", uid, frozenset(gids), gid=gid if gid is not None else uid)


def _event(devname: str, major: int, minor: int, **extra) -> DeviceChanged:
    props = {"ACTION": "change", "DEVPATH": "/devices/x", "SUBSYSTEM": "block", "DEVNAME": devname,
             "MAJOR": str(major), "MINOR": str(minor), "ID_FS_TYPE": "ext4", "ID_FS_UUID": "u-u-i-d", **extra}
    return DeviceChanged("change", "/devices/x", "block", props)


@pytest.fixture
def loop_node():
    """A real device node of the test's own, with an owner, group and mode set here."""
    if os.geteuid() != 0:
        pytest.skip("needs root (a loop device, chown)")
    from udev import LoopDevice

    with LoopDevice() as loop:
        yield loop


def test_post_by_node_permissions(loop_node):
    st_ = os.stat(loop_node.node)
    major, minor = os.major(st_.st_rdev), os.minor(st_.st_rdev)
    event = _event(loop_node.node, major, minor)
    os.chown(loop_node.node, 0, 4242)
    os.chmod(loop_node.node, 0o640)
    post = unix_devices.post
    assert post(_peer(0), event, {}) is event  # root
    assert post(_peer(1000), event, {}).properties.keys() == event.properties.keys() - {"ID_FS_UUID"}
    assert post(_peer(1000, gids=[4242]), event, {}) is event  # group may read
    assert post(_peer(1000, gid=4242), event, {}) is event  # primary group
    os.chown(loop_node.node, 1000, 4242)
    os.chmod(loop_node.node, 0o060)  # owner bits say no: the group bits are not consulted for the owner
    assert "ID_FS_UUID" not in post(_peer(1000, gids=[4242]), event, {}).properties
    os.chmod(loop_node.node, 0o604)  # others may read
    assert post(_peer(2000), event, {}) is event
    # the node is not the event's device number: fail closed
    assert "ID_FS_UUID" not in post(_peer(2000), _event(loop_node.node, major, minor + 1), {}).properties
    # no node, outside /dev, not a device: fail closed
    for devname in ("/dev/wqd-no-such-node", "/etc/passwd", "/dev/../etc/passwd", ""):
        assert "ID_FS_UUID" not in post(_peer(2000), _event(devname, major, minor), {}).properties
    # nothing identifying: the event as it was
    plain = DeviceChanged("add", "/devices/y", "net", {"ACTION": "add", "INTERFACE": "eth9"})
    assert post(_peer(2000), plain, {}) is plain


# Recorded property sets (udev 252 on real hardware; addresses and serials changed):
# what a peer that may not open a node gets of each.
USB_ETHERNET = ("/devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/net/enx00e04c680abc", "net", {
    "ACTION": "add", "DEVPATH": "/devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/net/enx00e04c680abc",
    "SUBSYSTEM": "net", "INTERFACE": "enx00e04c680abc", "IFINDEX": "5", "SEQNUM": "4242",
    "ID_NET_NAME_MAC": "enx00e04c680abc", "ID_NET_NAME_PATH": "enp0s20f0u1", "ID_NET_NAME": "enx00e04c680abc",
    "ID_NET_NAMING_SCHEME": "v252", "ID_NET_LINK_FILE": "/usr/lib/systemd/network/73-usb-net-by-mac.link",
    "ID_VENDOR_ID": "0bda", "ID_MODEL_ID": "8153", "ID_BUS": "usb", "ID_PATH": "pci-0000:00:14.0-usb-0:1:1.0",
    "ID_PATH_TAG": "pci-0000_00_14_0-usb-0_1_1_0", "ID_NET_DRIVER": "r8152",
    "ID_SERIAL": "Realtek_USB_10_100_1000_LAN_000001",
})
BLUETOOTH_INPUT = ("/devices/virtual/misc/uhid/0005:046D:B342.0003/input/input27", "input", {
    "ACTION": "add", "DEVPATH": "/devices/virtual/misc/uhid/0005:046D:B342.0003/input/input27",
    "SUBSYSTEM": "input", "PRODUCT": "5/46d/b342/1310", "NAME": '"Alice\'s Keyboard"',
    "PHYS": '"a4:c3:f0:85:12:34"', "UNIQ": '"e8:1c:de:ad:be:ef"', "PROP": "0", "EV": "12001f",
    "MODALIAS": "input:b0005v046DpB342e1310-e0,1,4,11,14,k71,r,am4,lsfw", "ID_INPUT": "1", "ID_INPUT_KEYBOARD": "1",
    "ID_BUS": "bluetooth",
})
BLUETOOTH_HID = ("/devices/virtual/misc/uhid/0005:046D:B342.0003", "hid", {
    "ACTION": "add", "DEVPATH": "/devices/virtual/misc/uhid/0005:046D:B342.0003", "SUBSYSTEM": "hid",
    "HID_ID": "0005:0000046D:0000B342", "HID_NAME": "Alice's Keyboard", "HID_PHYS": "a4:c3:f0:85:12:34",
    "HID_UNIQ": "e8:1c:de:ad:be:ef", "MODALIAS": "hid:b0005g0000v0000046Dp0000B342", "DRIVER": "hid-generic",
})
MEMORY = ("/devices/virtual/dmi/id", "dmi", {
    "ACTION": "change", "DEVPATH": "/devices/virtual/dmi/id", "SUBSYSTEM": "dmi",
    "MEMORY_DEVICE_0_ASSET_TAG": "9876543210", "MEMORY_DEVICE_0_SERIAL_NUMBER": "1A2B3C4D",
    "MEMORY_DEVICE_0_PART_NUMBER": "M471A1K43CB1-CTD", "MEMORY_DEVICE_0_MANUFACTURER": "Samsung",
    "MEMORY_DEVICE_0_SIZE": "8589934592", "MEMORY_DEVICE_0_LOCATOR": "ChannelA-DIMM0",
    "MEMORY_ARRAY_NUM_DEVICES": "2",
})
RFKILL = ("/devices/pci0000:00/0000:00:14.0/usb1/1-10/1-10:1.0/bluetooth/hci0/rfkill1", "rfkill", {
    "ACTION": "add", "SUBSYSTEM": "rfkill", "RFKILL_NAME": "hci0", "RFKILL_TYPE": "bluetooth",
    "RFKILL_STATE": "1", "RFKILL_HW_BLOCK_LIST": "0",
})


@pytest.mark.parametrize("recorded, withheld", [
    (USB_ETHERNET, {"INTERFACE", "ID_NET_NAME_MAC", "ID_NET_NAME_PATH", "ID_NET_NAME", "ID_SERIAL"}),
    (BLUETOOTH_INPUT, {"NAME", "PHYS", "UNIQ"}),
    (BLUETOOTH_HID, {"HID_NAME", "HID_PHYS", "HID_UNIQ"}),
    (MEMORY, {"MEMORY_DEVICE_0_ASSET_TAG", "MEMORY_DEVICE_0_SERIAL_NUMBER"}),
    (RFKILL, set()),
], ids=["usb-ethernet", "bluetooth-input", "bluetooth-hid", "memory", "rfkill"])
def test_recorded_devices_redacted_by_meaning(recorded, withheld):
    devpath, subsystem, props = recorded
    event = DeviceChanged(props["ACTION"], devpath, subsystem, props)
    got = unix_devices.post(_peer(2000), event, {})  # no node: only root would get it all
    assert got.properties.keys() == props.keys() - withheld
    assert unix_devices.post(_peer(0), event, {}) is event
    if not withheld:
        assert got is event
    for value in (got.devpath, *got.properties.values()):
        assert not unix_devices.carries_address(value), value
        for secret in ("00e04c680abc", "a4:c3:f0", "e8:1c:de", "Alice", "1A2B3C4D", "9876543210"):
            assert secret not in value


def test_mac_named_devpath_gets_a_stable_token():
    devpath, subsystem, props = USB_ETHERNET
    event = DeviceChanged("add", devpath, subsystem, props)
    got = unix_devices.post(_peer(2000), event, {})
    head, _, tail = got.devpath.rpartition("/")
    assert head == devpath.rsplit("/", 1)[0] and tail.startswith("<redacted:") and tail.endswith(">")
    assert got.properties["DEVPATH"] == got.devpath
    removed = DeviceChanged("remove", devpath, subsystem, {**props, "ACTION": "remove"})
    assert unix_devices.post(_peer(2001), removed, {}).devpath == got.devpath  # add and remove pair
    other = unix_devices.redacted_devpath(devpath.replace("abc", "abd"))
    assert other != got.devpath  # another device, another token


@pytest.mark.parametrize("value, address", [
    ("00:11:22:33:44:55", True), ("AA-BB-CC-DD-EE-FF", True), ("peer a4_c3_f0_85_12_34 x", True),
    ("enx001122334455", True), ("wlx00c0ffee1234", True), ("/net/enx001122334455/queues", True),
    ("00:11:22:33:44", False), ("00:11:22:33:44:55:66:77", True),  # EUI-64: identifying too
    ("00:11-22:33:44:55", False),
    ("0fc63daf-8483-4772-8e79-3d69d8477de4", False),  # a partition type GUID is public
    ("0005:046D:B342.0003", False), ("pci-0000:00:14.0-usb-0:1:1.0", False), ("enx00112233445", False),
    ("usb:v046DpC52Bd2411dc00dsc00dp00ic03isc01ip01in00", False), ("xenx001122334455", False),
])
def test_hardware_addresses_in_values(value, address):
    assert unix_devices.carries_address(value) is address


def test_an_address_in_any_property_is_withheld():
    props = {"ACTION": "change", "SUBSYSTEM": "misc", "SYNTH_ARG_PEER": "wlx00c0ffee1234",
             "SOMETHING": "bound to 00:1a:7d:da:71:13", "COLOR": "red"}
    got = unix_devices.post(_peer(2000), DeviceChanged("change", "/devices/virtual/misc/x", "misc", props), {})
    assert got.properties == {"ACTION": "change", "SUBSYSTEM": "misc", "COLOR": "red"}


@pytest.mark.parametrize("text", [
    '[devices]\nbackend = "sideways"\n', "[devices]\nreceive_buffer = 10\n", '[devices]\nreceive_buffer = "big"\n',
    "[devices]\nreceive_buffer = true\n", "[devices]\nnope = 1\n",
])
def test_bad_settings_make_the_source_unavailable(text):
    from wqd.config import parse
    from wqd.sources.devices import open_source

    with pytest.raises(ValueError):  # the daemon reports the source unavailable ("") and logs why
        open_source(parse(text))


def test_forced_backend():
    from wqd.config import parse
    from wqd.sources.devices import open_source

    assert open_source(parse('[devices]\nbackend = "uevent"\nreceive_buffer = 4096\n')).backend == "uevent"
