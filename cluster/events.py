"""What the node hears from its components: typed events on one memory channel.

Health verdicts, backend MACs, the flow-sync digest verdict and BGP session counts all arrive
on the node's inbox, in order, and one node task (`Node._consume`) applies them to the view and
reconciles once per batch. A `Flush` is a barrier: its event is set once everything sent before
it has been applied, which is how start-up knows the view is complete before it goes on.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio

from cluster.config import IPAddress
from cluster.loadshare import Published
from healthcheck.config import BackendId
from healthcheck.state import BackendChanged

INBOX_SIZE = 1024  # a slow node makes its producers wait (the health checks), it loses nothing


@dataclass(frozen=True, slots=True)
class HealthReset:
    """A health checker started: which backends pass, per health name (then BackendChanged)."""

    healthy: Mapping[str, frozenset[BackendId]]


@dataclass(frozen=True, slots=True)
class MacsLearned:
    """Backends whose MAC the neighbour table now knows, or knows anew."""

    macs: Mapping[IPAddress, str]


@dataclass(frozen=True, slots=True)
class DigestVerdict:
    """Whether a live flow-sync peer's view digest differs from ours."""

    mismatch: bool


@dataclass(frozen=True, slots=True)
class SessionsChanged:
    """How many BGP sessions are Established now."""

    established: int


@dataclass(frozen=True, slots=True)
class WeightsPublished:
    """The cluster's load-aware weights of one service changed (cluster/loadshare.py); None: none
    are published (the configured weights apply)."""

    service: str
    published: Published | None


@dataclass(frozen=True, slots=True)
class Flush:
    """Set `done` once every event sent before this one has been applied."""

    done: trio.Event


NodeEvent = BackendChanged | HealthReset | MacsLearned | DigestVerdict | SessionsChanged | WeightsPublished | Flush


class Inbox:
    """The node's one input channel; `run` is the one task that consumes it."""

    def __init__(self, size: int = INBOX_SIZE) -> None:
        self.sender, self._receiver = trio.open_memory_channel[NodeEvent](size)

    async def send(self, event: NodeEvent) -> None:
        await self.sender.send(event)

    async def flush(self) -> None:
        """Wait until every event sent so far has been applied (and reconciled)."""
        done = trio.Event()
        await self.sender.send(Flush(done))
        await done.wait()

    async def run(self, apply: Callable[[NodeEvent], bool], reconcile: Callable[[], None], *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """`apply` each event in order (True: the view changed); `reconcile` once per batch of
        what has queued up meanwhile, before the batch's flushes are answered."""
        task_status.started()
        while True:
            batch = [await self._receiver.receive()]
            while len(batch) < INBOX_SIZE:
                try:
                    batch.append(self._receiver.receive_nowait())
                except trio.WouldBlock:
                    break
            changed = [apply(event) for event in batch if not isinstance(event, Flush)]
            if any(changed):
                reconcile()
            for event in batch:
                if isinstance(event, Flush):
                    event.done.set()
