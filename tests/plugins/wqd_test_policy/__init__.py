"""A third-party wqd policy plugin, for tests: installed only through its dist-info.

``tests/plugins`` on ``PYTHONPATH`` makes ``wqd_test_policy-0.1.dist-info`` visible
to ``importlib.metadata``, whose ``entry_points.txt`` registers ``redact-aux`` in
the ``wqd.policy`` group, the way ``pip install`` of a real plugin would.

``[policy.redact-aux]``:

- ``deny_targets``: targets (as passed to Watch) this plugin denies;
- ``redact_uids``: peers whose ``KeyChanged`` events lose their ``aux`` (set to 0);
- ``drop_changes``: key change names dropped for every peer.
"""

from __future__ import annotations

from wqd.events import KeyChanged
from wqd.policy import ABSTAIN, Deny


class RedactAux:
    name = "redact-aux"

    def __init__(self, context) -> None:
        settings = context.settings
        self.deny_targets = frozenset(settings.get("deny_targets", ()))
        self.redact_uids = frozenset(settings.get("redact_uids", ()))
        self.drop_changes = frozenset(settings.get("drop_changes", ()))

    def probe(self):
        return None  # runs anywhere

    def watch(self, peer, source, target):  # a plain function: the stack accepts both
        if target.spec in self.deny_targets:
            return Deny(f"{self.name}: target {target.spec} is off limits")
        return ABSTAIN

    def post(self, peer, event):
        if isinstance(event, KeyChanged):
            if event.change in self.drop_changes:
                return None
            if peer.uid in self.redact_uids:
                return event.redact(aux=0)
        return event
