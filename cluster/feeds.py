"""Each component's run, with what it reports turned into events on the node's inbox.

- health: the checker's first snapshot (`HealthReset`, applied before start-up goes on), then
  every `BackendChanged`. (`ServiceChanged` is not the node's concern: whether a VIP is up also
  counts weights and MACs, cluster.desired.)
- BGP: the speaker reports session changes from inside its own tasks through a callback; the
  counts are queued in order (few: one per session change) and relayed as `SessionsChanged`.
- flow sync: its digest verdict is a property that changes with peers' heartbeats and with
  time (a peer's death), with no event of its own, so it is read every `DIGEST_POLL_S` and sent
  as `DigestVerdict` whenever it differs from the node's view of it.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import trio

from cluster.components import HealthLike, SpeakerLike, SyncLike
from cluster.events import DigestVerdict, HealthReset, Inbox, SessionsChanged
from healthcheck.state import BackendChanged

DIGEST_POLL_S = 0.25


async def run_health(checker: HealthLike, inbox: Inbox, *,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(checker.run)
        await inbox.send(HealthReset({s.service: frozenset(b.backend for b in s.backends if b.usable)
                                      for s in checker.snapshot()}))
        await inbox.flush()
        task_status.started()
        async for event in checker.events:
            if isinstance(event, BackendChanged):
                await inbox.send(event)
        # The checker never ends its events by itself; advertising without health checks is wrong.
        raise RuntimeError("health checker stopped sending events")


class SessionFeed:
    """Pass `changed` to the speaker as its `on_sessions_changed`, then `run` it."""

    def __init__(self, inbox: Inbox) -> None:
        self._inbox = inbox
        self._counts, self._relay = trio.open_memory_channel[int](math.inf)
        self._speaker: SpeakerLike | None = None

    def changed(self) -> None:
        if self._speaker is not None:
            self._counts.send_nowait(self._speaker.established_peers())

    async def run(self, speaker: SpeakerLike, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._speaker = speaker
        async with trio.open_nursery() as nursery:
            await nursery.start(speaker.run)
            nursery.start_soon(self._forward)
            task_status.started()

    async def _forward(self) -> None:
        async for established in self._relay:
            await self._inbox.send(SessionsChanged(established))


async def run_sync(sync: SyncLike, inbox: Inbox, believed: Callable[[], bool], *,
                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """`believed()`: the digest verdict in the node's view now."""
    async with trio.open_nursery() as nursery:
        await nursery.start(sync.run)
        task_status.started()
        while True:
            if sync.digest_mismatch != believed():
                await inbox.send(DigestVerdict(sync.digest_mismatch))
            await trio.sleep(DIGEST_POLL_S)
