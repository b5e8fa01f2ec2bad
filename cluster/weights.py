"""Load-aware weights: a damped controller that aims at equal utilisation. Pure, no I/O, no clock.

Theory of operation. Each backend i has a configured weight W_i and, when a load source reports,
a utilisation u_i = load_i / capacity_i (the load itself when no capacity hint is given). The
controller keeps a multiplier m_i = exp(x_i) and hashes with W_i * m_i. Shares are w_i / sum(w),
so with u_i proportional to share_i / c_i, equal utilisation means w_i proportional to c_i.

Control law, once per load interval k, in log space, for the backends whose source is fresh:

    s_i  <- a * u_i + (1 - a) * s_i                              exponential smoothing (a = smoothing)
    e_i   = ln s_i - mean_j ln s_j                               how far i is above the geometric mean
    e_i   = 0 if |e_i| <= ln(1 + deadband)                       close enough: no move
    x_i  <- x_i - clamp(g * e_i, -ln(max_step), +ln(max_step))   g = gain, bounded multiplicative step
    x    <- x - mean_j x_j, then clamp x_i to [ln floor, ln ceiling]

Why it does not oscillate. ln u_i - mean = (x_i - mean x) - (ln c_i - mean ln c), so per backend
the error e obeys a linear recursion. A report describes the weights that were in force one
interval earlier, so the loop has a delay: the newest sample reflects x_{k-1}. Without smoothing
the error follows e_{k+1} = e_k - g * e_{k-1}, with characteristic polynomial z^2 - z + g. The
naive law `weight = 1/load` is g = 1: both roots lie on the unit circle, |z| = 1, and the weights
swing for ever (period 6 intervals). With smoothing a the polynomial is

    (z - 1)(z - (1 - a)) + g * a = 0

which is stable for every 0 < g < 1 (Jury: |1 - a + g*a| < 1), and has two real positive roots
(no overshoot, no ringing) when g <= a / 4. The defaults a = 0.6, g = 0.15 sit exactly there:
a double root at z = 0.7, so an error decays like (1 + 0.43 k) * 0.7^k. The step clamp only ever
makes a move smaller than the linear law's, and the output lags behind, never ahead; the floor
keeps every healthy backend at >= floor of its configured weight so it still receives traffic
and so still produces load reports (a starved backend would report no load and never recover).

Hysteresis and quantisation. The output is integers 1..MAX_WEIGHT (configured weight 0 stays 0:
the backend takes no new flows). It changes only when some backend's integer weight would move by
more than `hysteresis` of its current value, or when the set of backends or the set whose load
source is fresh changes; otherwise the previous output is returned unchanged, so sample noise
does not rebuild the hash tables. The dead band on the error is what makes that safe: x_i
integrates, and an integrator behind a held (or quantised) output keeps winding up against a
small residual error until it jumps past the target, a slow limit cycle of the hysteresis' size.
Within the dead band the integrator stands still, so a settled output stays put. The integer
scale is K = MAX_WEIGHT // ceil(max W * ceiling), at least 1, so a multiplier at the ceiling fits.

Staleness. A backend whose newest sample is older than `stale_after_s` (or that has none) is
hashed with its configured weight (times K), and its state is forgotten: when reports resume it
starts again from m = 1.

Determinism. Backends are processed in name order and all arithmetic is IEEE double in a fixed
order, so two controllers fed the same inputs at the same times return the same weights. Nodes
that probe on their own see different inputs; cluster/loadshare.py makes them agree: one leader
runs the controller on the combined inputs and publishes the quantised output.

Failover. A new leader `resume`s from the last published multipliers and weights, so its first
output continues where the old leader stopped instead of restarting from m = 1.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

MAX_WEIGHT = 1000
_MIN_UTILISATION = 1e-3  # an idle backend's ln(u) stays finite


class WeightsError(ValueError):
    """Invalid controller parameters or inputs; the message names the field."""


@dataclass(frozen=True, slots=True)
class LoadSample:
    """One report from a backend's load source."""

    load: float  # utilisation when the backend has no capacity hint, else load in capacity units
    observed_at_s: float  # the caller's monotonic clock, the same one it passes as `now`


@dataclass(frozen=True, slots=True)
class BackendInput:
    configured_weight: int  # 0..MAX_WEIGHT, from the config
    sample: LoadSample | None = None
    capacity: float | None = None  # e.g. CPUs; utilisation = load / capacity


@dataclass(frozen=True, slots=True)
class ControllerParams:
    gain: float = 0.15  # g: fraction of the log-error corrected per interval; stable below 1
    smoothing: float = 0.6  # a: weight of the newest sample in the moving average
    max_step: float = 1.5  # a multiplier moves by at most this factor per interval
    floor: float = 0.1  # multiplier bounds, relative to the configured weight
    ceiling: float = 8.0
    deadband: float = 0.05  # utilisation within this fraction of the (geometric) mean: no correction
    hysteresis: float = 0.05  # emit a new output only if some weight moves by more than this fraction
    stale_after_s: float = 5.0  # a source silent this long falls back to the configured weight

    def __post_init__(self) -> None:
        checks = (
            ("gain", 0 < self.gain < 1, "must be in (0, 1)"),
            ("smoothing", 0 < self.smoothing <= 1, "must be in (0, 1]"),
            ("max_step", self.max_step > 1, "must be > 1"),
            ("floor", 0 < self.floor <= 1, "must be in (0, 1]"),
            ("ceiling", self.ceiling >= 1, "must be >= 1"),
            ("deadband", 0 <= self.deadband < 1, "must be in [0, 1)"),
            ("hysteresis", 0 <= self.hysteresis < 1, "must be in [0, 1)"),
            ("stale_after_s", self.stale_after_s > 0, "must be > 0"),
        )
        for name, ok, reason in checks:
            if not ok:
                raise WeightsError(f"{name}: {reason}, got {getattr(self, name)!r}")


@dataclass(slots=True)
class _Track:
    smoothed: float  # s_i
    seen_at_s: float  # observed_at_s of the last sample taken in
    log_m: float = 0.0  # x_i


@dataclass(slots=True)
class WeightController:
    """Call `update` once per load interval with every backend that may take traffic."""

    params: ControllerParams = field(default_factory=ControllerParams)
    _tracks: dict[str, _Track] = field(default_factory=dict)
    _last: dict[str, int] = field(default_factory=dict)
    _last_live: frozenset[str] = frozenset()
    _seed: dict[str, float] = field(default_factory=dict)  # name -> x_i for a track not yet started

    def resume(self, multipliers: Mapping[str, float], weights: Mapping[str, int]) -> None:
        """Continue from another controller's output (a leader failover): the next tracks start
        at these multipliers, and `weights` is the output the hysteresis compares with."""
        self._seed = {n: math.log(min(max(m, self.params.floor), self.params.ceiling))
                      for n, m in multipliers.items() if m > 0}
        self._last = dict(weights)
        self._last_live = frozenset()

    def update(self, inputs: Mapping[str, BackendInput], now: float) -> dict[str, int]:
        """The effective integer weights (name -> 0..MAX_WEIGHT, in name order) after this interval."""
        p = self.params
        names = sorted(inputs)
        for name in names:
            _validate(name, inputs[name])
        for gone in set(self._tracks) - set(names):
            del self._tracks[gone]

        live: list[str] = []
        stepped: list[str] = []
        for name in names:
            inp = inputs[name]
            sample = inp.sample
            if inp.configured_weight == 0 or sample is None or now - sample.observed_at_s > p.stale_after_s:
                self._tracks.pop(name, None)
                continue
            util = max(sample.load / (inp.capacity or 1.0), _MIN_UTILISATION)
            track = self._tracks.get(name)
            if track is None:
                self._tracks[name] = _Track(smoothed=util, seen_at_s=sample.observed_at_s,
                                            log_m=self._seed.pop(name, 0.0))
                stepped.append(name)
            elif sample.observed_at_s > track.seen_at_s:
                track.smoothed = p.smoothing * util + (1 - p.smoothing) * track.smoothed
                track.seen_at_s = sample.observed_at_s
                stepped.append(name)
            live.append(name)

        if len(live) >= 2 and stepped:
            self._step(live, stepped)
        elif len(live) == 1:
            self._tracks[live[0]].log_m = 0.0  # alone, a multiplier means nothing

        scale = scale_for((inputs[n].configured_weight for n in names), p.ceiling)
        candidate = {n: self._quantise(n, inputs[n].configured_weight, scale) for n in names}

        live_set = frozenset(live)
        if live_set == self._last_live and candidate.keys() == self._last.keys() and not any(
                abs(candidate[n] - self._last[n]) > p.hysteresis * self._last[n] for n in names):
            return dict(self._last)
        self._last = candidate
        self._last_live = live_set
        return dict(candidate)

    def multipliers(self) -> dict[str, float]:
        """m_i of the backends under load control (for `lbnode status` and tests)."""
        return {n: math.exp(t.log_m) for n, t in sorted(self._tracks.items())}

    def _step(self, live: list[str], stepped: list[str]) -> None:
        p = self.params
        tracks = self._tracks
        mean_log_u = math.fsum(math.log(tracks[n].smoothed) for n in live) / len(live)
        bound = math.log(p.max_step)
        dead = math.log1p(p.deadband)
        for name in stepped:
            error = math.log(tracks[name].smoothed) - mean_log_u
            if abs(error) <= dead:
                continue
            tracks[name].log_m -= min(bound, max(-bound, p.gain * error))
        mean_x = math.fsum(tracks[n].log_m for n in live) / len(live)
        lo, hi = math.log(p.floor), math.log(p.ceiling)
        for name in live:
            tracks[name].log_m = min(hi, max(lo, tracks[name].log_m - mean_x))

    def _quantise(self, name: str, configured: int, scale: int) -> int:
        if configured == 0:
            return 0
        track = self._tracks.get(name)
        weight = configured * scale * (math.exp(track.log_m) if track is not None else 1.0)
        return min(MAX_WEIGHT, max(1, math.floor(weight + 0.5)))


def scale_for(configured: Iterable[int], ceiling: float) -> int:
    """K: integer weights are configured x K x multiplier, and a multiplier at the ceiling fits."""
    return max(1, MAX_WEIGHT // max(1, math.ceil(max(configured, default=0) * ceiling)))


def _validate(name: str, inp: BackendInput) -> None:
    if not 0 <= inp.configured_weight <= MAX_WEIGHT:
        raise WeightsError(f"{name}.configured_weight: must be 0..{MAX_WEIGHT}, got {inp.configured_weight}")
    if inp.capacity is not None and not (inp.capacity > 0 and math.isfinite(inp.capacity)):
        raise WeightsError(f"{name}.capacity: must be a finite number > 0, got {inp.capacity!r}")
    if inp.sample is not None and not (inp.sample.load >= 0 and math.isfinite(inp.sample.load)):
        raise WeightsError(f"{name}.sample.load: must be a finite number >= 0, got {inp.sample.load!r}")
