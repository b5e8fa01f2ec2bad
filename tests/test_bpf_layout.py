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


def test_flag_and_kind_constants_match_header() -> None:
    """Every `#define` that user space mirrors in bpf/structs.py has the header's value."""
    header = (BPF_DIR / "lbnode.h").read_text()
    defines = {name: int(value, 0) for name, value in re.findall(r"^#define (\w+) (0x[0-9a-fA-F]+|\d+)\b", header, re.M)}
    mirrored = [n for n in ("FLOW_F_CLOSING", "FLOW_F_SYNCED", "BACKEND_F_VALID", "BACKEND_F_UNRESOLVED",
                            "SERVICE_F_ACTIVE", "EVENT_FLOW_NEW", "EVENT_FLOW_CLOSE", "NEW_PIN_WINDOW_NS")]
    for name in mirrored:
        assert getattr(structs, name) == defines[name], name
