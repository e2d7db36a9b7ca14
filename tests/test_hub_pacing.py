"""Costly Watches are paced per uid (finding 4, devices half): what enumerates
devices or judges a snapshot waits for its uid's turn, spaced by what the last one
cost; a uid whose turn is too far away is refused; root is not paced."""

from __future__ import annotations

import time

import pytest

from wqd.errors import LimitsExceeded
from wqd.peer import PeerCredentials
from wqd.sources import devices

pytestmark = pytest.mark.asyncio


async def test_costly_devices_watches_wait_for_their_uid_s_turn():
    source = devices.DevicesSource("uevent")  # no monitor open: every Watch would open and enumerate
    alice, bob, root = PeerCredentials(":1.1", 1000), PeerCredentials(":1.2", 1001), PeerCredentials(":1.3", 0)
    assert source._costly("usb", False) and source._costly(None, False)
    await source.resolve(alice, "", {})  # the first turn is free
    source._charge_turn(1000, time.monotonic() - 0.05)  # ... and took 50 ms on the loop
    t = time.monotonic()
    await source.resolve(alice, "", {})
    waited = time.monotonic() - t
    assert waited >= 0.05 * devices.PACE_FACTOR * 0.9  # asleep, not answered at once (a lower bound)
    t = time.monotonic()
    await source.resolve(bob, "", {"initial": True})  # another uid has its own turn
    await source.resolve(root, "", {"initial": True})
    assert time.monotonic() - t < waited
    source._charge_turn(1000, time.monotonic() - 1.0)  # a one-second enumeration: ten seconds away
    with pytest.raises(LimitsExceeded):
        await source.resolve(alice, "", {"initial": True})
