"""ctypes mirrors of the structs in bpf/lbnode.h, and the 16-byte address form.

Every struct that crosses between the kernel and user space is defined once here; a test
compares sizes and field names with the types bcc generates from the C header.
"""
from __future__ import annotations

import ctypes
import enum
import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NO_BACKEND = 0xFFFFFFFF
FLOW_HASH_SEED = 0x6C626E64
NEW_PIN_WINDOW_NS = 1_000_000_000  # the window of LbConfig.max_new_per_s_per_cpu

FLOW_F_CLOSING = 0x1
FLOW_F_SYNCED = 0x2
BACKEND_F_VALID = 0x1
BACKEND_F_UNRESOLVED = 0x2
SERVICE_F_ACTIVE = 0x1
EVENT_FLOW_NEW = 1
EVENT_FLOW_CLOSE = 2

IPPROTO_TCP = 6
IPPROTO_UDP = 17
PROTOCOLS = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP}


class Stat(enum.IntEnum):
    """Mirror of `enum lb_stat`: global counters."""

    PASS = 0
    PASS_UNPARSED = 1
    PASS_NOT_OURS = 2
    TX = 3
    DROP_NO_BACKEND = 4
    DROP_FRAGMENT = 5
    NEW_FLOW = 6
    SYN_UNPINNED = 7
    ICMP_TOO_BIG = 8
    FLOW_REPINNED = 9
    EVENT_LOST = 10
    DROP_UNRESOLVED = 11
    FLOOD_UNPINNED = 12


STAT_MAX = len(Stat)


def addr16(address: str | IPAddress) -> bytes:
    """An address in the kernel's one form: IPv6 as is, IPv4 as IPv4-mapped IPv6."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv4Address):
        return b"\x00" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def from_addr16(raw: bytes) -> IPAddress:
    ip6 = ipaddress.IPv6Address(bytes(raw))
    return ip6.ipv4_mapped or ip6


def mac_bytes(mac: str) -> bytes:
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return bytes(int(p, 16) for p in parts)


def mac_str(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in bytes(raw))


def _be32x4(raw: bytes) -> ctypes.Array[ctypes.c_uint32]:
    arr = (ctypes.c_uint32 * 4)()
    ctypes.memmove(arr, raw, 16)
    return arr


def _raw(arr: ctypes.Array[ctypes.c_uint32]) -> bytes:
    return ctypes.string_at(ctypes.addressof(arr), 16)


class FlowKey(ctypes.Structure):
    """struct flow_key: the 5-tuple as the client sent it (ports in network order)."""

    _fields_ = [
        ("src", ctypes.c_uint32 * 4),
        ("dst", ctypes.c_uint32 * 4),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]

    @classmethod
    def make(cls, src: str | IPAddress, sport: int, dst: str | IPAddress, dport: int, proto: int) -> FlowKey:
        return cls(_be32x4(addr16(src)), _be32x4(addr16(dst)), _htons(sport), _htons(dport), proto)

    @property
    def src_ip(self) -> IPAddress:
        return from_addr16(_raw(self.src))

    @property
    def dst_ip(self) -> IPAddress:
        return from_addr16(_raw(self.dst))

    @property
    def src_port(self) -> int:
        return _htons(self.sport)

    @property
    def dst_port(self) -> int:
        return _htons(self.dport)

    def __repr__(self) -> str:
        return f"FlowKey({self.src_ip}:{self.src_port} -> {self.dst_ip}:{self.dst_port} proto {self.proto})"


class Flow(ctypes.Structure):
    """struct flow: pinned backend and service indexes, flags, last-seen time (CLOCK_MONOTONIC_COARSE ns)."""

    _fields_ = [
        ("backend", ctypes.c_uint32),
        ("service", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("last_seen_ns", ctypes.c_uint64),
    ]


class ServiceKey(ctypes.Structure):
    """struct service_key: (VIP, port in network order, L4 protocol)."""

    _fields_ = [("vip", ctypes.c_uint32 * 4), ("port", ctypes.c_uint16), ("proto", ctypes.c_uint8),
                ("pad", ctypes.c_uint8)]

    @classmethod
    def make(cls, vip: str | IPAddress, port: int, proto: int) -> ServiceKey:
        return cls(_be32x4(addr16(vip)), _htons(port), proto)


class Service(ctypes.Structure):
    """struct service (by index): the first slot of the active hash table, and flags."""

    _fields_ = [("table_base", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class Backend(ctypes.Structure):
    """struct backend: address (for flow events), MAC and flags."""

    _fields_ = [("addr", ctypes.c_uint32 * 4), ("mac", ctypes.c_uint8 * 6), ("flags", ctypes.c_uint16)]


class LbConfig(ctypes.Structure):
    """struct lb_config: our MAC, when to refresh a flow's last-seen time, the control plane's
    clock, and the cap on new pins per CPU per NEW_PIN_WINDOW_NS (0: none)."""

    _fields_ = [
        ("mac", ctypes.c_uint8 * 6),
        ("flags", ctypes.c_uint16),
        ("refresh_ns", ctypes.c_uint64),
        ("epoch_ns", ctypes.c_uint64),
        ("max_new_per_s_per_cpu", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class PinWindow(ctypes.Structure):
    """struct pin_window (one CPU's): start of the current new-pin window and the pins made in it."""

    _fields_ = [("start_ns", ctypes.c_uint64), ("pins", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class VipKey(ctypes.Structure):
    """struct vip_key."""

    _fields_ = [("addr", ctypes.c_uint32 * 4)]


class FlowEvent(ctypes.Structure):
    """struct flow_event: a ring-buffer record of a new or closing flow."""

    _fields_ = [
        ("key", FlowKey),
        ("backend_addr", ctypes.c_uint32 * 4),
        ("backend", ctypes.c_uint32),
        ("service", ctypes.c_uint32),
        ("time_ns", ctypes.c_uint64),
        ("kind", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 7),
    ]

    @property
    def backend_ip(self) -> IPAddress:
        return from_addr16(_raw(self.backend_addr))


class ServiceStats(ctypes.Structure):
    """struct service_stats (one CPU's share)."""

    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64), ("new_flows", ctypes.c_uint64),
                ("drops", ctypes.c_uint64)]


class BackendStats(ctypes.Structure):
    """struct backend_stats (one CPU's share)."""

    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64), ("new_flows", ctypes.c_uint64),
                ("closed", ctypes.c_uint64)]

    @property
    def active(self) -> int:
        """What this node adds to the backend's active connections (may be < 0: flows pinned
        elsewhere closed here); weighting leastconn sums it over the cluster."""
        return int(self.new_flows) - int(self.closed)


def backend_value(address: str | IPAddress, mac: str | None, *, valid: bool = True) -> Backend:
    """A backend entry; `mac` None: configured but not resolved yet (its pinned flows are held)."""
    flags = (BACKEND_F_VALID | (BACKEND_F_UNRESOLVED if mac is None else 0)) if valid else 0
    return Backend(_be32x4(addr16(address)), (ctypes.c_uint8 * 6)(*mac_bytes(mac or "00:00:00:00:00:00")), flags)


def vip_key(address: str | IPAddress) -> VipKey:
    return VipKey(_be32x4(addr16(address)))


def _htons(value: int) -> int:
    return int.from_bytes(value.to_bytes(2, "big"), "little")


# Every mirror and the C struct name it mirrors; the layout test walks this.
MIRRORS: dict[str, type[ctypes.Structure]] = {
    "flow_key": FlowKey,
    "flow": Flow,
    "service_key": ServiceKey,
    "service": Service,
    "backend": Backend,
    "lb_config": LbConfig,
    "vip_key": VipKey,
    "flow_event": FlowEvent,
    "service_stats": ServiceStats,
    "backend_stats": BackendStats,
    "pin_window": PinWindow,
}
