"""mountinfo parsing and diffing; statmount results spelled the same way."""

from hypothesis import given, settings
from hypothesis import strategies as st

from wqd.kernel.fanotify import MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY, MS_RDONLY, StatMount
from wqd.parse.mountinfo import MountEntry, MountinfoParser, diff, entry_from_statmount, parse_line, parse_mountinfo

# Lines as this machine's kernel wrote them (a tmpfs at "/tmp/w5/m a" remounted ro,
# a bind mount, a shared mount with optional fields, an empty source).
CAPTURE = (
    b"22 27 0:21 / /proc rw,relatime - proc proc rw\n"
    b"27 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro\n"
    b"42 27 0:39 / /tmp/w5/m\\040a ro,nosuid,noexec,relatime - tmpfs tfs ro,size=1024k\n"
    b"43 27 0:39 /sub /tmp/w5/bind rw,relatime shared:5 master:2 - tmpfs tfs ro,size=1024k\n"
    b"44 27 0:40 / /tmp/w5/e rw,relatime - tmpfs  rw,mode=755\n"
    b"45 27 0:41 / /tmp/w5/sp\\040ace rw,relatime - tmpfs src\\040a,b\\134c rw,size=1024k,mode=755\n"
)


def test_fields():
    table = parse_mountinfo(CAPTURE)
    assert list(table) == [22, 27, 42, 43, 44, 45]
    assert table[42] == MountEntry(42, 27, "0:39", "/", "/tmp/w5/m a", "tmpfs", "tfs",
                                   "ro,nosuid,noexec,relatime,size=1024k")
    assert table[43].root == "/sub" and table[43].options == "rw,relatime,ro,size=1024k"
    assert table[27].info() == {"fstype": "ext4", "source": "/dev/vda1", "options": "rw,relatime,errors=remount-ro"}
    assert table[44].source == "" and table[44].fstype == "tmpfs"
    assert table[45].source == "src a,b\\c" and table[45].mount_point == "/tmp/w5/sp ace"


def test_chunks():
    whole = parse_mountinfo(CAPTURE)
    for size in (1, 2, 7, 50, 333):
        parser = MountinfoParser()
        for i in range(0, len(CAPTURE), size):
            parser.feed(CAPTURE[i:i + size])
        assert parser.finish() == whole
    parser = MountinfoParser()
    parser.feed(CAPTURE.rstrip(b"\n"))  # no final newline: the last line still counts
    assert parser.finish() == whole


def test_malformed_lines_are_counted_and_skipped():
    parser = MountinfoParser()
    parser.feed(b"garbage\n22 27 0:21 / /proc rw - proc\nx y 0:1 / /a rw - t s o\n" + CAPTURE)
    assert list(parser.finish()) == [22, 27, 42, 43, 44, 45]
    assert parser.malformed == 3
    assert parse_line("1 2 3 4 5 6 7") is None


def test_diff_attach_detach_move_change():
    old = parse_mountinfo(CAPTURE)
    new = dict(old)
    del new[44]
    new[46] = MountEntry(46, 27, "0:50", "/", "/tmp/new", "tmpfs", "x", "rw")
    new[42] = old[42].__class__(**{**_fields(old[42]), "mount_point": "/tmp/moved"})
    new[43] = old[43].__class__(**{**_fields(old[43]), "options": "ro,relatime"})
    d = diff(old, new)
    assert d.detached == [old[44]] and d.attached == [new[46]]
    assert d.moved == [(old[42], new[42])] and d.changed == [(old[43], new[43])]
    assert d.size == 4
    assert d.actions() == [("detached", old[44], None), ("moved", new[42], "/tmp/w5/m a"), ("attached", new[46], None)]


def test_reused_id_is_detach_then_attach():
    old = parse_mountinfo(CAPTURE)
    new = dict(old)
    new[44] = MountEntry(44, 27, "0:77", "/", "/elsewhere", "proc", "proc", "rw")
    d = diff(old, new)
    assert d.detached == [old[44]] and d.attached == [new[44]] and not d.moved


def test_detach_order_children_first():
    old = parse_mountinfo(CAPTURE)
    d = diff(old, {k: v for k, v in old.items() if k in (22, 27)})
    assert [e.mount_id for e in d.detached] == [45, 44, 43, 42]


def test_statmount_spelled_like_mountinfo():
    line = parse_mountinfo(CAPTURE)[42]
    sm = StatMount(mask=0x2BB, mnt_id=0x8000002D, parent_id=0x8000001C, mnt_id_old=42, parent_id_old=27,
                   mnt_attr=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC, sb_flags=MS_RDONLY,
                   dev=(0, 39), fs_type="tmpfs", mnt_root="/", mnt_point="/tmp/w5/m a", sb_source="tfs",
                   mnt_opts="size=1024k", mnt_ns_id=0)
    entry = entry_from_statmount(sm)
    assert entry.info() == line.info()
    assert (entry.mount_point, entry.device, entry.root) == (line.mount_point, line.device, line.root)
    assert entry.mount_id == 0x8000002D


def _fields(entry):
    return {f: getattr(entry, f) for f in entry.__slots__}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_never_raises(data):
    parser = MountinfoParser()
    parser.feed(data)
    parser.finish()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 80), max_size=20))
def test_any_chunking(cuts):
    parser = MountinfoParser()
    pos = 0
    for n in cuts:
        parser.feed(CAPTURE[pos:pos + n])
        pos += n
    parser.feed(CAPTURE[pos:])
    assert parser.finish() == parse_mountinfo(CAPTURE)
