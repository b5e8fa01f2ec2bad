"""The compile child: compile with bcc, load, pin the program and every map, print a report, exit.

    python -m bpf.compile_child --pin-dir DIR --ifname IF --limits JSON [--cflag=-DX ...]

Run by bpf/pinned.py's `build_pinned` so that bcc and its LLVM never live in the node's
process. bcc compiles lbnode.c and creates fresh maps; then, for every map whose pinned
predecessor has the same signature (bpf/pinned.py), the program is pointed at the pinned map
instead: its instructions name maps by fd (BPF_LD_IMM64 with src_reg BPF_PSEUDO_MAP_FD), so
the fds of bcc's fresh maps are rewritten to those of the pins before the program is loaded
through bpf(2). A flow table of another size is migrated (bpf/pinned.py). Fresh maps are
pinned in place of old ones, the program is pinned as `prog`, and the `layout` record is
written last (removed first), so a child that dies half-way leaves a directory the next one
treats as unknown: it starts empty rather than adopting a mix.

Pinning is best effort: a directory this user may not write in, pins of another user, a
directory that is not in a bpffs (EACCES, EPERM) do not fail the build. The previous state is
then not adopted (if it cannot be read) or not kept (if it cannot be written): whatever this run
pinned is removed again, the fds are handed over all the same, and the report's `pin_error`
says why, for the node's warning and status (bpf/pinned.py: a node that cannot pin runs unpinned).

Exit status 0 with one JSON line (`BuildReport`) on stdout; otherwise the reason on stderr
(the verifier's log for a refused program), which the node puts in its error.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import socket
import struct
import sys
from pathlib import Path

from bpf import syscall
from bpf.flowtable import FlowCursor
from bpf.loader import BPF_DIR, PROGRAM_SOURCE, BpfError, Limits, bcc_table_fd, compile_module
from bpf.maps import MAP_SPECS, OPTIONAL_MAPS
from bpf.pinned import (
    FLOW_TYPES,
    FORWARDING_GROUP,
    INDEX_STATE_PIN,
    LAYOUT_PIN,
    LAYOUT_VALUE_SIZE,
    LAYOUT_VERSION,
    PROG_PIN,
    BuildReport,
    Layout,
    PinError,
    limits_dict,
    map_signature,
    netns_cookie,
)

_LD_IMM64 = 0x18
_PSEUDO_MAP_FD = 1


def _open_layout(pin_dir: Path) -> tuple[Layout | None, str]:
    """The previous run's layout record, or None and why there is none to adopt."""
    path = pin_dir / LAYOUT_PIN
    if not path.exists():
        return None, ("no pinned state" if not (pin_dir / PROG_PIN).exists()
                      else "pins without a layout record (a compile was interrupted)")
    fd = syscall.obj_get(str(path))
    try:
        value = ctypes.create_string_buffer(LAYOUT_VALUE_SIZE)
        if not syscall.lookup(fd, ctypes.create_string_buffer(4), value):
            return None, "an empty layout record"
        return Layout.decode(value.raw), ""
    except (ValueError, KeyError) as exc:
        return None, f"an unreadable layout record ({exc})"
    finally:
        os.close(fd)


def _rewrite(insns: bytes, fds: dict[int, int]) -> bytes:
    """The instructions with each map fd in `fds` replaced by its value."""
    out = bytearray(insns)
    for off in range(0, len(out), 8):
        code, regs, _, imm = struct.unpack_from("<BBhi", out, off)
        if code == _LD_IMM64 and regs >> 4 == _PSEUDO_MAP_FD:
            if imm not in fds:
                raise BpfError(f"instruction {off // 8} names map fd {imm}, which is no map of lbnode.h")
            struct.pack_into("<i", out, off + 4, fds[imm])
    return bytes(out)


def build(pin_dir: Path | None, ifname: str, limits: Limits, cflags: list[str]
          ) -> tuple[BuildReport, int, dict[str, int]]:
    """Compile, adopt what the pins allow, load, pin: (report, program fd, map fds by name).
    Without `pin_dir`, nothing is adopted or pinned: the fds are all there is."""
    header = (BPF_DIR / "lbnode.h").read_text()
    module = compile_module(PROGRAM_SOURCE, [*limits.cflags(), *cflags])
    fresh: dict[str, int] = {}
    for name in [*MAP_SPECS, *OPTIONAL_MAPS]:
        fd = bcc_table_fd(module, name)
        if fd >= 0:
            fresh[name] = fd
        elif name in MAP_SPECS:
            raise BpfError(f"lbnode.c declares no map {name!r} (bpf/maps.py MAP_SPECS names it)")
    shapes = {name: syscall.map_info(fd).shape() for name, fd in fresh.items()}
    index_entries = limits.max_services + limits.max_backends
    shapes[INDEX_STATE_PIN] = (syscall.BPF_MAP_TYPE_ARRAY, 4, 4, index_entries, 0)
    signatures = {name: map_signature(name, shape, header) for name, shape in shapes.items()}
    flow_shape = shapes["flows"]
    signatures[FLOW_TYPES] = map_signature(FLOW_TYPES, (*flow_shape[:3], flow_shape[4]), header)
    signatures[INDEX_STATE_PIN] = hashlib.sha256(f"{INDEX_STATE_PIN} {shapes[INDEX_STATE_PIN]} {LAYOUT_VERSION}"
                                                 .encode()).hexdigest()[:32]
    cookie = netns_cookie()

    old: Layout | None = None
    note = "not pinned"
    if pin_dir is not None:
        try:
            old, note = _open_layout(pin_dir) if pin_dir.exists() else (None, "no pinned state")
        except (OSError, BpfError) as exc:  # pins this user may not open (EACCES)
            old, note = None, f"cannot read the pinned state ({exc})"
    if old is not None and old.version != LAYOUT_VERSION:
        note = f"pinned layout version {old.version}, this node's is {LAYOUT_VERSION}"
        old = None
    elif old is not None and (old.netns_cookie, old.ifname) != (cookie, ifname):
        old, note = None, "pins of another network namespace that had the same inode number (deleted since)"
    pinned: dict[str, int] = {}  # reused map -> fd of its pin
    migrated = -1  # flows copied from a flow table of another size (-1: none was)
    if old is not None and pin_dir is not None:
        for name, sig in signatures.items():
            if name not in shapes:
                continue  # FLOW_TYPES: no map of its own
            path = pin_dir / name
            if old.maps.get(name) != sig or not path.exists():
                continue
            try:
                fd = syscall.obj_get(str(path))
            except BpfError:  # a pin this user may not open: not reused
                continue
            if syscall.map_info(fd).shape() != shapes[name]:
                os.close(fd)
                continue
            pinned[name] = fd
        missing = [m for m in FORWARDING_GROUP if m not in pinned]
        resized = old.maps.get(FLOW_TYPES) == signatures[FLOW_TYPES] and (pin_dir / "flows").exists()
        if missing == ["flows"] and resized:
            migrated = _migrate_flows(str(pin_dir / "flows"), fresh["flows"])
            note = f"flow table resized: {migrated} flows migrated into {limits.flow_table_size} entries"
        elif missing:
            note = f"the layout of {', '.join(missing)} changed (lbnode.h or the limits): flows start empty"
            for name in FORWARDING_GROUP:
                if name in pinned:
                    os.close(pinned.pop(name))
    if INDEX_STATE_PIN not in pinned:
        fresh[INDEX_STATE_PIN] = syscall.map_create(syscall.BPF_MAP_TYPE_ARRAY, 4, 4, index_entries,
                                                    INDEX_STATE_PIN)
    insns = _rewrite(module.dump_func(b"xdp_main"), {fd: pinned.get(name, fd) for name, fd in fresh.items()})
    prog_fd = syscall.prog_load_xdp(insns, "xdp_main")
    fds = {name: pinned[name] if name in pinned else fresh[name] for name in shapes}
    reused = tuple(sorted(pinned))
    adopted = "flows" in pinned or migrated >= 0
    pin_error = ""
    if pin_dir is not None:
        try:
            _pin(pin_dir, prog_fd, {n: fd for n, fd in fresh.items() if n not in pinned},
                 Layout(LAYOUT_VERSION, cookie, ifname, signatures, limits_dict(limits)))
        except (OSError, BpfError) as exc:
            # Half a directory helps nobody (and holds kernel memory): remove what can be. What
            # this run uses lives on by the fds handed over.
            shutil.rmtree(pin_dir, ignore_errors=True)
            pin_error = str(exc)
    report = BuildReport(str(pin_dir or ""), syscall.prog_id(prog_fd), reused,
                         tuple(sorted(n for n in shapes if n not in pinned)), "" if "flows" in pinned else note,
                         adopted_flows=adopted, migrated_flows=max(0, migrated), pin_error=pin_error)
    return report, prog_fd, fds


def _pin(pin_dir: Path, prog_fd: int, fresh: dict[str, int], layout: Layout) -> None:
    """Pin the fresh maps over the old ones, then the program, then the layout record."""
    os.makedirs(pin_dir, mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pin_dir / LAYOUT_PIN)  # from here until the new record, the directory is "unknown"

    for name, fd in fresh.items():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pin_dir / name)
        syscall.obj_pin(fd, str(pin_dir / name))
    # (bpffs refuses rename: unpin, pin. The old program stays attached meanwhile: its
    # attachment, not its pin, keeps it alive, until the node attaches this one over it.)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pin_dir / PROG_PIN)
    syscall.obj_pin(prog_fd, str(pin_dir / PROG_PIN))

    layout_fd = syscall.map_create(syscall.BPF_MAP_TYPE_ARRAY, 4, LAYOUT_VALUE_SIZE, 1, LAYOUT_PIN)
    raw = layout.encode()
    syscall.update(layout_fd, ctypes.create_string_buffer(4), ctypes.create_string_buffer(raw, len(raw)))
    syscall.obj_pin(layout_fd, str(pin_dir / LAYOUT_PIN))
    os.close(layout_fd)


def _migrate_flows(old_path: str, new_fd: int) -> int:
    """Copy every flow of the pinned table at `old_path` into `new_fd`, a chunk at a time."""
    old_fd = syscall.obj_get(old_path)
    copied = 0
    try:
        for chunk in FlowCursor(old_fd):
            n = len(chunk)
            syscall.update_batch(new_fd, chunk.keys, chunk.values, n)
            copied += n
    finally:
        os.close(old_fd)
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bpf.compile_child", description=__doc__.splitlines()[0])
    parser.add_argument("--pin-dir", type=Path, help="pin (and adopt) here; without it, nothing is pinned")
    parser.add_argument("--ifname", required=True)
    parser.add_argument("--limits", required=True, help="JSON object of bpf.loader.Limits fields")
    parser.add_argument("--cflag", action="append", default=[])
    parser.add_argument("--send-fds", type=int, help="a unix socket: the report and the fds go there")
    args = parser.parse_args(argv)
    try:
        report, prog_fd, fds = build(args.pin_dir, args.ifname, Limits(**json.loads(args.limits)), args.cflag)
        if args.send_fds is not None:
            names = sorted(fds)
            with socket.socket(fileno=args.send_fds) as sock:
                message = json.dumps({"report": report.to_json(), "maps": names}).encode()
                socket.send_fds(sock, [message], [prog_fd, *(fds[n] for n in names)])
    except (BpfError, PinError, OSError) as exc:
        print(f"{args.pin_dir or args.ifname}: {exc}", file=sys.stderr)
        return 1
    print(report.to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
