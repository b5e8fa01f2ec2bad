"""The apply task: the node's latest `Desired` into the data plane, on a worker thread.

`DataPlane.apply` builds hash tables (ms per service), so it never runs on the event loop.
`want(desired)` is synchronous and cheap: it records the state and wakes the task, which
applies the newest state it has (intermediate ones are skipped) and then records the routes
that state allows and calls `on_applied`: the node announces only routes whose services the
data plane already has. `applied()` waits for the state of the latest `want()`.
"""
from __future__ import annotations

from collections.abc import Callable

import trio

from bgp.rib import RouteAttrs
from cluster.components import DataPlaneLike
from cluster.desired import Desired, Prefix


class Applier:
    def __init__(self, desired: Desired, on_applied: Callable[[], None]) -> None:
        self.routes: dict[Prefix, RouteAttrs] = {}  # allowed by the state the data plane has
        self._desired = desired
        self._on_applied = on_applied
        self._wanted = 0  # generation of the latest want()
        self._done = 0  # generation the data plane has
        self._kick = trio.Event()
        self._finished = trio.Event()
        self._error: BaseException | None = None
        self._waiters = 0

    def want(self, desired: Desired) -> None:
        self._desired = desired
        self._wanted += 1
        self._kick.set()

    async def run(self, dp: DataPlaneLike, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """An apply error goes to whoever waits in `applied()` (a reload then rolls back); with
        no one waiting it stops the node, as a component crash does."""
        self.want(self._desired)  # the first pass applies the state at start-up
        task_status.started()
        while True:
            await self._kick.wait()
            self._kick = trio.Event()
            generation, desired = self._wanted, self._desired
            try:
                # The specs are built on the worker thread too (ms per service at scale).
                await trio.to_thread.run_sync(_apply, dp, desired)
            except Exception as exc:
                if not self._waiters:
                    raise
                self._error = exc
            else:
                self._error = None
                self.routes = dict(desired.routes)
                self._on_applied()
            self._done = generation
            self._finished.set()
            self._finished = trio.Event()

    async def applied(self) -> None:
        """Wait until the data plane has the state of the latest want(); raise its error."""
        generation = self._wanted
        self._waiters += 1
        try:
            while self._done < generation:
                await self._finished.wait()
        finally:
            self._waiters -= 1
        if self._error is not None:
            raise self._error


def _apply(dp: DataPlaneLike, desired: Desired) -> None:
    """On a worker thread: build the data plane's services and apply them."""
    dp.apply(desired.dataplane_services())
