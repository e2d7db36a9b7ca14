"""The proc-keys fallback's pure parts: /proc/keys parsing and snapshot diffs."""

from hypothesis import given, strategies as st

from wqd.parse.proc_keys import KeySnapshot, diff, parse_proc_keys

PROC_KEYS = """\
0b3f5e2a I--Q---     1 perm 3f010000     0     0 keyring   _uid.0: 2
1c9d4b11 I--Q---     2 perm 3f3f0000     0     0 user      krb5cc: 12
2222aaaa I-R----     1 perm 3f3f0000  1000   100 logon     secret: 8
garbage line
ffffffff
"""


def test_parse():
    keys = parse_proc_keys(PROC_KEYS)
    assert set(keys) == {0x0B3F5E2A, 0x1C9D4B11, 0x2222AAAA}
    k = keys[0x2222AAAA]
    assert (k.flags, k.perm, k.uid, k.gid, k.type) == ("I-R----", 0x3F3F0000, 1000, 100, "logon")


def snap(**kw):
    base = dict(exists=True, flags="I--Q---", perm=0x3F3F0000, uid=0, gid=0, members=(1, 2), digest=None)
    base.update(kw)
    return KeySnapshot(**base)


def test_linked_unlinked_in_keyring_order():
    changes, gone = diff(snap(members=(1, 2)), snap(members=(2, 3, 4)))
    assert changes == [("unlinked", 1), ("linked", 3), ("linked", 4)] and not gone


def test_cleared_when_two_or_more_go_at_once():
    assert diff(snap(members=(1, 2)), snap(members=()))[0] == [("cleared", 0)]
    assert diff(snap(members=(1,)), snap(members=()))[0] == [("unlinked", 1)]


def test_setattr_updated_revoked_invalidated_instantiated():
    assert diff(snap(), snap(perm=0x3F3F0001))[0] == [("setattr", 0)]
    assert diff(snap(members=None, digest=b"a"), snap(members=None, digest=b"b"))[0] == [("updated", 0)]
    assert diff(snap(), snap(flags="I-RQ---"))[0] == [("revoked", 0)]
    assert diff(snap(), snap(flags="I--Q--i"))[0] == [("invalidated", 0)]
    assert diff(snap(flags="---QU--"), snap(flags="I--Q---"))[0] == [("instantiated", 0)]


def test_gone():
    assert diff(snap(), KeySnapshot(False)) == ([], True)


def test_unreadable_payload_gives_no_updated():
    assert diff(snap(members=None, digest=None), snap(members=None, digest=None)) == ([], False)


@given(st.text(max_size=2000))
def test_parse_never_raises(text):
    parse_proc_keys(text)


members = st.lists(st.integers(1, 50), unique=True, max_size=8).map(tuple)


@given(members, members)
def test_membership_diff_is_complete(old, new):
    changes, _ = diff(snap(members=old), snap(members=new))
    if changes == [("cleared", 0)]:
        assert new == () and len(old) >= 2
        return
    linked = {aux for c, aux in changes if c == "linked"}
    unlinked = {aux for c, aux in changes if c == "unlinked"}
    assert linked == set(new) - set(old) and unlinked == set(old) - set(new)
