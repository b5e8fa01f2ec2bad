"""The bpf(2) commands lbnode uses, called straight through libc: no bcc, no libbpf ABI.

The long-running node must not import bcc (its LLVM costs ~120 MB that stays resident), so
everything it does to the program and the maps after start-up goes through here, by fd: open
pinned objects, read their info, look up / update / delete elements, batch updates, load a
program from instructions, pin. Each wrapper fills the member of `union bpf_attr`
(include/uapi/linux/bpf.h) its command reads; the kernel zero-fills the rest of the union.
ctypes drops the GIL while a syscall runs.

Errors raise `BpfSyscallError` (a `BpfError`) naming the command, the object and errno.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass

from bpf.loader import BpfError

SYS_BPF = 321  # x86_64

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27

# enum bpf_map_type (the ones lbnode declares)
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_RINGBUF = 27
PERCPU_TYPES = frozenset({5, BPF_MAP_TYPE_PERCPU_ARRAY, 10})  # percpu hash, array, lru hash

BPF_PROG_TYPE_XDP = 6
BPF_F_NO_PREALLOC = 1

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class BpfSyscallError(BpfError):
    def __init__(self, what: str, err: int) -> None:
        super().__init__(f"{what}: {os.strerror(err)}")
        self.errno = err


def bpf(cmd: int, attr: ctypes.Structure) -> int:
    """The syscall's result (>= 0), or -errno."""
    ret = int(_libc.syscall(SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
    return ret if ret >= 0 else -ctypes.get_errno()


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise BpfSyscallError(what, -ret)
    return ret


class ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class BatchAttr(ctypes.Structure):
    """The BPF_MAP_*_BATCH member."""

    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64), ("keys", ctypes.c_uint64),
                ("values", ctypes.c_uint64), ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32), ("inner_map_fd", ctypes.c_uint32),
                ("numa_node", ctypes.c_uint32), ("map_name", ctypes.c_char * 16)]


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
                ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
                ("prog_name", ctypes.c_char * 16)]


class _MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16)]


class _ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8)]


@dataclass(frozen=True, slots=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int
    name: str

    def shape(self) -> tuple[int, int, int, int, int]:
        """What must match for a pinned map to stand in for a freshly declared one."""
        return (self.type, self.key_size, self.value_size, self.max_entries, self.map_flags)


def obj_get(path: str) -> int:
    """A new fd of the object pinned at `path` (close it when done)."""
    raw = os.fsencode(path)
    return _check(bpf(BPF_OBJ_GET, _ObjAttr(pathname=ctypes.cast(ctypes.c_char_p(raw), ctypes.c_void_p).value or 0)),
                  f"BPF_OBJ_GET {path}")


def obj_pin(fd: int, path: str) -> None:
    raw = os.fsencode(path)
    _check(bpf(BPF_OBJ_PIN, _ObjAttr(pathname=ctypes.cast(ctypes.c_char_p(raw), ctypes.c_void_p).value or 0,
                                     bpf_fd=fd)), f"BPF_OBJ_PIN {path}")


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    _check(bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info),
                                                  info=ctypes.addressof(info))), f"map info of fd {fd}")
    return MapInfo(info.type, info.id, info.key_size, info.value_size, info.max_entries, info.map_flags,
                   info.name.decode(errors="replace"))


def prog_id(fd: int) -> int:
    info = _ProgInfo()
    _check(bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info),
                                                  info=ctypes.addressof(info))), f"program info of fd {fd}")
    return int(info.id)


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, name: str, flags: int = 0) -> int:
    attr = _MapCreateAttr(map_type=map_type, key_size=key_size, value_size=value_size, max_entries=max_entries,
                          map_flags=flags, map_name=name.encode()[:15])
    return _check(bpf(BPF_MAP_CREATE, attr), f"BPF_MAP_CREATE {name}")


def prog_load_xdp(insns: bytes, name: str, license: str = "GPL") -> int:
    """Load XDP instructions; a refusal raises with the verifier's log in the message."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    log_buf = ctypes.create_string_buffer(1 << 20)

    def load(log_level: int) -> int:
        return bpf(BPF_PROG_LOAD, _ProgLoadAttr(
            prog_type=BPF_PROG_TYPE_XDP, insn_cnt=len(insns) // 8, insns=ctypes.addressof(code),
            license=ctypes.addressof(lic), log_level=log_level, log_size=len(log_buf) if log_level else 0,
            log_buf=ctypes.addressof(log_buf) if log_level else 0, prog_name=name.encode()[:15]))

    fd = load(0)
    if fd >= 0:
        return fd
    first = -fd
    fd = load(1)  # again with the log: the refusal is rare, and the log is what an operator needs
    if fd >= 0:
        return fd
    tail = log_buf.value.decode(errors="replace").strip().splitlines()[-40:]
    raise BpfSyscallError(f"BPF_PROG_LOAD {name} refused by the verifier\n" + "\n".join(tail), first)


def lookup(fd: int, key: ctypes.Array[ctypes.c_char] | ctypes.Structure | ctypes._SimpleCData,  # type: ignore[type-arg]
           value: ctypes.Array[ctypes.c_char]) -> bool:
    """Fill `value` with the entry at `key`; False if there is none."""
    ret = bpf(BPF_MAP_LOOKUP_ELEM, ElemAttr(map_fd=fd, key=ctypes.addressof(key), value=ctypes.addressof(value)))
    if ret == -errno.ENOENT:
        return False
    _check(ret, f"BPF_MAP_LOOKUP_ELEM on map fd {fd}")
    return True


def update(fd: int, key: ctypes.Array[ctypes.c_char], value: ctypes.Array[ctypes.c_char], flags: int = 0) -> None:
    _check(bpf(BPF_MAP_UPDATE_ELEM, ElemAttr(map_fd=fd, key=ctypes.addressof(key), value=ctypes.addressof(value),
                                             flags=flags)), f"BPF_MAP_UPDATE_ELEM on map fd {fd}")


def delete(fd: int, key: ctypes.Array[ctypes.c_char]) -> bool:
    """False if there was no such entry."""
    ret = bpf(BPF_MAP_DELETE_ELEM, ElemAttr(map_fd=fd, key=ctypes.addressof(key)))
    if ret == -errno.ENOENT:
        return False
    _check(ret, f"BPF_MAP_DELETE_ELEM on map fd {fd}")
    return True


def next_key(fd: int, key: ctypes.Array[ctypes.c_char] | None, out: ctypes.Array[ctypes.c_char]) -> bool:
    """Fill `out` with the key after `key` (the first with None); False at the end."""
    ret = bpf(BPF_MAP_GET_NEXT_KEY, ElemAttr(map_fd=fd, key=ctypes.addressof(key) if key is not None else 0,
                                             value=ctypes.addressof(out)))
    if ret == -errno.ENOENT:
        return False
    _check(ret, f"BPF_MAP_GET_NEXT_KEY on map fd {fd}")
    return True


def _address(data: bytes) -> int:
    """Where the bytes object's buffer is: the kernel only reads it (no copy)."""
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0


def update_batch(fd: int, keys: bytes, values: bytes, count: int) -> None:
    """Write `count` packed entries in one call (the kernel may stop early on error: raise then)."""
    attr = BatchAttr(keys=_address(keys), values=_address(values), count=count, map_fd=fd)
    ret = bpf(BPF_MAP_UPDATE_BATCH, attr)
    _check(ret, f"BPF_MAP_UPDATE_BATCH of {count} on map fd {fd} (wrote {attr.count})")


def possible_cpus() -> int:
    """How many values a per-CPU map entry has (the kernel's possible CPUs, not the online ones)."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += (int(hi) if hi else int(lo)) - int(lo) + 1
    return n
