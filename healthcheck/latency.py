"""Probe durations as a fixed-bucket histogram: bounded memory per check, whatever the run time.

Pure (no clock, no I/O). One `LatencyHistogram` per (backend, check) in `healthcheck.state`;
its snapshot rides along in `CheckStatus`, and `cluster.metrics` exports it as a Prometheus
histogram. The buckets are fixed so that every check's histogram, on every node, can be summed
or compared in PromQL (`histogram_quantile` needs the same `le` everywhere): from 100 us (a
connect on a LAN) to 5 s (well above a sane check timeout; slower ones land in +Inf).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

# Upper bounds in seconds (Prometheus base unit): prometheus_client's default 1-2.5-5 steps, from
# 100 us (a TCP connect on a LAN takes a fraction of a millisecond) to 5 s. 15 buckets + +Inf.
BUCKETS_S: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                1.0, 2.5, 5.0)


@dataclass(frozen=True, slots=True)
class LatencySnapshot:
    bounds_s: tuple[float, ...]  # upper bounds; the +Inf bucket is implied
    counts: tuple[int, ...]  # per bucket (not cumulative), len(bounds_s) + 1: the last is above every bound
    sum_s: float
    count: int

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it), ending with (inf, count): Prometheus's `le` buckets."""
        out, total = [], 0
        for bound, n in zip((*self.bounds_s, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class LatencyHistogram:
    __slots__ = ("_counts", "_sum_s", "_count")

    def __init__(self) -> None:
        self._counts = [0] * (len(BUCKETS_S) + 1)
        self._sum_s = 0.0
        self._count = 0

    def observe(self, duration_s: float) -> None:
        duration_s = max(0.0, duration_s)
        # bisect_left: a duration equal to a bound belongs to that bucket (le = "less or equal").
        self._counts[bisect.bisect_left(BUCKETS_S, duration_s)] += 1
        self._sum_s += duration_s
        self._count += 1

    def snapshot(self) -> LatencySnapshot:
        return LatencySnapshot(BUCKETS_S, tuple(self._counts), self._sum_s, self._count)
