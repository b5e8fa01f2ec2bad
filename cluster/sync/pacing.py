"""Send pacing (pure): the token bucket that spaces out bulk sends (refresh passes, resync answers).

Bulk sends go at SEND_RATE datagrams a second, in batches of SEND_BATCH with a yield between, so
the loop never runs more than ~1 ms of them at a time. 20k/s is 460k flows/s (1M flows in
~2.3 s), below what one receiver installs per core, so its socket buffer (16 MB) never overruns.
Small sends (new flows, heartbeats, repairs) are not paced. The I/O module (flowsync.py) asks
`Pacer.due` after each batch and sleeps until then.
"""
from __future__ import annotations

import math

SEND_RATE = 20_000
SEND_BATCH = 32


class Pacer:
    """A token bucket shared by every bulk send of one FlowSync: after n datagrams, `due(n, now)`
    is when the rate allows them (a burst of `burst` is allowed after idling)."""

    def __init__(self, rate_per_s: float, burst: int = SEND_BATCH) -> None:
        self.rate_per_s = rate_per_s
        self.burst_s = burst / rate_per_s
        self._next = -math.inf

    def due(self, n: int, now: float) -> float:
        """When the caller may go on after `n` more datagrams: wait until then if it is after `now`."""
        self._next = max(self._next, now - self.burst_s) + n / self.rate_per_s
        return self._next
