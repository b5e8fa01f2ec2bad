"""The program's maps by fd, typed with the ctypes mirrors of bpf/structs.py: no bcc.

`MAP_SPECS` names every map lbnode.h declares with its key and value mirrors; `BpfMap` is
what DataPlane works on (lookups, updates, deletes, key walks, batch writes, per-CPU reads)
through bpf/syscall.py, whether the fd came from bcc (an in-process compile, in tests) or
from a pin (the node). `BpfMap.check()` refuses a map whose kernel sizes disagree with its
mirror, so a stale pin or a header changed without its mirror fails loudly at open.
"""
from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bpf import structs, syscall
from bpf.loader import MapError


@dataclass(frozen=True, slots=True)
class MapSpec:
    key: type[Any] | None  # None: a ring buffer
    value: type[Any] | None
    percpu: bool = False


MAP_SPECS: dict[str, MapSpec] = {
    "services": MapSpec(structs.ServiceKey, ctypes.c_uint32),
    "service_slots": MapSpec(ctypes.c_uint32, structs.Service),
    "vips": MapSpec(structs.VipKey, ctypes.c_uint32),
    "ch_tables": MapSpec(ctypes.c_uint32, ctypes.c_uint32),
    "backends": MapSpec(ctypes.c_uint32, structs.Backend),
    "flows": MapSpec(structs.FlowKey, structs.Flow),
    "config": MapSpec(ctypes.c_uint32, structs.LbConfig),
    "service_stats": MapSpec(ctypes.c_uint32, structs.ServiceStats, percpu=True),
    "backend_stats": MapSpec(ctypes.c_uint32, structs.BackendStats, percpu=True),
    "stats": MapSpec(ctypes.c_uint32, ctypes.c_uint64, percpu=True),
    "pin_windows": MapSpec(ctypes.c_uint32, structs.PinWindow, percpu=True),
    "flow_events": MapSpec(None, None),
}
OPTIONAL_MAPS: dict[str, MapSpec] = {  # declared only by some builds (bench/xdp.py)
    "bench_counter": MapSpec(ctypes.c_uint32, ctypes.c_uint64, percpu=True),
}


def _round8(n: int) -> int:
    return (n + 7) & ~7


class BpfMap:
    """One map by fd (owned: `close()` closes it). The subset of bcc's table API DataPlane uses:
    `Key`/`Leaf` types, `map_fd`, `total_cpu`, `m[key]` (KeyError if absent), `m[key] = v`,
    `del m[key]`, `keys()`, `getvalue(key)` (per-CPU: a list, one value per CPU),
    `update_batch(packed keys, packed values)`, plus `zero(key)`."""

    def __init__(self, fd: int, name: str, spec: MapSpec, *, owned: bool = True) -> None:
        self.map_fd = fd
        self.name = name
        self.spec = spec
        self.info = syscall.map_info(fd)
        self._owned = owned
        self.Key: Any = spec.key
        self.Leaf: Any = spec.value
        self.total_cpu = syscall.possible_cpus() if spec.percpu else 1
        self._stride = _round8(self.info.value_size) if spec.percpu else self.info.value_size

    def check(self) -> None:
        """The kernel's key and value sizes are the mirrors' (see the module docstring)."""
        if self.spec.key is None:
            return
        want = (ctypes.sizeof(self.spec.key), ctypes.sizeof(self.spec.value))  # type: ignore[arg-type]
        have = (self.info.key_size, self.info.value_size)
        if want != have:
            raise MapError(f"map {self.name}: the kernel's key/value sizes are {have}, the mirrors' in bpf/structs.py "
                           f"{want}: a map from another layout, or a header changed without its mirror")

    def close(self) -> None:
        if self._owned and self.map_fd >= 0:
            os.close(self.map_fd)
        self.map_fd = -1

    # ---- elements ------------------------------------------------------------------------------

    def _key(self, key: Any) -> ctypes.Array[ctypes.c_char]:
        raw = bytes(key)
        if len(raw) != self.info.key_size:
            raise MapError(f"map {self.name}: a {len(raw)}-byte key, the map's are {self.info.key_size}")
        return ctypes.create_string_buffer(raw, len(raw))

    def _value_buffer(self) -> ctypes.Array[ctypes.c_char]:
        return ctypes.create_string_buffer(self._stride * self.total_cpu)

    def __getitem__(self, key: Any) -> Any:
        buf = self._value_buffer()
        if not syscall.lookup(self.map_fd, self._key(key), buf):
            raise KeyError(key)
        if self.spec.percpu:
            return self.getvalue(key)
        return self.Leaf.from_buffer_copy(buf.raw[: self.info.value_size])

    def get(self, key: Any) -> Any:
        try:
            return self[key]
        except KeyError:
            return None

    def getvalue(self, key: Any) -> list[Any]:
        """A per-CPU entry, one value per possible CPU (ints for scalar values)."""
        buf = self._value_buffer()
        if not syscall.lookup(self.map_fd, self._key(key), buf):
            raise KeyError(key)
        values = [self.Leaf.from_buffer_copy(buf.raw, i * self._stride) for i in range(self.total_cpu)]
        if issubclass(self.Leaf, ctypes._SimpleCData):  # as bcc does: plain ints for scalar values
            return [v.value for v in values]
        return values

    def __setitem__(self, key: Any, value: Any) -> None:
        raw = bytes(value)
        if self.spec.percpu:  # the same value on every CPU (zeroing, mostly)
            raw = b"".join(raw.ljust(self._stride, b"\0") for _ in range(self.total_cpu))
        elif len(raw) != self.info.value_size:
            raise MapError(f"map {self.name}: a {len(raw)}-byte value, the map's are {self.info.value_size}")
        syscall.update(self.map_fd, self._key(key), ctypes.create_string_buffer(raw, len(raw)))

    def zero(self, key: Any) -> None:
        self[key] = bytes(self.info.value_size)

    def __delitem__(self, key: Any) -> None:
        if not syscall.delete(self.map_fd, self._key(key)):
            raise KeyError(key)

    def keys(self) -> Iterator[Any]:
        """Every key (a snapshot taken first: deleting while iterating is safe)."""
        out = []
        prev = None
        cur = ctypes.create_string_buffer(self.info.key_size)
        while syscall.next_key(self.map_fd, prev, cur):
            out.append(self.Key.from_buffer_copy(cur.raw))
            prev, cur = cur, ctypes.create_string_buffer(self.info.key_size)
        return iter(out)

    def update_batch(self, keys: bytes, values: bytes) -> int:
        """Write packed keys and values (whole entries) in one call; returns how many."""
        n = len(keys) // self.info.key_size
        if len(keys) != n * self.info.key_size or len(values) != n * self.info.value_size or self.spec.percpu:
            raise MapError(f"map {self.name}: a batch of {len(keys)} key / {len(values)} value bytes is not whole "
                           f"entries of {self.info.key_size} / {self.info.value_size}")
        if n:
            syscall.update_batch(self.map_fd, keys, values, n)
        return n
