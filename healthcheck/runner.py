"""The health checker component: one trio task per (backend, check), events out on a channel.

    checker = HealthChecker(services, netns="lb-node")  # through-VIP routing set up there
    await nursery.start(checker.run)        # ready: steering installed, all loops started
    async for event in checker.events: ...  # BackendChanged / ServiceChanged
    checker.snapshot()                      # ServiceStatus per service, for status output

Each loop starts at a random phase within its interval and then ticks every interval scaled by
``1 ± jitter``, so a thousand checks neither beat in phase nor drift into lock-step. Wake-ups
are rounded up to a `tick_s` grid (10 ms) and parked on a `TickWheel`, so checks due close
together share one pass of the event loop and a wake-up costs no cancel scope: at 1,000
checks/s the difference between ~1,000 and ~100 loop passes. A probe runs
inside a cancel scope of the check's timeout; results go into the pure `ServiceHealth`, and the
events it returns are sent on a memory channel (a slow consumer applies back-pressure to the
checks, it does not lose events). Events report changes only: read `snapshot()` once after
start for the initial state.
"""
from __future__ import annotations

import heapq
import logging
import math
import random
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from bpf.loglimit import LogLimiter
from healthcheck.config import BackendConfig, CheckConfig, CheckKind, ServiceHealthConfig
from healthcheck.errors import HealthCheckError, SteeringError
from healthcheck.probe import Attempt, ProbeResult, ProbeTarget, SocketFactory, make_ssl_context, plain_socket, probe
from healthcheck.state import BackendChanged, Event, ServiceHealth, ServiceStatus
from healthcheck.vipnet import NetnsSockets, VipSteering

log = logging.getLogger(__name__)

ProbeFn = Callable[[CheckConfig, ProbeTarget, Attempt], Awaitable[ProbeResult]]
CLEANUP_TIMEOUT_S = 5.0
PROBE_BUG_LOG_PERIOD_S = 60.0  # "probe raised" tracebacks: at most one per check per minute


class TickWheel:
    """Parks tasks until a tick of a `tick_s` grid and wakes all of a tick's tasks at once.

    `trio.sleep_until` per task costs a cancel scope, a deadline registration and a
    `Cancelled` exception per wake-up; here a parked task is rescheduled directly, and only
    the wheel's own task sleeps (until the earliest occupied tick, moved earlier by `park`).
    """

    def __init__(self, tick_s: float) -> None:
        self.tick_s = tick_s
        self._slots: dict[int, list[trio.lowlevel.Task]] = {}
        self._heap: list[int] = []
        self._scope: trio.CancelScope | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            with trio.CancelScope(deadline=self._heap[0] * self.tick_s if self._heap else math.inf) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
            now = trio.current_time()
            while self._heap and self._heap[0] * self.tick_s <= now:
                for task in self._slots.pop(heapq.heappop(self._heap), ()):
                    trio.lowlevel.reschedule(task)

    async def park(self, when: float) -> None:
        """Sleep until the first tick at or after `when`."""
        k = math.ceil(when / self.tick_s)
        if k * self.tick_s <= trio.current_time():
            await trio.lowlevel.checkpoint()
            return
        task = trio.lowlevel.current_task()
        slot = self._slots.get(k)
        if slot is None:
            slot = self._slots[k] = []
            heapq.heappush(self._heap, k)
            if self._scope is not None and k * self.tick_s < self._scope.deadline:
                self._scope.deadline = k * self.tick_s
        slot.append(task)

        def abort(_: Any) -> trio.lowlevel.Abort:
            slot.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


class HealthChecker:
    def __init__(self, services: Sequence[ServiceHealthConfig], *, netns: str | None = None,
                 steering: VipSteering | None = None, probe_fn: ProbeFn = probe, jitter: float = 0.05,
                 rng: random.Random | None = None, event_buffer: int | None = None, tick_s: float = 0.01) -> None:
        """`netns`: probe from this named network namespace (None: the process's own).

        `tick_s`: wake-ups are rounded up to this grid so that checks due within one tick share
        one pass of the event loop (0: exact times). It bounds how far apart the loop's
        wake-ups are, which is most of the cost of a thousand idle-ish tasks.

        Services with `through_vip` get policy routing from `steering`, by default a
        `VipSteering` in the same namespace, installed by `run` and removed when it ends.
        """
        if not 0 <= jitter < 0.5:
            raise HealthCheckError(f"jitter must be in [0, 0.5), got {jitter}")
        if not 0 <= tick_s <= 0.1:
            raise HealthCheckError(f"tick_s must be in [0, 0.1], got {tick_s}")
        self._tick_s = tick_s
        self._wheel: TickWheel | None = None
        if steering is None and any(s.through_vip for s in services):
            steering = VipSteering(netns)
        if steering is not None and steering.netns != netns:
            raise HealthCheckError(f"steering is for netns {steering.netns!r} but checks run in {netns!r}")
        self.services = tuple(services)
        self.netns = netns
        self._steering = steering
        self._open_socket: SocketFactory = plain_socket
        self._probe = probe_fn
        self._jitter = jitter
        self._rng = rng or random.Random()
        buffer = event_buffer if event_buffer is not None else 2 * sum(len(s.backends) + 1 for s in services) + 16
        self._send, self.events = trio.open_memory_channel[Event](buffer)
        self._health: dict[str, ServiceHealth] = {}
        self._ssl_contexts = _ssl_contexts(self.services)

    @property
    def steering(self) -> VipSteering | None:
        """The through-VIP policy routing (its marks), for probes that go where the checks go."""
        return self._steering

    def snapshot(self) -> tuple[ServiceStatus, ...]:
        return tuple(h.snapshot() for h in self._health.values())

    def service(self, name: str) -> ServiceHealth:
        return self._health[name]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        now = trio.current_time()
        self._health = {s.name: ServiceHealth(s, now) for s in self.services}
        pairs = [(s.vip, b.address) for s in self.services if s.through_vip for b in s.backends]
        sockets = NetnsSockets(self.netns) if self.netns is not None else None
        self._open_socket = sockets or plain_socket
        try:
            if pairs:
                assert self._steering is not None
                await self._steering.apply(pairs)
            async with self._send, trio.open_nursery() as nursery:
                if pairs:
                    assert self._steering is not None
                    await nursery.start(self._steering.maintain)  # routes flushed with a link come back
                if self._tick_s:
                    self._wheel = TickWheel(self._tick_s)
                    await nursery.start(self._wheel.run)
                count = 0
                for s in self.services:
                    for b in s.backends:
                        for i, check in enumerate(s.checks):
                            nursery.start_soon(self._loop, self._health[s.name], b, i, check, self._target(s, b, check),
                                               name=f"healthcheck {s.name} {b.key} #{i}")
                            count += 1
                log.info("health checker: %d checks for %d services started", count, len(self.services))
                task_status.started()
        finally:
            if pairs:
                assert self._steering is not None
                with trio.move_on_after(CLEANUP_TIMEOUT_S, shield=True) as scope:
                    try:
                        await self._steering.remove()
                    except SteeringError as exc:  # do not mask why we are stopping
                        log.error("health checker: removing through-VIP steering: %s", exc)
                if scope.cancelled_caught:
                    log.error("health checker: removing through-VIP steering timed out after %ss", CLEANUP_TIMEOUT_S)
            if sockets is not None:
                sockets.close()

    def _target(self, s: ServiceHealthConfig, b: BackendConfig, check: CheckConfig) -> ProbeTarget:
        if s.through_vip:
            assert self._steering is not None
            host = str(s.vip) if s.vip.version == 4 else f"[{s.vip}]"
            return ProbeTarget(str(s.vip), check.port or b.port, host, mark=self._steering.mark_for(b.address),
                               open_socket=self._open_socket, ssl_context=self._ssl_context(check))
        host = str(b.address) if b.address.version == 4 else f"[{b.address}]"
        return ProbeTarget(str(b.address), check.port or b.port, host, open_socket=self._open_socket,
                           ssl_context=self._ssl_context(check))

    def _unrouted(self, s: ServiceHealthConfig, b: BackendConfig) -> str | None:
        """Why a through-VIP check cannot reach its backend now (its link is down), or None."""
        if not s.through_vip or self._steering is None:
            return None
        return self._steering.unrouted.get(b.address)

    def _ssl_context(self, check: CheckConfig) -> ssl.SSLContext | None:
        if check.kind is not CheckKind.HTTPS or check.http is None:
            return None
        return self._ssl_contexts[(check.http.verify, check.http.ca_file)]

    async def _loop(self, health: ServiceHealth, backend: BackendConfig, index: int, check: CheckConfig,
                    target: ProbeTarget) -> None:
        interval_s = check.interval_s
        next_at = trio.current_time() + self._rng.uniform(0, interval_s)
        last_error: str | None = None
        bug_log = LogLimiter(PROBE_BUG_LOG_PERIOD_S)
        wheel = self._wheel
        while True:
            if wheel is not None:
                await wheel.park(next_at)
            else:
                await trio.sleep_until(next_at)
            unrouted = self._unrouted(health.config, backend)
            if unrouted is not None:  # no probe: it could only fail, and less clearly
                result = ProbeResult(False, 0.0, f"through-VIP: {unrouted}")
            else:
                result = await check_once(check, target, self._probe, bug_log=bug_log)
            now = trio.current_time()
            if result.error != last_error:
                log.debug("%s %s #%d: %s", health.config.name, backend.key, index, result.error or "passed")
                last_error = result.error
            events = health.observe(backend.key, index, result.ok, now, error=result.error,
                                    latency_ms=None if unrouted is not None else result.latency_ms)
            for event in events:
                if isinstance(event, BackendChanged):
                    log.info("%s: %s -> %s (%s)", event.service, event.backend, "up" if event.usable else "down",
                             event.reason)
                else:
                    log.info("%s: service -> %s (%d of need %d)", event.service, "up" if event.up else "down",
                             event.usable, event.need)
                await self._send.send(event)
            next_at += interval_s * (1 + self._rng.uniform(-self._jitter, self._jitter))
            if next_at < now:  # the probe overran (should not happen: timeout < interval); skip beats
                next_at = now + interval_s * self._rng.uniform(0, 1)


async def check_once(check: CheckConfig, target: ProbeTarget, probe_fn: ProbeFn = probe, *,
                     bug_log: LogLimiter | None = None) -> ProbeResult:
    """One probe under the check's timeout; a timeout or a probe bug is a failed result.

    A probe bug is logged with its traceback, at most once per `bug_log` period (every time
    without one): a bug hit by every probe must not flood the log every interval. The failed
    result carries the exception either way, so the snapshot shows it.
    """
    attempt = Attempt()
    start = trio.current_time()
    with trio.move_on_after(check.timeout_s):
        try:
            return await probe_fn(check, target, attempt)
        except Exception as exc:  # a probe bug must not take the other checks down
            now = trio.current_time()
            held = bug_log.allow(now) if bug_log is not None else 0
            if held is not None:
                log.warning("%s:%d: probe raised%s", target.address, target.port,
                            f" ({held} more since the last report)" if held else "", exc_info=True)
            return ProbeResult(False, (now - start) * 1000, f"internal error: {exc!r}")
    elapsed_ms = (trio.current_time() - start) * 1000
    return ProbeResult(False, elapsed_ms, f"timeout after {check.timeout_ms} ms {attempt.phase}")


def _ssl_contexts(services: Sequence[ServiceHealthConfig]) -> dict[tuple[bool, str | None], ssl.SSLContext]:
    """One TLS client context per (verify, ca_file) of the HTTPS checks, built now, not per probe."""
    contexts: dict[tuple[bool, str | None], ssl.SSLContext] = {}
    for s in services:
        for i, check in enumerate(s.checks):
            if check.kind is not CheckKind.HTTPS or check.http is None:
                continue
            key = (check.http.verify, check.http.ca_file)
            if key not in contexts:
                try:
                    contexts[key] = make_ssl_context(*key)
                except (OSError, ssl.SSLError) as exc:  # config load checked the file; it changed since
                    raise HealthCheckError(f"service {s.name}: checks[{i}].ca_file: cannot load "
                                           f"{check.http.ca_file!r}: {exc}") from exc
    return contexts
