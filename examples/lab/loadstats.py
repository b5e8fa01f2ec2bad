"""The load lab's measurements, pure: occupancy meters, the agent's reply, spread and settle time.

Theory of operation. A simulated backend (examples/lab/loadsim.py) serves at most `slots`
requests at once (capacity units x slots per unit), each for a fixed service time; further
requests wait in a queue. Two step functions of time describe it: `busy` (requests in service,
0..slots) and `load` (in service plus waiting, like a Unix load average counts runnable tasks).
`Occupancy` keeps the integral of such a step function, so the average over any interval is a
difference of two integrals divided by the interval: exact, with no sampling error, whatever
the request rate.

    utilisation = mean busy / slots                        (0..1; what the plot and the spread use)
    load        = mean (busy + waiting) / slots per unit   (capacity units; above capacity when queueing)

The agent reports over a trailing window (`Window`, `agent_reply`); the lab's sampler reads the
raw integrals and computes its own intervals. Spread and settle time are computed from the
sampler's series, after the run.
"""
from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

_MIN_UTILISATION = 1e-3  # a backend that served nothing makes the spread large, not infinite


@dataclass(slots=True)
class Occupancy:
    """The integral over time of a step function (requests in service, say)."""

    value: int = 0
    integral: float = 0.0  # value-seconds up to `since_s`
    since_s: float = 0.0

    def set(self, now_s: float, value: int) -> None:
        self.integral = self.integral_at(now_s)
        self.since_s = now_s
        self.value = value

    def integral_at(self, now_s: float) -> float:
        return self.integral + self.value * max(0.0, now_s - self.since_s)


@dataclass(slots=True)
class Window:
    """A trailing average of an `Occupancy` over about `window_s`, from snapshots taken every
    `tick_s` (bounded: window_s / tick_s + 2 snapshots)."""

    window_s: float
    tick_s: float
    _snapshots: deque[tuple[float, float]] = field(default_factory=deque)

    def snapshot(self, now_s: float, meter: Occupancy) -> None:
        self._snapshots.append((now_s, meter.integral_at(now_s)))
        while len(self._snapshots) > 2 and self._snapshots[1][0] <= now_s - self.window_s:
            self._snapshots.popleft()

    def mean(self, now_s: float, meter: Occupancy) -> float:
        """The average value since the oldest snapshot still in the window (the current value
        before the first snapshot)."""
        if not self._snapshots or now_s <= self._snapshots[0][0]:
            return float(meter.value)
        t0, i0 = self._snapshots[0]
        return (meter.integral_at(now_s) - i0) / (now_s - t0)


class AgentStyle(enum.Enum):
    """What the simulated backend's agent-check port writes (one line, then it closes).

    HAProxy reads an agent's `NN%` as a percentage of the configured weight, and so does lbnode's
    agent mode: the agent's own policy sets the weight. Which policy balances depends on it:

    - IDLE, the machine's idle percentage, is what agents commonly report. With equal configured
      weights it only narrows the gap: the weights follow idle fractions, not capacities.
    - IDLE_CAPACITY, idle capacity units (CPUs x idle fraction) as a percentage of one unit, has
      its fixed point at equal utilisation: with shares s_i and L requests' worth of work over
      total capacity C, weight_i = c_i - L s_i, and s_i = c_i / C solves s = w / sum(w). It is
      the naive law, though: one interval's error comes back multiplied by -L / (C - L), so it
      converges (alternating) below 50% mean utilisation and oscillates above it.
    - LOAD, `load:X.XXX` (mean requests in service or waiting, in capacity units), is a word
      HAProxy and lbnode's agent parser ignore; it is here for a node that feeds agent loads to
      its controller instead.
    """

    IDLE = "idle"
    IDLE_CAPACITY = "idle-capacity"
    LOAD = "load"


def agent_reply(style: AgentStyle, *, utilisation: float, load: float, capacity: float) -> str:
    """The agent's line for the current window, newline included (HAProxy requires a line end)."""
    idle = 1 - min(1.0, max(0.0, utilisation))
    if style is AgentStyle.IDLE:
        return f"up {math.floor(100 * idle + 0.5)}%\n"
    if style is AgentStyle.IDLE_CAPACITY:
        return f"up {math.floor(100 * capacity * idle + 0.5)}%\n"
    return f"up load:{max(0.0, load):.3f}\n"


def spread(utilisations: Sequence[float]) -> float:
    """Highest utilisation over lowest (1.0 = perfectly even)."""
    if not utilisations:
        raise ValueError("spread of no backends")
    return max(utilisations) / max(min(utilisations), _MIN_UTILISATION)


@dataclass(frozen=True, slots=True)
class Interval:
    """Between two consecutive samples: each backend's utilisation and the node's weights."""

    start_s: float
    end_s: float
    busy_s: Mapping[str, float]  # slot-seconds in service during the interval, per backend
    slots: Mapping[str, int]  # how many requests each backend serves at once
    weights: Mapping[str, int]  # the (first) node's effective weights at the interval's end; {} if unknown
    peers: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # other nodes' weights, by node

    def utilisation(self, name: str) -> float:
        return self.busy_s[name] / (self.slots[name] * (self.end_s - self.start_s))


def phase_utilisation(intervals: Sequence[Interval], start_s: float, end_s: float) -> dict[str, float]:
    """Each backend's utilisation over [start_s, end_s], from the intervals that lie inside it:
    total busy time over total capacity-time, so a long interval counts for its length."""
    inside = [iv for iv in intervals if iv.start_s >= start_s - 1e-9 and iv.end_s <= end_s + 1e-9]
    if not inside:
        raise ValueError(f"no samples between {start_s:.3f} and {end_s:.3f}")
    names = sorted(inside[0].busy_s)
    duration = math.fsum(iv.end_s - iv.start_s for iv in inside)
    return {n: math.fsum(iv.busy_s[n] for iv in inside) / (inside[0].slots[n] * duration) for n in names}


def phase_spread(intervals: Sequence[Interval], start_s: float, end_s: float) -> float:
    """The spread of a phase: each backend's utilisation averaged over the phase's second half,
    then the highest over the lowest. Averaging before dividing keeps request-count noise (a
    small backend serves few requests in a short interval) from inflating the ratio."""
    mid = (start_s + end_s) / 2
    return spread(list(phase_utilisation(intervals, mid, end_s).values()))


def weight_shares(weights: Mapping[str, int]) -> dict[str, float]:
    total = sum(weights.values())
    return {n: (w / total if total else 0.0) for n, w in weights.items()}


def disagreement(intervals: Sequence[Interval], start_s: float, end_s: float) -> float | None:
    """The largest difference, in share of the weights, between any node's weights and the first
    node's, over the intervals in [start_s, end_s] where every node answered; None without peers."""
    worst: float | None = None
    for iv in intervals:
        if not (start_s <= iv.end_s <= end_s) or not iv.peers or not iv.weights:
            continue
        if any(not w for w in iv.peers.values()):
            continue
        ref = weight_shares(iv.weights)
        for weights in iv.peers.values():
            shares = weight_shares(weights)
            gap = max(abs(shares.get(n, 0.0) - ref[n]) for n in ref)
            worst = gap if worst is None else max(worst, gap)
    return worst


def settle_time(intervals: Sequence[Interval], start_s: float, end_s: float, *, tolerance: float = 0.1) -> float:
    """Seconds from `start_s` until the weights stay settled for the rest of the phase: every
    backend's weight share within `tolerance` of the step from its final value, where the final
    value is its mean share over the phase's second half and the step is the largest change of
    any backend's share, from the last weights before `start_s` (or the first after) to final.

    A step-relative band, as in a step response's settling time: a band relative to each share
    would be too tight for a small backend's share (a 1-capacity backend of 15 holds ~7% of the
    weight, and a controller's normal wander of one point would count as unsettled). Measured on
    the weights rather than on utilisation: they are the controller's output, free of the
    request-count noise of short utilisation intervals, and they are what moves traffic.
    Returns the phase's length if the weights were never reported.
    """
    before = [iv for iv in intervals if iv.end_s <= start_s and iv.weights]
    inside = [iv for iv in intervals if start_s < iv.end_s <= end_s and iv.weights]
    mid = (start_s + end_s) / 2
    late = [weight_shares(iv.weights) for iv in inside if iv.end_s >= mid]
    if not inside or not late:
        return end_s - start_s
    names = sorted(late[0])
    final = {n: math.fsum(s.get(n, 0.0) for s in late) / len(late) for n in names}
    initial = weight_shares((before[-1] if before else inside[0]).weights)
    band = tolerance * max(abs(final[n] - initial.get(n, 0.0)) for n in names)
    settled_at = start_s
    for iv in inside:
        shares = weight_shares(iv.weights)
        if any(abs(shares.get(n, 0.0) - final[n]) > band for n in names):
            settled_at = iv.end_s
    return settled_at - start_s
