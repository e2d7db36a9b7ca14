"""The contract between the hub and the sources: ``Subscription``, ``Source``,
the sink protocol (``Sink``, what the hub is to a source) and ``ANY``.

``wqd.hub`` and ``wqd.sources`` both import this module and never each other
(docs/architecture.md, "Layers"). It knows nothing of D-Bus.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import KW_ONLY, dataclass, field
from typing import Protocol

from wqd.events import Event, WatchTarget
from wqd.peer import PeerCredentials


@dataclass(eq=False, slots=True)
class Subscription:
    number: int
    owner: PeerCredentials
    source: str
    target: WatchTarget  # what the source made of the Watch options (they are not kept besides)
    _: KW_ONLY  # the rest by name: a stray positional argument (the options, once) fails loudly
    _queue: deque | None = field(default=None, repr=False)  # see ``queue``
    queued_events: int = 0
    delivered: int = 0
    lost: int = 0
    active: bool = True
    paused: bool = False  # the outlet waits for the peer to read before sending more (wqd.bus.emitter)
    stalled: bool = False  # ... and has waited too long: its queue no longer pauses the sources
    routes: tuple = ()
    state: dict = field(default_factory=dict)  # the source's per-subscription data
    charge: int = 0  # bytes charged to the owner's uid for the subscription itself (Hub budgets)
    options_key: tuple | None = None  # its entry in the hub's pool of option sets

    @property
    def peer(self) -> str:
        return self.owner.unique_name

    @property
    def queue(self) -> deque:
        """Made on first use: an empty deque is 760 bytes, and most subscriptions are idle."""
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        return queue


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
