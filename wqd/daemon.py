"""wqd: wiring. Sources, hub, policy and the bus; signals; readiness."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import time

from dbus_fast import RequestNameReply
from dbus_fast.constants import NameFlag

from wqd import __version__, config as configuration, journal
from wqd.bus import names
from wqd.bus.connection import connect
from wqd.bus.reach import BusUnreachable, describe, reach, seconds
from wqd.bus.service import WatchQueueService
from wqd.hub import Hub, Limits
from wqd.kernel.libc import require
from wqd.bus.polkit import BusAuthority
from wqd.policy import PluginError, UnknownPolicy, load_stack
from wqd.sources.registry import SOURCES
from wqd.sources.unavailable import UnavailableSource
from wqd.systemd_integration import Watchdog, notify

log = logging.getLogger("wqd")


def sd_notify(state: str) -> None:
    notify(state)  # wqd.systemd_integration: a no-op without NOTIFY_SOCKET


def limits_of(cfg: configuration.Config) -> Limits:
    return Limits(cfg.queue_length, cfg.subscriptions_per_peer, cfg.subscriptions_total,
                  subscriptions_per_uid=cfg.subscriptions_per_uid, bytes_per_uid=cfg.bytes_per_uid)


SOURCE_SECTIONS = tuple(SOURCES)  # [keys], [devices], ...: read when the sources open


def build_sources(cfg: configuration.Config) -> dict:
    """Every source of the registry (``wqd.sources.registry``), opened; one that
    cannot run here (what it needs from wqd.kernel.libc's per-architecture table is
    not declared for this machine, its settings are bad, the kernel lacks it) is
    unavailable with the reason instead of failing later."""
    sources = {}
    for name, kind in SOURCES.items():
        try:
            require(*kind.needs)
            sources[name] = kind.open(cfg)
        except (OSError, ValueError, ImportError) as exc:
            log.warning("source %s unavailable: %s", name, exc)
            sources[name] = UnavailableSource(name, str(exc))
    return sources


class Daemon:
    def __init__(self, cfg: configuration.Config, address: str | None, system: bool,
                 connect_timeout: float | None = None) -> None:
        self.cfg = cfg
        self.address = address
        self.system = system
        self.connect_timeout = connect_timeout or cfg.connect_timeout
        self.stopping = asyncio.Event()
        self.policy_services: dict = {}  # shared with every policy plugin (PluginContext.services)
        self._reloading: asyncio.Task | None = None
        self._reload_again = False

    def load_policy(self, cfg: configuration.Config):
        return load_stack(cfg.policy_plugins, cfg.raw.get("policy", {}), cfg.policy_timeout,
                          rules=cfg.policy_ruleset, services=self.policy_services)

    async def reload(self, hub: Hub) -> bool:
        """SIGHUP: re-read the configuration and rules files, swap in the new policy
        and the ``[daemon]`` limits, and re-check every subscription by the policy
        (keeping the bus and the subscriptions). A bad file changes nothing. The
        sources' settings need a restart: a change there is logged as such."""
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            cfg = configuration.load(self.cfg.path)
            policy = self.load_policy(cfg)
        except (configuration.ConfigError, PluginError) as exc:
            log.error("reload failed; the previous policy stays in force: %s", exc)
            sd_notify(f"READY=1\nSTATUS=reload failed: {exc}")
            return False
        revoked = await hub.recheck(policy)
        self.cfg.policy_plugins, self.cfg.policy_ruleset = cfg.policy_plugins, cfg.policy_ruleset
        limits = limits_of(cfg)
        if limits != hub.limits:
            hub.set_limits(limits)
            log.info("limits now: queue_length %d, subscriptions_per_peer %d, subscriptions_per_uid %d, "
                     "subscriptions_total %d", limits.queue_length, limits.subscriptions_per_peer,
                     limits.subscriptions_per_uid, limits.subscriptions_total)
        pending = sorted(section for section in SOURCE_SECTIONS
                         if cfg.raw.get(section, {}) != self.cfg.raw.get(section, {}))
        if pending:
            log.warning("changed settings in %s take effect when wqd restarts",
                        ", ".join(f"[{section}]" for section in pending))
        self.cfg.raw = {**cfg.raw, **{section: self.cfg.raw.get(section, {}) for section in SOURCE_SECTIONS}}
        log.info("reloaded %s: policy %s, %d rule(s); %d subscription(s) revoked", cfg.path or "defaults",
                 " ".join(policy.names), len(cfg.policy_ruleset or ()), revoked)
        sd_notify(f"READY=1\nSTATUS=reloaded: {revoked} subscription(s) revoked")
        return True

    def _on_hup(self, hub: Hub) -> None:
        if self._reloading is not None and not self._reloading.done():
            self._reload_again = True  # once more after this one: the files changed again
            return
        self._reloading = asyncio.ensure_future(self._reload_loop(hub))

    async def _reload_loop(self, hub: Hub) -> None:
        while True:
            self._reload_again = False
            try:
                await self.reload(hub)
            except Exception:
                log.exception("reload failed")
            if not self._reload_again:
                return

    async def run(self) -> int:
        cfg = self.cfg
        policy = self.load_policy(cfg)
        sources = build_sources(cfg)
        hub = Hub(sources, policy, limits_of(cfg))
        bus = await reach(lambda: connect(self.address, self.system), describe(self.address, self.system),
                          self.connect_timeout)
        self.policy_services["polkit"] = BusAuthority(bus)
        service = WatchQueueService(bus, hub)
        await service.start()
        for source in sources.values():
            await source.start(hub)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup, hub)
        reply = await bus.request_name(names.BUS_NAME, NameFlag.DO_NOT_QUEUE)
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            log.error("cannot own %s on the bus (%s): is another wqd running, or does the bus policy forbid it?",
                      names.BUS_NAME, reply.name)
            bus.disconnect()
            return 1
        backends = ", ".join(f"{n}={s.backend or 'unavailable'}" for n, s in sources.items())
        log.info("wqd %s ready on %s as %s; %s", __version__, self.address or ("system bus" if self.system else "session bus"),
                 names.BUS_NAME, backends, extra={"MESSAGE_ID": journal.DAEMON_STARTED})
        sd_notify(f"READY=1\nSTATUS=serving {backends}")
        tune_gc()
        watchdog = Watchdog.from_environment()
        if watchdog is not None:
            watchdog.start()
        disconnected = asyncio.ensure_future(bus.wait_for_disconnect())
        stop = asyncio.ensure_future(self.stopping.wait())
        done, _ = await asyncio.wait([disconnected, stop], return_when=asyncio.FIRST_COMPLETED)
        if watchdog is not None:
            watchdog.stop()
        if disconnected in done:
            exc = disconnected.exception()
            log.error("lost the bus connection%s; stopping", f": {exc}" if exc else "",
                      extra={"MESSAGE_ID": journal.DAEMON_STOPPED})
            code = 1
        else:
            log.info("stopping", extra={"MESSAGE_ID": journal.DAEMON_STOPPED})
            sd_notify("STOPPING=1")
            code = 0
        for source in sources.values():
            try:
                await source.stop()
            except Exception:
                log.exception("stopping source %s", source.name)
        if not disconnected.done():
            bus.disconnect()
            disconnected.cancel()
        stop.cancel()
        return code


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="wqd", description="Kernel notifications on D-Bus, filtered per peer.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--system", action="store_true", help="serve on the system bus")
    where.add_argument("--session", action="store_true", help="serve on the session bus (default)")
    where.add_argument("--address", metavar="ADDRESS", help="serve on the bus at ADDRESS")
    p.add_argument("--config", metavar="FILE", help=f"configuration file (default {configuration.DEFAULT_PATH})")
    p.add_argument("--connect-timeout", type=seconds, metavar="SECONDS",
                   help="give up (exit 1) when the bus is not reached and Hello not answered within SECONDS "
                        "(default: [daemon] connect_timeout, 25)")
    p.add_argument("--check-config", nargs="?", const="", metavar="FILE",
                   help="validate the configuration (FILE, else --config or the default) and exit")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-target", default="auto", choices=["auto", "journal", "stderr"],
                   help="auto: the journal when stderr is systemd's journal stream, else stderr")
    p.add_argument("--version", action="version", version=f"wqd {__version__}")
    return p.parse_args(argv)


def setup_logging(level: str, target: str = "auto") -> str:
    return journal.setup_logging(level, target)


def check_config(path: str | None) -> int:
    """``wqd --check-config``: 0 if *path* (or the default file) is valid, else 1 with file:line errors."""
    shown = path or configuration.DEFAULT_PATH
    if path is None and not os.path.exists(configuration.DEFAULT_PATH):
        print(f"wqd: {shown}: no such file; the built-in defaults apply")
        return 0
    try:
        cfg = configuration.load(path)
    except configuration.ConfigError as exc:
        print(f"wqd: {exc}", file=sys.stderr)
        return 1
    try:
        configuration.validate(cfg)  # the rules files
        checks = {name: kind.check_settings for name, kind in SOURCES.items() if kind.check_settings is not None}
        configuration.check_source_settings(cfg, checks)
        Daemon(cfg, None, False).load_policy(cfg)  # the plugins check their own settings
    except configuration.ConfigError as exc:
        print(f"wqd: {exc}", file=sys.stderr)
        return 1
    except (UnknownPolicy, PluginError, ValueError, OSError) as exc:
        print(f"wqd: {cfg.path or shown}: {exc}", file=sys.stderr)
        return 1
    print(f"wqd: {cfg.path or shown}: OK")
    return 0


def tune_gc() -> None:
    """Shorter and fewer garbage-collection pauses (each one stops the loop for everyone).

    A collection walks every tracked object of its generation and the younger ones,
    so with a hostile uid's thousands of subscriptions a full one is long. Measured
    with ``python -m bench.gc_pause`` (16,384 subscriptions, then a quarter closed and
    made again; load ~2): the interpreter's defaults gave 6 full collections, the
    worst 75 ms, 300-400 ms of collections in all; ``gc.freeze()`` alone cut the
    worst full one to 47-56 ms (what start-up made, modules and all, is no longer
    walked: it lives as long as the daemon); with the thresholds below as well, no
    full collection ran at all, the worst pause was 13-15 ms (a generation-1 one)
    and 110-150 ms in all. A young generation of 5,000 objects (700 by default) is
    still a short walk, and collected less often; 10 of them per older one, as by
    default. Cost: cyclic garbage made at start-up (if any) is never reclaimed, and
    cycles live a little longer before they are.
    """
    gc.freeze()
    gc.set_threshold(5_000, 10, 10)


def bus_address(args: argparse.Namespace) -> str | None:
    """``--address``; else, without --system/--session, the bus that activated us, if any."""
    if args.address or args.system or args.session:
        return args.address
    return os.environ.get("DBUS_STARTER_ADDRESS") or None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check_config is not None:
        return check_config(args.check_config or args.config)
    setup_logging(args.log_level, args.log_target)
    try:
        cfg = configuration.load(args.config)
    except configuration.ConfigError as exc:
        print(f"wqd: {exc}", file=sys.stderr)
        return 2
    daemon = Daemon(cfg, bus_address(args), args.system, args.connect_timeout)
    try:
        return asyncio.run(daemon.run())
    except PluginError as exc:  # UnknownPolicy, a plugin's bad settings
        print(f"wqd: {exc}", file=sys.stderr)
        return 2
    except BusUnreachable as exc:
        print(f"wqd: {exc}", file=sys.stderr)
        return 1
    except (OSError, ConnectionError) as exc:
        print(f"wqd: cannot connect to the bus: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
