"""``KEYRING:persistent:UID`` caches, woken through the ``keys`` source's own
machinery: a ``KeysSource`` of the credentials source's own (its backend from
``[keys]``: the notification pipe where the kernel has watch queues, else the
``proc-keys`` poller, which polls: ``Sources`` says which), with this object as
its sink.

A keyring collection is several keys (``op_krb5_keyring_keys``): the uid's
persistent keyring, ``_krb`` in it, and in ``_krb`` each cache's keyring and
the ``krb_ccache:primary`` key. kinit links a cache keyring into ``_krb`` and
updates the primary key, kinit -R clears and refills a cache keyring, kswitch
updates the primary key, kdestroy unlinks. A watch on one key does not see into
the keys it holds, so each is watched (as the peer, by the keys source's
helpers, which the kernel's View check judges) and the set is brought up to
date after every change: a new cache keyring is watched from the read that
found it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

from wqd.errors import AccessDenied, NotSupported, WqdError
from wqd.events import Event, KeyChanged, SourceLoss, TargetGone
from wqd.kernel import errors as kerr
from wqd.sources.keys import peer_credentials
from wqd.subscription import Subscription

log = logging.getLogger(__name__)


class KeyringCaches:
    """The key watches of every watched ``KEYRING:`` cache: *keys* is the
    KeysSource, *wake(watch)* asks the credentials source to re-read a cache."""

    def __init__(self, keys, wake: Callable[[object], None]) -> None:
        self.keys = keys
        self.wake = wake
        self.outer = None  # the hub: its back-pressure is ours
        self.subs: dict[object, dict[int, Subscription]] = {}  # CacheWatch -> serial -> its key subscription
        self.numbers = itertools.count(1)

    @property
    def backend(self) -> str:
        return self.keys.backend

    async def start(self, sink) -> None:
        self.outer = sink
        await self.keys.start(self)

    async def stop(self) -> None:
        for watch in list(self.subs):
            self.forget(watch)
        await self.keys.stop()

    # -- the sink of the KeysSource --------------------------------------

    def dispatch(self, event: Event) -> None:
        if isinstance(event, SourceLoss):  # the keys backend lost records: re-read them all
            woken = list(self.subs)
        else:
            serial = event.key if isinstance(event, KeyChanged) else getattr(event, "target", None)
            woken = [w for w, subs in self.subs.items() if serial in subs]
        if isinstance(event, TargetGone):  # a key gone (kdestroy): its watch with it
            for watch in woken:
                sub = self.subs[watch].pop(event.target, None)
                if sub is not None:
                    self.keys.detach(sub)
        for watch in woken:
            self.wake(watch)

    @property
    def congested(self) -> bool:
        return self.outer.congested

    def on_relief(self, callback) -> None:
        self.outer.on_relief(callback)

    def preload(self, sub, events) -> int:
        return 0

    # -- the keys of one cache -------------------------------------------

    async def refresh(self, watch, peer, uid: int) -> None:
        """Watch exactly the keys *watch*'s collection is made of now (as *peer*).
        Raises WqdError (AccessDenied: not the peer's keyring)."""
        try:
            serials = set(await self.keys.run(peer_credentials(peer), "krb5_keyring_keys", uid))
        except kerr.PermissionDenied:
            raise AccessDenied("the persistent keyring of another uid") from None
        except kerr.KernelError as exc:
            raise NotSupported(f"cannot reach the persistent keyring: {exc.strerror}") from None
        subs = self.subs.setdefault(watch, {})
        for serial in list(subs):
            if serial not in serials:
                self.keys.detach(subs.pop(serial))
        for serial in sorted(serials - set(subs)):
            try:
                target = await self.keys.resolve(peer, str(serial), {})
                sub = Subscription(next(self.numbers), peer, self.keys.name, target)
                await self.keys.attach(sub)
            except WqdError as exc:  # gone meanwhile (a kdestroy racing): the next read says so
                log.debug("KEYRING: key %d not watched: %s", serial, exc)
                continue
            if self.subs.get(watch) is not subs:  # forgotten while arming
                self.keys.detach(sub)
                return
            subs[serial] = sub

    def forget(self, watch) -> None:
        for sub in self.subs.pop(watch, {}).values():
            self.keys.detach(sub)
