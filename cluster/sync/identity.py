"""A node's identity in flow sync: its node id and its incarnations (pure but for one counter).

Node ids: an IPv4 address is its own id (readable in captures); an IPv6 address gives 32 bits of
its hash. Incarnations are start times in wall-clock seconds, renewed by flowsync.py every
`INCARNATION_RENEW_S` (15 min; peers treat a higher incarnation as a restart and resume tracking
at its first number), because receivers refuse to adopt an incarnation more than two renewals
older than their own clock (policy.py: what a replay to a freshly started receiver can use is at
most that old).
"""
from __future__ import annotations

import hashlib
import ipaddress


def node_id_of(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    """IPv4: the address as a number (readable in captures); IPv6: 32 bits of its hash."""
    if isinstance(address, ipaddress.IPv4Address):
        return int(address)
    return int.from_bytes(hashlib.blake2b(address.packed, digest_size=4).digest(), "big")


_last_incarnation = 0


def next_incarnation(wall_s: float) -> int:
    """Start time in seconds, but always above the previous one of this process: a sync restarted
    within the same second (config reload) must not look like a replay of its predecessor. The
    last one is the process's (a module global): every FlowSync of this process takes from it."""
    global _last_incarnation
    _last_incarnation = max(int(wall_s) & 0xFFFFFFFF, _last_incarnation + 1)
    return _last_incarnation
