"""LSM-style policy plugins: a ``watch`` hook and a ``post`` hook.

Like the kernel's ``security_watch_key`` and ``security_post_notification``:

- ``watch(peer, source, target) -> Decision``: may *peer* watch *target* of
  *source*? ``ALLOW``, ``Deny(reason)`` or ``ABSTAIN``. May be ``async``; bounded
  in time by the stack (``[policy] timeout``).
- ``post(peer, event) -> Event | None``: the event as *peer* may see it (the same
  object, a redacted copy of the same type, see ``Event.redact``), or ``None`` to
  drop it. Synchronous and cheap: it runs per event per subscriber.
- optional ``probe() -> str | None``: ``None`` if the plugin can run here, else
  why not. A plugin that cannot run denies every ``Watch`` (fail closed).
- optional ``forget(unique_name)``: the peer left the bus; drop what is cached.
- optional ``decision_key(peer, event) -> Hashable | None``: what this plugin's
  ``post(peer, event)`` depends on about *peer* for this *event*: two peers with
  equal keys must get equal answers from ``post``. ``()`` says "the same for every
  peer"; ``None`` says "ask me per peer". The hub judges an event once per distinct
  key of the whole stack (``PolicyStack.decision_key``) and hands the same copy to
  every subscriber with that key, so a key must cover *everything* ``post`` reads
  of the peer (uid, groups, namespaces, ...). A plugin without the method is asked
  per peer, which is always correct, only slower.

Plugins stack in the configured order; any deny wins; a plugin that raises (or
times out, or answers something that is not a ``Decision``) denies, and is
logged; the daemon lives on. With no plugin allowing, the answer is deny (fail
closed). Third-party plugins register a factory in the ``wqd.policy`` entry-point
group; it is called with a :class:`PluginContext`. See docs/policy-plugins.md.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from wqd.events import Event, WatchTarget
from wqd.peer import PeerCredentials

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "wqd.policy"
# wqd's own plugins, as pyproject.toml registers them (tests/test_policy_stack.py compares):
# found here without importlib.metadata, whose import and scan of every installed
# distribution cost ~0.6 s of each start under TCG; and a third-party distribution
# cannot take one of these names.
BUILTIN = {
    "unix": "wqd.policy.unix:UnixPolicy",
    "namespace": "wqd.policy.namespace:NamespacePolicy",
    "sandbox": "wqd.policy.sandbox:SandboxPolicy",
    "rules": "wqd.policy.rules:RulesPolicy",
    "polkit": "wqd.policy.polkit:PolkitPolicy",
}


def _factories(name: str):
    """``(value, load)`` of each registration of *name*: the built-in one, else the
    ``wqd.policy`` entry points'."""
    if name in BUILTIN:
        value = BUILTIN[name]
        module, _, attr = value.partition(":")
        yield value, lambda: getattr(importlib.import_module(module), attr)
        return
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            yield ep.value, ep.load


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: str  # "allow" | "deny" | "abstain"
    reason: str = ""

    @property
    def allowed(self) -> bool:
        return self.verdict == "allow"


ALLOW = Decision("allow")
ABSTAIN = Decision("abstain")


def Deny(reason: str) -> Decision:  # noqa: N802 - reads like a constructor
    return Decision("deny", reason)


@dataclass
class PluginContext:
    """What a plugin factory is given.

    - ``name``: the name the plugin is configured under (``[policy] plugins``).
    - ``settings``: its own table, ``[policy.NAME]`` (``{}`` if absent).
    - ``policy``: the whole ``[policy]`` table.
    - ``rules``: the parsed rules files (``wqd.policy.rules_file.RuleSet``) when
      the configuration loaded them, else ``None``.
    - ``services``: what the daemon offers plugins, filled in once the bus is up:
      ``"polkit"`` -> a ``wqd.policy.polkit.Authority``. Look services up when
      deciding, not in the factory.
    """

    name: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    policy: Mapping[str, Any] = field(default_factory=dict)
    rules: Any = None
    services: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Policy(Protocol):
    name: str

    def watch(self, peer: PeerCredentials, source: str, target: WatchTarget) -> Decision:
        """Or ``async def``: both are accepted."""

    def post(self, peer: PeerCredentials, event: Event) -> Event | None: ...


class PluginError(ValueError):
    """A plugin could not be set up (unknown name, bad settings, missing dependency)."""


class UnknownPolicy(PluginError):
    pass


class UnavailablePlugin:
    """Stands in for a plugin whose ``probe()`` says it cannot run here: denies."""

    def __init__(self, name: str, why: str) -> None:
        self.name = name
        self.why = why

    def watch(self, peer, source, target) -> Decision:
        return Deny(f"policy {self.name} cannot run here")

    def post(self, peer, event):
        return event

    def decision_key(self, peer, event):
        return ()


class PolicyStack:
    """The configured plugins, in order."""

    def __init__(self, plugins: list[Policy], timeout: float = 5.0) -> None:
        self.plugins = plugins
        self.timeout = timeout
        self._post_failures: dict[str, int] = {}
        self._forgetters = [p for p in plugins if callable(getattr(p, "forget", None))]
        keyers = [getattr(p, "decision_key", None) for p in plugins]
        # None when a plugin declares no key: then every peer is judged on its own.
        self._keyers = keyers if all(callable(k) for k in keyers) else None
        self._key_failures = 0

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.plugins]

    async def watch(self, peer: PeerCredentials, target: WatchTarget) -> Decision:
        allowed = False
        for plugin in self.plugins:
            try:
                decision = plugin.watch(peer, target.source, target)
                if inspect.isawaitable(decision):
                    decision = await asyncio.wait_for(decision, self.timeout)
                if not isinstance(decision, Decision) or decision.verdict not in ("allow", "deny", "abstain"):
                    raise TypeError(f"watch() returned {decision!r}, not a Decision")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, asyncio.TimeoutError):
                    log.error("policy %s did not decide within %.1f s; denying", plugin.name, self.timeout)
                else:
                    log.exception("policy %s failed on watch; denying", plugin.name)
                return Deny(f"policy {plugin.name} failed")
            if decision.verdict == "deny":
                return Deny(decision.reason or f"denied by policy {plugin.name}")
            allowed |= decision.verdict == "allow"
        return ALLOW if allowed else Deny("no policy allows this")

    def post(self, peer: PeerCredentials, event: Event) -> Event | None:
        original = type(event)
        for plugin in self.plugins:
            try:
                event = plugin.post(peer, event)
                if event is not None and type(event) is not original:
                    raise TypeError(f"post() turned a {original.__name__} into {event!r}")
            except Exception:
                n = self._post_failures.get(plugin.name, 0) + 1
                self._post_failures[plugin.name] = n
                if n == 1 or n % 1000 == 0:
                    log.exception("policy %s failed on post (%d time(s)); dropping the event", plugin.name, n)
                return None
            if event is None:
                return None
        return event

    def decision_key(self, peer: PeerCredentials, event: Event):
        """What ``post(peer, event)`` depends on, from every plugin's ``decision_key``
        (a tuple of theirs), or ``None`` when some plugin declares none, answers
        ``None`` or fails: then *peer* is judged on its own."""
        keyers = self._keyers
        if keyers is None:
            return None
        try:
            key = tuple(keyer(peer, event) for keyer in keyers)
        except Exception:
            self._key_failures += 1
            if self._key_failures == 1 or self._key_failures % 1000 == 0:
                log.exception("a policy's decision_key failed (%d time(s)); judging per peer", self._key_failures)
            return None
        if None in key:
            return None
        return key

    def forget(self, unique_name: str) -> None:
        for plugin in self._forgetters:
            try:
                plugin.forget(unique_name)
            except Exception:
                log.exception("policy %s failed to forget %s", plugin.name, unique_name)


def load_plugin(name: str, context: PluginContext | Mapping | None = None) -> Policy:
    """Instantiate the plugin registered as *name*: one of wqd's own (``BUILTIN``) or
    one registered in the ``wqd.policy`` entry-point group.

    Its ``probe()``, if any, is asked whether it can run here; if not, an
    ``UnavailablePlugin`` that denies everything takes its place.
    """
    if not isinstance(context, PluginContext):
        policy = dict(context or {})
        settings = policy.get(name, {})
        context = PluginContext(name, settings if isinstance(settings, Mapping) else {}, policy)
    for value, load in _factories(name):
        try:
            factory = load()
        except Exception as exc:
            raise PluginError(f"policy plugin {name!r} ({value}) cannot be loaded: {exc}") from exc
        try:
            plugin = factory(context)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"policy plugin {name!r}: {exc}") from exc
        if not isinstance(plugin, Policy):
            raise PluginError(f"policy plugin {name!r} ({value}) lacks watch/post")
        probe = getattr(plugin, "probe", None)
        why = probe() if callable(probe) else None
        if why:
            log.error("policy %s cannot run here (%s): it denies every Watch", name, why)
            return UnavailablePlugin(name, why)
        return plugin
    raise UnknownPolicy(f"no policy plugin named {name!r} (entry-point group {ENTRY_POINT_GROUP})")


def load_stack(names: list[str], config: Mapping | None = None, timeout: float = 5.0, *,
               rules: Any = None, services: dict | None = None) -> PolicyStack:
    """The stack of *names*; *config* is the ``[policy]`` table.

    *rules* (parsed rules files) and *services* (shared, filled in by the daemon)
    reach every plugin through its ``PluginContext``.
    """
    policy = dict(config or {})
    shared = services if services is not None else {}
    plugins = []
    for name in names:
        settings = policy.get(name, {})
        ctx = PluginContext(name, settings if isinstance(settings, Mapping) else {}, policy, rules, shared)
        plugins.append(load_plugin(name, ctx))
    return PolicyStack(plugins, timeout)
