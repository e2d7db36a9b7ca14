"""unix rules for mounts and fs-errors, and the mounts source's own checks (no bus)."""

import os
import pwd

import pytest

from wqd.errors import AccessDenied, InvalidArgument
from wqd.events import FilesystemError, MountChanged, WatchTarget
from wqd.hub import Subscription
from wqd.peer import PeerCredentials
from wqd.policy import unix_mounts
from wqd.policy.unix import UnixPolicy
from wqd.sources.mount_backends import MountinfoBackend
from wqd.sources.fs_errors import FsErrorTarget
from wqd.sources.mounts import MountsSource, MountTarget

NS, OTHER_NS = 4026531840, 4026532999


def peer(uid=1000, mnt_ns=NS, gids=frozenset(), **kw):
    return PeerCredentials(f":1.{uid}", uid, gids, mnt_ns=mnt_ns, **kw)


def mounts_target(ns=NS, other=False):
    return MountTarget("mounts", "", ns, other_namespace=other)


def event(source="tfs", options="rw,relatime,size=1024k", ns=NS, mount_point="/mnt/x"):
    return MountChanged("attached", 7, mount_point, {"fstype": "tmpfs", "source": source, "options": options},
                        mnt_ns=ns)


@pytest.mark.asyncio
async def test_mounts_own_namespace_only():
    assert (await unix_mounts.watch(peer(), mounts_target(), {})).allowed
    assert not (await unix_mounts.watch(peer(), mounts_target(OTHER_NS), {})).allowed
    assert not (await unix_mounts.watch(peer(mnt_ns=None), mounts_target(), {})).allowed  # unknown: fail closed
    assert not (await unix_mounts.watch(peer(uid=0, mnt_ns=None), mounts_target(), {})).allowed
    # a target the mounts source did not resolve cannot say whose namespace it is: denied
    assert not (await unix_mounts.watch(peer(), WatchTarget("mounts", "", NS), {})).allowed


@pytest.mark.asyncio
async def test_other_namespaces_setting():
    target = mounts_target(other=True)
    assert (await unix_mounts.watch(peer(), target, {})).allowed
    assert (await unix_mounts.watch(peer(), target, {"unix": {"mounts_other_namespaces": True}})).allowed
    for value in (False, "yes", 1):  # anything but true denies
        assert not (await unix_mounts.watch(peer(), target, {"unix": {"mounts_other_namespaces": value}})).allowed
    assert not (await unix_mounts.watch(peer(), mounts_target(), {"unix": "garbage"})).allowed


@pytest.mark.asyncio
async def test_fs_errors_root_only_unless_groups():
    target = FsErrorTarget("fs-errors", "/mnt", 1, fstype="ext4", device="7:0")
    assert (await unix_mounts.watch(peer(uid=0), target, {})).allowed
    assert not (await unix_mounts.watch(peer(), target, {})).allowed
    settings = {"unix": {"fs_errors_groups": [4242, "root"]}}
    assert (await unix_mounts.watch(peer(gids=frozenset({4242})), target, settings)).allowed
    assert (await unix_mounts.watch(peer(gids=frozenset({0})), target, settings)).allowed  # "root" by name
    assert (await unix_mounts.watch(peer(gid=4242), target, settings)).allowed  # primary group
    assert not (await unix_mounts.watch(peer(gids=frozenset({7})), target, settings)).allowed
    assert not (await unix_mounts.watch(peer(gids=frozenset({4242})), target,
                                        {"unix": {"fs_errors_groups": "4242"}})).allowed


@pytest.mark.asyncio
async def test_through_the_unix_plugin():
    policy = UnixPolicy({})
    assert (await policy.watch(peer(), "mounts", mounts_target())).allowed
    assert not (await policy.watch(peer(), "fs-errors", WatchTarget("fs-errors", "/mnt", 1))).allowed
    assert policy.post(peer(), event(ns=OTHER_NS)) is None
    assert policy.post(peer(uid=0), FilesystemError("/mnt", 5, 1)) == FilesystemError("/mnt", 5, 1)


def test_post_drops_other_namespaces():
    assert unix_mounts.post(peer(), event(ns=OTHER_NS), {}) is None
    assert unix_mounts.post(peer(uid=0), event(ns=OTHER_NS), {}) is None
    assert unix_mounts.post(peer(mnt_ns=None), event(), {}) is None


def test_root_sees_everything():
    e = event(source="/home/alice/img", options="rw,lowerdir=/home/alice/l")
    assert unix_mounts.post(peer(uid=0), e, {}) is e


def test_redaction_rule():
    home = pwd.getpwuid(1000).pw_dir if _has_uid(1000) else None
    cases = {
        "tfs": "tfs",
        "/dev/sda1": "/dev/sda1",
        "/dev/mapper/vg-home": "/dev/mapper/vg-home",
        "/srv/alice/data": "<redacted>",
        "server:/export/home/bob": "<redacted>",
        "~bob/x": "<redacted>",
        "/run/user/1000/doc": "/run/user/1000/doc",
        "/run/user/1001/gvfs": "<redacted>",
        "/devices/evil": "<redacted>",  # /dev is a prefix only as a directory
        # resolved before the prefix test: no ".." or "." games
        "/run/user/1000/../1001/secret.img": "<redacted>",
        "/run/user/1000/./../1001": "<redacted>",
        "/run/user/1000/..": "<redacted>",
        "/dev/../srv/alice/img": "<redacted>",
        "/dev/./../../srv/x": "<redacted>",
        "//run/user/1000/doc": "//run/user/1000/doc",
        "/run/user/1001/../1000/doc": "/run/user/1001/../1000/doc",  # it is 1000's
        # a remote account, with or without a path: whoever's it is
        "alice@fileserver:/home/alice": "<redacted>",
        "alice@fileserver:docs": "<redacted>",
        "bob@10.0.0.1:": "<redacted>",
        "user@example": "user@example",  # no host:path form: not a source that names an account
    }
    if home and home != "/":
        cases[os.path.join(home, "disk.img")] = os.path.join(home, "disk.img")
    for source, seen in cases.items():
        assert unix_mounts.post(peer(), event(source=source), {}).info["source"] == seen, source


def test_option_values_redacted_one_by_one():
    options = "rw,relatime,lowerdir=/srv/a:/srv/b,upperdir=/run/user/1000/u,uhelper=udisks2,size=1024k,/weird/flag"
    got = unix_mounts.post(peer(), event(options=options), {}).info["options"]
    assert got == "rw,relatime,lowerdir=<redacted>,upperdir=/run/user/1000/u,uhelper=udisks2,size=1024k,<redacted>"
    sneaky = "lowerdir=/run/user/1000/../1001/l:/run/user/1000/l,upperdir=/run/user/1000/../../user/1001/u"
    got = unix_mounts.post(peer(), event(options=sneaky), {}).info["options"]
    assert got == "lowerdir=<redacted>,upperdir=<redacted>"
    own = "lowerdir=/run/user/1001/../1000/l"
    assert unix_mounts.post(peer(uid=1001), event(options=own), {}).info["options"] == "lowerdir=<redacted>"
    assert unix_mounts.post(peer(), event(options=own), {}).info["options"] == own
    plain = event()
    assert unix_mounts.post(peer(), plain, {}) is plain  # nothing to hide: the same event
    unresolved = MountChanged("detached", 9, "", {}, mnt_ns=NS)
    assert unix_mounts.post(peer(), unresolved, {}) is unresolved


def _has_uid(uid):
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


# -- the source's own checks ------------------------------------------------

def source():
    return MountsSource(MountinfoBackend(), own_ns=NS)


@pytest.mark.asyncio
async def test_resolve_fails_closed_without_a_namespace():
    with pytest.raises(AccessDenied):
        await source().resolve(peer(mnt_ns=None), "", {})


@pytest.mark.asyncio
async def test_resolve_targets_and_options():
    src = source()
    t = await src.resolve(peer(), "/mnt//a/./b/", {"actions": ["attached", "moved"]})
    assert isinstance(t, MountTarget)
    assert (t.source, t.object_id, t.prefix, t.actions, t.other_namespace) == (
        "mounts", NS, "/mnt/a/b", frozenset({"attached", "moved"}), False)
    assert (await src.resolve(peer(mnt_ns=OTHER_NS), "", {})).details() == {
        "prefix": None, "actions": None, "other_namespace": True}
    assert (await src.resolve(peer(), "//", {})).prefix == "/"
    for spec, options, error in (
            ("mnt", {}, 'mounts target must be "" or an absolute path prefix'),
            ("", {"actions": []}, "option 'actions' must not be empty"),
            ("", {"actions": ["gone"]}, "option 'actions': unknown value(s) gone"),
            ("", {"x": 1, "actions": ["attached"]}, "unknown option(s) for mounts: x"),
            ("", {"actions": "attached"}, "option 'actions' must be an array of strings (as)")):
        with pytest.raises(InvalidArgument) as info:
            await src.resolve(peer(), spec, options)
        assert str(info.value) == error


@pytest.mark.asyncio
async def test_accepts_prefix_actions_moves_and_unresolved():
    src = source()
    sub = Subscription(1, peer(), "mounts", await src.resolve(peer(), "/data", {"actions": ["attached", "moved"]}))

    def mc(action, point, **info):
        return MountChanged(action, 1, point, info, mnt_ns=NS)

    assert src.accepts(sub, mc("attached", "/data"))
    assert src.accepts(sub, mc("attached", "/data/x/y"))
    assert not src.accepts(sub, mc("attached", "/database"))
    assert not src.accepts(sub, mc("detached", "/data/x"))  # not asked for
    assert src.accepts(sub, mc("moved", "/elsewhere", moved_from="/data/x"))  # left the prefix
    assert not src.accepts(sub, mc("moved", "/elsewhere", moved_from="/other"))
    assert src.accepts(sub, mc("attached", ""))  # unresolved: may have been under the prefix


@pytest.mark.asyncio
async def test_attach_refuses_another_namespace():
    src = source()
    target = await src.resolve(peer(), "", {})
    intruder = peer(uid=1001, mnt_ns=OTHER_NS)
    with pytest.raises(AccessDenied):
        src.attach(Subscription(1, intruder, "mounts", target))
    assert src.watches == {}
