"""Per-connection rate limits: a token bucket that pauses reading instead of dropping."""

from __future__ import annotations

import asyncio
import time

from ..transport import Link

RATE = "rate limit"  # the reason a connection's reading is held


class RateLimit:
    """``rate`` frames per second with bursts of ``burst``. Over it, the connection is
    not read until the bucket has refilled: TCP then slows the sender down, and nothing it
    sent is lost or refused."""

    __slots__ = ("_level", "_stamp", "burst", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst or max(1, int(rate)))
        self._level = self.burst
        self._stamp = time.monotonic()

    def spend(self, link: Link, packets: int) -> bool:
        """Take ``packets`` from the bucket; pause ``link`` while it is in debt. Return
        whether it was paused."""
        now = time.monotonic()
        self._level = min(self.burst, self._level + (now - self._stamp) * self.rate) - packets
        self._stamp = now
        if self._level >= 0:
            return False
        link.pause_reading(RATE)
        asyncio.get_running_loop().call_later(-self._level / self.rate, link.resume_reading, RATE)
        return True
