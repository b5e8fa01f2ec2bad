"""Backend MAC addresses from the kernel's neighbour table (ARP / IPv6 ND).

The node forwards by MAC, so a backend is usable only once its MAC is known. Every
`interval_s` this reads the neighbour entries of the node's interface; a backend with no
usable entry gets a one-byte UDP datagram to the discard port (9), which makes the kernel
resolve it (the reply, if any, is an ICMP port-unreachable, harmless). A MAC, once learned,
is kept while the entry fails: a dead backend is taken out by its health checks, and its
pinned flows keep a destination. A changed MAC (a replaced host) is picked up at once. What
is learned goes to the node as `MacsLearned` events.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable
from typing import Any

import trio

from bpf.structs import IPAddress
from cluster.events import MacsLearned

log = logging.getLogger(__name__)

# linux/neighbour.h NUD_* states whose lladdr can be used.
NUD_REACHABLE, NUD_STALE, NUD_DELAY, NUD_PROBE, NUD_PERMANENT, NUD_NOARP = 0x02, 0x04, 0x08, 0x10, 0x80, 0x40
USABLE_STATES = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT | NUD_NOARP
DISCARD_PORT = 9
FAST_INTERVAL_S = 0.1


class Neighbours:
    """Keeps `macs` current for a set of backend addresses; sends what changed to `events`."""

    def __init__(self, ifname: str, addresses: Iterable[IPAddress], events: trio.abc.SendChannel[MacsLearned],
                 interval_s: float = 1.0) -> None:
        self.ifname = ifname
        self.addresses = frozenset(addresses)
        self.macs: dict[IPAddress, str] = {}
        self._events = events
        self._interval_s = interval_s
        self._wake = trio.Event()

    def set_addresses(self, addresses: Iterable[IPAddress]) -> None:
        self.addresses = frozenset(addresses)
        self.macs = {a: m for a, m in self.macs.items() if a in self.addresses}
        self._wake.set()  # a new backend: look it up now, not at the next slow poll

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            if not ipr.link_lookup(ifname=self.ifname):
                raise OSError(f"neighbours: no interface {self.ifname!r}")
            await self._refresh(ipr)
            task_status.started()
            while True:
                # Poll fast while a backend's MAC is still unknown: it cannot take traffic until then.
                missing = any(a not in self.macs for a in self.addresses)
                with trio.move_on_after(FAST_INTERVAL_S if missing else self._interval_s):
                    await self._wake.wait()
                self._wake = trio.Event()
                await self._refresh(ipr)

    async def _refresh(self, ipr: Any) -> None:
        def read() -> list[Any]:
            # By name every time: an interface deleted and created again has a new index.
            indexes = ipr.link_lookup(ifname=self.ifname)
            return list(ipr.get_neighbours(ifindex=indexes[0])) if indexes else []
        entries = await trio.to_thread.run_sync(read)
        seen: dict[IPAddress, str] = {}
        for entry in entries:
            lladdr, dst = entry.get_attr("NDA_LLADDR"), entry.get_attr("NDA_DST")
            if lladdr and dst and entry["state"] & USABLE_STATES:
                seen[ipaddress.ip_address(dst)] = lladdr
        changed: dict[IPAddress, str] = {}
        for address in self.addresses:
            mac = seen.get(address)
            if mac is None:
                _nudge(address, self.ifname)
            elif self.macs.get(address) != mac:
                log.info("%s: backend %s is at %s (was %s)", self.ifname, address, mac, self.macs.get(address))
                self.macs[address] = changed[address] = mac
        if changed:
            await self._events.send(MacsLearned(changed))


def _nudge(address: IPAddress, ifname: str) -> None:
    """Make the kernel resolve `address` on `ifname` by sending it one discard datagram."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            sock.sendto(b"\0", (str(address), DISCARD_PORT))
        except OSError as exc:  # unreachable now; the next round tries again
            log.debug("%s: cannot nudge %s: %s", ifname, address, exc)
