"""Compile the XDP program with bcc and attach it to an interface (in any namespace).

Attach and detach go through a netlink socket opened inside the namespace that owns the
device (pyroute2's `IPRoute(netns=...)`), so an interface index is only ever resolved and used
there. A program left attached (by a killed process, or on purpose: `lbnode stop --keep-forwarding`)
is replaced in place, atomically when the mode is the same, not a reason to fail.
"""
from __future__ import annotations

import contextlib
import enum
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parent
PROGRAM_SOURCE = BPF_DIR / "lbnode.c"
PASS_SOURCE = BPF_DIR / "xdp_pass.c"

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2


class BpfError(Exception):
    """Base of every error raised by the bpf package."""


class CompileError(BpfError):
    """bcc could not compile or the verifier refused the program; carries the log."""


class AttachError(BpfError):
    """The program could not be attached to, or detached from, an interface."""


class MapError(BpfError):
    """A map operation failed (full map, bad index, kernel error)."""


class XdpMode(enum.Enum):
    NATIVE = "native"
    GENERIC = "generic"

    @property
    def flags(self) -> int:
        return XDP_FLAGS_DRV_MODE if self is XdpMode.NATIVE else XDP_FLAGS_SKB_MODE


@dataclass(frozen=True, slots=True)
class Limits:
    """Map sizes compiled into the program (the C header's #ifndef constants)."""

    max_services: int = 256
    max_backends: int = 4096
    ch_table_bits: int = 12
    flow_table_size: int = 262144
    event_ring_pages: int = 256

    @property
    def ch_table_size(self) -> int:
        return 1 << self.ch_table_bits

    def cflags(self) -> list[str]:
        return [
            f"-DMAX_SERVICES={self.max_services}",
            f"-DMAX_BACKENDS={self.max_backends}",
            f"-DCH_TABLE_BITS={self.ch_table_bits}",
            f"-DFLOW_TABLE_SIZE={self.flow_table_size}",
            f"-DEVENT_RING_PAGES={self.event_ring_pages}",
        ]


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """bcc's compiler and the verifier write to fd 2; keep what they say for the error."""
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


def compile_program(source: Path, function: str, cflags: Sequence[str] = ()) -> tuple[Any, Any]:
    """Compile `source` and load `function` as an XDP program; returns (bcc.BPF, loaded function).
    In-process: for tests and tools. The node compiles in a child (bpf/compile_child.py)."""
    return _compile(source, cflags, function)


def compile_module(source: Path, cflags: Sequence[str] = ()) -> Any:
    """Compile `source` with bcc (which creates its maps) without loading a program: bcc.BPF."""
    return _compile(source, cflags, None)[0]


def bcc_table_fd(module: Any, name: str) -> int:
    """The fd of map `name` of a bcc module, -1 if the build declares none."""
    import bcc

    return int(bcc.lib.bpf_table_fd(module.module, name.encode()))  # type: ignore[attr-defined]


def _compile(source: Path, cflags: Sequence[str], function: str | None) -> tuple[Any, Any]:
    import bcc  # Debian's python3-bpfcc; imported here so pure modules never need it

    flags = [f"-I{BPF_DIR}", *cflags]
    failure: Exception | None = None
    fn = None
    with _captured_stderr() as output:
        try:
            bpf = bcc.BPF(src_file=str(source).encode(), cflags=flags)
            if function is not None:
                fn = bpf.load_func(function.encode(), bcc.BPF.XDP)
        except Exception as exc:
            failure = exc
    if failure is not None:
        raise CompileError(f"{source}: {failure} (cflags: {' '.join(flags)})\n{output[0].strip()}") from failure
    return bpf, fn


@dataclass(frozen=True, slots=True)
class Attachment:
    """Where a program is attached, so it can be detached from the same place."""

    ifname: str
    netns: str | None
    mode: XdpMode
    prog_id: int


def _ipr(netns: str | None) -> Any:
    from pyroute2 import IPRoute

    return IPRoute(netns=netns) if netns else IPRoute()


def _xdp_state(ipr: Any, index: int) -> tuple[int, int]:
    """(attached program id or 0, the flags to address it with)."""
    xdp = ipr.get_links(index)[0].get_attr("IFLA_XDP")
    attrs = dict(xdp["attrs"]) if xdp else {}
    mode = attrs.get("IFLA_XDP_ATTACHED")
    prog_id = attrs.get("IFLA_XDP_PROG_ID", 0) or 0
    flags = XDP_FLAGS_SKB_MODE if mode == "xdpgeneric" else XDP_FLAGS_DRV_MODE
    return prog_id, flags


def _set_xdp(ipr: Any, index: int, fd: int, flags: int) -> None:
    ipr.link("set", index=index, xdp={"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]})


def _lookup(ipr: Any, ifname: str, netns: str | None) -> int:
    indexes = ipr.link_lookup(ifname=ifname)
    if not indexes:
        raise AttachError(f"no interface {ifname!r} in {'netns ' + netns if netns else 'this namespace'}")
    return int(indexes[0])


def attach(fd: int, ifname: str, mode: XdpMode, netns: str | None = None) -> Attachment:
    """Attach program `fd` to `ifname`, replacing whatever XDP program is already there."""
    where = f"{ifname} (netns {netns or 'current'})"
    try:
        with _ipr(netns) as ipr:
            index = _lookup(ipr, ifname, netns)
            stale_id, stale_flags = _xdp_state(ipr, index)
            if stale_id and stale_flags != mode.flags:
                # Another mode: the kernel refuses both at once, so this one has a gap.
                log.warning("%s: detaching XDP program id %d (other mode) to attach in %s mode", where, stale_id,
                            mode.value)
                _set_xdp(ipr, index, -1, stale_flags)
            elif stale_id:
                # Same mode: the new program replaces the old one in one netlink request, no packet
                # without a program (a restart over a program left forwarding, or by a killed node).
                log.info("%s: replacing XDP program id %d in place", where, stale_id)
            _set_xdp(ipr, index, fd, mode.flags)
            prog_id, _ = _xdp_state(ipr, index)
    except AttachError:
        raise
    except Exception as exc:
        raise AttachError(f"{where}: cannot attach XDP in {mode.value} mode: {exc}") from exc
    log.info("%s: XDP program id %d attached in %s mode", where, prog_id, mode.value)
    return Attachment(ifname, netns, mode, prog_id)


def detach(attachment: Attachment) -> None:
    """Detach the program if it is still the one we attached (never someone else's)."""
    where = f"{attachment.ifname} (netns {attachment.netns or 'current'})"
    try:
        with _ipr(attachment.netns) as ipr:
            index = _lookup(ipr, attachment.ifname, attachment.netns)
            prog_id, flags = _xdp_state(ipr, index)
            if prog_id == attachment.prog_id:
                _set_xdp(ipr, index, -1, flags)
                log.info("%s: XDP program id %d detached", where, prog_id)
            else:
                log.warning("%s: XDP program is now id %d, not ours (%d); left in place",
                            where, prog_id, attachment.prog_id)
    except AttachError:
        raise
    except Exception as exc:
        raise AttachError(f"{where}: cannot detach XDP: {exc}") from exc


def attached_program_id(ifname: str, netns: str | None = None) -> int:
    """The id of the XDP program on `ifname`, 0 if none."""
    with _ipr(netns) as ipr:
        return _xdp_state(ipr, _lookup(ipr, ifname, netns))[0]
