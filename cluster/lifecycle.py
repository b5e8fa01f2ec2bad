"""Supervision: the node's components by name, in its one nursery, each stoppable on its own.

A reload restarts only the components whose settings changed (`stop` then `start`); a
component that raises takes the nursery, and so the node, down: a node that cannot forward
must not attract traffic (its BGP sessions close with it).
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

Component = Callable[..., Awaitable[None]]  # async def run(*, task_status) -> None


class Supervisor:
    def __init__(self) -> None:
        self._running: dict[str, tuple[trio.CancelScope, trio.Event]] = {}

    async def start(self, nursery: trio.Nursery, name: str, component: Component) -> None:
        """Start `component` in `nursery`; return once it reports it is ready."""
        await nursery.start(self._supervise, name, component)

    async def stop(self, name: str) -> None:
        """Cancel `name` and wait until it has finished (its cleanup included)."""
        entry = self._running.pop(name, None)
        if entry is not None:
            scope, done = entry
            scope.cancel()
            await done.wait()

    async def _supervise(self, name: str, component: Component, *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        done = trio.Event()
        with trio.CancelScope() as scope:
            self._running[name] = (scope, done)
            try:
                await component(task_status=task_status)
            finally:
                done.set()
