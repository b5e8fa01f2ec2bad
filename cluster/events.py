"""What the node hears from its components: typed events on one memory channel.

Health verdicts, backend MACs, the flow-sync digest verdict and BGP session counts all arrive
on the node's inbox, in order, and one node task (`Node._consume`) applies them to the view and
reconciles once per batch. A `Flush` is a barrier: its event is set once everything sent before
it has been applied, which is how start-up knows the view is complete before it goes on.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import trio

from cluster.config import IPAddress
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
class Flush:
    """Set `done` once every event sent before this one has been applied."""

    done: trio.Event


NodeEvent = BackendChanged | HealthReset | MacsLearned | DigestVerdict | SessionsChanged | Flush
