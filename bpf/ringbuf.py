"""A batch reader of a BPF ring buffer through mmap: records as bytes, no per-record callback.

bcc's `ring_buffer_consume` calls a ctypes function per record, which caps a Python reader well
below the 200k flow events/s flow sync wants. The kernel's layout (kernel/bpf/ringbuf.c) is
simple enough to read directly:

- offset 0, one page, read-write: the consumer position (u64), which we advance;
- offset PAGE_SIZE, read-only: one page with the producer position (u64), then the data pages,
  mapped twice in a row so a record that wraps is still contiguous.

Each record starts with an 8-byte header {u32 len; u32 pg_off}; bit 31 of len is BUSY (the
program has reserved but not committed it: stop there), bit 30 DISCARD (skip it). Records are
8-byte aligned. Positions only grow; the data offset is position & (size - 1).

The ring's fd stays pollable (readable while the producer is ahead of the consumer), so a trio
reader waits with `wait_readable(fd)` and then calls `read()`. Do not mix this reader with
bcc's `open_ring_buffer` on the same map: both would advance the consumer position.
"""
from __future__ import annotations

import mmap
import struct

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class RingReader:
    """Reads committed records of one BPF_MAP_TYPE_RINGBUF map of `size` data bytes (a power of two)."""

    def __init__(self, map_fd: int, size: int) -> None:
        if size <= 0 or size & (size - 1) or size % mmap.PAGESIZE:
            raise ValueError(f"ring size must be a power of two multiple of the page size, got {size}")
        self.fd = map_fd
        self.size = size
        self._mask = size - 1
        self._consumer = mmap.mmap(map_fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(map_fd, mmap.PAGESIZE + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                                   offset=mmap.PAGESIZE)
        self._view = memoryview(self._producer)
        self.records = 0
        self.discarded = 0

    def pending_bytes(self) -> int:
        return int(_U64.unpack_from(self._producer, 0)[0] - _U64.unpack_from(self._consumer, 0)[0])

    def read(self, max_records: int = 1 << 30) -> list[bytes]:
        """Every committed record up to `max_records` (oldest first); frees their space."""
        view, mask, base = self._view, self._mask, mmap.PAGESIZE
        unpack = _U32.unpack_from
        cons = _U64.unpack_from(self._consumer, 0)[0]
        prod = _U64.unpack_from(self._producer, 0)[0]
        out: list[bytes] = []
        start = cons
        while cons < prod and len(out) < max_records:
            off = base + (cons & mask)
            length = unpack(view, off)[0]
            if length & _BUSY:
                break
            if length & _DISCARD:
                length &= ~_DISCARD
                self.discarded += 1
            else:
                out.append(bytes(view[off + _HDR: off + _HDR + length]))
            cons += (length + _HDR + 7) & ~7
        if cons != start:
            _U64.pack_into(self._consumer, 0, cons)
        self.records += len(out)
        return out

    def close(self) -> None:
        self._view.release()
        self._producer.close()
        self._consumer.close()
