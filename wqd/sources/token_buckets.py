"""Per-uid pacing of the Watch calls that cost wqd work on a peer's behalf.

A ``Watch`` of ``keys`` or ``credentials`` costs a credential helper several
operations (key lookups, a cache read as the peer) before policy has even
judged it, so a user repeating it 10,000 times must not buy 10,000 helper
rounds. Each such source keeps one ``TokenBuckets`` (its ``[SOURCE] watch_rate``
and ``watch_burst``): a token bucket per non-root uid, shared by all of that
uid's connections. Root is never paced.
"""

from __future__ import annotations

import time

from wqd.errors import LimitsExceeded


class TokenBuckets:
    """A token bucket per uid: *rate* tokens a second, at most *burst* saved up."""

    MAX_TRACKED = 4096

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.buckets: dict[int, tuple[float, float]] = {}  # uid -> (tokens, when)

    def take(self, uid: int) -> bool:
        now = time.monotonic()
        tokens, when = self.buckets.get(uid, (self.burst, now))
        tokens = min(self.burst, tokens + (now - when) * self.rate)
        if tokens < 1:
            self.buckets[uid] = (tokens, now)
            return False
        if len(self.buckets) >= self.MAX_TRACKED and uid not in self.buckets:
            self._prune(now)
        self.buckets[uid] = (tokens - 1, now)
        return True

    def admit(self, uid: int, calls: str) -> None:
        """Take a token for one of *uid*'s *calls* (``"keys Watch"``), or raise
        ``LimitsExceeded`` naming the rate; root is not paced."""
        if uid != 0 and not self.take(uid):
            raise LimitsExceeded(f"too many {calls} calls from uid {uid}; at most {self.rate:g} a second")

    def _prune(self, now: float) -> None:
        """Forget the uids whose buckets are full again (they lose nothing)."""
        for uid, (tokens, when) in list(self.buckets.items()):
            if tokens + (now - when) * self.rate >= self.burst:
                del self.buckets[uid]
