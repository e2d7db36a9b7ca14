"""``sandbox``: sandboxed apps get nothing unless a rule allows their app id.

A peer is a sandboxed app when, at first contact (``wqd.peer``):

- **Flatpak**: its root holds ``.flatpak-info`` (read through the pidfd-verified
  ``/proc/PID/root``); the app id is ``[Application] name``.
- **Snap**: the kernel's AppArmor label for it (``LinuxSecurityLabel`` from the
  bus) is ``snap.NAME.APP``; the app id is ``NAME``. A ``snap.NAME.*.scope``
  cgroup without that label marks it sandboxed but unconfirmed.

A sandboxed peer is denied unless the first ``app:`` rule (rules files, see
``wqd.policy.rules_file``) matching its app id, the source and the target says
``allow``; an allowed app then still goes through the other plugins (this one
abstains). Rules with other subjects (``world``, ``uid:``...) do not open the
door to sandboxed apps. An unconfirmed sandbox (no readable app id, a cgroup-only
snap) is always denied, and so is a peer whose process could not be inspected:
it might be sandboxed.
"""

from __future__ import annotations

from wqd.events import Event, WatchTarget
from wqd.peer import PeerCredentials
from wqd.policy import ABSTAIN, Decision, Deny, PluginContext
from wqd.policy.rules import ruleset_of


def _app_rule(rule) -> bool:
    return rule.subject.kind == "app"


class SandboxPolicy:
    name = "sandbox"

    def __init__(self, context: PluginContext) -> None:
        self.ruleset = ruleset_of(context)

    def watch(self, peer: PeerCredentials, source: str, target: WatchTarget) -> Decision:
        sandbox = peer.sandbox
        if sandbox is None:
            if not peer.verified:
                return Deny("cannot tell whether the caller is a sandboxed app")
            return ABSTAIN
        if not sandbox.confirmed or sandbox.app_id is None:
            return Deny(f"unidentified {sandbox.kind} app")
        rule = self.ruleset.first_match(peer, source, target, only=_app_rule)
        if rule is not None and rule.verdict == "allow":
            return ABSTAIN
        return Deny(f"{sandbox.kind} app {sandbox.app_id} may not watch {source}")

    def post(self, peer: PeerCredentials, event: Event) -> Event | None:
        return event

    def decision_key(self, peer: PeerCredentials, event: Event):
        return ()  # post passes every event through, whoever the peer
