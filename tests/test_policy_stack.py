"""The plugin stack: order, any deny wins, failures deny and are logged, probe, post, loading."""

from __future__ import annotations

import asyncio
import logging

import pytest

from wqd.events import KeyChanged, MountChanged, WatchTarget
from wqd.peer import PeerCredentials
from wqd.policy import (ABSTAIN, ALLOW, Decision, Deny, PluginContext, PluginError, PolicyStack, UnavailablePlugin,
                        UnknownPolicy, load_plugin, load_stack)
from wqd.policy.namespace import NamespacePolicy, translate_options
from wqd.peer import own_namespaces

pytestmark = pytest.mark.asyncio

PEER = PeerCredentials(":1.7", 1000, frozenset({1000}), 4242, None, 1, 1, 1, 1, True, gid=1000)
TARGET = WatchTarget("keys", "@u", 77)
EVENT = KeyChanged(77, "linked", 5)


class Fixed:
    def __init__(self, name, decision, post=lambda peer, ev: ev):
        self.name = name
        self.decision = decision
        self.calls = []
        self._post = post

    async def watch(self, peer, source, target):
        self.calls.append((peer.unique_name, source, target.spec))
        if isinstance(self.decision, BaseException):
            raise self.decision
        return self.decision

    def post(self, peer, event):
        return self._post(peer, event)


class Sync(Fixed):
    def watch(self, peer, source, target):  # a plain function is accepted as well
        self.calls.append(source)
        return self.decision


class Slow(Fixed):
    async def watch(self, peer, source, target):
        await asyncio.sleep(30)
        return ALLOW


async def test_any_deny_wins_whatever_the_order():
    for order in ((ALLOW, Deny("no")), (Deny("no"), ALLOW), (ABSTAIN, Deny("no"), ALLOW)):
        stack = PolicyStack([Fixed(f"p{i}", d) for i, d in enumerate(order)])
        decision = await stack.watch(PEER, TARGET)
        assert decision.verdict == "deny" and decision.reason == "no"


async def test_plugins_see_source_and_run_in_order_until_a_deny():
    a, b, c = Fixed("a", ALLOW), Fixed("b", Deny("stop")), Fixed("c", ALLOW)
    assert (await PolicyStack([a, b, c]).watch(PEER, TARGET)).verdict == "deny"
    assert a.calls == [(":1.7", "keys", "@u")] and b.calls and not c.calls


async def test_all_abstain_is_a_deny_and_one_allow_suffices():
    assert (await PolicyStack([Fixed("a", ABSTAIN)]).watch(PEER, TARGET)).reason == "no policy allows this"
    assert (await PolicyStack([]).watch(PEER, TARGET)).verdict == "deny"
    assert (await PolicyStack([Fixed("a", ABSTAIN), Sync("b", ALLOW)]).watch(PEER, TARGET)).allowed


async def test_a_plugin_that_raises_denies_and_is_logged(caplog):
    caplog.set_level(logging.ERROR, "wqd.policy")
    stack = PolicyStack([Fixed("ok", ALLOW), Fixed("broken", RuntimeError("boom"))])
    decision = await stack.watch(PEER, TARGET)
    assert decision == Deny("policy broken failed")
    assert "policy broken failed on watch" in caplog.text and "boom" in caplog.text


@pytest.mark.parametrize("bad", [None, True, "allow", Decision("maybe")])
async def test_a_plugin_answering_nonsense_denies(bad, caplog):
    stack = PolicyStack([Fixed("ok", ALLOW), Fixed("odd", bad)])
    assert (await stack.watch(PEER, TARGET)).verdict == "deny"
    assert "policy odd failed" in caplog.text


async def test_a_plugin_that_takes_too_long_denies(caplog):
    stack = PolicyStack([Fixed("ok", ALLOW), Slow("slow", None)], timeout=0.2)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    decision = await stack.watch(PEER, TARGET)
    assert decision.verdict == "deny" and loop.time() - t0 < 2
    assert "did not decide within 0.2 s" in caplog.text


async def test_post_chains_redactions_and_none_drops(caplog):
    redact = Fixed("r", ALLOW, post=lambda p, ev: ev.redact(aux=0))
    seen = []
    spy = Fixed("spy", ALLOW, post=lambda p, ev: seen.append(ev) or ev)
    out = PolicyStack([redact, spy]).post(PEER, EVENT)
    assert out == KeyChanged(77, "linked", 0) and seen == [out]
    assert EVENT.aux == 5  # the original is untouched: other subscribers get their own view
    drop = Fixed("d", ALLOW, post=lambda p, ev: None)
    assert PolicyStack([drop, spy]).post(PEER, EVENT) is None and len(seen) == 1


async def test_post_that_raises_or_changes_the_type_drops(caplog):
    boom = Fixed("boom", ALLOW, post=lambda p, ev: 1 / 0)
    assert PolicyStack([boom]).post(PEER, EVENT) is None
    assert "policy boom failed on post" in caplog.text
    swap = Fixed("swap", ALLOW, post=lambda p, ev: MountChanged("attached", 1, "/", {}))
    assert PolicyStack([swap]).post(PEER, EVENT) is None


async def test_forget_reaches_plugins_that_have_it():
    class Caching(Fixed):
        def __init__(self):
            super().__init__("caching", ALLOW)
            self.forgotten = []

        def forget(self, name):
            self.forgotten.append(name)

    c = Caching()
    PolicyStack([Fixed("plain", ALLOW), c]).forget(":1.9")
    assert c.forgotten == [":1.9"]


async def test_builtins_load_without_the_entry_point_scan_and_match_pyproject():
    """wqd's own plugins are found by ``BUILTIN`` (no importlib.metadata at start);
    the table and pyproject.toml's entry points are the same registrations."""
    import tomllib

    from support import REPO
    from wqd.policy import BUILTIN

    with open(REPO / "pyproject.toml", "rb") as f:
        registered = tomllib.load(f)["project"]["entry-points"]["wqd.policy"]
    assert registered == BUILTIN
    stack = load_stack(["unix", "namespace", "sandbox", "rules", "polkit"], {"rules": []})
    assert stack.names == ["unix", "namespace", "sandbox", "rules", "polkit"]
    with pytest.raises(UnknownPolicy, match="no policy plugin named 'nope'"):
        load_plugin("nope")
    with pytest.raises(PluginError, match="policy.polkit.default"):
        load_stack(["polkit"], {"polkit": {"default": "perhaps"}})


async def test_unix_denies_and_drops_sources_it_has_no_rules_for():
    unix = load_plugin("unix", PluginContext("unix"))
    unix.rules.pop("devices", None)  # as in a build without unix_devices
    decision = await unix.watch(PEER, "devices", WatchTarget("devices", "usb"))
    assert decision.verdict == "deny"
    from wqd.events import DeviceChanged
    assert unix.post(PEER, DeviceChanged("add", "/devices/x", "usb", {})) is None


async def test_a_plugin_that_cannot_run_here_denies(monkeypatch):
    from wqd.policy import namespace

    monkeypatch.setattr(namespace.NamespacePolicy, "probe", lambda self: "no /proc here", raising=False)
    plugin = load_plugin("namespace", PluginContext("namespace"))
    assert isinstance(plugin, UnavailablePlugin)
    assert (await PolicyStack([Fixed("ok", ALLOW), plugin]).watch(PEER, TARGET)).verdict == "deny"


async def test_namespace_post_translates_or_drops_ids_for_a_foreign_user_namespace():
    own = own_namespaces()
    foreign = PeerCredentials(":1.8", 1000, frozenset(), 42, None, 1, own["mnt"], own["user"] + 1, own["pid"], True,
                              gid=1000, uid_map=((0, 1000, 1),), gid_map=((0, 1000, 1),))
    assert translate_options("rw,uid=1000,gid=1000,mode=700", foreign) == "rw,uid=0,gid=0,mode=700"
    assert translate_options("rw,uid=0,gid=5,resuid=1000", foreign) == "rw,resuid=0"
    plugin = NamespacePolicy()
    ev = MountChanged("attached", 9, "/mnt", {"fstype": "tmpfs", "options": "rw,uid=1000,gid=4"}, mnt_ns=own["mnt"])
    assert plugin.post(foreign, ev).info == {"fstype": "tmpfs", "options": "rw,uid=0"}
    other_ns = MountChanged("attached", 9, "/mnt", {}, mnt_ns=own["mnt"] + 1)
    assert plugin.post(foreign, other_ns) is None
    local = PeerCredentials(":1.9", 1000, frozenset(), 42, None, 1, own["mnt"], own["user"], own["pid"], True)
    assert plugin.post(local, ev) is ev  # nothing to translate: the very same object
