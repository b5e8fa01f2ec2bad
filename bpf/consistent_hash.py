"""Weighted rendezvous (highest random weight) hashing into a fixed-size slot table.

Theory of operation. Each slot s of a service's table goes to the backend b with the highest
score  w_b / -ln(u(s, b)),  where u(s, b) in (0, 1) is a hash of the slot and the backend's
identity (its address and port, never its index, so every node builds the same table).
This is the weighted HRW of Schindelhauer & Schomaker ("Weighted distributed hash tables",
2005): backend b wins a slot with probability w_b / sum(w).

Properties the tests hold us to:
- Minimal disruption: each slot's winner depends only on the scores of the backends present,
  so removing a backend moves exactly the slots it owned; adding one moves only slots to it;
  changing one backend's weight moves slots only to or from that backend.
- Weights: a backend's share of slots is w_b / sum(w) up to sampling noise; with the default
  4096 slots the share is within 2 percentage points for the weight sets in the tests (the
  binomial standard deviation is at most 0.8 points).
The kernel only indexes the table: slot = flow_hash & (size - 1).

Speed. `build_table_reference` is the definition, one Python loop per (slot, backend): about
85 ms for 4096 slots x 64 backends, so 64 such services took 5 s. `build_table` computes the
same scores with numpy over blocks of slots (a few ms a table, memory bounded by the block).
Every node must build the identical table, and numpy's vectorised log may differ from libm's
`math.log` in the last bit; so wherever the best two scores of a slot are within 1e-9 of each
other (relative, a million times any log error) the slot is decided by the reference code.
The result is then exactly the reference's, which a test checks on random inputs.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

NO_BACKEND = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True, slots=True)
class Member:
    """One backend as the hash sees it: a stable identity, a weight and its kernel index."""

    identity: str  # e.g. "10.0.0.11:80"; equal on every node
    weight: int
    index: int


def _seed(identity: str) -> int:
    return int.from_bytes(hashlib.blake2b(identity.encode(), digest_size=8).digest(), "little")


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a fast, well-spread 64-bit hash step."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


_GOLDEN = 0x9E3779B97F4A7C15
_TWO_53 = 9007199254740992.0
_NEAR_TIE = 1e-9  # relative gap of the best two scores below which the reference decides
_BLOCK_CELLS = 1 << 18  # slots x backends scored at once: ~2 MB per float64 temporary


def _live(members: Sequence[Member], size: int) -> list[Member]:
    if size <= 0 or size & (size - 1):
        raise ValueError(f"table size must be a power of two, got {size}")
    live = [m for m in members if m.weight > 0]
    if len({m.identity for m in live}) != len(live):
        raise ValueError("backend identities must be unique")
    return live


def _best(seeds: Sequence[tuple[int, int, int]], slot: int) -> int:
    """The reference decision for one slot: the first member with the highest score."""
    salt = (slot + 1) * _GOLDEN & _MASK64
    best_score, best_index = -1.0, NO_BACKEND
    for seed, weight, index in seeds:
        # u in (0, 1): 53 random bits, never 0 or 1.
        u = ((_mix64(seed ^ salt) >> 11) + 0.5) / _TWO_53
        score = weight / -math.log(u)
        if score > best_score:
            best_score, best_index = score, index
    return best_index


def build_table_reference(members: Sequence[Member], size: int) -> list[int]:
    """The definition (slow): slot -> backend index, NO_BACKEND everywhere without weight."""
    live = _live(members, size)
    if not live:
        return [NO_BACKEND] * size
    seeds = [(_seed(m.identity), m.weight, m.index) for m in live]
    return [_best(seeds, slot) for slot in range(size)]


def build_table_array(members: Sequence[Member], size: int) -> npt.NDArray[np.uint32]:
    """`build_table_reference`, computed with numpy: the identical table as uint32."""
    live = _live(members, size)
    if not live:
        return np.full(size, NO_BACKEND, dtype=np.uint32)
    seeds = [(_seed(m.identity), m.weight, m.index) for m in live]
    seed_arr = np.array([s for s, _, _ in seeds], dtype=np.uint64)
    weights = np.array([float(w) for _, w, _ in seeds], dtype=np.float64)
    indexes = np.array([i for _, _, i in seeds], dtype=np.uint32)
    out = np.empty(size, dtype=np.uint32)
    block = max(1, min(size, _BLOCK_CELLS // len(live)))
    with np.errstate(over="ignore"):
        for first in range(0, size, block):
            slots = np.arange(first + 1, min(size, first + block) + 1, dtype=np.uint64)
            x = (slots * np.uint64(_GOLDEN))[:, None] ^ seed_arr[None, :]  # wraps mod 2**64, as & _MASK64
            x ^= x >> np.uint64(30)
            x *= np.uint64(0xBF58476D1CE4E5B9)
            x ^= x >> np.uint64(27)
            x *= np.uint64(0x94D049BB133111EB)
            x ^= x >> np.uint64(31)
            u = ((x >> np.uint64(11)).astype(np.float64) + 0.5) / _TWO_53
            scores = weights[None, :] / -np.log(u)
            winners = np.argmax(scores, axis=1)
            out[first:first + len(slots)] = indexes[winners]
            if len(live) > 1:
                top2 = np.partition(scores, len(live) - 2, axis=1)[:, -2:]
                near = np.nonzero(top2[:, 1] - top2[:, 0] <= top2[:, 1] * _NEAR_TIE)[0]
                for row in near.tolist():
                    out[first + row] = _best(seeds, first + row)
    return out


def build_table(members: Sequence[Member], size: int) -> list[int]:
    """Slot -> backend index (NO_BACKEND for every slot when no member has weight > 0)."""
    return [int(x) for x in build_table_array(members, size).tolist()]
