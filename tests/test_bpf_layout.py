"""The Python mirrors in bpf/structs.py match the C structs as bcc compiles them."""
from __future__ import annotations

import ctypes
import re
from collections.abc import Iterator
from typing import Any

import pytest

from bpf import structs
from bpf.loader import BPF_DIR, PROGRAM_SOURCE, Limits, compile_program

pytestmark = pytest.mark.bpf


@pytest.fixture(scope="module")
def bcc_types() -> Iterator[dict[str, Any]]:
    bpf, _ = compile_program(PROGRAM_SOURCE, "xdp_main", [*Limits().cflags(), "-DLBNODE_LAYOUT_CHECK"])
    try:
        yield {
            "flow_key": bpf[b"flows"].Key,
            "flow": bpf[b"flows"].Leaf,
            "service_key": bpf[b"services"].Key,
            "service": bpf[b"service_slots"].Leaf,
            "backend": bpf[b"backends"].Leaf,
            "lb_config": bpf[b"config"].Leaf,
            "vip_key": bpf[b"vips"].Key,
            "flow_event": bpf[b"layout_flow_event"].Leaf,
            "service_stats": bpf[b"service_stats"].sLeaf,
            "backend_stats": bpf[b"backend_stats"].sLeaf,
            "pin_window": bpf[b"pin_windows"].sLeaf,
        }
    finally:
        bpf.cleanup()


def layout(cls: type) -> list[tuple[str, int, int]]:
    """(name, offset, size) of every field, nested structs flattened."""
    out = []
    for name, ftype, *_ in cls._fields_:
        field = getattr(cls, name)
        if isinstance(ftype, type) and issubclass(ftype, ctypes.Structure):
            out += [(f"{name}.{n}", field.offset + o, s) for n, o, s in layout(ftype)]
        else:
            out.append((name, field.offset, field.size))
    return out


@pytest.mark.parametrize("c_name", sorted(structs.MIRRORS))
def test_mirror_matches_bcc_layout(c_name: str, bcc_types: dict[str, Any]) -> None:
    mirror, generated = structs.MIRRORS[c_name], bcc_types[c_name]
    assert ctypes.sizeof(mirror) == ctypes.sizeof(generated)
    assert layout(mirror) == layout(generated)


def test_stat_enum_matches_header() -> None:
    header = (BPF_DIR / "lbnode.h").read_text()
    body = re.search(r"enum lb_stat \{(.*?)\};", header, re.S)
    assert body is not None
    names = re.findall(r"^\s*STAT_(\w+)", body.group(1), re.M)
    assert names[-1] == "MAX"
    assert names[:-1] == [s.name for s in structs.Stat]


def _header_defines() -> dict[str, int]:
    """Every `#define NAME <integer>` of lbnode.h (with its u/l suffixes dropped)."""
    header = (BPF_DIR / "lbnode.h").read_text()
    return {name: int(value, 0)
            for name, value in re.findall(r"^#define (\w+)\s+(0x[0-9a-fA-F]+|\d+)[uUlL]*\b", header, re.M)}


# The header's constants of these families are all mirrored, so a new one must be added to bpf/structs.py.
MIRRORED_FAMILIES = ("FLOW_F_", "EVENT_FLOW_", "BACKEND_F_", "SERVICE_F_")
MIRRORED_SINGLES = ("NO_BACKEND", "FLOW_HASH_SEED", "NEW_PIN_WINDOW_NS")


def test_flag_and_kind_constants_match_header() -> None:
    """Every `#define` that user space mirrors in bpf/structs.py has the header's value."""
    defines = _header_defines()
    mirrored = [n for n in ("FLOW_F_CLOSING", "FLOW_F_SYNCED", "BACKEND_F_VALID", "BACKEND_F_UNRESOLVED",
                            "SERVICE_F_ACTIVE", "EVENT_FLOW_NEW", "EVENT_FLOW_CLOSE", "NEW_PIN_WINDOW_NS")]
    for name in mirrored:
        assert getattr(structs, name) == defines[name], name


@pytest.mark.parametrize("name", sorted({n for n in _header_defines() if n.startswith(MIRRORED_FAMILIES)}
                                        | set(MIRRORED_SINGLES)))
def test_every_mirrored_constant_matches_header(name: str) -> None:
    """All FLOW_F_*, EVENT_FLOW_*, BACKEND_F_* and SERVICE_F_* flags, NO_BACKEND and the hash seed:
    each is in bpf/structs.py with the header's value (a flag added in C only fails here)."""
    defines = _header_defines()
    assert name in defines, f"{name} is not a #define in lbnode.h any more"
    assert getattr(structs, name, None) == defines[name], name


def test_flow_sync_record_offsets_come_from_the_mirrors() -> None:
    """Flow sync cuts its wire records out of `struct flow_event`s and writes `struct flow`s: its
    offsets are the mirrors' (checked against bcc above), and the record is still wire version 3's."""
    from cluster.sync import codec

    event, key = structs.FlowEvent, structs.FlowKey
    assert (event.key.offset, ctypes.sizeof(key)) == (0, codec.FLOW_KEY_BYTES)
    assert codec.KEY_WIRE_BYTES == key.pad.offset == key.proto.offset + key.proto.size
    assert codec.KEY_DST == (key.dst.offset, key.dst.offset + key.dst.size)
    assert codec.KEY_DPORT_PROTO == (key.dport.offset, key.proto.offset + 1)
    assert (codec.BACKEND_ADDR_OFFSET, codec.FLOW_RECORD_BYTES) == (
        event.backend_addr.offset, event.backend_addr.offset + event.backend_addr.size)
    assert codec.EVENT_KIND_OFFSET == event.kind.offset
    assert structs.Flow.last_seen_ns.offset + structs.Flow.last_seen_ns.size == ctypes.sizeof(structs.Flow)
    assert (codec.VERSION, codec.KEY_WIRE_BYTES, codec.BACKEND_ADDR_OFFSET,
            codec.FLOW_RECORD_BYTES) == (3, 37, 40, 56), \
        "the flow record changed: that is a new wire version"
