"""cluster/loopwatch.py: the longest loop stall, with a fake clock and with a real trio loop."""
from __future__ import annotations

import time

import pytest
import trio

from cluster.loopwatch import LoopWatch, heartbeat

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTask:
    def __init__(self, name: str) -> None:
        self.name = name


def step(watch: LoopWatch, clock: FakeClock, name: str, duration_s: float) -> None:
    watch.before_task_step(FakeTask(name))  # type: ignore[arg-type]
    clock.now += duration_s
    watch.after_task_step(FakeTask(name))  # type: ignore[arg-type]


def test_longest_step_and_its_task_since_start() -> None:
    clock = FakeClock()
    watch = LoopWatch(clock, window_s=10)
    for name, d in [("a", 0.001), ("status", 0.120), ("b", 0.002)]:
        step(watch, clock, name, d)
    snap = watch.snapshot()
    assert snap["max_stall_ms"] == pytest.approx(120)
    assert snap["max_step_task"] == "status" and snap["steps"] == 3


@pytest.mark.parametrize("idle_s,expected_ms", [
    (0.0, 120),    # same bucket
    (12.0, 120),   # one window later: the previous bucket still counts
    (25.0, 0),     # two windows later: forgotten by the window, not by max_stall_ms
])
def test_window_forgets_old_stalls(idle_s: float, expected_ms: float) -> None:
    clock = FakeClock()
    watch = LoopWatch(clock, window_s=10)
    step(watch, clock, "status", 0.120)
    clock.now += idle_s
    assert watch.window_stall_ms() == pytest.approx(expected_ms)
    assert watch.max_stall_ms == pytest.approx(120)


def test_a_new_stall_in_the_window_replaces_a_forgotten_one() -> None:
    clock = FakeClock()
    watch = LoopWatch(clock, window_s=10)
    step(watch, clock, "old", 0.200)
    clock.now += 30
    step(watch, clock, "new", 0.005)
    assert watch.window_stall_ms() == pytest.approx(5)
    assert watch.snapshot()["max_step_task"] == "old"


def test_heartbeat_lateness_counts_as_a_stall() -> None:
    clock = FakeClock()
    watch = LoopWatch(clock, window_s=10)
    watch.record_lateness(clock.now, 0.300)
    watch.record_lateness(clock.now, -0.001)  # early wake-ups are not negative stalls
    assert watch.max_stall_ms == pytest.approx(300)
    assert watch.snapshot()["max_heartbeat_late_ms"] == pytest.approx(300)
    watch.reset()
    assert watch.max_stall_ms == 0


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window_s"):
        LoopWatch(window_s=0)


def test_on_a_real_loop_a_blocking_step_is_seen_and_named() -> None:
    watch = LoopWatch(window_s=60)

    async def blocker() -> None:
        await trio.lowlevel.checkpoint()
        time.sleep(0.05)  # noqa: ASYNC251  # blocks the loop on purpose: what the watch is for

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeat, watch, 0.005)
            nursery.start_soon(blocker, name="blocker")
            with trio.fail_after(10):
                # noqa below: the watch's snapshot has no event to wait on; bounded by fail_after(10).
                while watch.snapshot()["max_heartbeat_late_ms"] < 40:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main, instruments=[watch])
    snap = watch.snapshot()
    assert snap["max_step_ms"] >= 45 and snap["max_step_task"] == "blocker"
    assert 45 <= watch.max_stall_ms < 5000
