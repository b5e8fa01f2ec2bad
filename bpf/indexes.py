"""Service and backend indexes: the pools, the quarantine, and the plan of a change.

Theory of operation. The program names a service by its slot in `service_slots` and a backend
by its slot in `backends`, and a pinned flow records both. An index can therefore not be reused
while flows pinned to its old owner may remain:

- an `IndexPool` hands out never-used indexes first and freed ones last;
- a retired index is *quarantined* (`Indexes.quarantined_*`) until a maintenance pass of the
  flow table has deleted its stale flows, and only then `release`d to its pool;
- `Indexes.plan` checks a whole change against the pools before any map is touched, and orders
  it so that it fits: a change that cannot fit is refused with the kernel left as it was.

Pure bookkeeping: no maps, no locks, no walks. DataPlane holds its apply lock around every use,
and purges the quarantine itself (a walk) when a pool runs dry.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping, Set
from dataclasses import dataclass, field
from typing import TypeVar

from bpf.loader import MapError

K = TypeVar("K", bound=Hashable)  # a service key
A = TypeVar("A", bound=Hashable)  # a backend address


@dataclass
class IndexPool:
    """Stable small integers; freed ones (already purged of their old pins) are reused last."""

    size: int
    what: str
    next_unused: int = 0
    freed: deque[int] = field(default_factory=deque)

    def take(self) -> int:
        if self.next_unused < self.size:
            self.next_unused += 1
            return self.next_unused - 1
        if self.freed:
            return self.freed.popleft()
        raise MapError(f"no free {self.what} index (limit {self.size})")

    def give_back(self, index: int) -> None:
        self.freed.append(index)

    def available(self) -> int:
        return self.size - self.next_unused + len(self.freed)


class Indexes:
    """The service and backend pools, and the indexes that wait in quarantine for a sweep."""

    def __init__(self, max_services: int, max_backends: int) -> None:
        self.services = IndexPool(max_services, "service")
        self.backends = IndexPool(max_backends, "backend")
        # Indexes whose stale pinned flows may remain; reusable once a pass has deleted them.
        self.quarantined_services: set[int] = set()
        self.quarantined_backends: set[int] = set()

    @property
    def sweep_pending(self) -> bool:
        return bool(self.quarantined_services or self.quarantined_backends)

    def quarantined(self) -> tuple[frozenset[int], frozenset[int]]:
        """(services, backends) in quarantine now: what a pass starting now will delete."""
        return frozenset(self.quarantined_services), frozenset(self.quarantined_backends)

    def release(self, services: frozenset[int], backends: frozenset[int]) -> None:
        """These indexes' stale flows are gone: those still quarantined go back to their pools."""
        for index in services & self.quarantined_services:
            self.quarantined_services.discard(index)
            self.services.give_back(index)
        for index in backends & self.quarantined_backends:
            self.quarantined_backends.discard(index)
            self.backends.give_back(index)

    def adopt(self, used_services: Set[int], used_backends: Set[int], never_used_services: Set[int],
              never_used_backends: Set[int]) -> None:
        """Start from a previous run's state (DataPlane._adopt): the used indexes are taken, the
        never-used ones free, and every other one (retired, or owned by a service that is gone)
        quarantined: stale flows may still name it."""
        for pool, used, free, quarantine in ((self.services, used_services, never_used_services,
                                              self.quarantined_services),
                                             (self.backends, used_backends, never_used_backends,
                                              self.quarantined_backends)):
            pool.next_unused = pool.size
            pool.freed = deque(sorted(free))
            quarantine.clear()
            quarantine.update(i for i in range(pool.size) if i not in used and i not in free)

    def plan(self, current: Mapping[K, Set[A]], wanted: Mapping[K, Set[A]]) -> list[K]:
        """The order in which to apply `wanted` (service key -> backend addresses) over
        `current` (the same, as applied now) so that it fits: services that give backend
        indexes back go before those that need new ones (a reload may move backends from one
        service to another at the limit). Raises MapError if the change cannot fit at all."""
        def delta(key: K) -> int:  # backend indexes this service needs (< 0: gives back)
            addresses, have = wanted[key], current.get(key)
            if have is None:
                return len(addresses)
            return len(addresses - have) - len(have - addresses)
        removed = [have for key, have in current.items() if key not in wanted]
        new_services = sum(1 for key in wanted if key not in current)
        services_free = self.services.available() + len(self.quarantined_services) + len(removed)
        if new_services > services_free:
            raise MapError(f"the change needs {new_services} new service indexes, {services_free} are free "
                           f"(limit {self.services.size})")
        deltas = {key: delta(key) for key in wanted}
        needed = sum(deltas.values()) - sum(len(have) for have in removed)
        backends_free = self.backends.available() + len(self.quarantined_backends)
        if needed > backends_free:
            raise MapError(f"the change needs {needed} more backend indexes than it frees, {backends_free} are "
                           f"free (limit {self.backends.size})")
        return sorted(wanted, key=lambda key: deltas[key])
