"""The typed API over the XDP program's maps: the one way the rest of lbnode steers it.

`DataPlane.apply(services)` takes the complete desired set of services and reconciles the
kernel with it: backends get stable indexes, each service's consistent-hash table is written
into its idle half and then switched in with one map update (a packet sees the old table or
the new one, never a mix), and removed backends are marked invalid so their pinned flows are
re-chosen. Flows are walked in chunks and written in batches (the peer side of flow sync),
counters are summed over CPUs, and new/closing flows are read from the ring buffer.
DataPlane owns the maps and the order of writes; the bookkeeping behind it lives apart:
bpf/indexes.py (index pools, quarantine, planning), bpf/sweep.py (the maintenance walk),
bpf/counters.py (batch counter reads, the flow tally), bpf/ringbuf.py (the event reader).

Scale (a million flows, thousands of backends) and threads. Nothing here costs time in
proportion to the flow table on the caller's thread except the explicit walks:
- `apply()` never walks the flow table. A removed service is made inactive and a removed
  backend invalid, which already makes the program ignore (service) or re-choose (backend)
  their pinned flows; their indexes are *quarantined*, not reused, until a maintenance pass
  has deleted the stale flows. Only when every index is in use or in quarantine does `apply`
  purge the quarantine itself (a chunked walk, on its own thread). Hash tables are built with
  numpy (bpf/consistent_hash.py), a few ms each.
- `maintain()` advances one chunked maintenance walk of the flow table: it deletes flows of
  quarantined indexes, and each completed pass counts the table. `flow_count()` is that count
  corrected by counters since (pins from the program, writes and deletes from user space),
  bounded by the table size: no walk.
- `flow_chunks()` is a cursor over the table in chunks of packed bytes, never the whole table.
- `apply()` and `maintain()` may run on worker threads (`trio.to_thread.run_sync`): apply is
  serialised by a lock, and the lookups other threads make (`service_index`, `backend_index`,
  `backend_addresses`, `table`) read an immutable snapshot published when apply changes it.

The program reads no clock (it cost a third of the fast path): its owner calls `tick()` every
half refresh interval, and flows are stamped with that time. A stale tick only makes flow ages
look older; forwarding never depends on it.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import socket
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from bpf import structs, syscall
from bpf.consistent_hash import Member, build_table_array
from bpf.counters import ActiveTally, Counters, FlowCount, FlowTally, read_backend_net, read_counters, sum_per_cpu
from bpf.flowtable import DEFAULT_CHUNK_ENTRIES, FlowCursor, delete_keys
from bpf.indexes import Indexes, IndexPool
from bpf.loader import (
    PROGRAM_SOURCE,
    AttachError,
    Attachment,
    Limits,
    MapError,
    XdpMode,
    attach,
    attached_program_id,
    bcc_table_fd,
    compile_program,
    detach,
)
from bpf.maps import MAP_SPECS, OPTIONAL_MAPS, BpfMap, MapSpec
from bpf.pinned import (
    INDEX_FREE,
    INDEX_RETIRED,
    INDEX_STATE_PIN,
    SERVICE_IN_USE,
    BuildReport,
    Leave,
    PinDir,
    PinError,
    build_in_child,
)
from bpf.structs import (
    BackendStats,
    Flow,
    FlowKey,
    IPAddress,
    LbConfig,
    Service,
    ServiceKey,
    ServiceStats,
    Stat,
)
from bpf.sweep import Sweeper

if TYPE_CHECKING:
    from bpf.ringbuf import RingReader


# MapError, Counters and FlowCount live in bpf/loader.py and bpf/counters.py; exported here as before.
__all__ = ["BackendSpec", "Counters", "DataPlane", "FlowCount", "MapError", "ServiceSpec", "monotonic_ns"]

log = logging.getLogger(__name__)


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
class _ServiceState:
    index: int
    active_half: int
    backends: dict[IPAddress, int]  # address -> backend index
    applied: tuple[object, ...] = ()  # what the kernel has now: unchanged services are skipped


@dataclass(frozen=True, slots=True)
class _Published:
    """What lookups from any thread see: replaced whole by apply, never mutated."""

    services: Mapping[tuple[IPAddress, int, int], int]  # service key -> service index
    backends: Mapping[tuple[IPAddress, int, int, IPAddress], int]  # (service key, address) -> backend index
    addresses: Mapping[int, IPAddress]  # backend index -> address
    table_bases: Mapping[tuple[IPAddress, int, int], int]  # service key -> first slot of its active table


_EMPTY = _Published(MappingProxyType({}), MappingProxyType({}), MappingProxyType({}), MappingProxyType({}))


# A connection counts as active here while this node forwarded a packet of it within this long
# (weighting: leastconn's idle_s overrides it per service; see bpf/counters.py ActiveTally).
DEFAULT_ACTIVE_IDLE_S = 30.0


def monotonic_ns() -> int:
    """The clock of flow timestamps (the program reads it from lb_config.epoch_ns)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


_INDEX_STATE_SPEC = MapSpec(ctypes.c_uint32, ctypes.c_uint32)


def _warn_unpinned(ifname: str, why: str) -> None:
    log.warning("%s: cannot pin the data plane (%s): it will not outlive this process, a restart starts with an "
                "empty flow table. To keep it, give the node a bpffs it may write in (README: State in bpffs)",
                ifname, why)


class DataPlane:
    """A compiled lbnode XDP program and its maps. `apply` and `maintain` may run on worker
    threads (see the module docstring); everything else belongs to one owner thread.

    Two ways to get one. `DataPlane(limits)` compiles in this process with bcc (tests, tools:
    nothing is pinned, everything goes with the process). `DataPlane(limits, pins=PinDir...)`,
    the node's, never imports bcc: a child compiles and pins (bpf/pinned.py) and hands the fds
    over, and if the child adopted the previous run's forwarding state, this rebuilds its index
    bookkeeping from the maps (`_adopt`), so pinned flows keep their backends. `child=True`
    without pins is the same without bpffs: nothing outlives the process."""

    def __init__(self, limits: Limits = Limits(), extra_cflags: Sequence[str] = (), *,
                 pins: PinDir | None = None, child: bool = False) -> None:
        self.limits = limits
        self.pins = pins
        self.build: BuildReport | None = None  # what the compile child did (pinned only)
        self._module: Any = None  # the bcc module (in-process only): owns the program and map fds
        self._maps: dict[str, BpfMap] = {}
        self.unpinned_reason: str | None = None  # set by the owner when it could not pin (status says it)
        if pins is None and not child:
            self._module, fn = compile_program(PROGRAM_SOURCE, "xdp_main", [*limits.cflags(), *extra_cflags])
            self._prog_fd = int(fn.fd)
            for name, spec in {**MAP_SPECS, **OPTIONAL_MAPS}.items():
                fd = bcc_table_fd(self._module, name)
                if fd >= 0:
                    self._maps[name] = BpfMap(fd, name, spec, owned=False)
            fd = syscall.map_create(syscall.BPF_MAP_TYPE_ARRAY, 4, 4, limits.max_services + limits.max_backends,
                                    INDEX_STATE_PIN)
            self._maps[INDEX_STATE_PIN] = BpfMap(fd, INDEX_STATE_PIN, _INDEX_STATE_SPEC)
        else:
            built = build_in_child(pins, pins.ifname if pins else "-", limits, extra_cflags)
            self.build, self._prog_fd = built.report, built.prog_fd
            if pins is not None and built.report.pin_error:
                _warn_unpinned(pins.ifname, f"{pins.path}: {built.report.pin_error}")
                self.pins, self.unpinned_reason = None, built.report.pin_error
            specs = {**MAP_SPECS, **OPTIONAL_MAPS, INDEX_STATE_PIN: _INDEX_STATE_SPEC}
            for name, fd in built.map_fds.items():
                if name in specs:
                    self._maps[name] = BpfMap(fd, name, specs[name])
                else:
                    os.close(fd)
        for m in self._maps.values():
            m.check()
        self._services: dict[tuple[IPAddress, int, int], _ServiceState] = {}
        self._indexes = Indexes(limits.max_services, limits.max_backends)
        self._published = _EMPTY
        self._lock = threading.Lock()  # apply, and the indexes (pools, quarantine) maintain() touches
        self._tally = FlowTally(self._stat(Stat.NEW_FLOW))  # for flow_count() without a walk (bpf/counters.py)
        # Per service index: how recently a flow must have been forwarded here to be an active
        # connection (set_active_idle); for counters().active (bpf/counters.py ActiveTally).
        self._active_idle_ns = np.full(limits.max_services, int(DEFAULT_ACTIVE_IDLE_S * 1e9), dtype=np.int64)
        self._active = ActiveTally(limits.max_backends, self._backend_net())
        self._sweeper = Sweeper(self._flows_fd, self._indexes, self._lock, self._tally,
                                lambda: self._stat(Stat.NEW_FLOW), self._active, self._backend_net,
                                self._active_idle_ns, monotonic_ns)
        self._attachments: list[Attachment] = []
        self._config = LbConfig()
        self.adopted = 0  # flows found in the pinned table at start (0 when started empty)
        if self.build is not None and self.build.adopted_flows:
            self._adopt()

    @classmethod
    def for_interface(cls, limits: Limits, ifname: str) -> DataPlane:
        """The node's: compiled in a child, pinned for `ifname` in this namespace, adopting what a
        previous run left. Where it cannot pin (bpffs missing and not mountable, a directory it
        may not write), it still compiles in a child, unpinned, and says so (log and status)."""
        try:
            pins = PinDir.for_interface(ifname)
            pins.prepare()
        except (PinError, OSError) as exc:
            _warn_unpinned(ifname, str(exc))
            dp = cls(limits, child=True)
            dp.unpinned_reason = str(exc)
            return dp
        return cls(limits, pins=pins)

    # ---- program -------------------------------------------------------------------------

    @property
    def fd(self) -> int:
        return self._prog_fd

    reattached = 0  # times `keep_attached` found the program gone and attached it again

    def attach(self, ifname: str, mode: XdpMode = XdpMode.NATIVE, netns: str | None = None) -> Attachment:
        attachment = attach(self.fd, ifname, mode, netns)
        self._attachments.append(attachment)
        return attachment

    def keep_attached(self) -> str | None:
        """Check that every attachment is still in place, and attach again where the interface has
        no XDP program (someone detached it, or the interface was deleted and created again).
        Returns why forwarding is impossible now (no such interface; another program attached,
        which we do not fight), or None. Netlink round trips: call it from a worker thread."""
        problems = []
        for i, a in enumerate(self._attachments):
            try:
                current = attached_program_id(a.ifname, a.netns)
                if current == 0:
                    log.warning("%s: our XDP program (id %d) is no longer attached: attaching it again", a.ifname,
                                a.prog_id)
                    self._attachments[i] = attach(self.fd, a.ifname, a.mode, a.netns)
                    self.reattached += 1
                elif current != a.prog_id:
                    problems.append(f"{a.ifname}: XDP program id {current} is attached there, not ours ({a.prog_id})")
            except (AttachError, OSError) as exc:
                problems.append(f"{a.ifname}: {exc}")
        return "; ".join(problems) or None

    def detach_all(self) -> None:
        while self._attachments:
            detach(self._attachments.pop())

    def close(self, leave: Leave = Leave.NOTHING) -> None:
        """Detach (unless `leave` is FORWARDING) and close; with NOTHING, also remove the pins
        (bpf/pinned.py says which state each choice leaves behind)."""
        try:
            if leave is not Leave.FORWARDING:
                self.detach_all()
            else:
                for a in self._attachments:
                    log.info("%s: XDP program id %d left attached, forwarding with the maps pinned in %s",
                             a.ifname, a.prog_id, self.pins.path if self.pins else "(nowhere: not pinned)")
        finally:
            for m in self._maps.values():
                m.close()
            if self._module is not None:
                self._module.cleanup()
            elif self._prog_fd >= 0:
                os.close(self._prog_fd)
            self._prog_fd = -1
            if self.pins is not None and leave is Leave.NOTHING:
                self.pins.remove()
                log.info("%s: pins removed", self.pins.path)

    def pin_status(self) -> dict[str, Any] | None:
        """For `lbnode status`: where the maps are pinned and what start-up adopted (None: an
        in-process build)."""
        if self.build is None:
            return None
        if self.pins is None:  # (what it adopted, if it could read old pins but not pin its own)
            return {"dir": None, "adopted_flows": self.adopted, "migrated_flows": self.build.migrated_flows,
                    "reused": list(self.build.reused), "fresh": list(self.build.fresh),
                    "note": f"not pinned ({self.unpinned_reason or 'no pin directory'}): a restart starts empty"}
        return {"dir": str(self.pins.path), "adopted_flows": self.adopted, "migrated_flows": self.build.migrated_flows,
                "reused": list(self.build.reused), "fresh": list(self.build.fresh), "note": self.build.note or None}

    def _map(self, name: str) -> BpfMap:
        try:
            return self._maps[name]
        except KeyError:
            raise MapError(f"this build has no map {name!r}") from None

    # ---- adopting a previous run's state --------------------------------------------------------

    def _adopt(self) -> None:
        """Rebuild the index bookkeeping from pinned maps the previous run left: services from
        `services` and `service_slots`, backends from `index_state` and `backends`. Indexes it
        marked retired, or that no live service owns any more, wait in quarantine for the
        first maintenance pass; never-used ones are free. The next apply() rewrites every
        table into its idle half (nothing is skipped as unchanged) and flips."""
        max_services = self.limits.max_services
        size = self.limits.ch_table_size
        state_map = self._map(INDEX_STATE_PIN)
        states = [int(state_map[ctypes.c_uint32(i)].value) for i in range(max_services + self.limits.max_backends)]
        live: dict[int, tuple[IPAddress, int, int]] = {}
        for key in self._map("services").keys():
            index = int(self._map("services")[key].value)
            slot = self._map("service_slots")[ctypes.c_uint32(index)]
            half = slot.table_base // size - 2 * index
            if index >= max_services or not slot.flags & structs.SERVICE_F_ACTIVE or half not in (0, 1):
                continue
            spec_key = (structs.from_addr16(bytes(key.vip)), socket.ntohs(key.port), int(key.proto))
            live[index] = spec_key
            self._services[spec_key] = _ServiceState(index=index, active_half=half, backends={})
        used_backends: set[int] = set()
        for slot in range(self.limits.max_backends):
            owner = states[max_services + slot]
            if owner in (INDEX_FREE, INDEX_RETIRED) or owner - 1 not in live:
                continue
            backend = self._map("backends")[ctypes.c_uint32(slot)]
            if backend.flags & structs.BACKEND_F_VALID:
                self._services[live[owner - 1]].backends[structs.from_addr16(bytes(backend.addr))] = slot
                used_backends.add(slot)
        self._indexes.adopt(
            used_services=set(live), used_backends=used_backends,
            never_used_services={i for i in range(max_services) if states[i] == INDEX_FREE and i not in live},
            never_used_backends={i for i in range(self.limits.max_backends)
                                 if states[max_services + i] == INDEX_FREE and i not in used_backends})
        self._publish()
        while not self.maintain(1 << 30):  # one pass: counts the adopted flows, deletes stale ones
            pass
        self.adopted = self.flow_count().walked
        log.info("%s: adopted %d services, %d backends and the flow table from the previous run",
                 self.pins.path if self.pins else "?", len(live), len(used_backends))

    def _mark(self, index: int, value: int) -> None:
        """Record an index's state in `index_state` (read back by `_adopt` after a restart)."""
        self._map(INDEX_STATE_PIN)[ctypes.c_uint32(index)] = ctypes.c_uint32(value)

    # ---- configuration -----------------------------------------------------------------------

    def set_config(self, mac: str, refresh_s: float = 1.0, max_new_per_s_per_cpu: int = 0) -> None:
        """Our MAC (source of forwarded frames), how stale a flow's timestamp may get, and the cap
        on new pins per CPU per second of the published clock (0: none; see bpf/lbnode.c). The
        window's boundary is seen at the next tick(), so it lasts max(1 s, refresh_s / 2)."""
        if not 0 <= max_new_per_s_per_cpu <= 0xFFFFFFFF:
            raise ValueError(f"max_new_per_s_per_cpu must be 0..2^32-1, got {max_new_per_s_per_cpu}")
        self._config = LbConfig((ctypes.c_uint8 * 6)(*structs.mac_bytes(mac)), 0, int(refresh_s * 1e9), 0,
                                max_new_per_s_per_cpu)
        self.tick()

    def tick(self, now_ns: int | None = None) -> None:
        """Publish the control plane's clock: flows are stamped with it. Call every refresh_s / 2."""
        self._config.epoch_ns = monotonic_ns() if now_ns is None else now_ns
        self._map("config")[ctypes.c_int(0)] = self._config

    def set_active_idle(self, vip: IPAddress, port: int, proto: int, idle_s: float) -> None:
        """A connection of this service counts as active (counters().active) while this node
        forwarded a packet of it within `idle_s`; at least twice the refresh interval, since an
        active flow's stamp is only rewritten that often. Takes effect from the next chunk walked."""
        index = self.service_index(vip, port, proto)
        if index is not None:
            self._active_idle_ns[index] = max(int(idle_s * 1e9), 2 * int(self._config.refresh_ns))

    def apply(self, services: Iterable[ServiceSpec]) -> None:
        """Make the kernel serve exactly `services` (add, change, remove). Thread-safe (one apply
        at a time); costs a few ms per changed service and never walks the flow table, except to
        purge quarantined indexes when every index is taken."""
        wanted = {spec.key: spec for spec in services}
        with self._lock:
            # Raises, before any map is touched, if the change cannot fit (bpf/indexes.py).
            order = self._indexes.plan({k: st.backends.keys() for k, st in self._services.items()},
                                       {k: {b.address for b in spec.backends} for k, spec in wanted.items()})
            try:
                for key in [k for k in self._services if k not in wanted]:
                    self._remove_service(key)
                for key in order:
                    self._apply_service(wanted[key])
                self._sync_vips()
            finally:
                self._publish()

    def _apply_service(self, spec: ServiceSpec) -> None:
        state = self._services.get(spec.key)
        if state is None:
            index = self._take(self._indexes.services, self._indexes.quarantined_services)
            self._zero_percpu("service_stats", index)
            self._mark(index, SERVICE_IN_USE)
            state = _ServiceState(index=index, active_half=1, backends={})
            self._services[spec.key] = state
        wanted = {b.address: b for b in spec.backends}
        removed = [state.backends.pop(a) for a in [a for a in state.backends if a not in wanted]]
        for address in wanted:
            if address not in state.backends:
                try:
                    slot = self._take(self._indexes.backends, self._indexes.quarantined_backends)
                except MapError:
                    if not removed:
                        raise
                    # Every index is taken: hand over one of a removed backend's at once (its
                    # slots in the live table now drop until the flip below: only when full).
                    slot = removed.pop()
                    self._retire_backend(slot, quarantine=False)
                    self._publish()
                    self._sweeper.purge(frozenset(), frozenset({slot}))  # an old pin must not reach its new owner
                self._zero_percpu("backend_stats", slot)
                self._active.reset(slot)
                self._mark(self.limits.max_services + slot, state.index + 1)
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
        self._write_array("ch_tables", base, build_table_array(members, self.limits.ch_table_size))
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
        # They stay in the table until a maintenance pass deletes them (the index waits for it).
        self._map("service_slots")[ctypes.c_int(state.index)] = Service()
        del self._map("services")[ServiceKey.make(*key)]
        for index in state.backends.values():
            self._retire_backend(index)
        self._mark(state.index, INDEX_RETIRED)
        self._indexes.quarantined_services.add(state.index)

    def _retire_backend(self, index: int, *, quarantine: bool = True) -> None:
        """Invalid backends make their pinned flows re-choose instead of going nowhere."""
        self._map("backends")[ctypes.c_int(index)] = structs.Backend()
        self._mark(self.limits.max_services + index, INDEX_RETIRED)
        if quarantine:
            self._indexes.quarantined_backends.add(index)

    def _take(self, pool: IndexPool, quarantine: set[int]) -> int:
        """A free index whose old pins are gone; purges the quarantine first if none is left."""
        try:
            return pool.take()
        except MapError:
            if not quarantine:
                raise
        self._publish()  # lookups stop naming what is about to be reused
        self._sweeper.purge(*self._indexes.quarantined())
        return pool.take()

    def _publish(self) -> None:
        self._published = _Published(
            services=MappingProxyType({k: st.index for k, st in self._services.items()}),
            backends=MappingProxyType({(*k, a): i for k, st in self._services.items() for a, i in st.backends.items()}),
            addresses=MappingProxyType({i: a for st in self._services.values() for a, i in st.backends.items()}),
            table_bases=MappingProxyType({k: (st.index * 2 + st.active_half) * self.limits.ch_table_size
                                          for k, st in self._services.items()}),
        )

    # ---- maintenance: stale-flow sweep and count ----------------------------------------------------

    @property
    def sweep_pending(self) -> bool:
        """Indexes wait in quarantine for a maintenance pass."""
        return self._indexes.sweep_pending

    def maintain(self, max_entries: int = 16 * DEFAULT_CHUNK_ENTRIES) -> bool:
        """Advance the maintenance walk by about `max_entries` flows (one batch syscall per 4096);
        True when that completed a pass. Meant for a worker thread, called again and again."""
        return self._sweeper.step(max_entries)

    def sweep(self) -> None:
        """Run maintenance passes until no index waits in quarantine (tests, benchmarks)."""
        while True:
            while not self.maintain():
                pass
            if not self.sweep_pending:
                return

    def flow_count(self) -> FlowCount:
        """Flow-table occupancy without a walk: the last pass's count, plus pins by the program
        and writes from user space since it began, minus deletes since it ended, within 0..size.
        Replacing writes and LRU evictions make it an upper estimate until the next pass."""
        return self._tally.count(self._stat(Stat.NEW_FLOW), self.limits.flow_table_size)

    @property
    def _flows_fd(self) -> int:
        return int(self._map("flows").map_fd)

    def _stat(self, stat: Stat) -> int:
        return int(sum(self._map("stats").getvalue(ctypes.c_int(stat))))

    def _sync_vips(self) -> None:
        counts: dict[IPAddress, int] = {}
        for vip, _, _ in self._services:
            counts[vip] = counts.get(vip, 0) + 1
        vips = self._map("vips")
        for key in list(vips.keys()):
            if structs.from_addr16(bytes(key.addr)) not in counts:
                del vips[key]
        for vip, n in counts.items():
            vips[structs.vip_key(vip)] = ctypes.c_uint32(n)

    def _write_array(self, name: str, first: int, values: Any) -> None:
        """Write a uint32 array's consecutive entries from `first` (values: a numpy uint32 array)."""
        indexes = np.arange(first, first + len(values), dtype=np.uint32)
        try:
            self._map(name).update_batch(indexes.tobytes(), np.ascontiguousarray(values, dtype=np.uint32).tobytes())
        except Exception as exc:
            raise MapError(f"{name}: batch write of {len(values)} entries at {first}: {exc}") from exc

    def _zero_percpu(self, name: str, index: int) -> None:
        self._map(name).zero(ctypes.c_int(index))

    # ---- lookups for callers ------------------------------------------------------------------

    def service_index(self, vip: IPAddress, port: int, proto: int) -> int | None:
        return self._published.services.get((vip, port, proto))

    def backend_index(self, vip: IPAddress, port: int, proto: int, address: IPAddress) -> int | None:
        """The local index of a service's backend: how a flow learned from a peer is translated."""
        return self._published.backends.get((vip, port, proto, address))

    def table(self, vip: IPAddress, port: int, proto: int) -> list[int]:
        """The active consistent-hash table of a service, as the kernel has it."""
        base = self._published.table_bases[(vip, port, proto)]
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
                flows.update_batch(bytes(keys), bytes(values))  # no copy for bytes
            except Exception as exc:
                raise MapError(f"flows: batch write of {n} entries: {exc}") from exc
            self._tally.wrote(n)
        return n

    def backend_addresses(self) -> Mapping[int, IPAddress]:
        """Backend index -> address, over all services: the inverse of `backend_index` (a
        read-only snapshot, safe to use while apply runs on another thread)."""
        return self._published.addresses

    def lookup_flow(self, key: FlowKey) -> Flow | None:
        flows = self._map("flows")
        try:
            leaf = flows[flows.Key.from_buffer_copy(key)]
        except KeyError:
            return None
        return Flow.from_buffer_copy(leaf)

    def flow_chunks(self, chunk_entries: int = DEFAULT_CHUNK_ENTRIES) -> FlowCursor:
        """A cursor over the flow table, `chunk_entries` flows at a time as packed bytes
        (bpf/flowtable.py); drive it with one `next()` per worker-thread call."""
        return FlowCursor(self._flows_fd, chunk_entries)

    def flows(self) -> list[tuple[FlowKey, Flow]]:
        """Every flow as ctypes pairs: for tests and small tables only (it holds the whole
        table, ~400 bytes a flow); production code walks `flow_chunks()`."""
        return [pair for chunk in self.flow_chunks() for pair in chunk.items()]

    def delete_flows(self, keys: Sequence[FlowKey]) -> int:
        """Delete these flows in one batch (absent ones are skipped); returns how many went."""
        n = delete_keys(self._flows_fd, b"".join(bytes(k) for k in keys))
        self._tally.deleted(n)
        return n

    # ---- counters -----------------------------------------------------------------------------

    def stats(self) -> dict[Stat, int]:
        return {stat: self._stat(stat) for stat in Stat}

    def counters(self) -> Counters:
        """All per-service and per-backend counters, summed over CPUs: two batch syscalls, where
        `service_stats`/`backend_stats` cost one lookup each (4096 backends: ~40 ms); with each
        backend's active connections through this node, corrected by the maintenance walk."""
        return read_counters(self._map("service_stats"), self._map("backend_stats"), self.limits.max_services,
                             self.limits.max_backends, self._active)

    def _backend_net(self) -> Any:
        """Every backend's new_flows - closed (one batch read): what ActiveTally anchors to."""
        return read_backend_net(self._map("backend_stats"), self.limits.max_backends)

    def service_stats(self, index: int) -> ServiceStats:
        return sum_per_cpu(self._map("service_stats").getvalue(ctypes.c_int(index)), ServiceStats)

    def backend_stats(self, index: int) -> BackendStats:
        return sum_per_cpu(self._map("backend_stats").getvalue(ctypes.c_int(index)), BackendStats)

    # ---- flow events ----------------------------------------------------------------------------

    @property
    def flow_events_fd(self) -> int:
        """The ring buffer's map fd: pollable, readable while events wait (for trio's wait_readable)."""
        return int(self._map("flow_events").map_fd)

    def flow_event_reader(self) -> RingReader:
        """A batch reader of raw `struct flow_event` records (bpf/ringbuf.py): the one consumer of
        the ring (decode a record with `structs.FlowEvent.from_buffer_copy`)."""
        from bpf.ringbuf import RingReader

        return RingReader(self.flow_events_fd, self.limits.event_ring_pages * mmap.PAGESIZE)
