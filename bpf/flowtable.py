"""Chunked walks and batch deletes of the flow table, straight through bpf(2).

Theory of operation. The flow table holds up to millions of entries; a Python copy of it costs
hundreds of megabytes and seconds. So nothing here ever holds more than one chunk:

- `FlowCursor` walks the table with BPF_MAP_LOOKUP_BATCH, `chunk_entries` entries at a time,
  into one reused buffer, and hands each chunk out as packed bytes (`FlowChunk`: concatenated
  `struct flow_key`s and `struct flow`s, as `DataPlane.write_flows_packed` takes them). The
  kernel's batch token is a bucket index: entries present for the whole walk are seen exactly
  once; entries added or removed during it may or may not be (a walk is not a snapshot).
- `delete_keys` removes packed keys with BPF_MAP_DELETE_BATCH, skipping keys already gone.

Each call is one or a few syscalls, and ctypes drops the GIL while they run: drive a cursor from
a worker thread, one `next()` per `trio.to_thread.run_sync`, so the event loop runs between
chunks. `FLOW_DTYPE` views a chunk's values as a numpy array, for selecting without a Python
loop per entry.

bcc's `items_lookup_batch` is not used: it allocates a buffer for the whole table (max_entries)
and only yields after the walk is complete.
"""
from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from bpf import syscall
from bpf.loader import BpfError
from bpf.structs import Flow, FlowKey

KEY_SIZE = ctypes.sizeof(FlowKey)  # 40
VALUE_SIZE = ctypes.sizeof(Flow)  # 16
DEFAULT_CHUNK_ENTRIES = 4096

# struct flow as numpy sees it (little-endian host, as the kernel writes it).
FLOW_DTYPE = np.dtype([("backend", "<u4"), ("service", "<u2"), ("flags", "<u2"), ("last_seen_ns", "<u8")])
assert FLOW_DTYPE.itemsize == VALUE_SIZE

_BPF_MAP_LOOKUP_BATCH = syscall.BPF_MAP_LOOKUP_BATCH
_BPF_MAP_DELETE_BATCH = syscall.BPF_MAP_DELETE_BATCH
_BatchAttr = syscall.BatchAttr


class FlowTableError(BpfError):
    """A batch operation on the flow table failed."""


def _bpf(cmd: int, attr: _BatchAttr) -> int:
    """0, or the errno of a failed call."""
    return max(0, -syscall.bpf(cmd, attr))


@dataclass(frozen=True, slots=True)
class FlowChunk:
    """Up to one cursor chunk of flows: `len(self)` packed keys and values."""

    keys: bytes  # len(self) * KEY_SIZE bytes of struct flow_key
    values: bytes  # len(self) * VALUE_SIZE bytes of struct flow

    def __len__(self) -> int:
        return len(self.keys) // KEY_SIZE

    def items(self) -> list[tuple[FlowKey, Flow]]:
        """As ctypes pairs (tests, small tables): costs ~1 us a flow."""
        return [(FlowKey.from_buffer_copy(self.keys, i * KEY_SIZE), Flow.from_buffer_copy(self.values, i * VALUE_SIZE))
                for i in range(len(self))]

    def flows(self) -> npt.NDArray[np.void]:
        """The values as a read-only numpy array of FLOW_DTYPE (no copy)."""
        return np.frombuffer(self.values, dtype=FLOW_DTYPE)

    def key_rows(self) -> npt.NDArray[np.uint8]:
        """The keys as a read-only (n, KEY_SIZE) uint8 array (no copy)."""
        return np.frombuffer(self.keys, dtype=np.uint8).reshape(len(self), KEY_SIZE)

    def select(self, mask: npt.NDArray[np.bool_]) -> FlowChunk:
        """The entries where `mask` is true."""
        return FlowChunk(self.key_rows()[mask].tobytes(), self.flows()[mask].tobytes())


class FlowCursor:
    """One pass over the flow table map `map_fd`, a chunk at a time (see the module docstring).
    Not thread-safe: one thread at a time may call `next()`."""

    def __init__(self, map_fd: int, chunk_entries: int = DEFAULT_CHUNK_ENTRIES) -> None:
        if chunk_entries < 1:
            raise ValueError(f"chunk_entries must be >= 1, got {chunk_entries}")
        self.map_fd = map_fd
        self.chunk_entries = chunk_entries
        self.done = False
        self.seen = 0  # entries returned so far
        self._keys = ctypes.create_string_buffer(KEY_SIZE * chunk_entries)
        self._values = ctypes.create_string_buffer(VALUE_SIZE * chunk_entries)
        self._in = ctypes.c_uint32(0)
        self._out = ctypes.c_uint32(0)
        self._started = False

    def next(self) -> FlowChunk | None:
        """The next chunk, or None once the walk is complete."""
        while not self.done:
            attr = _BatchAttr(
                in_batch=ctypes.addressof(self._in) if self._started else 0,
                out_batch=ctypes.addressof(self._out),
                keys=ctypes.addressof(self._keys),
                values=ctypes.addressof(self._values),
                count=self.chunk_entries,
                map_fd=self.map_fd,
            )
            err = _bpf(_BPF_MAP_LOOKUP_BATCH, attr)
            if err == errno.ENOENT:
                self.done = True  # the last buckets; attr.count says how many came with them
            elif err:
                raise FlowTableError(f"flows: BPF_MAP_LOOKUP_BATCH of {self.chunk_entries}: {os.strerror(err)}")
            self._in.value = self._out.value
            self._started = True
            n = attr.count
            if n:
                self.seen += n
                return FlowChunk(ctypes.string_at(self._keys, n * KEY_SIZE),
                                 ctypes.string_at(self._values, n * VALUE_SIZE))
        return None

    def __iter__(self) -> Iterator[FlowChunk]:
        while (chunk := self.next()) is not None:
            yield chunk


def delete_keys(map_fd: int, keys: bytes) -> int:
    """Delete the packed flow keys `keys` (absent ones are skipped); returns how many went."""
    n = len(keys) // KEY_SIZE
    if len(keys) != n * KEY_SIZE:
        raise FlowTableError(f"flows: delete of {len(keys)} key bytes is not whole keys")
    buf = ctypes.create_string_buffer(keys, len(keys))
    deleted, first = 0, 0
    while first < n:
        attr = _BatchAttr(keys=ctypes.addressof(buf) + first * KEY_SIZE, count=n - first, map_fd=map_fd)
        err = _bpf(_BPF_MAP_DELETE_BATCH, attr)
        deleted += attr.count
        if err == 0:
            break
        if err != errno.ENOENT:
            raise FlowTableError(f"flows: BPF_MAP_DELETE_BATCH of {n - first}: {os.strerror(err)}")
        first += attr.count + 1  # the key at attr.count is already gone (the program or an LRU evicted it)
    return deleted


def read_array_u64(map_fd: int, entries: int, slots_per_entry: int) -> npt.NDArray[np.uint64]:
    """Every entry of an array map whose values are u64 fields, in BPF_MAP_LOOKUP_BATCH calls:
    an (entries, slots_per_entry) array. For a per-CPU array, slots_per_entry is
    possible CPUs x fields (the kernel pads each CPU's value to 8 bytes: u64 fields need none)."""
    keys = np.zeros(entries, dtype=np.uint32)
    values = np.zeros((entries, slots_per_entry), dtype=np.uint64)
    token_in, token_out = ctypes.c_uint32(0), ctypes.c_uint32(0)
    done = 0
    while done < entries:
        attr = _BatchAttr(in_batch=ctypes.addressof(token_in) if done else 0, out_batch=ctypes.addressof(token_out),
                          keys=keys.ctypes.data + 4 * done,
                          values=values.ctypes.data + values.itemsize * slots_per_entry * done,
                          count=entries - done, map_fd=map_fd)
        err = _bpf(_BPF_MAP_LOOKUP_BATCH, attr)
        if err not in (0, errno.ENOENT):
            raise FlowTableError(f"array: BPF_MAP_LOOKUP_BATCH of {entries - done}: {os.strerror(err)}")
        done += attr.count
        token_in.value = token_out.value
        if err == errno.ENOENT or attr.count == 0:
            break
    return values


def synthetic_flows(first: int, n: int, dst16: bytes, dport: int, proto: int, backend: int, service: int,
                    *, flags: int = 0, last_seen_ns: int = 0) -> FlowChunk:
    """`n` distinct flows from clients 10.0.0.0/8 (client `first` .. `first + n - 1`, port
    40000) to `dst16`:`dport`, pinned to (backend, service): for tests and benchmarks."""
    if first + n > 1 << 24:
        raise ValueError("synthetic clients are 10.0.0.0/8: at most 2**24")
    keys = np.zeros((n, KEY_SIZE), dtype=np.uint8)
    keys[:, 10:12] = 0xFF
    src = np.arange(first, first + n, dtype=np.uint32) | np.uint32(10 << 24)
    keys[:, 12:16] = src.astype(">u4").view(np.uint8).reshape(n, 4)
    keys[:, 16:32] = np.frombuffer(dst16, dtype=np.uint8)
    keys[:, 32:34] = np.frombuffer((40000).to_bytes(2, "big"), dtype=np.uint8)
    keys[:, 34:36] = np.frombuffer(dport.to_bytes(2, "big"), dtype=np.uint8)
    keys[:, 36] = proto
    values = np.zeros(n, dtype=FLOW_DTYPE)
    values["backend"], values["service"] = backend, service
    values["flags"], values["last_seen_ns"] = flags, last_seen_ns
    return FlowChunk(keys.tobytes(), values.tobytes())
