"""How long the trio loop was blocked: the longest single task step, and heartbeat lateness.

The event loop is a real-time thread (STYLE.md section 11): BFD at 100 ms x 3 drops the node
after 300 ms without the loop. Two measures, both as "longest since start" and "longest over
the last window" (between `window_s` and 2 x `window_s`: two buckets, rotated by time):

- `LoopWatch` is a `trio.abc.Instrument`: the wall time between `before_task_step` and
  `after_task_step` is one task step, i.e. code that ran without yielding. The longest step
  and the task that took it name the culprit.
- `heartbeat(watch)` sleeps `interval_s` again and again and records how late it woke. That
  also catches time the loop spent outside task steps: waiting for the GIL held by a worker
  thread, or trio's own I/O handling.

The clock is injected (default `time.perf_counter`), so the bookkeeping is pure and a test drives
it with a fake clock. Wiring: `trio.lowlevel.add_instrument(watch)` (or `trio.run(...,
instruments=[watch])`), `nursery.start_soon(heartbeat, watch)`, and `watch.snapshot()` in status.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio


@dataclass
class _Peak:
    """Longest duration since start and per window bucket."""

    window_s: float
    max_s: float = 0.0
    max_what: str = ""
    bucket_start: float | None = None
    current_s: float = 0.0
    previous_s: float = 0.0

    def record(self, now: float, duration_s: float, what: str) -> None:
        self._rotate(now)
        if duration_s > self.max_s:
            self.max_s, self.max_what = duration_s, what
        if duration_s > self.current_s:
            self.current_s = duration_s

    def window_max(self, now: float) -> float:
        self._rotate(now)
        return max(self.current_s, self.previous_s)

    def _rotate(self, now: float) -> None:
        if self.bucket_start is None:
            self.bucket_start = now
            return
        elapsed = now - self.bucket_start
        if elapsed < self.window_s:
            return
        # One bucket later the current becomes the previous; two or more: both are old.
        self.previous_s = self.current_s if elapsed < 2 * self.window_s else 0.0
        self.current_s = 0.0
        self.bucket_start = now - (elapsed % self.window_s)


class LoopWatch(trio.abc.Instrument):
    """Longest task step (and heartbeat lateness), since start and over the last window."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter, window_s: float = 10.0) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.clock = clock
        self.window_s = window_s
        self._step = _Peak(window_s)
        self._late = _Peak(window_s)
        self._step_started: float | None = None
        self.steps = 0

    # ---- trio.abc.Instrument -----------------------------------------------------------------

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._step_started = self.clock()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        started, self._step_started = self._step_started, None
        if started is not None:
            now = self.clock()
            self.record_step(now, now - started, task.name)

    # ---- bookkeeping (pure) ------------------------------------------------------------------

    def record_step(self, now: float, duration_s: float, task_name: str) -> None:
        self.steps += 1
        self._step.record(now, duration_s, task_name)

    def record_lateness(self, now: float, late_s: float) -> None:
        self._late.record(now, max(0.0, late_s), "heartbeat")

    @property
    def max_stall_ms(self) -> float:
        """The longest the loop was blocked since start, by either measure."""
        return max(self._step.max_s, self._late.max_s) * 1e3

    def window_stall_ms(self) -> float:
        """The longest over the last window (window_s .. 2 x window_s)."""
        now = self.clock()
        return max(self._step.window_max(now), self._late.window_max(now)) * 1e3

    def reset(self) -> None:
        """Forget the peaks (e.g. after start-up's compile, or between benchmark phases)."""
        self._step = _Peak(self.window_s)
        self._late = _Peak(self.window_s)

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "max_stall_ms": round(self.max_stall_ms, 3),
            "window_stall_ms": round(max(self._step.window_max(now), self._late.window_max(now)) * 1e3, 3),
            "window_s": self.window_s,
            "max_step_ms": round(self._step.max_s * 1e3, 3),
            "max_step_task": self._step.max_what,
            "max_heartbeat_late_ms": round(self._late.max_s * 1e3, 3),
            "steps": self.steps,
        }


async def heartbeat(watch: LoopWatch, interval_s: float = 0.01) -> None:
    """Sleep `interval_s` forever, recording in `watch` how late each wake-up was."""
    while True:
        expected = watch.clock() + interval_s
        await trio.sleep(interval_s)
        now = watch.clock()
        watch.record_lateness(now, now - expected)
