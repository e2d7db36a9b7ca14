"""wqd.krb5cache against a real MIT KDC on loopback and a real sssd-kcm.

Every cache type (FILE:, DIR:, KEYRING:persistent:UID, KCM:) is driven by the real
kinit / kinit -R / kswitch / kdestroy as uid 1000, and read back by
``wqd.krb5cache`` *in a process of that uid* (as the daemon's credential helper
will read it); the sequence of ``classify`` results is checked exactly. Reads as
the wrong uid get nothing. sssd-kcm's store is watched with inotify to show which
event marks a change (docs/credentials.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
import sys
import time

import pytest

import wqd.krb5cache as k
from krb5_support import Realm

OWNER, OTHER = 1000, 1001
KINDS = ("FILE", "DIR", "KEYRING", "KCM")


def cache_name(realm: Realm, kind: str, uid: int, tag: str = "") -> str:
    home = realm.user_dir(uid)
    return {
        "FILE": f"FILE:{home}/krb5cc{tag}",
        "DIR": f"DIR:{home}/dir{tag}",
        "KEYRING": f"KEYRING:persistent:{uid}",
        "KCM": "KCM:",
    }[kind]


@pytest.fixture(params=KINDS)
def cache(request, realm):
    """(realm, kind, cache name of OWNER), the cache empty before and after."""
    kind = request.param
    if kind == "KCM":
        request.getfixturevalue("kcm")
    name = cache_name(realm, kind, OWNER, tag=f"-{request.node.name.split('[')[0]}")
    realm.kdestroy(OWNER, name, all_caches=kind != "FILE")
    yield realm, kind, name
    realm.kdestroy(OWNER, name, all_caches=kind != "FILE")


def state(realm: Realm, uid: int, name: str) -> k.CacheState | None:
    out = realm.read_as(uid, "read_cache", name)
    if out is None:
        return None
    assert "error" not in out, out
    return k.CacheState(**out)


def next_second() -> None:
    """Ticket times have one-second resolution: make the next ticket's differ."""
    time.sleep(1.05 - (time.time() % 1.0))


@pytest.mark.root
def test_sequence_of_changes(cache):
    """kinit → kinit -R → kinit → (another principal) → kswitch → kdestroy, read
    as the owner after each step: created renewed refreshed switched switched
    destroyed (then kdestroy -A). FILE: has no kswitch: kinit of the other principal into the same
    file is its switch."""
    realm, kind, name = cache
    principal, alt = f"user{OWNER}@WQD.TEST", f"user{OWNER}/alt@WQD.TEST"
    seen = [None]
    changes = []

    def step(action, *args):
        action(OWNER, name, *args)
        seen.append(state(realm, OWNER, name))
        changes.append(k.classify(seen[-2], seen[-1]))

    step(realm.kinit)
    first = seen[-1]
    assert first.principal == principal
    assert first.expires - first.starttime == 600  # -l 10m
    assert first.renew_until - first.authtime == 86400  # -r 1d
    next_second()
    step(realm.renew)
    renewed = seen[-1]
    assert renewed.authtime == first.authtime and renewed.renew_until == first.renew_until
    assert renewed.starttime > first.starttime and renewed.expires > first.expires
    next_second()
    step(realm.kinit)
    assert seen[-1].authtime > first.authtime
    step(realm.kinit, f"user{OWNER}/alt")
    assert seen[-1].principal == alt
    if kind == "FILE":
        assert seen[-1].name == name
        step(realm.kdestroy)
        assert changes == ["created", "renewed", "refreshed", "switched", "destroyed"]
        return
    assert seen[-1].name != seen[-2].name  # a second cache in the collection, now primary
    step(realm.kswitch, principal)
    assert seen[-1].principal == principal and seen[-1].name == seen[-3].name
    coll = realm.read_as(OWNER, "collection", name)
    assert sorted(c["principal"] for c in coll["caches"]) == sorted([principal, alt])
    assert coll["primary"]["name"] == seen[-1].name
    step(realm.kdestroy)  # the primary only; alt's cache stays in the collection
    step(realm.kdestroy, True)  # -A
    # DIR: and KEYRING: keep naming the destroyed cache as primary; sssd-kcm
    # makes the remaining cache the default at once, so there it is a switch.
    last = ["switched", "destroyed"] if kind == "KCM" else ["destroyed", None]
    assert changes == ["created", "renewed", "refreshed", "switched", "switched", *last]


@pytest.mark.root
def test_unchanged_cache_classifies_as_nothing(cache):
    realm, kind, name = cache
    realm.kinit(OWNER, name)
    a, b = state(realm, OWNER, name), state(realm, OWNER, name)
    assert a == b and k.classify(a, b) is None
    assert k.classify(None, None) is None


@pytest.mark.root
def test_short_lifetime_gives_correct_expires(cache):
    realm, kind, name = cache
    before = int(time.time())
    realm.kinit(OWNER, name, lifetime="90s")
    after = int(time.time())
    s = state(realm, OWNER, name)
    # kinit asks for its clock + 90 s and the KDC stamps the start with its own (later)
    # second: across a second boundary the two are 91 s apart (seen in a host run, 2026-12-03)
    assert 90 <= s.expires - s.starttime <= 91
    assert before + 90 <= s.expires <= after + 90 + 1


@pytest.mark.root
def test_other_uid_reads_nothing_of_the_owners_cache(cache):
    """FILE: and the persistent keyring refuse (CacheAccessDenied); DIR:'s 0700
    directory and KCM's per-uid namespace show nothing. Never the owner's TGT."""
    realm, kind, name = cache
    realm.kinit(OWNER, name)
    owner_view = state(realm, OWNER, name)
    assert owner_view is not None
    if kind == "KCM":
        # The same name, and the owner's full name, resolve in the other uid's
        # own KCM namespace: sssd-kcm checks the socket peer's uid.
        assert realm.read_as(OTHER, "read_cache", name) is None
        assert realm.read_as(OTHER, "read_cache", owner_view.name) is None
        assert realm.read_as(OTHER, "collection", name)["caches"] == []
        return
    if kind == "KEYRING":
        # KEYRING:persistent:1000 as uid 1001: keyctl_get_persistent says EPERM.
        assert realm.read_as(OTHER, "read_cache", name) == {"error": "CacheAccessDenied", "code": -1750600185}
        return
    out = realm.read_as(OTHER, "read_cache", owner_view.name if kind == "DIR" else name)
    if kind == "FILE":
        assert out == {"error": "CacheAccessDenied", "code": -1765328190}
    else:  # DIR: the directory cannot be searched: the cache is not there for uid 1001
        assert out is None


@pytest.mark.root
def test_absent_cache_reads_as_none(realm):
    home = realm.user_dir(OWNER)
    assert realm.read_as(OWNER, "read_cache", f"FILE:{home}/never") is None
    assert realm.read_as(OWNER, "read_cache", f"DIR:{home}/never-dir") is None
    assert realm.read_as(OWNER, "collection", f"DIR:{home}/never-dir") == {
        "name": f"DIR:{home}/never-dir", "primary": None, "caches": []}


@pytest.mark.root
def test_kcm_without_server_is_an_error_not_absence(realm):
    """No sssd_kcm at the configured socket: CacheError, so the source can say
    its KCM backend is unavailable instead of reporting "destroyed"."""
    conf = realm.directory / "nokcm.conf"
    conf.write_text(realm.krb5_conf.read_text().replace(str(realm.kcm_socket), str(realm.directory / "no.socket")))
    conf.chmod(0o644)
    out = realm.as_uid(
        OWNER, sys.executable, "-c",
        "import wqd.krb5cache as k\ntry:\n    k.read_cache('KCM:')\nexcept k.CacheError as e:\n    print(type(e).__name__)\n",
        extra_env={"KRB5_CONFIG": str(conf)},
    ).stdout.strip()
    assert out == "CacheError"


# --- default_ccache_name --------------------------------------------------------

TEMPLATES = [
    ("KEYRING:persistent:%{uid}", "KEYRING:persistent:1000"),
    ("DIR:/run/user/%{uid}/krb5cc", "DIR:/run/user/1000/krb5cc"),
    ("/tmp/krb5cc_%{uid}_wqd", "FILE:/tmp/krb5cc_1000_wqd"),
    ("KCM:", "KCM:"),
    (None, "FILE:/tmp/krb5cc_1000"),
]


@pytest.mark.parametrize(("template", "expected"), TEMPLATES)
def test_default_ccache_name_expands_uid(tmp_path, template, expected):
    conf = tmp_path / "krb5.conf"
    setting = f"  default_ccache_name = {template}\n" if template else ""
    conf.write_text(
        "# a comment\n[libdefaults]\n  default_realm = WQD.TEST\n" + setting
        + "[realms]\n  WQD.TEST = {\n    default_ccache_name = FILE:/wrong\n  }\n"
    )
    assert k.default_ccache_name(1000, [str(conf)]) == expected


def test_default_ccache_name_follows_includes_and_first_file_wins(tmp_path):
    d = tmp_path / "krb5.conf.d"
    d.mkdir()
    (d / "kcm_default_ccache").write_text("[libdefaults]\n    default_ccache_name = KCM:\n")
    (d / "ignored.rpmsave").write_text("[libdefaults]\n    default_ccache_name = FILE:/ignored\n")
    main = tmp_path / "krb5.conf"
    main.write_text(f"includedir {d}\n[libdefaults]\n  default_ccache_name = FILE:/later\n")
    assert k.default_ccache_name(1000, [str(main)]) == "KCM:"
    first = tmp_path / "first.conf"
    first.write_text("[libdefaults]\n default_ccache_name = DIR:/first/%{uid}\n")
    assert k.default_ccache_name(1001, [str(first), str(main)]) == "DIR:/first/1001"
    with pytest.raises(ValueError):
        bad = tmp_path / "bad.conf"
        bad.write_text("[libdefaults]\n default_ccache_name = FILE:/x/%{nonsense}\n")
        k.default_ccache_name(1000, [str(bad)])


@pytest.mark.root
@pytest.mark.parametrize(("template", "expected"), TEMPLATES)
def test_default_ccache_name_agrees_with_mit_run_as_the_uid(realm, tmp_path, template, expected):
    """MIT's own krb5_cc_default_name, run as uid 1000 without KRB5CCNAME, gives
    the same name as default_ccache_name(1000) computed by root."""
    conf = realm.directory / f"dcn-{abs(hash(template))}.conf"
    setting = f"  default_ccache_name = {template}\n" if template else ""
    conf.write_text("[libdefaults]\n  default_realm = WQD.TEST\n" + setting)
    conf.chmod(0o644)
    mit = realm.as_uid(
        OWNER, sys.executable, "-c", "import krb5; print(krb5.cc_default_name(krb5.init_context()).decode())",
        extra_env={"KRB5_CONFIG": str(conf)},
    ).stdout.strip()
    mit = mit if ":" in mit.split("/")[0] else "FILE:" + mit
    assert k.default_ccache_name(OWNER, [str(conf)]) == mit == expected


# --- the KCM store: which file, which event -------------------------------------

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_TO, IN_CREATE, IN_DELETE_SELF, IN_MOVE_SELF = 0x80, 0x100, 0x400, 0x800
IN_IGNORED = 0x8000
IN_NONBLOCK = os.O_NONBLOCK
WATCHED = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE_SELF | IN_MOVE_SELF


class Inotify:
    """inotify(7) through libc, for this test only (the source will get its
    wrapper in wqd/kernel/)."""

    def __init__(self, path: str, mask: int) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = libc.inotify_init1(IN_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(self.fd, os.fsencode(path), mask) < 0:
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")

    def masks(self, timeout: float = 0.0) -> list[int]:
        """Events queued now (or within *timeout*), as their masks."""
        out = []
        if select.select([self.fd], [], [], timeout)[0]:
            while True:
                try:
                    buf = os.read(self.fd, 65536)
                except BlockingIOError:
                    break
                off = 0
                while off < len(buf):
                    _, mask, _, length = struct.unpack_from("iIII", buf, off)
                    out.append(mask)
                    off += 16 + length
        return out

    def close(self) -> None:
        os.close(self.fd)


@pytest.mark.root
def test_kcm_store_changes_are_attrib_events_on_secrets_ldb(kcm):
    """sssd-kcm 2.8 keeps every cache in /var/lib/sss/secrets/secrets.ldb (a tdb
    it changes through mmap, so no IN_MODIFY): each committed transaction ends
    with utime() — IN_ATTRIB on that file. kinit/kinit -R/kswitch/kdestroy each
    give at least one; reading (klist, read_cache, collection) gives none, so a
    watcher that re-reads on the event never wakes itself."""
    realm = kcm
    assert realm.kcm_store.exists()
    ino = Inotify(str(realm.kcm_store), WATCHED)
    try:
        realm.kdestroy(OWNER, "KCM:", all_caches=True)
        ino.masks(timeout=0.2)  # drain

        def events_of(action, *args) -> list[int]:
            action(*args)
            # sssd-kcm commits before it answers the client: the event is
            # queued by the time the command has returned.
            return ino.masks()

        writes = {
            "kinit": events_of(realm.kinit, OWNER, "KCM:"),
            "kinit -R": events_of(realm.renew, OWNER, "KCM:"),
            "kinit alt": events_of(realm.kinit, OWNER, "KCM:", f"user{OWNER}/alt"),
            "kswitch": events_of(realm.kswitch, OWNER, "KCM:", f"user{OWNER}@WQD.TEST"),
        }
        reads = {
            "klist": events_of(lambda: realm.as_uid(OWNER, "klist", "-A", ccache="KCM:")),
            "read_cache": events_of(realm.read_as, OWNER, "read_cache", "KCM:"),
            "collection": events_of(realm.read_as, OWNER, "collection", "KCM:"),
            "other uid": events_of(realm.read_as, OTHER, "collection", "KCM:"),
        }
        writes["kdestroy -A"] = events_of(realm.kdestroy, OWNER, "KCM:", True)
        for what, masks in writes.items():
            assert masks and all(m & IN_ATTRIB for m in masks), (what, masks)
            assert not any(m & (IN_MODIFY | IN_CLOSE_WRITE) for m in masks), (what, masks)
        assert reads == {what: [] for what in reads}
    finally:
        ino.close()


@pytest.mark.root
def test_file_cache_is_replaced_by_rename(realm):
    """MIT writes a FILE: cache (kinit, kinit -R) to a temporary name and renames
    it over the cache: IN_MOVED_TO on the directory, never a write to the old
    inode; kdestroy overwrites then unlinks. So a FILE: watch is on the
    directory (name filter), not on the file."""
    home = realm.user_dir(OWNER)
    name = f"FILE:{home}/renamed"
    realm.kinit(OWNER, name)
    ino_file = Inotify(f"{home}/renamed", IN_MODIFY | IN_CLOSE_WRITE | IN_ATTRIB)
    ino_dir = Inotify(str(home), IN_MOVED_TO | IN_CREATE)
    try:
        next_second()
        realm.renew(OWNER, name)
        old_inode = ino_file.masks()
        # The old inode is never written: it loses its link (IN_ATTRIB) and,
        # freed, the watch on it goes (IN_IGNORED).
        assert not any(m & (IN_MODIFY | IN_CLOSE_WRITE) for m in old_inode), old_inode
        assert any(m & IN_IGNORED for m in old_inode), old_inode
        assert IN_MOVED_TO in [m & IN_MOVED_TO for m in ino_dir.masks()]
    finally:
        ino_file.close()
        ino_dir.close()
        realm.kdestroy(OWNER, name)


# --- classify's rules on their own (no realm) -----------------------------------

def _s(**kw) -> k.CacheState:
    base = dict(name="FILE:/c", principal="u@R", expires=200, renew_until=1000, starttime=100,
                authtime=100, ticket_id="a")
    return k.CacheState(**{**base, **kw})


@pytest.mark.parametrize(("old", "new", "change"), [
    (None, _s(), "created"),
    (_s(), None, "destroyed"),
    (_s(), _s(name="FILE:/other"), "switched"),
    (_s(), _s(principal="v@R"), "switched"),
    (_s(), _s(authtime=150, starttime=150, expires=250, ticket_id="b"), "refreshed"),
    (_s(), _s(starttime=150, expires=250, ticket_id="b"), "renewed"),
    # a renewal within the same second: only the ticket differs
    (_s(), _s(ticket_id="b"), "renewed"),
    (_s(), _s(), None),
])
def test_classify_rules(old, new, change):
    assert k.classify(old, new) == change
    assert change is None or change in k.CHANGES


def test_a_read_leaves_no_cache_file_open(realm, monkeypatch):
    """A FILE: cursor left half-way holds the file open: it would pin a deleted
    cache and its directory (no IN_DELETE_SELF for the source's watch)."""
    monkeypatch.setenv("KRB5_CONFIG", str(realm.krb5_conf))
    name = f"FILE:{realm.directory}/root-cc"
    realm.kinit(0, name, principal=f"user{OWNER}")
    try:
        assert k.read_cache(name).principal == f"user{OWNER}@WQD.TEST"
        assert k.collection(name).primary is not None
        opened = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                  if os.path.exists(f"/proc/self/fd/{fd}")]
        assert name.partition(":")[2] not in opened
    finally:
        realm.kdestroy(0, name)
