"""Nothing learnt about other users' subscriptions (issue 12, finding 2).

uid 1001 probes uid 1000's live subscription, one uid 1000 closed, and numbers
never handed out, through every way in (Close, Properties.Get/GetAll,
Introspect): the answers must be identical. And the numbers of one peer do not
follow from another's: no counting others' Watch calls.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from policy_support import Peers, require_root, world_keyring  # noqa: E402

pytestmark = [pytest.mark.asyncio, pytest.mark.root, pytest.mark.bus]

SUB_IFACE = "io.wqd.Subscription1"
PREFIX = "/io/wqd/WatchQueue1/subscription/"


async def probe(peer, path: str) -> list:
    """Every answer *peer* gets for *path*, as (ok, error, text)."""
    answers = []
    for req in (dict(op="call", path=path, iface=SUB_IFACE, member="Close"),
                dict(op="call", path=path, iface=None, member="Close"),
                dict(op="get", path=path, iface=SUB_IFACE, prop="Delivered"),
                dict(op="call", path=path, iface="org.freedesktop.DBus.Properties", member="GetAll",
                     signature="s", body=[SUB_IFACE]),
                dict(op="call", path=path, iface="org.freedesktop.DBus.Introspectable", member="Introspect")):
        out = await peer.request(**req)
        answers.append((out["ok"], out.get("error"), out.get("text")))
    return answers


async def test_another_users_subscription_answers_as_one_never_made(system_bus, wqd_factory):
    require_root()
    await wqd_factory(system_bus)
    peers = Peers(system_bus.address)
    try:
        owner, other = peers.start("owner", 1000), peers.start("other", 1001)
        with world_keyring("wqd-oracle") as ring:
            live = (await owner.request("watch", source="keys", target=str(ring)))["result"][0]
            closed = (await owner.request("watch", source="keys", target=str(ring)))["result"][0]
            assert (await owner.request("call", path=closed, iface=SUB_IFACE, member="Close"))["ok"]
            number = int(live.rsplit("/", 1)[1])
            never = [PREFIX + str(n) for n in (number + 1, number - 1, 1, 2, 9223372036854775807)]
            expected = await probe(other, never[0])
            assert expected[0] == (False, "io.wqd.WatchQueue1.Error.NoSuchObject", "no such subscription")
            assert all(answer[0] is False for answer in expected)
            for path in (live, closed, *never[1:]):
                assert await probe(other, path) == expected, path
            # ... and the owner's subscription was not touched by any of it.
            out = await owner.request("get", path=live, iface=SUB_IFACE, prop="Delivered")
            assert out["ok"], out
            out = await owner.request("call", path=PREFIX.rstrip("/"), iface="org.freedesktop.DBus.Introspectable",
                                      member="Introspect")
            assert f'<node name="{number}"/>' in out["result"][0]
    finally:
        peers.close()


async def test_numbers_reveal_nothing_of_others_rate(system_bus, wqd_factory):
    require_root()
    await wqd_factory(system_bus)
    peers = Peers(system_bus.address)
    try:
        a, b = peers.start("a", 1000), peers.start("b", 1001)
        with world_keyring("wqd-numbers") as ring:
            numbers = []
            for peer in (a, b, a, b, a, b, a):
                out = await peer.request("watch", source="keys", target=str(ring))
                numbers.append(int(out["result"][0].rsplit("/", 1)[1]))
        assert len(set(numbers)) == len(numbers) and all(0 < n < 2 ** 63 for n in numbers)
        # Sequential numbering gave b exactly a's last + 1 (and a b's last + 1): a
        # count of each other's Watch calls. Random 63-bit numbers never do.
        steps = [later - earlier for earlier, later in zip(numbers, numbers[1:])]
        assert not any(0 < step <= 16 for step in steps), numbers
        assert max(numbers) > 2 ** 32, numbers  # not a small counter either
    finally:
        peers.close()
