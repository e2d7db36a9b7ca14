"""Who may open a device node, POSIX ACLs included (logind's ``uaccess``).

The oracle is the kernel: for random owners, modes and ACLs set with ``setfacl``
on a real file, ``readable_by`` must agree with whether a child process with the
peer's uid and groups can ``open()`` it for reading.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from wqd.kernel.credentials import Credentials, run_as
from wqd.peer import PeerCredentials
from wqd.policy.unix_devices import ACL_XATTR, BadAcl, parse_acl, readable_by

pytestmark = [pytest.mark.root]

PEERS = [  # (uid, primary gid, supplementary groups)
    (1000, 1000, ()),
    (1000, 1000, (4242,)),
    (1001, 1001, (4343, 4242)),
    (1002, 1002, ()),
]
PERMS = st.sampled_from(["---", "r--", "rw-", "-w-", "r-x"])


def peer_of(uid: int, gid: int, groups: tuple[int, ...]) -> PeerCredentials:
    return PeerCredentials(":1.1", uid, frozenset(groups), gid=gid)


def can_open(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        return True
    except PermissionError:
        return False


@pytest.fixture(scope="module")
def directory():
    if os.geteuid() != 0:
        pytest.skip("needs root to set owners and to open as other uids")
    if shutil.which("setfacl") is None:
        pytest.skip("setfacl is not installed (Debian package acl; scripts/setup installs it)")
    path = tempfile.mkdtemp(prefix="wqd-acl-")
    os.chmod(path, 0o755)  # every peer may reach the file; only its own permissions decide
    why = acl_unsupported(path)
    if why:
        shutil.rmtree(path)
        pytest.skip(why)
    yield path
    shutil.rmtree(path)


def acl_unsupported(directory: str) -> str | None:
    """Why POSIX ACLs cannot be set on the filesystem of *directory*, or None."""
    probe = os.path.join(directory, ".acl-probe")
    with open(probe, "w"):
        pass
    try:
        out = subprocess.run(["setfacl", "-m", "u:1000:r", probe], capture_output=True, text=True)
        return None if out.returncode == 0 else f"no POSIX ACLs on {directory}'s filesystem: {out.stderr.strip()}"
    finally:
        os.unlink(probe)


# Cases that once disagreed or that matter most, always tried:
# an ACL whose mask is empty is skipped by the kernel (mode bits decide);
@example(owner=0, group=0, user_obj="---", group_obj="---", other="r--", named_users={},
         named_groups={4242: "---"}, mask=None)
# a matching group entry that does not grant denies even though other grants;
@example(owner=0, group=0, user_obj="---", group_obj="---", other="r--", named_users={},
         named_groups={4242: "---", 4343: "-w-"}, mask="rw-")
# a named user under a mask without read; uaccess's shape (u:UID:rw, mask rw).
@example(owner=0, group=6, user_obj="rw-", group_obj="rw-", other="---", named_users={1000: "rw-"},
         named_groups={}, mask="-w-")
@example(owner=0, group=6, user_obj="rw-", group_obj="rw-", other="---", named_users={1000: "rw-"},
         named_groups={}, mask="rw-")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(owner=st.sampled_from([0, 1000, 1001]), group=st.sampled_from([0, 6, 4242, 4343]),
       user_obj=PERMS, group_obj=PERMS, other=PERMS,
       named_users=st.dictionaries(st.sampled_from([1000, 1001, 1002]), PERMS, max_size=2),
       named_groups=st.dictionaries(st.sampled_from([4242, 4343, 1002]), PERMS, max_size=2),
       mask=st.one_of(st.none(), PERMS))
def test_readable_by_agrees_with_the_kernel(directory, owner, group, user_obj, group_obj, other, named_users,
                                             named_groups, mask):
    path = os.path.join(directory, "node")
    with open(path, "w"):
        pass
    try:
        os.chown(path, owner, group)
        entries = [f"u::{user_obj}", f"g::{group_obj}", f"o::{other}"]
        entries += [f"u:{uid}:{perm}" for uid, perm in named_users.items()]
        entries += [f"g:{gid}:{perm}" for gid, perm in named_groups.items()]
        if named_users or named_groups:  # a mask is required then; setfacl computes one when not given
            if mask is not None:
                entries.append(f"m::{mask}")
        subprocess.run(["setfacl", "--set", ",".join(entries), path], check=True, capture_output=True)
        has_acl = True
        try:
            os.getxattr(path, ACL_XATTR)
        except OSError:
            has_acl = False  # a minimal ACL is stored as the mode alone
        assert has_acl == bool(named_users or named_groups)
        st_ = os.lstat(path)
        for uid, gid, groups in PEERS:
            expected = run_as(Credentials(uid, gid, groups), can_open, path)
            got = readable_by(peer_of(uid, gid, groups), path, st_)
            assert got == expected, (uid, gid, groups, entries, oct(stat.S_IMODE(st_.st_mode)))
    finally:
        os.unlink(path)


def test_parse_acl(directory):
    """Malformed values are refused with BadAcl, which readable_by treats as no access
    (the kernel validates what it stores, so they cannot be put on a real node)."""
    for data in (b"", b"\x02\x00\x00", b"\x01\x00\x00\x00", b"\x02\x00\x00\x00" + b"\x01\x00\x04\x00"):
        with pytest.raises(BadAcl):
            parse_acl(data)
    # A well-formed one round-trips through the kernel's own encoding.
    path = os.path.join(directory, "parsed")
    with open(path, "w"):
        pass
    try:
        subprocess.run(["setfacl", "--set", "u::r,u:1000:r,g::-,m::r,o::-", path], check=True)
        assert parse_acl(os.getxattr(path, ACL_XATTR)) == [
            (0x01, 4, 0xFFFFFFFF), (0x02, 4, 1000), (0x04, 0, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)]
    finally:
        os.unlink(path)
