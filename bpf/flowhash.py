"""Python mirror of the kernel's flow hash (flow_hash() in bpf/flowhash.h).

XXH32 of the 40 bytes of a struct flow_key (the kernel reads them as little-endian words, as
XXH32 does) seeded with FLOW_HASH_SEED. User space uses it to say which table slot, and so which
backend, an unpinned flow gets; a bpf-tier test checks it against the kernel, a unit test
against XXH32's published test vectors.
"""
from __future__ import annotations

import ctypes
import struct

from bpf.structs import FLOW_HASH_SEED, FlowKey

_MASK = 0xFFFFFFFF
_P1, _P2, _P3, _P4, _P5 = 2654435761, 2246822519, 3266489917, 668265263, 374761393


def _rotl32(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _MASK


def _round(acc: int, word: int) -> int:
    return (_rotl32((acc + word * _P2) & _MASK, 13) * _P1) & _MASK


def xxh32(data: bytes, seed: int) -> int:
    """XXH32 of `data` (any length; the kernel only ever hashes 40 bytes)."""
    n = len(data)
    i = 0
    if n >= 16:
        v = [(seed + _P1 + _P2) & _MASK, (seed + _P2) & _MASK, seed, (seed - _P1) & _MASK]
        while i + 16 <= n:
            for lane, (word,) in enumerate(struct.iter_unpack("<I", data[i:i + 16])):
                v[lane] = _round(v[lane], word)
            i += 16
        h = (_rotl32(v[0], 1) + _rotl32(v[1], 7) + _rotl32(v[2], 12) + _rotl32(v[3], 18)) & _MASK
    else:
        h = (seed + _P5) & _MASK
    h = (h + n) & _MASK
    while i + 4 <= n:
        (word,) = struct.unpack_from("<I", data, i)
        h = (_rotl32((h + word * _P3) & _MASK, 17) * _P4) & _MASK
        i += 4
    for byte in data[i:]:
        h = (_rotl32((h + byte * _P5) & _MASK, 11) * _P1) & _MASK
    h ^= h >> 15
    h = (h * _P2) & _MASK
    h ^= h >> 13
    h = (h * _P3) & _MASK
    h ^= h >> 16
    return h


def flow_hash(key: FlowKey) -> int:
    return xxh32(ctypes.string_at(ctypes.addressof(key), ctypes.sizeof(key)), FLOW_HASH_SEED)
