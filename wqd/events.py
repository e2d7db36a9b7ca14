"""The events wqd carries from kernel to bus: plain, immutable, I/O-free."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

# Key change subtypes 0-7 (enum key_notification_subtype,
# include/uapi/linux/watch_queue.h), in order.
KEY_CHANGES = (
    "instantiated",
    "updated",
    "linked",
    "unlinked",
    "cleared",
    "revoked",
    "invalidated",
    "setattr",
)
KEY_CHANGE_SUBTYPE = {name: i for i, name in enumerate(KEY_CHANGES)}


def bus_string(text: str) -> str:
    r"""*text* (a path or mount string the kernel gave as bytes, decoded with
    ``surrogateescape``) as a string the bus can carry, reversibly: every byte
    that is not part of valid UTF-8 is written ``\ooo`` (three octal digits, as
    /proc/self/mountinfo writes its escapes) and every backslash ``\\``. Valid
    UTF-8 without a backslash, nearly every string, comes back unchanged. To
    undo: ``\\`` is a backslash, ``\ooo`` the byte ``ooo``, anything else itself.
    """
    if "\\" not in text:
        if text.isascii():
            return text
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError:
            pass
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif "\udc80" <= ch <= "\udcff":  # a byte surrogateescape could not decode
            out.append(f"\\{ord(ch) - 0xdc00:03o}")
        elif "\ud800" <= ch <= "\udfff":  # any other lone surrogate: its bytes, escaped
            out.extend(f"\\{b:03o}" for b in ch.encode("utf-8", "surrogatepass"))
        else:
            out.append(ch)
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Event:
    """Base of everything a source emits. ``route`` picks the subscriptions."""

    source: ClassVar[str] = ""
    signal: ClassVar[str] = ""
    signature: ClassVar[str] = ""

    @property
    def route(self) -> object:
        raise NotImplementedError

    def body(self) -> list:
        raise NotImplementedError

    def redact(self, **changes) -> Event:
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class KeyChanged(Event):
    source: ClassVar[str] = "keys"
    signal: ClassVar[str] = "KeyChanged"
    signature: ClassVar[str] = "usu"

    key: int
    change: str
    aux: int = 0

    @property
    def route(self) -> int:
        return self.key

    def body(self) -> list:
        return [self.key, self.change, self.aux]


@dataclass(frozen=True, slots=True)
class TargetGone(Event):
    """What a subscription watches is gone (a key removed, a filesystem unmounted):
    the subscriptions on ``target`` (the route: a key's serial, a mount's path) end
    with ``Removed(reason)``. ``object_id``, when not 0, narrows it to the
    subscriptions whose ``WatchTarget.object_id`` is that (the mount id: a path may
    name another mount by now). ``tag`` is the source's own business: the keys
    parser gives the kernel's watch tag, which names the watch when the removal
    record carried no key id (``target`` 0); the hub ignores it."""

    source_name: str
    target: Hashable
    reason: str
    object_id: int = 0
    tag: int = 0

    @property
    def route(self) -> Hashable:
        return self.target


@dataclass(frozen=True, slots=True)
class SourceLoss(Event):
    """A source lost events (kernel loss record, ENOBUFS, FAN_Q_OVERFLOW).

    ``routes`` names the affected routes; ``None`` means every subscription of the
    source. ``count`` is what the kernel says was lost, or 1 when it does not say.
    """

    source_name: str
    count: int = 1
    routes: frozenset | None = None

    @property
    def route(self) -> object:
        return None


@dataclass(frozen=True, slots=True)
class DeviceChanged(Event):
    source: ClassVar[str] = "devices"
    signal: ClassVar[str] = "DeviceChanged"
    signature: ClassVar[str] = "ssa{ss}"

    action: str
    devpath: str
    subsystem: str
    properties: dict[str, str] = field(default_factory=dict, hash=False, compare=True)

    @property
    def route(self) -> str:
        return self.subsystem

    def body(self) -> list:
        return [self.action, self.devpath, self.properties]


@dataclass(frozen=True, slots=True)
class MountChanged(Event):
    source: ClassVar[str] = "mounts"
    signal: ClassVar[str] = "MountChanged"
    signature: ClassVar[str] = "stsa{ss}"

    action: str
    mount_id: int
    mount_point: str
    info: dict[str, str] = field(default_factory=dict, hash=False, compare=True)
    mnt_ns: int = 0

    @property
    def route(self) -> int:
        return self.mnt_ns

    def body(self) -> list:
        # what goes on the bus: mount strings escaped (bus_string), the event itself as the kernel said
        return [self.action, self.mount_id, bus_string(self.mount_point),
                {bus_string(k): bus_string(v) for k, v in self.info.items()}]


@dataclass(frozen=True, slots=True)
class FilesystemError(Event):
    source: ClassVar[str] = "fs-errors"
    signal: ClassVar[str] = "FilesystemError"
    signature: ClassVar[str] = "siu"

    mount_point: str
    error: int
    count: int

    @property
    def route(self) -> str:
        return self.mount_point

    def body(self) -> list:
        return [bus_string(self.mount_point), self.error, self.count]


@dataclass(frozen=True, slots=True)
class Typed:
    """A value with its D-Bus signature: what an ``a{sv}`` argument holds, without
    this layer importing D-Bus (``wqd.bus.signals`` writes it as a ``v``, as it
    writes dbus-fast's ``Variant``, which has the same two attributes)."""

    signature: str
    value: object


@dataclass(frozen=True, slots=True)
class CredentialsChanged(Event):
    """A watched Kerberos cache changed (``wqd.krb5cache.classify``, or
    ``expiring``). ``principal``/``expires``/``renew_until`` describe the TGT now,
    or for ``destroyed`` the one that was destroyed. Routed by (uid, cache,
    reader): the same name read by two uids is two caches (KCM:, a relative
    default), and read by one uid with two group lists two reads (``reader``:
    ``wqd.sources.credentials.reader_of``)."""

    source: ClassVar[str] = "credentials"
    signal: ClassVar[str] = "CredentialsChanged"
    signature: ClassVar[str] = "ssa{sv}"

    cache: str
    change: str
    principal: str
    expires: int
    renew_until: int
    uid: int
    reader: tuple = ()

    @property
    def route(self) -> tuple[int, str, tuple]:
        return (self.uid, self.cache, self.reader)

    def body(self) -> list:
        return [bus_string(self.cache), self.change,
                {"principal": Typed("s", bus_string(self.principal)), "expires": Typed("t", self.expires),
                 "renew_until": Typed("t", self.renew_until)}]


@dataclass(frozen=True, slots=True)
class WatchTarget:
    """What a ``Watch`` call asks for, resolved by the source for policy to judge.

    ``spec`` is the normalised target string. ``object_id`` identifies the kernel
    object (key serial, mount namespace inode); ``uid``/``gid``/``perm`` are its
    owner and permission word where it has them (key perm, device node mode).
    """

    source: str
    spec: str
    object_id: int = 0
    uid: int | None = None
    gid: int | None = None
    perm: int | None = None

    def details(self) -> dict:
        """What the source resolved beyond the fields above, by name: the hub pools
        equal option sets and charges their size (``wqd.hub``). Nothing for a plain
        target; a source's own target (``TypedTarget``) has its fields."""
        return {}

    def share(self, pooled: dict) -> None:
        """Hold the hub's pooled copies of equal details instead of this call's."""


_COMMON = ("source", "spec", "object_id", "uid", "gid", "perm")


@dataclass(frozen=True, slots=True)
class TypedTarget(WatchTarget):
    """Base of a source's own target dataclass (``KeyTarget``, ``DeviceTarget``,
    ``MountTarget``, ``FsErrorTarget``): its fields beyond ``WatchTarget``'s are its
    details, typed."""

    def details(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _COMMON}

    def share(self, pooled: dict) -> None:
        for name, value in pooled.items():
            object.__setattr__(self, name, value)  # frozen: an equal value, the pool's copy
