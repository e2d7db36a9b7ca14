"""The credential helper process: the key operations it may perform, and its main.

Started by ``wqd.sources.helper_pool.Helper`` (``python -I -S``, this module only,
no asyncio: it starts fast even on a slow machine). See that module for the design.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import os
import pickle
import signal
import socket

from wqd.kernel import errors as kerr
from wqd.kernel import inotify, keyctl
from wqd.kernel.credentials import FRAME
from wqd.parse.proc_keys import KeySnapshot, parse_proc_keys

_LEN = FRAME  # one framing, wqd.kernel.credentials's
READY = 0  # the message number of the helper's "ready" (after it took the credentials)


def op_resolve(spec: str, uid: int) -> int:
    """``@u``, ``@us`` or ``@p`` of *uid*, which the helper acts as (fs ids).

    ``@p``: ``KEYCTL_GET_PERSISTENT`` takes the uid (root may name any). ``@u``/
    ``@us``: looked up in the kernel's register of user keyrings (``.user_reg``,
    root may read it; only the kernel links into it, and userspace may not name a
    keyring with a leading dot), where ``_uid.N``/``_uid_ses.N`` owned by *uid* is
    the one. Only if it does not exist yet is it made by the kernel's own lookup,
    which reads the *real* uid (``_RealUid``): the one moment the peer can reach
    the helper.
    """
    if spec == "@p":
        serial = keyctl.get_persistent(uid, keyctl.KEY_SPEC_PROCESS_KEYRING)
        try:  # linked there by the kernel: do not keep possessing it
            keyctl.unlink(serial, keyctl.KEY_SPEC_PROCESS_KEYRING)
        except kerr.KernelError:
            pass
        return serial
    name = ("_uid." if spec == "@u" else "_uid_ses.") + str(uid)
    found = _registered_user_keyring(name, uid)
    if found is not None:
        return found
    raise _NeedRealUid


class _NeedRealUid(Exception):
    pass


def op_create_user_keyring(spec: str) -> int:
    special = {"@u": keyctl.KEY_SPEC_USER_KEYRING, "@us": keyctl.KEY_SPEC_USER_SESSION_KEYRING}[spec]
    return keyctl.get_keyring_id(special, True)


def _registered_user_keyring(name: str, uid: int) -> int | None:
    fsuid = _libc.setfsuid(0)  # the register grants root (its owner) View and Read
    try:
        reg = None
        try:
            with open("/proc/keys") as f:
                for line in f:
                    parts = line.split(None, 8)
                    if len(parts) == 9 and parts[7] == "keyring" and parts[5] == "0" \
                            and parts[8].startswith(".user_reg:"):
                        reg = int(parts[0], 16)
                        break
        except OSError:
            return None
        if reg is None:
            return None
        try:
            members = keyctl.read_keyring_serials(reg)
        except kerr.KernelError:
            return None
    finally:
        _libc.setfsuid(fsuid)
    for serial in members:
        try:
            desc = keyctl.describe(serial)  # with the peer's fs ids: only its own are visible
        except kerr.KernelError:
            continue
        if desc.type == "keyring" and desc.description == name and desc.uid == uid:
            return serial
    return None


def op_describe(serial: int) -> tuple[keyctl.KeyDescription, str | None]:
    """KEYCTL_DESCRIBE plus the key's /proc/keys flags (None if not listed there)."""
    desc = keyctl.describe(serial)
    try:
        with open("/proc/keys") as f:
            entry = parse_proc_keys(f.read()).get(serial)
    except OSError:
        entry = None
    return desc, entry.flags if entry else None


def op_exists(serial: int) -> bool:
    """False if the key is gone (ENOKEY, expired); other errors say nothing."""
    try:
        keyctl.describe(serial)
    except (kerr.NoSuchKey, kerr.KeyExpired):
        return False
    except kerr.KernelError:
        pass
    return True


def op_snapshot(serials: list[int]) -> dict[int, KeySnapshot]:
    """What the helper's credentials can see of each key now."""
    try:
        with open("/proc/keys") as f:
            proc = parse_proc_keys(f.read())
    except OSError:
        proc = {}
    out = {}
    for serial in serials:
        try:
            desc = keyctl.describe(serial)
        except kerr.KeyRevoked:
            entry = proc.get(serial)
            out[serial] = KeySnapshot(True, entry.flags if entry else "IR", *(
                (entry.perm, entry.uid, entry.gid) if entry else (0, 0, 0)))
            continue
        except kerr.KernelError:
            out[serial] = KeySnapshot(False)
            continue
        entry = proc.get(serial)
        members = digest = None
        try:
            payload = keyctl.read(serial)
            if desc.type == "keyring":
                members = tuple(keyctl.read_keyring_serials(serial))
            else:
                digest = hashlib.blake2b(payload, digest_size=16).digest()
        except kerr.KernelError:
            pass
        out[serial] = KeySnapshot(True, entry.flags if entry else "I", desc.perm, desc.uid, desc.gid, members, digest)
    return out


def op_watch_key(serial: int, fd: int, tag: int) -> None:
    keyctl.watch_key(serial, fd, tag)


def op_krb5_read(binding_dir: str, krb5_config: str | None, name: str, path: str | None) -> dict:
    """Read Kerberos cache *name* (``wqd.krb5cache.read_cache``) with the peer's
    identity: ``{"state": dict or None}``, or ``{"error": "denied"|"failed",
    "message", "code"}`` (plain data: nothing of the peer's making is unpickled).

    The fs ids alone do not make the peer here: sssd-kcm decides by the
    ``SO_PEERCRED`` of the socket, which records the *effective* uid and gid at
    ``connect()``, and ``keyctl_get_persistent`` lets an effective root name any
    uid. So for the read the effective ids are the peer's too (``_EffectiveIds``;
    real and saved stay 0, so the peer still cannot signal the helper). *path*,
    for ``FILE:``/``DIR:``, is stat()ed first as the peer: a directory it may not
    search is "denied", not an empty cache. The binding (pykrb5) is not on this
    ``python -I -S`` process's path: *binding_dir*, the root-owned directory that
    holds the daemon's ``krb5`` package, is added (the daemon checks its owner)
    and imported from with the daemon's fs ids (the peer may not read it).
    """
    if krb5_config is None:
        os.environ.pop("KRB5_CONFIG", None)
    else:
        os.environ["KRB5_CONFIG"] = krb5_config
    krb5cache = _import_binding(binding_dir)

    name, path = host_relative(name), None if path is None else path.lstrip("/") or "."
    with _EffectiveIds():
        try:
            if path is not None:
                try:
                    os.stat(path)
                except FileNotFoundError:
                    pass
                except PermissionError as exc:
                    return {"error": "denied", "message": f"{name}: {exc.strerror}", "code": exc.errno}
            state = krb5cache.read_cache(name)
        except krb5cache.CacheAccessDenied as exc:
            return {"error": "denied", "message": str(exc), "code": exc.code}
        except krb5cache.CacheError as exc:
            return {"error": "failed", "message": str(exc), "code": exc.code}
    if state is not None:
        state = dataclasses.replace(state, name=host_absolute(state.name))
    return {"state": None if state is None else dataclasses.asdict(state)}


def _import_binding(binding_dir: str):
    """``wqd.krb5cache`` with the krb5 binding from *binding_dir* (root's), imported
    with the daemon's fs ids (the peer may not read a 0700 venv). Done at start by
    the credentials source's helpers (``HelperPool(preload=)``): under a slow
    machine the import must not eat the first read's deadline."""
    import sys
    if binding_dir and binding_dir not in sys.path:
        sys.path.append(binding_dir)
    fsuid, fsgid = _libc.setfsuid(0), _libc.setfsgid(0)  # the daemon's files, read as the daemon
    try:
        from wqd import krb5cache
        krb5cache._require_binding()  # imports krb5: only now is it on the path
    finally:
        _libc.setfsgid(fsgid)
        _libc.setfsuid(fsuid)
    return krb5cache


def _path_name(name: str) -> tuple[str, str, str] | None:
    """``(type, ":" or "", path)`` of a ``FILE:``/``DIR:`` name (``DIR::p``
    names one cache of a collection), None for other types."""
    kind, sep, residual = name.partition(":")
    if kind.upper() not in ("FILE", "DIR") or not sep:
        return None
    colon = ":" if residual.startswith(":") else ""
    return kind, colon, residual[len(colon):]


def host_relative(name: str) -> str:
    """A ``FILE:``/``DIR:`` cache name with its path relative (``FILE:tmp/x``,
    ``DIR::run/user/1000/krb5cc/tkt``): looked up from the helper's working
    directory, the host's root, not from wqd's own (under its unit another
    namespace: its /tmp is PrivateTmp='s, /home and /run/user are hidden).
    Other types unchanged."""
    parts = _path_name(name)
    if parts is None:
        return name
    kind, colon, path = parts
    return f"{kind}:{colon}{path.lstrip('/') or '.'}"


def host_absolute(name: str) -> str:
    """``host_relative`` undone: the name as the peer knows it."""
    parts = _path_name(name)
    if parts is None or parts[2].startswith("/"):
        return name
    kind, colon, path = parts
    return f"{kind}:{colon}/{path}"


def op_inotify_add(fd: int, path: str, mask: int) -> int:
    """``inotify_add_watch`` on the daemon's inotify *fd* (passed to the helper at
    start), with the peer's fs ids: the kernel checks the peer's read permission
    on the directory (and search on the way), and the path (relative: the host's,
    see ``host_relative``) is the peer's view. The watch descriptor is the
    daemon's: events are read, and the watch removed, by the daemon."""
    return inotify.add_watch(fd, path.lstrip("/") or ".", mask)


def op_krb5_keyring_keys(uid: int) -> list[int]:
    """The keys a ``KEYRING:persistent:UID`` collection is made of, as the peer
    sees them: the persistent keyring, its ``_krb`` collection keyring and what
    ``_krb`` holds (each cache's keyring, the ``krb_ccache:primary`` key).
    Watching these (the ``keys`` source's backends) sees every kinit, kinit -R,
    kswitch and kdestroy. With the effective uid the peer's, as for the read:
    ``keyctl_get_persistent`` of another uid is then the kernel's EPERM."""
    out = []
    with _EffectiveIds():
        persistent = keyctl.get_persistent(uid, keyctl.KEY_SPEC_PROCESS_KEYRING)
        out.append(persistent)
        for serial in keyctl.read_keyring_serials(persistent):
            try:
                desc = keyctl.describe(serial)
            except kerr.KernelError:
                continue
            if desc.type == "keyring" and desc.description == "_krb":
                out.append(serial)
                out += keyctl.read_keyring_serials(serial)
                break
    return out


class _EffectiveIds:
    """The effective gid and uid are the fs ones (the peer's) for the body, then 0
    again (set back in that order: egid first while euid is 0, euid last).
    setres[ug]id(2) also resets the fs ids to the effective ones: they are set
    again after. For the daemon's own helper (fsuid 0) nothing changes."""

    def __enter__(self):
        self.uid, self.gid = _libc.setfsuid(-1), _libc.setfsgid(-1)  # -1: read, not set
        if self.uid != 0:
            os.setresgid(-1, self.gid, -1)
            os.setresuid(-1, self.uid, -1)
        return self

    def __exit__(self, *exc):
        if self.uid != 0:
            os.setresuid(-1, 0, -1)
            os.setresgid(-1, 0, -1)
            _libc.setfsgid(self.gid)
            _libc.setfsuid(self.uid)
            if _libc.setfsuid(-1) != self.uid or os.geteuid() != 0:
                os._exit(70)  # never serve the next call with the wrong identity
        return False


OPS = {"resolve": op_resolve, "describe": op_describe, "exists": op_exists,
       "snapshot": op_snapshot, "watch_key": op_watch_key, "krb5_read": op_krb5_read,
       "krb5_keyring_keys": op_krb5_keyring_keys, "inotify_add": op_inotify_add}


_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
KEYCTL_JOIN_SESSION_KEYRING = 1


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _status_uids() -> list[int]:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return [int(x) for x in line.split()[1:]]
    return []


def _drop_to(uid: int, gid: int, groups: tuple[int, ...]) -> None:
    """Take the peer's ids only where key permission checks read them (fs ids, groups)."""
    os.setgroups(list(groups))
    _libc.setfsgid(gid)
    _libc.setfsuid(uid)
    if _libc.setfsuid(-1) != uid:  # setfsuid returns the previous fsuid
        raise OSError(errno.EPERM, "setfsuid did not take")
    if _status_uids() != [0, 0, 0, uid]:
        raise OSError(errno.EPERM, f"unexpected uids {_status_uids()}")


class _RealUid:
    """The real uid is the peer's for the body only; then everything it let the peer
    touch (nice value, policy, CPU mask) is put back. setresuid(2) also resets the
    fsuid to the effective uid: it is set again."""

    def __init__(self, uid: int) -> None:
        self.uid = uid

    def __enter__(self):
        self.nice = os.getpriority(os.PRIO_PROCESS, 0)
        self.policy = os.sched_getscheduler(0)
        self.param = os.sched_getparam(0)
        self.cpus = os.sched_getaffinity(0)
        os.setresuid(self.uid, -1, -1)

    def __exit__(self, *exc):
        os.setresuid(0, -1, -1)
        _libc.setfsuid(self.uid)
        for fix in (lambda: os.setpriority(os.PRIO_PROCESS, 0, self.nice),
                    lambda: os.sched_setscheduler(0, self.policy, self.param),
                    lambda: os.sched_setaffinity(0, self.cpus)):
            try:
                fix()
            except OSError:
                pass
        return False


def helper_main(argv: list[str]) -> None:  # pragma: no cover - runs in the helper process
    """``fd uid gid groups|- self|peer [rootfd [bindingdir|-]]``: serve requests until the socket
    closes. *rootfd* (>= 0): the host's root directory (``HelperPool(root_fd=)``),
    made the working directory before the peer's ids are taken, so that the
    relative paths of ``krb5_read`` and ``inotify_add`` are the host's.
    *bindingdir*: the krb5 binding's directory, imported before "ready"
    (``HelperPool(preload=)``)."""
    fd, uid, gid, groups, mode = int(argv[0]), int(argv[1]), int(argv[2]), argv[3], argv[4]
    root_fd = int(argv[5]) if len(argv) > 5 else -1
    preload = argv[6] if len(argv) > 6 and argv[6] != "-" else ""
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD):
            try:
                signal.signal(sig, signal.SIG_IGN)
            except (OSError, ValueError):
                pass
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(0)
    sock = socket.socket(fileno=fd)
    if root_fd >= 0:
        os.fchdir(root_fd)
        os.close(root_fd)
    peer = mode == "peer"
    if peer:
        # A fresh anonymous session keyring: possess nothing of the daemon's.
        keyctl.keyctl(KEYCTL_JOIN_SESSION_KEYRING, 0)
        keyctl.get_keyring_id(keyctl.KEY_SPEC_PROCESS_KEYRING, True)  # root's, made before dropping
        _drop_to(uid, gid, tuple(int(g) for g in groups.split(",")) if groups != "-" else ())
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    if preload:
        try:
            _import_binding(preload)
        except ImportError:
            pass  # the read says so, as it would without the preload
    ready = pickle.dumps((READY, True, os.getpid()))
    sock.sendall(_LEN.pack(len(ready)) + ready)
    while True:
        try:
            (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
            number, op, args = pickle.loads(_recv_exact(sock, n))
        except EOFError:
            os._exit(0)
        try:
            if op == "resolve":
                args = (args[0], uid)  # the helper's uid, whatever was asked
            try:
                result = (True, OPS[op](*args))
            except _NeedRealUid:
                if peer:
                    with _RealUid(uid):
                        result = (True, op_create_user_keyring(args[0]))
                else:
                    result = (True, op_create_user_keyring(args[0]))
        except OSError as exc:
            result = (False, exc)
        except Exception as exc:  # noqa: BLE001 - carried to the daemon, as text
            result = (False, RuntimeError(repr(exc)))
        data = pickle.dumps((number, *result))
        sock.sendall(_LEN.pack(len(data)) + data)
