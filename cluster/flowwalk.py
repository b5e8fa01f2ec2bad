"""Walk the flow table from the trio loop without blocking it: one chunk per worker-thread hop.

`async for chunk in flow_chunks(dp): ...` gives `bpf.flowtable.FlowChunk`s (packed keys and
values, at most `chunk_entries` each, ~4096 x 56 bytes); the batch syscall runs on a worker
thread, and the loop runs between chunks. The consumer should keep its per-chunk work small
too (numpy over `chunk.flows()`, or slicing `chunk.keys`), or hand it to the thread as well.
Nothing holds more than one chunk, so a 1M-entry table costs ~250 KB, not ~400 MB.

A walk is not a snapshot (bpf/flowtable.py): flows present throughout are seen once.
"""
from __future__ import annotations

from collections.abc import AsyncIterator

import trio

from bpf.dataplane import DataPlane
from bpf.flowtable import DEFAULT_CHUNK_ENTRIES, FlowChunk


async def flow_chunks(dp: DataPlane, chunk_entries: int = DEFAULT_CHUNK_ENTRIES) -> AsyncIterator[FlowChunk]:
    cursor = dp.flow_chunks(chunk_entries)
    while (chunk := await trio.to_thread.run_sync(cursor.next)) is not None:
        yield chunk
