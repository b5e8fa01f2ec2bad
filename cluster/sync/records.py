"""Flow records between the wire and this node's flow table (pure: numpy and bytes, no I/O).

Out: `RecordBuilder` makes the wire records (codec.flow_wire) of a whole walk chunk at once with
numpy, for refresh passes and resync answers; `wire_from_events` those of ring buffer events (a
new flow, or the first FIN/RST of one). In: `FlowRows` translates checked records from peers
((VIP, port, proto, backend address) -> (service, backend), cached) into the keys and values of
one receive batch, stamped as idle (`last_seen` older than the refresh window) so this node
re-announces only flows it carries itself. A CLOSE becomes FLOW_F_CLOSING, not a delete: packets
in flight still reach the backend, and a SYN that reuses the tuple starts afresh.
"""
from __future__ import annotations

import ctypes
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from bpf.flowtable import FlowChunk
from bpf.structs import EVENT_FLOW_CLOSE, FLOW_F_CLOSING, FLOW_F_SYNCED, Flow, IPAddress, from_addr16
from cluster.sync import codec
from cluster.sync.codec import FlowOp

_OP_NEW = bytes((FlowOp.NEW, 0, 0))
_OP_CLOSE = bytes((FlowOp.CLOSE, 0, 0))
# struct flow (bpf/structs.Flow) as written for a synced flow: backend, service and flags, then
# last_seen_ns, which is the same stamp for a whole receive batch.
_LAST_SEEN_OFFSET = Flow.last_seen_ns.offset
_MISSING = object()
_WIRE_OP = np.array([FlowOp.REFRESH, FlowOp.CLOSE], dtype=np.uint8)


class RecordBuilder:
    """Wire records (codec.flow_wire: key[:37], op, 0, 0, backend address16) for a whole walk
    chunk at once, with numpy: a flow whose backend index has no address here is skipped; with
    `floor_ns`, so is one not seen since then. REFRESH, or CLOSE for a closing flow."""

    def __init__(self, addresses: Mapping[int, Any]) -> None:
        self.addresses = addresses  # what it was built from (DataPlane publishes a new mapping per apply)
        size = max(addresses, default=-1) + 1
        self._table = np.zeros((size, 16), dtype=np.uint8)
        self._known = np.zeros(size, dtype=bool)
        if addresses:
            index = np.fromiter(addresses.keys(), dtype=np.int64, count=len(addresses))
            v4 = b"\0" * 10 + b"\xff\xff"
            raw = b"".join(a.packed if a.version == 6 else v4 + a.packed for a in addresses.values())
            self._table[index] = np.frombuffer(raw, dtype=np.uint8).reshape(len(addresses), 16)
            self._known[index] = True

    def records(self, chunk: FlowChunk, floor_ns: int | None = None) -> bytes:
        flows = chunk.flows()
        backend = flows["backend"].astype(np.int64)
        ok: npt.NDArray[np.bool_] = backend < len(self._table)
        if floor_ns is not None:
            ok &= flows["last_seen_ns"] >= floor_ns
        ok[ok] &= self._known[backend[ok]]
        keys = chunk.key_rows()[ok]
        out = np.zeros((len(keys), codec.FLOW_RECORD_BYTES), dtype=np.uint8)
        out[:, :codec.KEY_WIRE_BYTES] = keys[:, :codec.KEY_WIRE_BYTES]
        out[:, codec.OP_OFFSET] = _WIRE_OP[((flows["flags"][ok] & FLOW_F_CLOSING) != 0).astype(np.intp)]
        out[:, codec.BACKEND_ADDR_OFFSET:codec.FLOW_RECORD_BYTES] = self._table[backend[ok]]
        return out.tobytes()


def wire_from_events(events: Iterable[bytes], out: list[bytes]) -> None:
    """Append the wire records of ring buffer events (struct flow_event) to `out`: NEW, or CLOSE
    for a closing flow (codec.flow_wire_from_event, inlined: this runs per event)."""
    key_end, kind_at = codec.KEY_WIRE_BYTES, codec.EVENT_KIND_OFFSET
    addr_at, record_end = codec.BACKEND_ADDR_OFFSET, codec.FLOW_RECORD_BYTES
    append = out.append
    for ev in events:
        append(ev[:key_end] + (_OP_CLOSE if ev[kind_at] == EVENT_FLOW_CLOSE else _OP_NEW) + ev[addr_at:record_end])


class Indexes(Protocol):
    """What `FlowRows` reads of the data plane: its local indexes (DataPlane has them)."""

    def service_index(self, vip: IPAddress, port: int, proto: int, /) -> int | None: ...

    def backend_index(self, vip: IPAddress, port: int, proto: int, address: IPAddress, /) -> int | None: ...


class FlowRows:
    """The flow table rows (keys, values) of one receive batch, from checked peer records
    (engine.Install): `begin(last_seen_ns)`, `add(records)` per Install, then `take()`.
    Translations are cached; `clear()` after an apply, `forget_unknown()` now and then (a
    service may have appeared)."""

    def __init__(self, indexes: Indexes) -> None:
        self._indexes = indexes
        self._xlate: dict[bytes, tuple[bytes, bytes] | None] = {}
        self.keys: list[bytes] = []
        self.values: list[bytes] = []
        self._stamp = b""

    def begin(self, last_seen_ns: int) -> None:
        """A new batch, its flows stamped as last seen at `last_seen_ns` (0 if negative)."""
        self.keys, self.values = [], []
        self._stamp = bytes(ctypes.c_uint64(max(0, last_seen_ns)))

    def take(self) -> tuple[list[bytes], list[bytes]]:
        keys, values = self.keys, self.values
        self.keys, self.values = [], []
        return keys, values

    def clear(self) -> None:
        self._xlate.clear()

    def forget_unknown(self) -> None:
        """Forget negative translations."""
        self._xlate = {k: v for k, v in self._xlate.items() if v is not None}

    def add(self, raw: bytes) -> tuple[int, int]:
        """Translate checked records into this node's indexes, for the batch: (added, unknown here)."""
        keys, values, stamp = self.keys, self.values, self._stamp
        xlate, size = self._xlate, codec.FLOW_RECORD_BYTES
        (dst, dst_end), (port, key_end) = codec.KEY_DST, codec.KEY_DPORT_PROTO
        addr, op_at, pad = codec.BACKEND_ADDR_OFFSET, codec.OP_OFFSET, codec.KEY_PAD
        n = unknown = 0
        for off in range(0, len(raw), size):
            # (VIP, port, protocol, backend address): what `_translate` turns into local indexes
            t = raw[off + dst:off + dst_end] + raw[off + port:off + key_end] + raw[off + addr:off + size]
            prefixes = xlate.get(t, _MISSING)
            if prefixes is _MISSING:
                prefixes = xlate[t] = self._translate(t)
            if prefixes is None:
                unknown += 1
                continue
            keys.append(raw[off:off + key_end] + pad)
            values.append(prefixes[raw[off + op_at] == FlowOp.CLOSE] + stamp)  # type: ignore[index]
            n += 1
        return n, unknown

    def _translate(self, t: bytes) -> tuple[bytes, bytes] | None:
        addr_len = codec.KEY_DST[1] - codec.KEY_DST[0]
        port_end = addr_len + 2
        vip, port, proto = from_addr16(t[:addr_len]), int.from_bytes(t[addr_len:port_end], "big"), t[port_end]
        backend = from_addr16(t[port_end + 1:])
        service = self._indexes.service_index(vip, port, proto)
        index = self._indexes.backend_index(vip, port, proto, backend)
        if service is None or index is None:
            return None
        return (bytes(Flow(index, service, FLOW_F_SYNCED))[:_LAST_SEEN_OFFSET],
                bytes(Flow(index, service, FLOW_F_SYNCED | FLOW_F_CLOSING))[:_LAST_SEEN_OFFSET])
