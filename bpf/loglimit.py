"""The one rate limit for log lines (healthcheck's probe bugs, bgp's accept errors and peer flaps,
flow sync's warnings): at most one line per period, counting the ones held back.

Pure: the caller passes `now` from its own clock (trio's, so tests run on a virtual clock) and
does the logging, in its own words. It lives in `bpf`, the bottom of the package graph, so that
every package may import it without a cycle (see bpf/validate.py).
"""
from __future__ import annotations

import math


class LogLimiter:
    """At most one log line per `period_s`; counts the ones it holds back.

        held = limiter.allow(now)
        if held is not None:
            log.warning("accept() failed: %s%s", exc, f" ({held} more since the last report)" if held else "")
    """

    __slots__ = ("_held", "_next_at", "period_s")

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._next_at = -math.inf
        self._held = 0

    def allow(self, now: float) -> int | None:
        """None: stay quiet (held back, counted). Else log, mentioning the returned number of lines
        held back since the last one allowed."""
        if now < self._next_at:
            self._held += 1
            return None
        held, self._held = self._held, 0
        self._next_at = now + self.period_s
        return held
