"""The ``devices`` source: udev and kernel uevents as ``DeviceChanged`` signals.

``Watch("devices", TARGET, options)``:

- ``TARGET``: a subsystem (``usb``, ``block``, ``mem``, ...) or ``""`` for all.
- ``options``: ``"actions": as`` (any of ``add remove change move online offline
  bind unbind``); ``"properties": as`` (only these property keys are delivered;
  ``[]`` for none); ``"initial": b`` (first an ``add`` for every device of the
  target that exists, then live events).

Signal: ``DeviceChanged(action, devpath, properties)``: ``devpath`` as the kernel
names it (``/devices/virtual/mem/null``), ``properties`` the uevent's (``ACTION``,
``DEVPATH``, ``SUBSYSTEM``, ``SEQNUM``, ``DEVNAME``, ...; with the ``udev``
backend also what udev's rules added), less what the policy withholds from the
subscriber (``unix``: see ``wqd.policy.unix_devices``). Events wqd made up carry
``WQD_SYNTHETIC``: ``initial`` (the snapshot of ``"initial"``) or ``resync``
(after a loss), and no ``SEQNUM``; a notification listener can tell "was there"
from "was plugged".

One netlink monitor serves every subscription (``devices_monitor``), open only
while there are subscriptions. Backends: ``udev`` when systemd-udevd runs
(its control socket accepts), else ``uevent``; ``[devices] backend`` forces one.
With ``auto`` the choice is made again whenever the monitor opens (the first
subscription after none), so a udevd that started after wqd is used from then on.

Filtering. The union of the subscribed subsystems is pushed into the socket's
kernel filter (libudev's BPF) with the ``udev`` backend; one ``""`` subscription
means no filter at all. The filter only ever lets more through than the
subscriptions want (while it is rebuilt after an unsubscribe, and on hash
collisions): the hub routes by subsystem, so nothing extra reaches anyone. The
``uevent`` backend cannot be filtered in the kernel (see ``devices_monitor``).

Initial snapshot and loss. wqd keeps a table of the devices of the subscribed
subsystems (devpath -> properties): enumerated when a subsystem is first
subscribed (the socket is already open, so nothing falls between), then kept up
to date by the events themselves. ``"initial"`` is served from it, queued for that
subscription alone ahead of its live events (``Hub.preload``): no second
enumeration, and no event is both in the snapshot and after it. On ``ENOBUFS``
the receive buffer is doubled, every subscriber of the source gets ``Lost(n)``
(``n`` from the kernel's drop counter for the socket, ``/proc/net/netlink``; 1 if
unreadable), and once the socket is read empty the subsystems are enumerated
again and the differences with the table are delivered as synthesised ``add``,
``remove`` and ``change`` events. Drops counted after the ``ENOBUFS`` (the kernel
reports it once per overflow) are reported as a second ``Lost`` before the
resync. A datagram from the kernel or udevd that cannot be parsed counts as a
loss the same way.

Costly Watches, kept table. Opening the monitor and enumerating a subsystem (or
all of them, for ``""``) costs tens of milliseconds on the loop, and an
``"initial"`` snapshot is judged device by device. So after the last subscription
ends the monitor and its table stay open for ``LINGER`` seconds (kept up to date
by the uevents; with ``backend = "auto"`` udevd is probed again when the next
subscription comes, and the monitor reopened if the answer changed): a
Watch+Close loop is served from the kept table, without enumerating again. What
still costs (the monitor closed, a subsystem not in the table, a snapshot) is
paced per uid but root: such a Watch waits for its uid's turn, the next turn
being at least ``PACE`` seconds and ``PACE_FACTOR`` times what the last one took
away, so one uid spends at most a small share of the loop on them; a uid whose
turn is more than ``PACE_WAIT_MAX`` seconds away is answered ``LimitsExceeded``.

Back-pressure: while any subscriber's queue is more than half full the socket is
not read, so uevents wait in the kernel (``receive_buffer``, 128 MiB by default)
rather than in wqd; reading at most 64 datagrams per wakeup keeps method calls
answered during a storm.

Configuration (``[devices]``): ``backend`` = ``auto`` | ``udev`` | ``uevent``;
``receive_buffer`` = bytes of socket receive buffer to ask for (1024 .. 1 GiB;
beyond ``net.core.rmem_max`` needs ``CAP_NET_ADMIN``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from wqd.errors import InvalidArgument, LimitsExceeded, NotSupported
from wqd.events import DeviceChanged, Event, SourceLoss, TypedTarget
from wqd.kernel.netlink import RECEIVE_BUFFER_MAX
from wqd.parse.uevent import diff, synthesise
from wqd.peer import PeerCredentials
from wqd.sources import Flag, Strings, check_options, read_settings
from wqd.sources.devices_monitor import UeventMonitor, udevd_running
from wqd.subscription import ANY, Sink

log = logging.getLogger(__name__)

# The kernel's actions, lib/kobject_uevent.c kobject_actions[].
NAME = "devices"
ACTIONS = ("add", "remove", "change", "move", "online", "offline", "bind", "unbind")
OPTIONS = {"actions": Strings(ACTIONS, nonempty=True), "properties": Strings(), "initial": Flag()}  # check_options
SUBSYSTEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+-]{0,63}\Z")
PROPERTY = re.compile(r"[^=\0]{1,128}\Z")
MAX_PROPERTIES = 256
BACKENDS = ("auto", "udev", "uevent")
LINGER = 10.0  # seconds the monitor and its table stay open after the last subscription
PACE = 0.01  # seconds: least spacing of one uid's costly Watches (see the module doc)
PACE_FACTOR = 10  # ... and that many times what the uid's last one took
PACE_WAIT_MAX = 5.0  # seconds: a uid's turn further away than this is refused
DEFAULT_RECEIVE_BUFFER = 128 << 20  # as systemd-udevd asks for its own monitor
SCHEMA = {  # [devices]
    "backend": (str, "auto", lambda v: v in BACKENDS, "one of " + ", ".join(BACKENDS)),
    "receive_buffer": (int, DEFAULT_RECEIVE_BUFFER, lambda v: 1024 <= v <= RECEIVE_BUFFER_MAX,
                       f"1024..{RECEIVE_BUFFER_MAX} bytes"),
}


def parse_subsystem(spec: str) -> str | None:
    if spec == "":
        return None
    if not SUBSYSTEM.match(spec):
        raise InvalidArgument('devices target must be a subsystem name ("usb", "block", ...) or "" for all')
    return spec


@dataclass(frozen=True, slots=True)
class DeviceTarget(TypedTarget):
    """A devices target: a subsystem (``None``: all) and the Watch options."""

    subsystem: str | None = None
    actions: frozenset[str] | None = None  # None: every action
    properties: frozenset[str] | None = None  # the properties to keep (``shape``); None: all
    initial: bool = False  # an initial snapshot of the subsystem's devices first


class DevicesSource:
    name = NAME

    def __init__(self, backend: str, receive_buffer: int = DEFAULT_RECEIVE_BUFFER, auto: bool = False) -> None:
        self.backend = backend
        self.auto = auto  # probe again whenever the monitor opens
        self.receive_buffer = receive_buffer
        self.sink: Sink | None = None
        self.monitor: UeventMonitor | None = None
        self.subs: dict[str | None, set] = {}  # subsystem (None: all) -> subscriptions
        self.tracked: frozenset[str] | None = frozenset()  # subsystems in the table; None: all
        self.table: dict[str, tuple[str, dict[str, str]]] = {}  # devpath -> (subsystem, properties)
        self.resync_pending = False
        self._linger: asyncio.TimerHandle | None = None
        self._turn: dict[int, float] = {}  # uid -> when (time.monotonic) its next costly Watch may run

    async def start(self, sink: Sink) -> None:
        self.sink = sink

    async def stop(self) -> None:
        self._close()
        self.subs.clear()

    # -- Watch() ----------------------------------------------------------

    async def resolve(self, peer: PeerCredentials, spec: str, options: dict) -> DeviceTarget:
        checked = check_options(NAME, OPTIONS, options)
        actions, properties, initial = checked["actions"], checked["properties"], checked["initial"]
        if properties is not None:
            if len(properties) > MAX_PROPERTIES:
                raise InvalidArgument(f"option 'properties' may name at most {MAX_PROPERTIES} keys")
            if not all(PROPERTY.match(p) for p in properties):
                raise InvalidArgument("option 'properties': keys are 1..128 characters without '=' or NUL")
        subsystem = parse_subsystem(spec)
        if peer.uid != 0 and self._costly(subsystem, initial):
            await self._wait_turn(peer.uid)
        return DeviceTarget(NAME, spec, subsystem=subsystem, actions=actions, properties=properties, initial=initial)

    def routes(self, sub) -> Iterable[Hashable]:
        subsystem = sub.target.subsystem
        return (ANY,) if subsystem is None else (subsystem,)

    def accepts(self, sub, event: Event) -> bool:
        actions = sub.target.actions
        return actions is None or event.action in actions

    def shape_key(self, sub):
        """Subscriptions with equal keys get equal ``shape`` results (the hub shares them)."""
        return sub.target.properties

    def shape(self, sub, event: DeviceChanged) -> DeviceChanged:
        """Only the properties the subscription asked for (``"properties"``)."""
        wanted = sub.target.properties
        if wanted is None:
            return event
        props = event.properties
        return event.redact(properties={k: props[k] for k in wanted if k in props})

    def _costly(self, subsystem: str | None, initial: bool) -> bool:
        """Whether attaching would enumerate devices or judge a snapshot."""
        if initial or self.monitor is None:
            return True
        tracked = self.tracked
        if tracked is None:
            return False
        return subsystem is None or subsystem not in tracked

    async def _wait_turn(self, uid: int) -> None:
        now = time.monotonic()
        turn = max(now, self._turn.get(uid, 0.0))
        if turn - now > PACE_WAIT_MAX:
            raise LimitsExceeded("too many device enumerations for this uid; try again later")
        self._turn[uid] = turn + PACE
        if len(self._turn) > 1024:
            self._turn = {u: t for u, t in self._turn.items() if t > now}
        if turn > now:
            await asyncio.sleep(turn - now)

    def _charge_turn(self, uid: int, started: float) -> None:
        if uid == 0:
            return
        now = time.monotonic()
        took = now - started
        self._turn[uid] = max(self._turn.get(uid, 0.0), now + max(PACE, took * PACE_FACTOR))

    def attach(self, sub) -> None:
        subsystem = sub.target.subsystem
        started = time.monotonic()
        costly = self._costly(subsystem, sub.target.initial)
        opened = False
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self.monitor is not None and self.auto and not self.subs:
            backend = "udev" if udevd_running() else "uevent"  # the first subscription after none: probe again
            if backend != self.backend:
                self._close()
        if self.monitor is None:
            self._open()
            opened = True
        self.subs.setdefault(subsystem, set()).add(sub)
        try:
            self._track()
            if sub.target.initial:
                snapshot = sorted((devpath, record) for devpath, record in self.table.items()
                                  if subsystem is None or record[0] == subsystem)
                self.sink.preload(sub, synthesise(
                    (("add", devpath, name, props) for devpath, (name, props) in snapshot), "initial"))
        except Exception:
            log.exception("devices: setting up subscription %d failed", sub.number)
            try:
                self._forget(sub)
            except Exception:
                log.exception("devices: undoing subscription %d failed", sub.number)
            if opened and not self.subs:
                self._close()
            raise NotSupported("cannot watch devices here") from None
        finally:
            owner = getattr(sub, "owner", None)
            if costly and owner is not None:
                self._charge_turn(owner.uid, started)

    def detach(self, sub) -> None:
        self._forget(sub)
        if not self.subs and self.monitor is not None and self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(LINGER, self._idle)

    def _idle(self) -> None:
        self._linger = None
        if not self.subs:
            self._close()

    def _forget(self, sub) -> None:
        subsystem = sub.target.subsystem
        bucket = self.subs.get(subsystem)
        if bucket is not None:
            bucket.discard(sub)
            if not bucket:
                del self.subs[subsystem]
                if self.monitor is not None and self.subs:
                    self._track()

    # -- the monitor, its filter and the device table -------------------------

    def _open(self) -> None:
        if self.auto:  # udevd may have started (or stopped) since wqd did
            backend = "udev" if udevd_running() else "uevent"
            if backend != self.backend:
                log.info("devices: backend now %s", backend)
                self.backend = backend
        try:
            self.monitor = UeventMonitor(self.backend, self.receive_buffer, self, self.sink)
        except (OSError, ImportError) as exc:
            log.error("devices: cannot open the uevent monitor: %s", exc)
            if getattr(exc, "errno", None) in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                raise LimitsExceeded("cannot open another uevent monitor") from None
            raise NotSupported("cannot open a uevent monitor here") from None
        self.tracked = frozenset()
        self.table = {}
        self.resync_pending = False

    def _close(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        self.tracked = frozenset()
        self.table = {}
        self.resync_pending = False

    def _wanted(self) -> frozenset[str] | None:
        if None in self.subs:
            return None
        return frozenset(self.subs)

    def _track(self) -> None:
        """Make the kernel filter and the table follow the subscribed subsystems."""
        wanted = self._wanted()
        before = self.tracked
        if wanted == before:
            return
        self.monitor.set_filter(wanted)
        if wanted is None:
            self.table = self.monitor.enumerate(None)
        else:
            self.table = {d: r for d, r in self.table.items() if r[0] in wanted}
            new = frozenset() if before is None else wanted - before  # all were tracked: nothing new
            if new:
                self.table.update(self.monitor.enumerate(new))
        self.tracked = wanted
        log.debug("devices: tracking %s (%d devices)", "all" if wanted is None else ", ".join(sorted(wanted)),
                  len(self.table))

    def _record(self, event: DeviceChanged) -> None:
        action = event.action
        if action == "remove":
            self.table.pop(event.devpath, None)
            return
        if action == "move":
            old = event.properties.get("DEVPATH_OLD")
            if old:
                self.table.pop(old, None)
        self.table[event.devpath] = (event.subsystem, event.properties)

    # -- from the monitor ---------------------------------------------------------

    def uevent(self, event: DeviceChanged) -> None:
        tracked = self.tracked
        if tracked is not None and event.subsystem not in tracked:
            return  # uevent backend (no kernel filter), or a filter hash collision
        self._record(event)
        self.sink.dispatch(event)

    def overrun(self) -> None:
        monitor = self.monitor
        lost = monitor.new_drops()
        monitor.enlarge()
        self._lost(max(lost or 1, 1), "the uevent socket overflowed (ENOBUFS)")

    def malformed(self, why: str) -> None:
        self._lost(1, f"a uevent could not be read: {why}")

    def _lost(self, count: int, why: str) -> None:
        log.warning("devices: %s; %d uevent(s) lost, resynchronising", why, count)
        self.resync_pending = True
        self.sink.dispatch(SourceLoss(NAME, count))

    def caught_up(self) -> None:
        if not self.resync_pending or self.monitor is None:
            return
        self.resync_pending = False
        later = self.monitor.new_drops()
        if later:
            self.sink.dispatch(SourceLoss(NAME, later))
        tracked = self.tracked
        fresh = self.monitor.enumerate(tracked)
        changes = diff(self.table, fresh)
        self.table = fresh
        log.info("devices: resynchronised %d device(s): %d difference(s)", len(fresh), len(changes))
        for event in synthesise(changes, "resync"):
            self.sink.dispatch(event)


def check_settings(conf: dict) -> dict:
    return read_settings(NAME, conf, SCHEMA)


def open_source(cfg) -> DevicesSource:
    """The source for this machine; raises ValueError (bad settings), ImportError
    (no pyudev) or OSError (no netlink uevent socket here)."""
    settings = check_settings(cfg.raw.get(NAME, {}))
    backend, receive_buffer = settings["backend"], settings["receive_buffer"]
    import pyudev

    auto = backend == "auto"
    if auto:
        backend = "udev" if udevd_running() else "uevent"
    # Fail now, not at the first Watch, where netlink is not allowed (a sandbox).
    pyudev.Monitor.from_netlink(pyudev.Context(), source="udev" if backend == "udev" else "kernel")
    log.info("devices: backend %s", backend)
    return DevicesSource(backend, receive_buffer, auto)
