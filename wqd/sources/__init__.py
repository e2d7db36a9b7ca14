"""Event sources: kernel fds driven by the event loop, parsed by sans-I/O parsers.

A source turns ``Watch(source, target, options)`` into kernel watches (refcounted
across subscriptions) and kernel records into ``Event``\\ s, which it hands to the
hub (its ``Sink``). It never knows about D-Bus.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Protocol

from wqd.events import Event, WatchTarget
from wqd.peer import PeerCredentials

if TYPE_CHECKING:
    from wqd.hub import Subscription

class Sink(Protocol):
    """Where a source delivers: the hub."""

    def dispatch(self, event: Event) -> None: ...

    @property
    def congested(self) -> bool:
        """Subscriber queues are filling: stop reading the kernel until relief."""

    def preload(self, sub: Subscription, events) -> int:
        """Queue *events* (an initial snapshot) for *sub* alone, ahead of live ones."""

    def on_relief(self, callback: Callable[[], None]) -> None:
        """Call *callback* once, when no longer congested."""


class Source(Protocol):
    name: str
    backend: str  # "" when the source cannot run here

    async def start(self, sink: Sink) -> None: ...

    async def stop(self) -> None: ...

    async def resolve(self, peer: PeerCredentials, spec: str, options: dict) -> WatchTarget:
        """Validate and resolve a target; raise InvalidArgument / NotSupported / AccessDenied."""

    def routes(self, sub: Subscription) -> Iterable[Hashable]:
        """The event routes *sub* listens on (see ``Event.route``); ``ANY`` for all."""

    def attach(self, sub: Subscription) -> None:
        """Arm what *sub* needs in the kernel (refcounted). May raise WqdError."""

    def detach(self, sub: Subscription) -> None: ...

    def accepts(self, sub: Subscription, event: Event) -> bool:
        """Per-subscription filter (options such as ``changes``)."""

    # Optional: ``shape(sub, event) -> Event``, per-subscription trimming applied
    # after policy (devices: the ``properties`` option).


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY = _Any()


def read_settings(section: str, conf: dict, schema: dict) -> dict:
    """A source's ``[section]`` table checked against *schema* (key -> (types,
    default, check, what the check wants)): every key, defaults filled in.
    Raises ValueError naming ``section.key``; used when the source opens and by
    ``wqd --check-config``."""
    unknown = sorted(set(conf) - set(schema))
    if unknown:
        raise ValueError(f"unknown setting {section}.{unknown[0]}")
    settings = {}
    for key, (types, default, check, want) in schema.items():
        value = conf.get(key, default)
        if isinstance(value, bool) or not isinstance(value, types) or not check(value):
            raise ValueError(f"{section}.{key} must be {want}, not {value!r}")
        settings[key] = value
    return settings


def string_list_option(options: dict, key: str, allowed: Iterable[str] | None = None) -> frozenset[str] | None:
    """Read an ``as`` option; ``None`` when absent. Raises InvalidArgument."""
    from wqd.errors import InvalidArgument

    if key not in options:
        return None
    value = options[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"option {key!r} must be an array of strings (as)")
    values = frozenset(value)
    if allowed is not None:
        unknown = values - frozenset(allowed)
        if unknown:
            raise InvalidArgument(f"option {key!r}: unknown value(s) {', '.join(sorted(unknown))}")
    return values
