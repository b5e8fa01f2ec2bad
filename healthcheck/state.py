"""Pure health state: rise/fall hysteresis per check, backend and need-N service aggregation.

Theory of operation
-------------------
Every (backend, check) pair owns a `Hysteresis`. It is UP or DOWN and counts consecutive results
that disagree with its state; `rise` consecutive passes turn DOWN into UP and `fall` consecutive
failures turn UP into DOWN. A result that agrees with the state resets the count, so a flapping
backend (pass, fail, pass, ...) never changes state while rise, fall >= 2. The transition table
`_TABLE` maps (state, ok) to an action and is enforced: a missing entry is an error.

A backend starts in its configured initial state (DOWN unless `initial: up`). It is *healthy*
while every one of its checks is UP, and *usable* (in the hash for new flows) while healthy and
not administratively disabled. A service is up while at least `need` backends are usable.

Nothing here reads a clock, sleeps or logs: callers pass `now` (any monotonic clock) and get
events back.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import cast

from healthcheck.config import BackendConfig, BackendId, CheckKind, InitialState, ServiceHealthConfig
from healthcheck.errors import HealthCheckError
from healthcheck.latency import LatencyHistogram, LatencySnapshot


class Health(enum.Enum):
    DOWN = "down"
    UP = "up"


class _Action(enum.Enum):
    AGREE = "agree"  # result matches the state: reset the streak
    COUNT = "count"  # result disagrees: extend the streak, flip when it reaches rise/fall


_TABLE: dict[tuple[Health, bool], _Action] = {
    (Health.DOWN, False): _Action.AGREE,
    (Health.DOWN, True): _Action.COUNT,
    (Health.UP, True): _Action.AGREE,
    (Health.UP, False): _Action.COUNT,
}


@dataclass(frozen=True, slots=True)
class Transition:
    old: Health
    new: Health
    at: float


class Hysteresis:
    """Rise/fall hysteresis for one (backend, check)."""

    __slots__ = ("rise", "fall", "state", "streak", "since")

    def __init__(self, rise: int, fall: int, initial: Health = Health.DOWN, now: float = 0.0) -> None:
        if rise < 1 or fall < 1:
            raise HealthCheckError(f"rise and fall must be >= 1, got rise={rise} fall={fall}")
        self.rise = rise
        self.fall = fall
        self.state = initial
        self.streak = 0
        self.since = now

    def observe(self, ok: bool, now: float) -> Transition | None:
        try:
            action = _TABLE[(self.state, bool(ok))]
        except KeyError:
            raise HealthCheckError(f"no transition for ({self.state}, {ok!r})") from None
        if action is _Action.AGREE:
            self.streak = 0
            return None
        self.streak += 1
        if self.streak < (self.rise if self.state is Health.DOWN else self.fall):
            return None
        old = self.state
        self.state = Health.UP if old is Health.DOWN else Health.DOWN
        self.streak = 0
        self.since = now
        return Transition(old, self.state, now)


# -- events (what other components consume) ------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BackendChanged:
    """A backend entered or left the hash for new flows."""

    service: str
    backend: BackendId
    usable: bool
    healthy: bool
    disabled: bool
    reason: str  # last probe error, "passed", or "disabled"/"enabled"
    at: float


@dataclass(frozen=True, slots=True)
class ServiceChanged:
    """A service crossed its `need` threshold: advertise (up) or withdraw (down) its VIP."""

    service: str
    up: bool
    usable: int
    need: int
    at: float


Event = BackendChanged | ServiceChanged


# -- snapshots (for status) ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CheckStatus:
    index: int
    kind: CheckKind
    state: Health
    since: float
    streak: int
    runs: int
    failures: int
    last_ok: bool | None  # None: never ran
    last_latency_ms: float | None
    last_error: str | None  # text of the most recent failure, kept after later passes
    last_error_at: float | None
    latency: LatencySnapshot | None = None  # every probe's duration (failures and timeouts included)


@dataclass(frozen=True, slots=True)
class BackendStatus:
    backend: BackendId
    disabled: bool
    healthy: bool
    usable: bool
    since: float  # when `usable` last changed (or start)
    checks: tuple[CheckStatus, ...]


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    service: str
    up: bool
    usable: int
    need: int
    since: float
    backends: tuple[BackendStatus, ...]


class _CheckTrack:
    __slots__ = ("hyst", "kind", "runs", "failures", "last_ok", "last_latency_ms", "last_error", "last_error_at",
                 "latency")

    def __init__(self, hyst: Hysteresis, kind: CheckKind) -> None:
        self.hyst = hyst
        self.kind = kind
        self.runs = 0
        self.failures = 0
        self.last_ok: bool | None = None
        self.last_latency_ms: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.latency = LatencyHistogram()


class _BackendTrack:
    __slots__ = ("config", "disabled", "checks", "usable", "since")

    def __init__(self, config: BackendConfig, checks: list[_CheckTrack], now: float) -> None:
        self.config = config
        self.disabled = config.disabled
        self.checks = checks
        self.usable = self.healthy and not self.disabled
        self.since = now

    @property
    def healthy(self) -> bool:
        return all(c.hyst.state is Health.UP for c in self.checks)


class ServiceHealth:
    """All hysteresis state of one service; feed it results, get events."""

    def __init__(self, config: ServiceHealthConfig, now: float) -> None:
        self.config = config
        initial = {InitialState.DOWN: Health.DOWN, InitialState.UP: Health.UP}
        self._backends: dict[BackendId, _BackendTrack] = {}
        for b in config.backends:
            checks = [_CheckTrack(Hysteresis(c.rise, c.fall, initial[b.initial], now), c.kind) for c in config.checks]
            self._backends[b.key] = _BackendTrack(b, checks, now)
        self.usable_count = sum(1 for b in self._backends.values() if b.usable)
        self.up = self.usable_count >= config.need
        self.since = now

    def usable_backends(self) -> tuple[BackendId, ...]:
        """Backends for the hash of new flows, in config order."""
        return tuple(k for k, b in self._backends.items() if b.usable)

    def observe(self, backend: str, check: int, ok: bool, now: float, *, latency_ms: float | None = None,
                error: str | None = None) -> list[Event]:
        """Record one probe result for `backend` (a BackendId or its text); returns the events
        it caused (possibly none)."""
        b = self._track(backend)
        c = b.checks[check]
        c.runs += 1
        c.last_ok = ok
        c.last_latency_ms = latency_ms
        if latency_ms is not None:  # None: no probe ran (e.g. a through-VIP check without a route)
            c.latency.observe(latency_ms / 1000)
        if not ok:
            c.failures += 1
            c.last_error = error or "failed"
            c.last_error_at = now
        if c.hyst.observe(ok, now) is None:
            return []
        return self._reaggregate(b, "passed" if ok else (error or "failed"), now)

    def set_disabled(self, backend: str, disabled: bool, now: float) -> list[Event]:
        """Drain (or re-enable) a backend administratively."""
        b = self._track(backend)
        if b.disabled == disabled:
            return []
        b.disabled = disabled
        return self._reaggregate(b, "disabled" if disabled else "enabled", now)

    def snapshot(self) -> ServiceStatus:
        backends = tuple(
            BackendStatus(
                backend=key, disabled=b.disabled, healthy=b.healthy, usable=b.usable, since=b.since,
                checks=tuple(
                    CheckStatus(index=i, kind=c.kind, state=c.hyst.state, since=c.hyst.since, streak=c.hyst.streak,
                                runs=c.runs, failures=c.failures, last_ok=c.last_ok, last_latency_ms=c.last_latency_ms,
                                last_error=c.last_error, last_error_at=c.last_error_at,
                                latency=c.latency.snapshot())
                    for i, c in enumerate(b.checks)))
            for key, b in self._backends.items())
        return ServiceStatus(service=self.config.name, up=self.up, usable=self.usable_count, need=self.config.need,
                             since=self.since, backends=backends)

    def _track(self, backend: str) -> _BackendTrack:
        try:
            return self._backends[cast(BackendId, backend)]  # a BackendId equals its text
        except KeyError:
            raise HealthCheckError(f"{self.config.name}: unknown backend {backend!r}") from None

    def _reaggregate(self, b: _BackendTrack, reason: str, now: float) -> list[Event]:
        events: list[Event] = []
        usable = b.healthy and not b.disabled
        if usable != b.usable:
            b.usable = usable
            b.since = now
            self.usable_count += 1 if usable else -1
            events.append(BackendChanged(self.config.name, b.config.key, usable, b.healthy, b.disabled, reason, now))
        count = self.usable_count
        up = count >= self.config.need
        if up != self.up:
            self.up = up
            self.since = now
            events.append(ServiceChanged(self.config.name, up, count, self.config.need, now))
        return events
