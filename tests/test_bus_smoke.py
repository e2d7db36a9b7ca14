import pytest

from support import MANAGER, IFACE, keyctl

pytestmark = [pytest.mark.asyncio, pytest.mark.bus]


async def test_linked(client):
    ring = keyctl("newring", "wqd-smoke", "@u")
    try:
        path = await client.watch("keys", ring)
        key = keyctl("add", "user", "k1", "data", ring)
        sigs = await client.wait_signals(path, 1)
        assert sigs[0] == ("KeyChanged", [int(ring), "linked", int(key)])
        print(await client.get(MANAGER, IFACE, "Sources"))
    finally:
        keyctl("unlink", ring, "@u")
