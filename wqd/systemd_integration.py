"""sd_notify(3) for the service manager: READY, STATUS, STOPPING and the watchdog.

Everything is a no-op without ``NOTIFY_SOCKET``, so wqd runs the same outside
systemd. The watchdog is pinged from a timer on the asyncio event loop, not from
a thread: if the loop is stuck (a blocking call, a busy reader callback), the
pings stop and systemd restarts the service after ``WatchdogSec=``.
"""

from __future__ import annotations

import asyncio
import logging
import os

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send *state* (``"READY=1\\nSTATUS=..."``) to ``$NOTIFY_SOCKET``; False if not sent."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return False
    try:
        from systemd import daemon as sd_daemon
    except ImportError:  # pragma: no cover - systemd-python is a dependency
        log.warning("systemd-python missing: cannot notify %s", state.split("\n", 1)[0])
        return False
    try:
        return bool(sd_daemon.notify(state))
    except OSError as exc:
        log.warning("sd_notify(%s) failed: %s", state.split("\n", 1)[0], exc)
        return False


def watchdog_interval() -> float | None:
    """Seconds between pings (half of ``WATCHDOG_USEC``), or None if no watchdog is asked for.

    ``WATCHDOG_PID``, when set, must be this process (systemd sets it so that a
    child that inherited the environment does not ping for its parent).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not os.environ.get("NOTIFY_SOCKET"):
        return None
    pid = os.environ.get("WATCHDOG_PID")
    try:
        if pid and int(pid) != os.getpid():
            return None
        value = int(usec)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r / WATCHDOG_PID=%r", usec, pid)
        return None
    if value <= 0:
        return None
    return value / 2_000_000


class Watchdog:
    """Pings ``WATCHDOG=1`` every *interval* seconds from the running event loop."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.pings = 0
        self._handle: asyncio.TimerHandle | None = None

    @classmethod
    def from_environment(cls) -> Watchdog | None:
        interval = watchdog_interval()
        return cls(interval) if interval else None

    def start(self) -> None:
        log.debug("watchdog: pinging every %.3f s", self.interval)
        self._ping()

    def _ping(self) -> None:
        if notify("WATCHDOG=1"):
            self.pings += 1
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._ping)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
