"""Kerberos credential caches: what one holds, and how it changed.

The groundwork of the ``credentials`` source (docs/credentials.md). Pure of
D-Bus and asyncio, at the level of ``wqd/parse``: every function here is a plain,
blocking call whose result is a frozen dataclass of ``str``/``int`` (picklable,
and turned into a plain dict by ``dataclasses.asdict``), so that the daemon's
credential helper can run it **as the peer** and hand the result back:

- ``KCM:``: sssd-kcm decides by the socket peer's uid (``SO_PEERCRED``); a read
  by root sees root's caches, not the peer's.
- ``FILE:``/``DIR:``: file permissions decide (the cache is 0600).
- ``KEYRING:``: the kernel's key permissions and ``keyctl_get_persistent``'s
  uid check decide.

Reading uses MIT Kerberos through pykrb5 (the ``krb5`` package on PyPI, the
``credentials`` extra): ``cc_resolve``, ``cc_get_principal`` and the cache's
credential iterator. Resolving a collection name (``DIR:dir``,
``KEYRING:persistent:UID``, ``KCM:``) gives its primary cache, which is what
``read_cache`` reads; ``collection`` lists all of its caches.

``default_ccache_name(uid)`` is the one thing the library cannot do for a uid
other than the calling process's (MIT expands ``%{uid}`` with ``geteuid()`` and
lets ``KRB5CCNAME`` win); it reads ``[libdefaults] default_ccache_name`` from the
profile files itself, the one relation it needs (see its docstring).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import importlib.util
import os
import pwd
import re
from collections.abc import Iterable, Sequence

# The binding (pykrb5, the `credentials` extra; without it the source is
# unavailable) is imported by the first read (``_require_binding``), not here: the
# daemon never reads a cache itself (its credential helpers do, as the peer), and
# the import is ~0.8 s of the daemon's start under TCG (tests/system/README "Times").
krb5 = None

__all__ = [
    "AVAILABLE",
    "CHANGES",
    "CacheAccessDenied",
    "CacheError",
    "CacheState",
    "CollectionState",
    "MIT_DEFAULT_CCACHE_NAME",
    "classify",
    "collection",
    "default_ccache_name",
    "read_cache",
]

AVAILABLE = importlib.util.find_spec("krb5") is not None

#: The values of ``CredentialsChanged``'s ``change`` argument that a diff of two
#: cache states can give (``expiring`` comes from a timer, not from a diff).
CHANGES = ("created", "destroyed", "refreshed", "renewed", "switched")

#: MIT's compiled-in default when krb5.conf sets no default_ccache_name
#: (``DEFCCNAME`` in MIT's ``osconf.h``; Debian does not override it).
MIT_DEFAULT_CCACHE_NAME = "FILE:/tmp/krb5cc_%{uid}"

# MIT error codes (krb5_err.et, k5e1_err.et, as compiled into com_err tables):
# "the cache is not there", as opposed to "you may not read it".
_KRB5_FCC_NOFILE = -1765328189  # No credentials cache found
_KRB5_CC_NOTFOUND = -1765328243  # Matching credential not found
_KRB5_CC_END = -1765328242  # End of credential cache reached
_KRB5_FCC_PERM = -1765328190  # Credentials cache permissions incorrect
_KRB5_KCC_INVALID_UID = -1750600185  # Invalid UID in persistent keyring name
_ABSENT = {_KRB5_FCC_NOFILE, _KRB5_CC_NOTFOUND, _KRB5_CC_END, errno.ENOENT}
_DENIED = {_KRB5_FCC_PERM, _KRB5_KCC_INVALID_UID, errno.EACCES, errno.EPERM}

# Collection types: resolving the name gives the primary cache, and the name
# stays the same when the primary changes (kswitch).
_COLLECTION_TYPES = ("DIR", "KEYRING", "KCM")


class CacheError(Exception):
    """A cache could not be read for a reason other than "absent" or "denied"
    (no KCM server, a corrupt file, no binding). ``code`` is MIT's error code."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class CacheAccessDenied(CacheError, PermissionError):
    """The calling process may not read this cache (file permissions, a
    persistent keyring of another uid). KCM never says so: a cache of another
    uid is simply not found in the caller's KCM namespace."""


@dataclasses.dataclass(frozen=True, slots=True)
class CacheState:
    """One cache and its ticket-granting ticket, as read at one moment.

    ``name`` is the resolved cache, ``TYPE:residual`` (for ``DIR:d`` the
    primary ``DIR::d/tkt``; for ``KCM:`` ``KCM:UID`` or ``KCM:UID:NNN``).
    The times are Unix seconds of the TGT (``krbtgt/REALM@REALM`` of the
    principal's realm): ``authtime`` is when the password/key was last used
    (kept by a renewal), ``starttime`` when this ticket became valid,
    ``expires`` its end, ``renew_until`` its renewable end (0: not renewable).
    """

    name: str
    principal: str
    expires: int
    renew_until: int
    starttime: int
    authtime: int
    #: A digest of the TGT's (encrypted) ticket: a new ticket within the same
    #: second as the last one still differs here. Internal: never sent to a peer.
    ticket_id: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class CollectionState:
    """A cache collection: its primary cache and every cache in it that holds
    a TGT, sorted by name. ``primary`` is the primary's state (None when the
    primary is absent, empty or has no TGT)."""

    name: str
    primary: CacheState | None
    caches: tuple[CacheState, ...]


def _require_binding() -> None:
    global krb5
    if krb5 is None:
        try:
            import krb5 as binding
        except ImportError:
            raise CacheError("the krb5 binding is not installed (pip install 'wqd[credentials]'; "
                             "Debian: /usr/share/doc/wqd/README.Debian)") from None
        krb5 = binding


def _error(exc: Exception, name: str) -> CacheError:
    code = getattr(exc, "err_code", 0)
    cls = CacheAccessDenied if code in _DENIED else CacheError
    # The library's message names the cache; the cache name is the caller's own.
    return cls(f"{name}: {exc}", code)


def _full_name(ctx, cc) -> str:
    return (krb5.cc_get_type(ctx, cc) + b":" + krb5.cc_get_name(ctx, cc)).decode("utf-8", "replace")


def _state_of(ctx, cc, name: str) -> CacheState | None:
    try:
        principal = krb5.cc_get_principal(ctx, cc)
    except krb5.Krb5Error as exc:
        if exc.err_code in _ABSENT:
            return None
        raise _error(exc, name) from None
    client = principal.name.decode("utf-8", "replace")
    realm = client.rpartition("@")[2]
    tgt = f"krbtgt/{realm}@{realm}"
    try:
        # Iterated to the end, never left half-way: pykrb5's iterator ends MIT's
        # cursor (krb5_cc_end_seq_get) only when it runs out, and a FILE: cursor
        # holds the cache file open, which pins the file and its directory (a
        # removed directory then never reports IN_DELETE_SELF to a watcher).
        every = list(cc)
    except krb5.Krb5Error as exc:
        if exc.err_code in _ABSENT:  # destroyed while being read
            return None
        raise _error(exc, name) from None
    for creds in every:
        if creds.server.name.decode("utf-8", "replace") == tgt:
            t = creds.times
            return CacheState(
                name=_full_name(ctx, cc),
                principal=client,
                expires=t.endtime,
                renew_until=t.renew_till,
                starttime=t.starttime or t.authtime,
                authtime=t.authtime,
                ticket_id=hashlib.sha256(creds.ticket).hexdigest()[:32],
            )
    return None  # initialised but holding no TGT (yet): an empty cache


def read_cache(name: str) -> CacheState | None:
    """The state of cache ``name`` (for a collection name: of its primary cache),
    or None if it is absent, has no principal, or holds no TGT.

    Raises ``CacheAccessDenied`` when the calling process may not read it and
    ``CacheError`` for anything else (no KCM server, unknown type, corruption).
    Reads with the calling process's identity: run it as the peer.
    """
    _require_binding()
    ctx = krb5.init_context()
    try:
        cc = krb5.cc_resolve(ctx, name.encode())
    except krb5.Krb5Error as exc:
        if exc.err_code in _ABSENT:
            return None
        raise _error(exc, name) from None
    return _state_of(ctx, cc, name)


def _in_collection(collection_name: str, cache_name: str) -> bool:
    ctype, _, residual = collection_name.partition(":")
    ctype = ctype.upper()
    ptype, _, presidual = cache_name.partition(":")
    if ptype.upper() != ctype:
        return False
    if ctype == "KCM":
        return True  # the KCM server lists only the caller's own caches
    if ctype == "DIR":
        directory = residual[1:] if residual.startswith(":") else residual
        if residual.startswith(":"):  # DIR::path names one cache; its dir is the collection
            directory = os.path.dirname(directory)
        return os.path.dirname(presidual.lstrip(":")) == os.path.normpath(directory)
    if ctype == "KEYRING":
        # KEYRING:persistent:1000 → KEYRING:persistent:1000:<subsidiary>
        anchor = residual.split(":")[:2] if residual.startswith(("persistent:", "user:", "session:", "process:", "thread:")) else [residual]
        return presidual.split(":")[: len(anchor)] == anchor
    return False


def collection(name: str) -> CollectionState:
    """All caches of the collection ``name`` (``DIR:dir``, ``KEYRING:…``, ``KCM:``)
    that hold a TGT, and its primary. For a ``FILE:`` name the collection is
    that one cache. Same identity rules and errors as ``read_cache``."""
    _require_binding()
    ctx = krb5.init_context()
    ctype = name.partition(":")[0].upper()
    primary = read_cache(name)
    if ctype not in _COLLECTION_TYPES:
        return CollectionState(name, primary, (primary,) if primary else ())
    # MIT iterates the collection of the context's default cache first: make
    # the watched collection the default of this context (not of the process).
    krb5.cc_set_default_name(ctx, name.encode())
    states: dict[str, CacheState] = {}
    try:
        for cc in krb5.cccol_iter(ctx):
            full = _full_name(ctx, cc)
            if not _in_collection(name, full):
                continue
            state = _state_of(ctx, cc, full)
            if state is not None:
                states[state.name] = state
    except krb5.Krb5Error as exc:
        if exc.err_code not in _ABSENT:
            raise _error(exc, name) from None
    return CollectionState(name, primary, tuple(states[k] for k in sorted(states)))


def classify(old: CacheState | None, new: CacheState | None) -> str | None:
    """How the cache a watch stands for changed between two reads, or None if
    it did not change in a way a subscriber is told about:

    - ``created``: there was no TGT, now there is one.
    - ``destroyed``: there was a TGT, now there is none (kdestroy, or the cache
      emptied/removed; for a collection: its primary is gone).
    - ``switched``: the TGT now belongs to another cache of the collection
      (kswitch, or kinit of another principal into a collection) or to another
      principal (kinit of another principal into the same ``FILE:`` cache).
    - ``refreshed``: same cache and principal, a new initial ticket: ``authtime``
      changed (kinit with the password or a keytab again).
    - ``renewed``: same cache, principal and ``authtime``, another ticket: a
      later ``expires``/``starttime`` (kinit -R: the KDC keeps authtime and
      renew_until and gives a new starttime and endtime; it keeps the
      ``initial`` flag too, so flags cannot tell the two apart), or the same
      times with another ``ticket_id`` (a renewal within the same second).
      Times have one-second resolution: a kinit within the same second as the
      previous one also looks like this.
    """
    if old is None and new is None:
        return None
    if old is None:
        return "created"
    if new is None:
        return "destroyed"
    if old.name != new.name or old.principal != new.principal:
        return "switched"
    if old.authtime != new.authtime:
        return "refreshed"
    if (new.expires, new.starttime, new.ticket_id) != (old.expires, old.starttime, old.ticket_id):
        return "renewed"
    return None


# --- default_ccache_name ---------------------------------------------------------

_SECTION = re.compile(r"^\[(?P<name>[^\]]+)\](?P<final>\*)?\s*$")
_RELATION = re.compile(r"^(?P<key>[^=\s]+)\s*=\s*(?P<value>.*?)(?P<final>\*)?\s*$")
_TOKEN = re.compile(r"%\{([^}]*)\}")


def _profile_files(files: Sequence[str] | None) -> list[str]:
    if files is not None:
        return list(files)
    # MIT: KRB5_CONFIG is a colon-separated list that replaces the default.
    return os.environ.get("KRB5_CONFIG", "/etc/krb5.conf").split(":")


def _profile_lines(path: str, depth: int = 0) -> Iterable[str]:
    if depth > 8:  # include loops
        return
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return  # MIT skips profile files that cannot be opened
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("include ") or stripped.startswith("include\t"):
            yield from _profile_lines(stripped[len("include"):].strip(), depth + 1)
        elif stripped.startswith("includedir"):
            directory = stripped[len("includedir"):].strip()
            try:
                names = sorted(os.listdir(directory))
            except OSError:
                continue
            # MIT: names of letters, digits, '-', '_' (or ending in .conf) only.
            for n in names:
                if re.fullmatch(r"[A-Za-z0-9_-]+", n) or n.endswith(".conf"):
                    yield from _profile_lines(os.path.join(directory, n), depth + 1)
        else:
            yield line


def _configured_ccache_name(files: Sequence[str]) -> str | None:
    """The first ``[libdefaults] default_ccache_name`` in profile order (MIT's
    profile_get_string returns the first value found; a ``*`` final marker only
    stops later files, which first-wins already implies)."""
    for path in files:
        section = None
        depth = 0  # inside a { … } subsection (realm-specific libdefaults)
        for raw in _profile_lines(path):
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            m = _SECTION.match(line)
            if m:
                section, depth = m.group("name").strip(), 0
                continue
            if line.endswith("{"):
                depth += 1
                continue
            if line.startswith("}"):
                depth = max(0, depth - 1)
                continue
            if section != "libdefaults" or depth:
                continue
            m = _RELATION.match(line)
            if m and m.group("key") == "default_ccache_name":
                value = m.group("value").strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                return value
    return None


def _expand(template: str, uid: int) -> str:
    def token(m: re.Match[str]) -> str:
        t = m.group(1)
        if t in ("uid", "euid", "USERID"):
            return str(uid)
        if t == "username":
            return pwd.getpwuid(uid).pw_name
        if t == "TEMP":
            return "/tmp"  # MIT: TMPDIR of the peer's process, which wqd cannot know
        if t == "null":
            return ""
        raise ValueError(f"default_ccache_name: unsupported token %{{{t}}}")

    return _TOKEN.sub(token, template)


def default_ccache_name(uid: int, files: Sequence[str] | None = None) -> str:
    """The default cache (collection) name of ``uid``: krb5.conf's
    ``[libdefaults] default_ccache_name`` with ``%{uid}``/``%{euid}``/``%{USERID}``
    (all the uid: wqd asks for a peer, not for a setuid program),
    ``%{username}``, ``%{TEMP}`` (``/tmp``) and ``%{null}`` expanded, or MIT's
    ``FILE:/tmp/krb5cc_%{uid}`` when unset. A name without a type is ``FILE:``.

    ``files`` defaults to ``$KRB5_CONFIG`` (colon-separated) or ``/etc/krb5.conf``.
    The peer's ``KRB5CCNAME`` is its own environment, which wqd does not see:
    a client that uses one passes the name as the target.
    """
    value = _configured_ccache_name(_profile_files(files)) or MIT_DEFAULT_CCACHE_NAME
    name = _expand(value, uid)
    if not re.match(r"^[A-Za-z0-9_-]+:", name):  # MIT: a bare path is a FILE: cache
        name = "FILE:" + name
    return name
