"""The flow hash's Python mirror (bpf/flowhash.py) against XXH32's published vectors; the bpf
tier (tests/test_bpf_program.py) checks it against the kernel's."""
from __future__ import annotations

import pytest

from bpf.flowhash import flow_hash, xxh32
from bpf.structs import IPPROTO_TCP, FlowKey

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("data", "seed", "expected"), [
    (b"", 0, 0x02CC5D05),
    (b"Nobody inspects the spammish repetition", 0, 0xE2293B2F),  # 2 stripes + a word + 3 bytes
])
def test_xxh32_published_vectors(data: bytes, seed: int, expected: int) -> None:
    assert xxh32(data, seed) == expected


def test_flow_hash_is_xxh32_of_the_key_bytes() -> None:
    key = FlowKey.make("192.0.2.7", 40000, "10.0.0.100", 80, IPPROTO_TCP)
    assert len(bytes(key)) == 40
    assert flow_hash(key) == xxh32(bytes(key), 0x6C626E64)
    other = FlowKey.make("192.0.2.7", 40001, "10.0.0.100", 80, IPPROTO_TCP)
    assert flow_hash(other) != flow_hash(key)
