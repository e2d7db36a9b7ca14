"""``rules``: the administrator's allow/deny rules files (format: ``wqd.policy.rules_file``).

The first matching rule decides (``allow`` or ``deny``); when none matches the
plugin abstains, so other plugins decide. An ``allow`` cannot override another
plugin's deny (any deny wins): rules add grants where e.g. ``unix`` abstains, and
add denials anywhere.

Configuration: ``[policy] rules = ["/etc/wqd/rules.d", ...]`` (default
``/etc/wqd/rules.d``; files and directories of ``*.rules``). The files are read
when the configuration is loaded (start, ``SIGHUP``); a bad file fails the load
with FILE:LINE and, on ``SIGHUP``, leaves the previous policy in force.
"""

from __future__ import annotations

import logging

from wqd.events import Event, WatchTarget
from wqd.peer import PeerCredentials
from wqd.policy import ABSTAIN, ALLOW, Decision, Deny, PluginContext
from wqd.policy.rules_file import RuleSet, load_rules

log = logging.getLogger(__name__)

DEFAULT_PATHS = ("/etc/wqd/rules.d",)


def ruleset_of(context: PluginContext) -> RuleSet:
    """The rules the configuration loaded, or (without them) the configured files read now."""
    if context.rules is not None:
        return context.rules
    paths = context.policy.get("rules")
    if paths is None:
        return load_rules(DEFAULT_PATHS, missing_ok=True)
    return load_rules(paths)


class RulesPolicy:
    name = "rules"

    def __init__(self, context: PluginContext) -> None:
        self.ruleset = ruleset_of(context)

    def watch(self, peer: PeerCredentials, source: str, target: WatchTarget) -> Decision:
        rule = self.ruleset.first_match(peer, source, target)
        if rule is None:
            return ABSTAIN
        log.debug("rule %s decides for %s (uid %d) on %s %r", rule, peer.unique_name, peer.uid, source, target.spec)
        if rule.verdict == "allow":
            return ALLOW
        return Deny("denied by the administrator's rules")

    def post(self, peer: PeerCredentials, event: Event) -> Event | None:
        return event

    def decision_key(self, peer: PeerCredentials, event: Event):
        return ()  # post passes every event through, whoever the peer
