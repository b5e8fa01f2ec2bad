"""The typed API over the XDP program's maps: the one way the rest of lbnode steers it.

`DataPlane.apply(services)` takes the complete desired set of services and reconciles the
kernel with it: backends get stable indexes, each service's consistent-hash table is written
into its idle half and then switched in with one map update (a packet sees the old table or
the new one, never a mix), and removed backends are marked invalid so their pinned flows are
re-chosen. Flows can be listed and written in batches (the peer side of flow sync), counters
are summed over CPUs, and new/closing flows are read from the ring buffer.

The program reads no clock (it cost a third of the fast path): its owner calls `tick()` every
half refresh interval, and flows are stamped with that time. A stale tick only makes flow ages
look older; forwarding never depends on it.
"""
from __future__ import annotations

import ctypes
import mmap
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bpf import structs
from bpf.consistent_hash import Member, build_table
from bpf.loader import PROGRAM_SOURCE, Attachment, BpfError, Limits, XdpMode, attach, compile_program, detach
from bpf.structs import (
    BackendStats,
    Flow,
    FlowEvent,
    FlowKey,
    IPAddress,
    LbConfig,
    Service,
    ServiceKey,
    ServiceStats,
    Stat,
)

if TYPE_CHECKING:
    from bpf.ringbuf import RingReader


class MapError(BpfError):
    """A map operation failed (full map, bad index, kernel error)."""


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """A backend of one service. In DSR the backend listens on the service's own port."""

    address: IPAddress
    mac: str | None  # None until the neighbour table knows it: no new flows, pinned ones held
    weight: int = 1
    in_hash: bool = True  # False when unhealthy or drained: no new flows, pinned flows continue

    @property
    def usable(self) -> bool:
        return self.mac is not None

    @property
    def hash_weight(self) -> int:
        return self.weight if (self.in_hash and self.usable) else 0


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    vip: IPAddress
    port: int
    proto: int  # structs.IPPROTO_TCP / IPPROTO_UDP
    backends: tuple[BackendSpec, ...] = ()

    @property
    def key(self) -> tuple[IPAddress, int, int]:
        return (self.vip, self.port, self.proto)


@dataclass
class _IndexPool:
    """Stable small integers; freed ones are reused last, so a stale pin rarely meets a new owner."""

    size: int
    what: str
    next_unused: int = 0
    freed: deque[int] = field(default_factory=deque)

    def take(self) -> tuple[int, bool]:
        """A free index, and whether it was used before (its old pins must be purged)."""
        if self.next_unused < self.size:
            self.next_unused += 1
            return self.next_unused - 1, False
        if self.freed:
            return self.freed.popleft(), True
        raise MapError(f"no free {self.what} index (limit {self.size})")

    def give_back(self, index: int) -> None:
        self.freed.append(index)


@dataclass
class _ServiceState:
    index: int
    active_half: int
    backends: dict[IPAddress, int]  # address -> backend index
    applied: tuple[object, ...] = ()  # what the kernel has now: unchanged services are skipped


def monotonic_ns() -> int:
    """The clock of flow timestamps (the program reads it from lb_config.epoch_ns)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class DataPlane:
    """A compiled lbnode XDP program and its maps. Not thread-safe: one owner drives it."""

    def __init__(self, limits: Limits = Limits(), extra_cflags: Sequence[str] = ()) -> None:
        self.limits = limits
        self._bpf, self._fn = compile_program(PROGRAM_SOURCE, "xdp_main", [*limits.cflags(), *extra_cflags])
        self._services: dict[tuple[IPAddress, int, int], _ServiceState] = {}
        self._service_pool = _IndexPool(limits.max_services, "service")
        self._backend_pool = _IndexPool(limits.max_backends, "backend")
        self._attachments: list[Attachment] = []
        self._event_callback: Callable[[FlowEvent], None] | None = None
        self._config = LbConfig()

    # ---- program -------------------------------------------------------------------------

    @property
    def fd(self) -> int:
        return int(self._fn.fd)

    def attach(self, ifname: str, mode: XdpMode = XdpMode.NATIVE, netns: str | None = None) -> Attachment:
        attachment = attach(self.fd, ifname, mode, netns)
        self._attachments.append(attachment)
        return attachment

    def detach_all(self) -> None:
        while self._attachments:
            detach(self._attachments.pop())

    def close(self) -> None:
        try:
            self.detach_all()
        finally:
            self._bpf.cleanup()

    def _map(self, name: str) -> Any:
        return self._bpf[name.encode()]

    # ---- configuration -----------------------------------------------------------------------

    def set_config(self, mac: str, refresh_s: float = 1.0) -> None:
        """Our MAC (source of forwarded frames) and how stale a flow's timestamp may get."""
        self._config = LbConfig((ctypes.c_uint8 * 6)(*structs.mac_bytes(mac)), 0, int(refresh_s * 1e9))
        self.tick()

    def tick(self, now_ns: int | None = None) -> None:
        """Publish the control plane's clock: flows are stamped with it. Call every refresh_s / 2."""
        self._config.epoch_ns = monotonic_ns() if now_ns is None else now_ns
        self._map("config")[ctypes.c_int(0)] = self._config

    def apply(self, services: Iterable[ServiceSpec]) -> None:
        """Make the kernel serve exactly `services` (add, change, remove)."""
        wanted = {spec.key: spec for spec in services}
        for key in [k for k in self._services if k not in wanted]:
            self._remove_service(key)
        for spec in wanted.values():
            self._apply_service(spec)
        self._sync_vips()

    def _apply_service(self, spec: ServiceSpec) -> None:
        state = self._services.get(spec.key)
        if state is None:
            index, _ = self._service_pool.take()  # a reused index had its flows purged on removal
            self._zero_percpu("service_stats", index)
            state = _ServiceState(index=index, active_half=1, backends={})
            self._services[spec.key] = state
        wanted = {b.address: b for b in spec.backends}
        removed = [state.backends.pop(a) for a in [a for a in state.backends if a not in wanted]]
        for address in wanted:
            if address not in state.backends:
                try:
                    slot, reused = self._backend_pool.take()
                except MapError:
                    if not removed:
                        raise
                    # Every index is taken: hand over one of a removed backend's at once (its
                    # slots in the live table now drop until the flip below: only when full).
                    slot, reused = removed.pop(), True
                    self._retire_backend(slot, give_back=False)
                if reused:  # an old pin to this index must not reach its new owner
                    self.delete_flows([k for k, f in self.flows() if f.backend == slot])
                self._zero_percpu("backend_stats", slot)
                state.backends[address] = slot
        applied = tuple((a, b.mac, b.hash_weight, state.backends[a]) for a, b in wanted.items())
        if applied == state.applied and not removed:
            return  # health events re-apply everything; rebuilding unchanged tables costs ms each
        members = []
        for address, backend in wanted.items():
            slot = state.backends[address]
            # Without a MAC (not learned yet) the backend takes no new flows, and its pinned flows
            # are held, not re-chosen: re-choosing would reset them (BACKEND_F_UNRESOLVED).
            self._map("backends")[ctypes.c_int(slot)] = structs.backend_value(address, backend.mac)
            members.append(Member(identity=str(address), weight=backend.hash_weight, index=slot))
        idle_half = 1 - state.active_half
        base = (state.index * 2 + idle_half) * self.limits.ch_table_size
        self._write_array("ch_tables", base, build_table(members, self.limits.ch_table_size))
        # The table is complete before a packet can use it: flip, then (first time) publish.
        self._map("service_slots")[ctypes.c_int(state.index)] = Service(base, structs.SERVICE_F_ACTIVE)
        self._map("services")[ServiceKey.make(*spec.key)] = ctypes.c_uint32(state.index)
        state.active_half = idle_half
        state.applied = applied
        # Only now, with no live table pointing at them, may removed backends become invalid
        # (their pinned flows then re-choose from the new table).
        for slot in removed:
            self._retire_backend(slot)

    def _remove_service(self, key: tuple[IPAddress, int, int]) -> None:
        state = self._services.pop(key)
        # Inactive first: from here on its pinned flows take the slow path and find no service.
        self._map("service_slots")[ctypes.c_int(state.index)] = Service()
        del self._map("services")[ServiceKey.make(*key)]
        self.delete_flows([k for k, f in self.flows() if f.service == state.index])
        for index in state.backends.values():
            self._retire_backend(index)
        self._service_pool.give_back(state.index)

    def _retire_backend(self, index: int, *, give_back: bool = True) -> None:
        """Invalid backends make their pinned flows re-choose instead of going nowhere."""
        self._map("backends")[ctypes.c_int(index)] = structs.Backend()
        if give_back:
            self._backend_pool.give_back(index)

    def _sync_vips(self) -> None:
        counts: dict[IPAddress, int] = {}
        for vip, _, _ in self._services:
            counts[vip] = counts.get(vip, 0) + 1
        vips = self._map("vips")
        for key in list(vips.keys()):
            if structs.from_addr16(bytes(key.addr)) not in counts:  # type: ignore[arg-type]
                del vips[key]
        for vip, n in counts.items():
            vips[structs.vip_key(vip)] = ctypes.c_uint32(n)

    def _write_array(self, name: str, first: int, values: Sequence[int]) -> None:
        table = self._map(name)
        keys = (table.Key * len(values))(*range(first, first + len(values)))
        leaves = (table.Leaf * len(values))(*values)
        try:
            table.items_update_batch(keys, leaves)
        except Exception as exc:
            raise MapError(f"{name}: batch write of {len(values)} entries at {first}: {exc}") from exc

    def _zero_percpu(self, name: str, index: int) -> None:
        table = self._map(name)
        table[ctypes.c_int(index)] = table.Leaf()

    # ---- lookups for callers ------------------------------------------------------------------

    def service_index(self, vip: IPAddress, port: int, proto: int) -> int | None:
        state = self._services.get((vip, port, proto))
        return state.index if state else None

    def backend_index(self, vip: IPAddress, port: int, proto: int, address: IPAddress) -> int | None:
        """The local index of a service's backend: how a flow learned from a peer is translated."""
        state = self._services.get((vip, port, proto))
        return state.backends.get(address) if state else None

    def table(self, vip: IPAddress, port: int, proto: int) -> list[int]:
        """The active consistent-hash table of a service, as the kernel has it."""
        state = self._services[(vip, port, proto)]
        base = (state.index * 2 + state.active_half) * self.limits.ch_table_size
        table = self._map("ch_tables")
        return [table[ctypes.c_int(base + i)].value for i in range(self.limits.ch_table_size)]

    # ---- flows --------------------------------------------------------------------------------

    def write_flows(self, entries: Sequence[tuple[FlowKey, Flow]]) -> None:
        """Install flows in one batch (e.g. learned from a peer); existing entries are replaced."""
        self.write_flows_packed(b"".join(bytes(k) for k, _ in entries), b"".join(bytes(v) for _, v in entries))

    def write_flows_packed(self, keys: bytes, values: bytes) -> int:
        """`write_flows` for raw bytes (flow sync's hot path): concatenated `struct flow_key`s and
        `struct flow`s, one batch; returns how many."""
        flows = self._map("flows")
        key_size, value_size = ctypes.sizeof(flows.Key), ctypes.sizeof(flows.Leaf)
        n = len(keys) // key_size
        if len(keys) != n * key_size or len(values) != n * value_size:
            raise MapError(f"flows: packed write of {len(keys)} key / {len(values)} value bytes is not whole entries")
        if n:
            try:
                flows.items_update_batch((flows.Key * n).from_buffer_copy(keys), (flows.Leaf * n).from_buffer_copy(values))
            except Exception as exc:
                raise MapError(f"flows: batch write of {n} entries: {exc}") from exc
        return n

    def backend_addresses(self) -> dict[int, IPAddress]:
        """Backend index -> address, over all services: the inverse of `backend_index`."""
        return {index: address for state in self._services.values() for address, index in state.backends.items()}

    def lookup_flow(self, key: FlowKey) -> Flow | None:
        flows = self._map("flows")
        try:
            leaf = flows[flows.Key.from_buffer_copy(key)]
        except KeyError:
            return None
        return Flow.from_buffer_copy(leaf)

    def flows(self) -> list[tuple[FlowKey, Flow]]:
        """Every pinned flow (one batched walk of the table)."""
        return [(FlowKey.from_buffer_copy(k), Flow.from_buffer_copy(v))
                for k, v in self._map("flows").items_lookup_batch()]

    def delete_flows(self, keys: Sequence[FlowKey]) -> None:
        flows = self._map("flows")
        for key in keys:
            raw = flows.Key.from_buffer_copy(key)
            try:
                del flows[raw]
            except KeyError:
                pass

    # ---- counters -----------------------------------------------------------------------------

    def stats(self) -> dict[Stat, int]:
        table = self._map("stats")
        return {stat: int(sum(table.getvalue(ctypes.c_int(stat)))) for stat in Stat}

    def service_stats(self, index: int) -> ServiceStats:
        return _sum_structs(self._map("service_stats").getvalue(ctypes.c_int(index)), ServiceStats)

    def backend_stats(self, index: int) -> BackendStats:
        return _sum_structs(self._map("backend_stats").getvalue(ctypes.c_int(index)), BackendStats)

    # ---- flow events ----------------------------------------------------------------------------

    def open_flow_events(self, callback: Callable[[FlowEvent], None]) -> None:
        """Deliver ring-buffer flow events to `callback` on each poll (replaces an earlier one)."""
        first = self._event_callback is None
        self._event_callback = callback
        if first:
            self._ring_handler = self._on_ring_event  # bcc keeps only a C pointer: hold a reference
            self._map("flow_events").open_ring_buffer(self._ring_handler)

    def _on_ring_event(self, _ctx: Any, data: Any, _size: int) -> int:
        assert self._event_callback is not None
        self._event_callback(FlowEvent.from_buffer_copy(ctypes.string_at(data, ctypes.sizeof(FlowEvent))))
        return 0

    @property
    def flow_events_fd(self) -> int:
        """The ring buffer's map fd: pollable, readable while events wait (for trio's wait_readable)."""
        return int(self._map("flow_events").map_fd)

    def flow_event_reader(self) -> RingReader:
        """A batch reader of raw `struct flow_event` records (bpf/ringbuf.py), for high event rates.
        Use it instead of `open_flow_events`, never both: each would consume the other's records."""
        from bpf.ringbuf import RingReader

        return RingReader(self.flow_events_fd, self.limits.event_ring_pages * mmap.PAGESIZE)

    def poll_flow_events(self, timeout_ms: int = 0) -> None:
        """Wait up to `timeout_ms` for events and deliver them (0: only what is there)."""
        if timeout_ms:
            self._bpf.ring_buffer_poll(timeout_ms)
        else:
            self._bpf.ring_buffer_consume()


def _sum_structs(per_cpu: Any, cls: type[ctypes.Structure]) -> Any:
    total = cls()
    for field in cls._fields_:
        setattr(total, field[0], sum(getattr(cpu, field[0]) for cpu in per_cpu))
    return total

