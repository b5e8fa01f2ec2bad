"""The checker's timing on trio's virtual clock: phases, intervals, jitter, timeouts, events."""
from __future__ import annotations

import logging
import random
import re
from collections import defaultdict
from itertools import pairwise
from typing import Any

import pytest
import trio
import trio.testing

from healthcheck.config import CheckConfig, ServiceHealthConfig
from healthcheck.errors import HealthCheckError
from healthcheck.probe import Attempt, ProbeResult, ProbeTarget
from healthcheck.runner import HealthChecker, TickWheel
from healthcheck.state import BackendChanged, Health, ServiceChanged
from healthcheck.vipnet import VipSteering
from tests.healthcheck_yaml import service_from_dict

pytestmark = pytest.mark.unit


def _services(n: int = 3, **check: Any) -> list[ServiceHealthConfig]:
    return [service_from_dict({
        "name": "web", "vip": "192.0.2.10", "port": 80, "through_vip": False,
        "checks": [{"kind": "tcp", "interval_ms": 1000, "timeout_ms": 300, "rise": 2, "fall": 2, **check}],
        "backends": [{"address": f"10.0.0.{i + 1}", "port": 80} for i in range(n)],
    }, "services[0]")]


class FakeProbe:
    """Records call times per target address; answers from `self.ok`, or hangs when `hang`."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.ok: dict[str, bool] = defaultdict(lambda: True)
        self.hang: set[str] = set()

    async def __call__(self, check: CheckConfig, target: ProbeTarget, attempt: Attempt) -> ProbeResult:
        self.calls[target.address].append(trio.current_time())
        if target.address in self.hang:
            attempt.phase = "waiting for response"
            await trio.sleep_forever()
        await trio.sleep(0.001)
        ok = self.ok[target.address]
        return ProbeResult(ok, 1.0, None if ok else "refused")


async def _run_for(checker: HealthChecker, seconds: float) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(checker.run)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()


async def test_no_jitter_ticks_at_the_interval_with_spread_phases(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeProbe()
    checker = HealthChecker(_services(20), probe_fn=fake, jitter=0.0, rng=random.Random(1), tick_s=0)
    start = trio.current_time()
    with trio.fail_after(60):
        await _run_for(checker, 10.0)
    firsts = sorted(times[0] - start for times in fake.calls.values())
    assert len(firsts) == 20 and 0 <= firsts[0] and firsts[-1] < 1.0
    assert len({round(t, 6) for t in firsts}) == 20  # no two checks in phase
    for times in fake.calls.values():
        gaps = [b - a for a, b in pairwise(times)]
        assert len(times) in (9, 10, 11)
        assert all(g == pytest.approx(1.0, abs=1e-6) for g in gaps)


async def test_wakeups_share_a_tick_grid(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeProbe()
    checker = HealthChecker(_services(50), probe_fn=fake, jitter=0.05, rng=random.Random(5), tick_s=0.01)
    with trio.fail_after(60):
        await _run_for(checker, 5.0)
    times = [t for ts in fake.calls.values() for t in ts]
    assert len(times) >= 200
    assert all(abs(t / 0.01 - round(t / 0.01)) < 1e-6 for t in times)  # everyone wakes on the grid
    assert len({round(ts[0], 6) for ts in fake.calls.values()}) >= 30  # still spread over the interval
    gaps = [b - a for ts in fake.calls.values() for a, b in pairwise(ts)]
    assert all(0.95 - 0.01 - 1e-9 <= g <= 1.05 + 0.01 + 1e-9 for g in gaps)


async def test_jitter_bounds_every_gap(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeProbe()
    checker = HealthChecker(_services(10), probe_fn=fake, jitter=0.1, rng=random.Random(2), tick_s=0)
    with trio.fail_after(120):
        await _run_for(checker, 30.0)
    gaps = [b - a for times in fake.calls.values() for a, b in pairwise(times)]
    assert len(gaps) > 250
    assert all(0.9 - 1e-9 <= g <= 1.1 + 1e-9 for g in gaps)
    assert max(gaps) - min(gaps) > 0.1  # it does jitter


async def test_timeout_fails_the_check_and_does_not_block_the_loop(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeProbe()
    fake.hang.add("10.0.0.2")
    checker = HealthChecker(_services(2), probe_fn=fake, jitter=0.0, rng=random.Random(3))
    with trio.fail_after(60):
        await _run_for(checker, 5.0)
    assert len(fake.calls["10.0.0.2"]) >= 4  # a hang costs one timeout, not the loop
    snap = checker.snapshot()[0]
    hung = snap.backends[1].checks[0]
    assert hung.last_ok is False and hung.state is Health.DOWN
    assert hung.last_error == "timeout after 300 ms waiting for response"
    assert hung.last_latency_ms == pytest.approx(300, abs=1)
    good = snap.backends[0].checks[0]
    assert good.last_ok is True and good.state is Health.UP and good.last_error is None


async def test_events_follow_rise_and_fall(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeProbe()
    checker = HealthChecker(_services(1), probe_fn=fake, jitter=0.0, rng=random.Random(4))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(checker.run)
            assert checker.snapshot()[0].up is False
            t0 = trio.current_time()
            ev = await checker.events.receive()
            assert isinstance(ev, BackendChanged) and ev.usable and ev.reason == "passed"
            assert 1.0 <= ev.at - t0 < 2.1  # second pass (rise=2) lands within the second interval
            ev2 = await checker.events.receive()
            assert isinstance(ev2, ServiceChanged) and ev2.up and ev2.usable == 1
            fake.ok["10.0.0.1"] = False
            t1 = trio.current_time()
            ev3 = await checker.events.receive()
            assert isinstance(ev3, BackendChanged) and not ev3.usable and ev3.reason == "refused"
            assert 1.0 <= ev3.at - t1 < 2.1  # fall=2
            ev4 = await checker.events.receive()
            assert isinstance(ev4, ServiceChanged) and not ev4.up
            nursery.cancel_scope.cancel()


async def test_a_probe_bug_is_a_failed_check_not_a_crash(autojump_clock: trio.testing.MockClock) -> None:
    async def broken(check: CheckConfig, target: ProbeTarget, attempt: Attempt) -> ProbeResult:
        raise ValueError("boom")

    checker = HealthChecker(_services(1), probe_fn=broken, jitter=0.0)
    with trio.fail_after(60):
        await _run_for(checker, 3.0)
    c = checker.snapshot()[0].backends[0].checks[0]
    assert c.runs >= 2 and c.last_error == "internal error: ValueError('boom')"


async def test_a_probe_bug_is_logged_at_most_once_a_minute_per_check(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    async def broken(check: CheckConfig, target: ProbeTarget, attempt: Attempt) -> ProbeResult:
        raise ValueError("boom")

    checker = HealthChecker(_services(2), probe_fn=broken, jitter=0.0)
    with caplog.at_level(logging.WARNING, logger="healthcheck.runner"), trio.fail_after(600):
        await _run_for(checker, 150.0)
    runs = sum(c.runs for b in checker.snapshot()[0].backends for c in b.checks)
    assert runs >= 2 * 149
    raised = [r for r in caplog.records if "probe raised" in r.getMessage()]
    # Per check: the first failure, then one a minute (t0+60, t0+120) naming what it held back.
    assert len(raised) == 2 * 3 and all(r.exc_info for r in raised)
    held_back = sorted(r.getMessage().split(" raised")[1] for r in raised)
    assert held_back[:2] == [""] * 2
    # 59 or 60: a probe due exactly at a minute's edge falls on either side of it (float time).
    assert all(re.fullmatch(r" \((59|60) more since the last report\)", text) for text in held_back[2:]), held_back


def test_bad_arguments() -> None:
    svc = service_from_dict({"name": "web", "vip": "192.0.2.10", "port": 80, "checks": [{"kind": "tcp"}],
                                         "backends": [{"address": "10.0.0.1", "port": 80}]}, "s")
    with pytest.raises(HealthCheckError, match="steering is for netns 'a' but checks run in None"):
        HealthChecker([svc], steering=VipSteering("a"))
    with pytest.raises(HealthCheckError, match="jitter"):
        HealthChecker(_services(1), jitter=0.7)
    with pytest.raises(HealthCheckError, match="tick_s"):
        HealthChecker(_services(1), tick_s=1.0)


async def test_tick_wheel_wakes_on_time_moves_earlier_and_survives_cancellation(
        autojump_clock: trio.testing.MockClock) -> None:
    wheel = TickWheel(0.01)
    woke: dict[str, float] = {}

    async def sleeper(name: str, when: float) -> None:
        await wheel.park(when)
        woke[name] = trio.current_time()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(wheel.run)
            t0 = trio.current_time()
            nursery.start_soon(sleeper, "late", t0 + 5.0)
            await trio.sleep(0.1)
            nursery.start_soon(sleeper, "early", t0 + 1.004)  # earlier than the wheel's deadline
            with trio.CancelScope() as doomed:
                doomed.deadline = t0 + 2.0
                await wheel.park(t0 + 3.0)  # cancelled while parked
            assert doomed.cancelled_caught
            await wheel.park(t0 - 1.0)  # in the past: returns at once
            await trio.sleep(4.0)
            nursery.cancel_scope.cancel()
    assert woke["early"] - t0 == pytest.approx(1.01, abs=1e-6)
    assert woke["late"] - t0 == pytest.approx(5.0, abs=1e-6)
