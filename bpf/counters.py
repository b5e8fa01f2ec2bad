"""The program's per-CPU counters summed in user space, and the flow count kept without a walk.

- `read_counters` reads every service's and backend's counters with one batch syscall per map
  (bpf/flowtable.py's `read_array_u64`) and sums them over CPUs with numpy: `Counters`.
  `sum_per_cpu` sums one entry's per-CPU structs (one lookup: fine for a single index).
- `FlowTally` is how `DataPlane.flow_count` answers without walking the flow table: the count
  of the last complete maintenance pass, corrected by what changed the table since (pins by
  the program, from the NEW_FLOW stat; writes and deletes from user space, tallied here).
  Thread-safe: flows are written, deleted and walked from worker threads.
- `ActiveTally` is how `DataPlane.counters` says how many connections each backend has through
  this node (weighting: leastconn) without trusting `new_flows - closed` alone, which drifts:
  see its docstring.
"""
from __future__ import annotations

import ctypes
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from bpf.flowtable import read_array_u64
from bpf.structs import BackendStats, ServiceStats


class Counters:
    """Every service's and backend's counters, read in one batch per map (`DataPlane.counters`),
    and each backend's active connections through this node (`active`; without an `ActiveTally`
    behind it, as in fakes: the raw `new_flows - closed`)."""

    def __init__(self, services: Any, backends: Any, active: Any = None) -> None:
        self._services, self._backends, self._active = services, backends, active

    def service(self, index: int) -> ServiceStats:
        return ServiceStats(*(int(x) for x in self._services[index]))

    def backend(self, index: int) -> BackendStats:
        return BackendStats(*(int(x) for x in self._backends[index]))

    def active(self, index: int) -> int:
        """Connections this node carries to backend `index` (see `ActiveTally`); may be < 0 for
        a moment (a flow counted by a peer closed here), the cluster's sum is clamped at 0."""
        if self._active is None:
            return self.backend(index).active
        return int(self._active[index])


def read_counters(service_stats: Any, backend_stats: Any, max_services: int, max_backends: int,
                  active: ActiveTally | None = None) -> Counters:
    """Both per-CPU stats maps (bcc tables), summed over CPUs: two batch syscalls, where one
    lookup per index costs ~40 ms for 4096 backends. With `active`, also the corrected active
    connections (from the same read: no extra syscall)."""
    out = []
    for table, cls, entries in ((service_stats, ServiceStats, max_services),
                                (backend_stats, BackendStats, max_backends)):
        fields = len(cls._fields_)
        ncpus = table.total_cpu
        raw = read_array_u64(int(table.map_fd), entries, ncpus * fields)
        out.append(raw.reshape(entries, ncpus, fields).sum(axis=1, dtype=np.uint64))
    return Counters(out[0], out[1], active=active.active(net_opened(out[1])) if active is not None else None)


def read_backend_net(backend_stats: Any, max_backends: int) -> npt.NDArray[np.int64]:
    """`net_opened` of every backend, from one batch read of `backend_stats`."""
    fields = len(BackendStats._fields_)
    raw = read_array_u64(int(backend_stats.map_fd), max_backends, backend_stats.total_cpu * fields)
    return net_opened(raw.reshape(max_backends, backend_stats.total_cpu, fields).sum(axis=1, dtype=np.uint64))


_NEW_FLOWS = [f[0] for f in BackendStats._fields_].index("new_flows")
_CLOSED = [f[0] for f in BackendStats._fields_].index("closed")


def net_opened(backends: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
    """Per backend, flows pinned here minus flows seen closing here (BackendStats.active), from
    an (entries, fields) array of summed backend_stats."""
    return backends[:, _NEW_FLOWS].astype(np.int64) - backends[:, _CLOSED].astype(np.int64)


_Struct = TypeVar("_Struct", bound=ctypes.Structure)


def sum_per_cpu(per_cpu: Any, cls: type[_Struct]) -> _Struct:
    """One per-CPU map entry (a sequence of `cls`, one per CPU) summed field by field."""
    total = cls()
    for spec in cls._fields_:
        setattr(total, spec[0], sum(getattr(cpu, spec[0]) for cpu in per_cpu))
    return total


@dataclass(frozen=True, slots=True)
class FlowCount:
    """Flow-table occupancy without a walk (see `DataPlane.flow_count`)."""

    entries: int  # best estimate now, 0..table_size
    walked: int  # what the last complete maintenance pass counted (0 before the first)
    walk_age_s: float  # seconds since that pass completed (inf before the first)
    table_size: int


class FlowTally:
    """Flows written and deleted from user space, and the last complete pass's count."""

    def __init__(self, new_flows_now: int = 0) -> None:
        """`new_flows_now`: the NEW_FLOW stat at start (not 0 when the counters were adopted
        from a previous run: its pins are in no pass's count yet, and none of ours)."""
        self._lock = threading.Lock()
        self._written = 0  # flows written from user space (replacements included)
        self._deleted = 0  # flows deleted from user space
        # (walked, NEW_FLOW stat, _written, _deleted, monotonic s) at the last complete pass
        self._counted: tuple[int, int, int, int, float] = (0, new_flows_now, 0, 0, -math.inf)

    def wrote(self, n: int) -> None:
        with self._lock:
            self._written += n

    def deleted(self, n: int) -> None:
        with self._lock:
            self._deleted += n

    @property
    def written(self) -> int:
        with self._lock:
            return self._written

    def pass_completed(self, walked: int, new_flows_at_start: int, written_at_start: int) -> None:
        """A pass that began at (NEW_FLOW stat, `written`) saw `walked` flows (its deletes excluded)."""
        with self._lock:
            self._counted = (walked, new_flows_at_start, written_at_start, self._deleted, time.monotonic())

    def count(self, new_flows: int, table_size: int) -> FlowCount:
        """The last pass's count, plus pins by the program (`new_flows`: the NEW_FLOW stat now)
        and writes from user space since it began, minus deletes since it ended, within 0..size."""
        with self._lock:
            walked, new0, written0, deleted0, when = self._counted
            estimate = walked + (new_flows - new0) + (self._written - written0) - (self._deleted - deleted0)
        return FlowCount(max(0, min(table_size, estimate)), walked, time.monotonic() - when, table_size)


class ActiveTally:
    """Each backend's active connections through this node, corrected from the flow table.

    The program counts, per backend, flows pinned here (`new_flows`) and first FIN/RSTs seen here
    (`closed`); their difference drifts for good whenever a connection ends without a client
    FIN/RST that this node sees: a server's reset (DSR never shows it), a client that vanished,
    an idle flow the LRU evicted, a flow that moved to another node. So each maintenance pass
    (bpf/sweep.py) also counts, per backend, the table's entries that are live connections *of
    this node*: not closing (FLOW_F_CLOSING), not only learned from a peer (FLOW_F_SYNCED: the
    program clears it when it refreshes the entry for a packet it forwards), and forwarded within
    the service's idle window (`last_seen_ns` no older than it). The answer is that count plus
    what the counters say changed since the pass began:

        active = walked + (new_flows - closed)_now - (new_flows - closed)_at pass start

    so a connection opened or closed between passes shows at once, and drift lasts at most one
    pass plus the idle window. Counters that restart (a new program, a reused index zeroed) are
    fine: the anchor is always this run's own read (`reset` for an index whose counters were
    zeroed). A flow opened while a pass walks may be in both terms until the next pass (an upper
    estimate, like `FlowTally`).

    Cluster sum (cluster/loadshare.py adds every node's `active`). Behind ECMP a flow's packets
    reach one node at a time, and only that node refreshes its entry (a peer's copy carries
    FLOW_F_SYNCED and an old stamp, and the forwarding node's REFRESH keeps rewriting it so), so
    each live connection is counted by exactly one node and the sum is the cluster's count, not
    a multiple. When the router moves a flow, the old node still counts it until its idle window
    passes or the new node's next sync refresh rewrites its copy, whichever is first: a brief
    over-count, never a lasting one. A connection idle for longer than the window is not counted
    (the data plane cannot tell an idle connection from a dead one): the window is the trade-off.
    """

    def __init__(self, max_backends: int, net_now: npt.NDArray[np.int64]) -> None:
        self._lock = threading.Lock()
        self._walked = np.zeros(max_backends, dtype=np.int64)
        self._anchor = net_now.astype(np.int64).copy()  # before any pass: counters since start
        self._reset_in_pass: set[int] = set()
        self.passes = 0

    def pass_started(self) -> None:
        with self._lock:
            self._reset_in_pass.clear()

    def pass_completed(self, walked: npt.NDArray[np.int64], anchor: npt.NDArray[np.int64]) -> None:
        """A pass that began when the counters said `anchor` counted `walked` per backend."""
        with self._lock:
            walked, anchor = walked.copy(), anchor.copy()
            for index in self._reset_in_pass:  # zeroed meanwhile: only its counters since count
                walked[index] = anchor[index] = 0
            self._walked, self._anchor = walked, anchor
            self.passes += 1

    def reset(self, index: int) -> None:
        """Backend `index` was taken anew and its counters zeroed (its old flows are gone)."""
        with self._lock:
            self._walked[index] = self._anchor[index] = 0
            self._reset_in_pass.add(index)

    def active(self, net_now: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        with self._lock:
            return self._walked + net_now - self._anchor
