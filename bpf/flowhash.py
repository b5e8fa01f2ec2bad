"""Python mirror of the kernel's flow hash (flow_hash() in bpf/lbnode.c).

murmur3_32 over the ten 32-bit words of a struct flow_key read in host byte order. User space
uses it to say which table slot, and so which backend, an unpinned flow gets; a bpf-tier test
checks it against the kernel.
"""
from __future__ import annotations

import ctypes
import struct

from bpf.structs import FLOW_HASH_SEED, FlowKey

_MASK = 0xFFFFFFFF


def _rotl32(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _MASK


def flow_hash(key: FlowKey) -> int:
    raw = ctypes.string_at(ctypes.addressof(key), ctypes.sizeof(key))
    h = FLOW_HASH_SEED
    for (word,) in struct.iter_unpack("=I", raw):
        k = (word * 0xCC9E2D51) & _MASK
        k = (_rotl32(k, 15) * 0x1B873593) & _MASK
        h ^= k
        h = (_rotl32(h, 13) * 5 + 0xE6546B64) & _MASK
    h ^= len(raw)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK
    h ^= h >> 16
    return h
