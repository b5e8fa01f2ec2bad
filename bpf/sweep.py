"""The maintenance walk of the flow table: stale pins of quarantined indexes go, and it is counted.

A retired service or backend index (bpf/indexes.py) may still be named by pinned flows; it waits
in quarantine until a walk has deleted them. `Sweeper.step()` advances one chunked walk by about
`max_entries` flows: it deletes the flows of the indexes that were quarantined when the pass
began, and a completed pass releases those indexes and records what it counted (bpf/counters.py's
`FlowTally`, which `DataPlane.flow_count` corrects). `purge()` is the same deletion as one whole
walk, for `DataPlane.apply` when a pool has run dry.

Threads: `step()` runs on worker threads, one pass at a time (its own lock); it takes the
indexes' lock (DataPlane's apply lock) only to snapshot and to release the quarantine.
`purge()` is called with that lock already held.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bpf.counters import FlowTally
from bpf.flowtable import FlowChunk, FlowCursor, delete_keys
from bpf.indexes import Indexes


@dataclass
class _Pass:
    """One maintenance walk: deletes flows of the indexes quarantined when it started, and counts."""

    cursor: FlowCursor
    services: frozenset[int]
    backends: frozenset[int]
    new_flows_at_start: int
    written_at_start: int
    deleted: int = 0


class Sweeper:
    """Walks the flow table at `flows_fd` for `indexes` (guarded by `indexes_lock`); `new_flows`
    reads the program's NEW_FLOW stat, to which a pass's count is anchored."""

    def __init__(self, flows_fd: int, indexes: Indexes, indexes_lock: threading.Lock, tally: FlowTally,
                 new_flows: Callable[[], int]) -> None:
        self._fd = flows_fd
        self._indexes, self._indexes_lock = indexes, indexes_lock
        self._tally, self._new_flows = tally, new_flows
        self._lock = threading.Lock()  # one maintenance walk at a time
        self._pass: _Pass | None = None

    def step(self, max_entries: int) -> bool:
        """Advance the walk by about `max_entries` flows; True when that completed a pass."""
        with self._lock:
            walk = self._pass
            if walk is None:
                with self._indexes_lock:
                    services, backends = self._indexes.quarantined()
                walk = self._pass = _Pass(FlowCursor(self._fd), services, backends, self._new_flows(),
                                          self._tally.written)
            target = walk.cursor.seen + max_entries
            while walk.cursor.seen < target:
                chunk = walk.cursor.next()
                if chunk is None:
                    break
                if walk.services or walk.backends:
                    walk.deleted += self._delete_stale(chunk, walk.services, walk.backends)
            if not walk.cursor.done:
                return False
            self._pass = None
            with self._indexes_lock:
                self._indexes.release(walk.services, walk.backends)
            self._tally.pass_completed(walk.cursor.seen - walk.deleted, walk.new_flows_at_start,
                                       walk.written_at_start)
            return True

    def purge(self, services: frozenset[int], backends: frozenset[int]) -> None:
        """Delete every flow of these indexes now (a whole chunked walk), and free those
        quarantined. The caller holds the indexes' lock."""
        for chunk in FlowCursor(self._fd):
            self._delete_stale(chunk, services, backends)
        self._indexes.release(services, backends)

    def _delete_stale(self, chunk: FlowChunk, services: frozenset[int], backends: frozenset[int]) -> int:
        flows = chunk.flows()
        stale = np.zeros(len(chunk), dtype=bool)
        if services:
            stale |= np.isin(flows["service"], np.fromiter(services, dtype=np.uint16))
        if backends:
            stale |= np.isin(flows["backend"], np.fromiter(backends, dtype=np.uint32))
        if not stale.any():
            return 0
        n = delete_keys(self._fd, chunk.select(stale).keys)
        self._tally.deleted(n)
        return n
