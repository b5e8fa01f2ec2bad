"""The program's per-CPU counters summed in user space, and the flow count kept without a walk.

- `read_counters` reads every service's and backend's counters with one batch syscall per map
  (bpf/flowtable.py's `read_array_u64`) and sums them over CPUs with numpy: `Counters`.
  `sum_per_cpu` sums one entry's per-CPU structs (one lookup: fine for a single index).
- `FlowTally` is how `DataPlane.flow_count` answers without walking the flow table: the count
  of the last complete maintenance pass, corrected by what changed the table since (pins by
  the program, from the NEW_FLOW stat; writes and deletes from user space, tallied here).
  Thread-safe: flows are written, deleted and walked from worker threads.
"""
from __future__ import annotations

import ctypes
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from bpf.flowtable import read_array_u64
from bpf.structs import BackendStats, ServiceStats


class Counters:
    """Every service's and backend's counters, read in one batch per map (`DataPlane.counters`)."""

    def __init__(self, services: Any, backends: Any) -> None:
        self._services, self._backends = services, backends

    def service(self, index: int) -> ServiceStats:
        return ServiceStats(*(int(x) for x in self._services[index]))

    def backend(self, index: int) -> BackendStats:
        return BackendStats(*(int(x) for x in self._backends[index]))


def read_counters(service_stats: Any, backend_stats: Any, max_services: int, max_backends: int) -> Counters:
    """Both per-CPU stats maps (bcc tables), summed over CPUs: two batch syscalls, where one
    lookup per index costs ~40 ms for 4096 backends."""
    out = []
    for table, cls, entries in ((service_stats, ServiceStats, max_services),
                                (backend_stats, BackendStats, max_backends)):
        fields = len(cls._fields_)
        ncpus = table.total_cpu
        raw = read_array_u64(int(table.map_fd), entries, ncpus * fields)
        out.append(raw.reshape(entries, ncpus, fields).sum(axis=1, dtype=np.uint64))
    return Counters(*out)


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
