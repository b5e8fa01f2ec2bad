"""The maintenance walk of the flow table: stale pins of quarantined indexes go, and it is counted.

A retired service or backend index (bpf/indexes.py) may still be named by pinned flows; it waits
in quarantine until a walk has deleted them. `Sweeper.step()` advances one chunked walk by about
`max_entries` flows: it deletes the flows of the indexes that were quarantined when the pass
began, and a completed pass releases those indexes and records what it counted (bpf/counters.py's
`FlowTally`, which `DataPlane.flow_count` corrects) and, per backend, the live connections this
node carries (`ActiveTally`, which `DataPlane.counters` corrects; numpy per chunk, one bincount).
`purge()` is the same deletion as one whole walk, for `DataPlane.apply` when a pool has run dry.

Threads: `step()` runs on worker threads, one pass at a time (its own lock); it takes the
indexes' lock (DataPlane's apply lock) only to snapshot and to release the quarantine.
`purge()` is called with that lock already held.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from bpf.counters import ActiveTally, FlowTally
from bpf.flowtable import FlowChunk, FlowCursor, delete_keys
from bpf.indexes import Indexes
from bpf.structs import FLOW_F_CLOSING, FLOW_F_SYNCED

# Entries with either flag are not this node's live connections (ActiveTally's docstring).
_NOT_ACTIVE_HERE = np.uint16(FLOW_F_CLOSING | FLOW_F_SYNCED)


@dataclass
class _Pass:
    """One maintenance walk: deletes flows of the indexes quarantined when it started, and counts."""

    cursor: FlowCursor
    services: frozenset[int]
    backends: frozenset[int]
    new_flows_at_start: int
    written_at_start: int
    net_at_start: npt.NDArray[np.int64]  # per backend, new_flows - closed when the pass began
    active: npt.NDArray[np.int64]  # per backend, the live connections of this node seen so far
    deleted: int = 0


class Sweeper:
    """Walks the flow table at `flows_fd` for `indexes` (guarded by `indexes_lock`); `new_flows`
    reads the program's NEW_FLOW stat, to which a pass's count is anchored, and `backend_net`
    every backend's new_flows - closed, to which its active connections are. `idle_ns` is read,
    per chunk, for each service index: how recently a flow must have been forwarded to count."""

    def __init__(self, flows_fd: int, indexes: Indexes, indexes_lock: threading.Lock, tally: FlowTally,
                 new_flows: Callable[[], int], active: ActiveTally, backend_net: Callable[[], npt.NDArray[np.int64]],
                 idle_ns: npt.NDArray[np.int64], now_ns: Callable[[], int]) -> None:
        self._fd = flows_fd
        self._indexes, self._indexes_lock = indexes, indexes_lock
        self._tally, self._new_flows = tally, new_flows
        self._active, self._backend_net = active, backend_net
        self._idle_ns, self._now_ns = idle_ns, now_ns
        self._lock = threading.Lock()  # one maintenance walk at a time
        self._pass: _Pass | None = None

    def step(self, max_entries: int) -> bool:
        """Advance the walk by about `max_entries` flows; True when that completed a pass."""
        with self._lock:
            walk = self._pass
            if walk is None:
                with self._indexes_lock:
                    services, backends = self._indexes.quarantined()
                self._active.pass_started()
                net = self._backend_net()
                walk = self._pass = _Pass(FlowCursor(self._fd), services, backends, self._new_flows(),
                                          self._tally.written, net, np.zeros(len(net), dtype=np.int64))
            target = walk.cursor.seen + max_entries
            while walk.cursor.seen < target:
                chunk = walk.cursor.next()
                if chunk is None:
                    break
                stale = None
                if walk.services or walk.backends:
                    stale = self._stale(chunk, walk.services, walk.backends)
                    walk.deleted += self._delete(chunk, stale)
                self._count_active(chunk, stale, walk.active)
            if not walk.cursor.done:
                return False
            self._pass = None
            with self._indexes_lock:
                self._indexes.release(walk.services, walk.backends)
            self._tally.pass_completed(walk.cursor.seen - walk.deleted, walk.new_flows_at_start,
                                       walk.written_at_start)
            self._active.pass_completed(walk.active, walk.net_at_start)
            return True

    def _count_active(self, chunk: FlowChunk, stale: npt.NDArray[np.bool_] | None,
                      active: npt.NDArray[np.int64]) -> None:
        """Add the chunk's live connections of this node to `active`, per backend index."""
        flows = chunk.flows()
        backend, service = flows["backend"], flows["service"]
        ok = ((flows["flags"] & _NOT_ACTIVE_HERE) == 0) & (backend < len(active)) & (service < len(self._idle_ns))
        if stale is not None:
            ok &= ~stale
        if not ok.any():
            return
        floor = np.int64(self._now_ns()) - self._idle_ns[service[ok]]
        ok[ok] = flows["last_seen_ns"][ok].astype(np.int64) >= floor
        active += np.bincount(backend[ok], minlength=len(active))[:len(active)]

    def purge(self, services: frozenset[int], backends: frozenset[int]) -> None:
        """Delete every flow of these indexes now (a whole chunked walk), and free those
        quarantined. The caller holds the indexes' lock."""
        for chunk in FlowCursor(self._fd):
            self._delete(chunk, self._stale(chunk, services, backends))
        self._indexes.release(services, backends)

    @staticmethod
    def _stale(chunk: FlowChunk, services: frozenset[int], backends: frozenset[int]) -> npt.NDArray[np.bool_]:
        flows = chunk.flows()
        stale = np.zeros(len(chunk), dtype=bool)
        if services:
            stale |= np.isin(flows["service"], np.fromiter(services, dtype=np.uint16))
        if backends:
            stale |= np.isin(flows["backend"], np.fromiter(backends, dtype=np.uint32))
        return stale

    def _delete(self, chunk: FlowChunk, stale: npt.NDArray[np.bool_]) -> int:
        if not stale.any():
            return 0
        n = delete_keys(self._fd, chunk.select(stale).keys)
        self._tally.deleted(n)
        return n
