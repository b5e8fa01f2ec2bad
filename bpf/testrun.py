"""Run an XDP program on one packet in the kernel: BPF_PROG_TEST_RUN.

Used by the bpf test tier and by bench/xdp.py. Goes straight to the bpf(2) syscall, so it
depends only on the stable `union bpf_attr` layout, not on a libbpf ABI.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import enum
import os
from dataclasses import dataclass

from bpf.loader import BpfError

_BPF_PROG_TEST_RUN = 10
_SYS_BPF = 321  # x86_64
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class XdpAction(enum.IntEnum):
    ABORTED = 0
    DROP = 1
    PASS = 2
    TX = 3
    REDIRECT = 4


class _TestAttr(ctypes.Structure):
    """The BPF_PROG_TEST_RUN member of union bpf_attr (include/uapi/linux/bpf.h)."""

    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


@dataclass(frozen=True, slots=True)
class XdpRunResult:
    action: XdpAction
    packet: bytes  # the frame as the program left it
    duration_ns: int  # kernel-measured mean per repetition


def run_xdp(prog_fd: int, frame: bytes, repeat: int = 1) -> XdpRunResult:
    """Run the XDP program `repeat` times on `frame` (the kernel needs >= 14 bytes)."""
    data_in = ctypes.create_string_buffer(bytes(frame), len(frame))
    data_out = ctypes.create_string_buffer(len(frame) + 256)
    attr = _TestAttr(
        prog_fd=prog_fd,
        data_size_in=len(frame),
        data_size_out=len(data_out),
        data_in=ctypes.addressof(data_in),
        data_out=ctypes.addressof(data_out),
        repeat=repeat,
    )
    if _libc.syscall(_SYS_BPF, _BPF_PROG_TEST_RUN, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        err = ctypes.get_errno()
        raise BpfError(f"BPF_PROG_TEST_RUN on a {len(frame)}-byte frame: {os.strerror(err)}")
    return XdpRunResult(XdpAction(attr.retval), data_out.raw[: attr.data_size_out], attr.duration)


_BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1


def run_xdp_live(prog_fd: int, frame: bytes, repeat: int, batch_size: int = 0) -> int:
    """Run the XDP program `repeat` times on live copies of `frame` (BPF_F_TEST_XDP_LIVE_FRAMES):
    XDP_TX and XDP_REDIRECT really transmit, so the program is a traffic generator. Runs on the
    calling thread's CPU; a redirect's ifindex is resolved in the calling process's namespace.
    The kernel recycles each frame's page with what the program (and anything the frame went
    through) wrote into it. batch_size 0 is the kernel's default (64). Returns the kernel-measured
    mean ns per repetition, which includes the softirq work the frames caused on this CPU."""
    data_in = ctypes.create_string_buffer(bytes(frame), len(frame))
    attr = _TestAttr(
        prog_fd=prog_fd,
        data_size_in=len(frame),
        data_in=ctypes.addressof(data_in),
        repeat=repeat,
        flags=_BPF_F_TEST_XDP_LIVE_FRAMES,
        batch_size=batch_size,
    )
    if _libc.syscall(_SYS_BPF, _BPF_PROG_TEST_RUN, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        err = ctypes.get_errno()
        raise BpfError(f"BPF_PROG_TEST_RUN (live frames) on a {len(frame)}-byte frame: {os.strerror(err)}")
    return int(attr.duration)
