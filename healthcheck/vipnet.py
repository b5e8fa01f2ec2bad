"""Through-VIP checks: reach the backend's MAC with the VIP as destination, like DSR traffic.

Design
------
With layer-2 DSR the load balancer rewrites only the destination MAC: the backend receives a
frame for *its* MAC carrying a packet for the *VIP*, and answers only if it has the VIP on a
loopback (with ``arp_ignore=1``, ``arp_announce=2``). A check that connects to the backend's own
address proves nothing about that. So a through-VIP check connects to ``VIP:port`` and policy
routing sends it to the chosen backend:

* every backend address gets a mark ``mark_base + i`` and a routing table ``table_base + i``
  holding ``VIP/32 via <backend> dev <dev> onlink`` for each VIP it serves;
* one rule per backend, ``fwmark <mark> lookup <table>``, at preference `pref` (before main);
* the probe sets ``SO_MARK`` on its socket before ``connect()``. The kernel keeps the mark on
  every segment of that connection, ARP resolves the backend's address, and the SYN leaves for
  the backend's MAC with destination VIP. The backend answers from the VIP straight back to the
  checker's own address, as DSR replies to clients do.

Several backends share a VIP, so a destination route alone cannot steer; the mark can, with no
XDP, raw sockets or a namespace per backend. Requirements, checked by `VipSteering.apply`:

* every backend is on a directly connected network (L2 DSR needs that anyway);
* the VIP is not a local address in the checking namespace (the ``local`` table, rule 0, would
  win). The XDP node does not configure the VIP on an interface; if a deployment does, run the
  checks from a dedicated check namespace with a veth or macvlan into the backend segment;
* replies come from the VIP, for which the checking namespace has no (or another) route, so
  reverse-path filtering would drop them: `apply` sets ``rp_filter=0`` on ``all`` and on the
  devices it steers through, and `remove` puts back the values it changed (``relax_rp_filter=False``
  leaves sysctls alone).

Everything namespace-specific lives here: `NetnsSockets` creates sockets inside a named network
namespace (``setns`` around ``socket()``, then back; a socket stays in the namespace it was
created in), so `HealthChecker(netns=...)` probes from there while the process stays put; the
``ip`` commands run with ``-n <netns>``. IPv4 and IPv6 use the same scheme
(``-6`` tables and rules); the tests exercise IPv4.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import socket as stdsocket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

import trio

from healthcheck.config import IPAddress
from healthcheck.errors import SteeringError

log = logging.getLogger(__name__)

MARK_BASE = 0x4C420000  # "LB" in the high half; low half indexes backends
TABLE_BASE = 0x4C420000
RULE_PREF = 9000
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True, slots=True)
class SteeringEntry:
    backend: IPAddress
    vips: tuple[IPAddress, ...]
    dev: str
    mark: int
    table: int


def plan(pairs: Iterable[tuple[IPAddress, IPAddress]], devs: Mapping[IPAddress, str], *,
         mark_base: int = MARK_BASE, table_base: int = TABLE_BASE) -> tuple[SteeringEntry, ...]:
    """Pure: (vip, backend) pairs and each backend's device -> one mark and table per backend."""
    vips_by_backend: dict[IPAddress, list[IPAddress]] = {}
    for vip, backend in pairs:
        vips = vips_by_backend.setdefault(backend, [])
        if vip not in vips:
            vips.append(vip)
    if len(vips_by_backend) > 0xFFFF:
        raise SteeringError(f"too many through-VIP backends: {len(vips_by_backend)} > 65535")
    return tuple(SteeringEntry(b, tuple(v), devs[b], mark_base + i, table_base + i)
                 for i, (b, v) in enumerate(sorted(vips_by_backend.items(), key=lambda kv: (kv[0].version, kv[0]))))


def add_commands(entries: Sequence[SteeringEntry], pref: int) -> list[str]:
    """Pure: ``ip -batch`` lines installing `entries` (one address family per batch)."""
    lines = []
    for e in entries:
        plen = 32 if e.backend.version == 4 else 128
        for vip in e.vips:
            lines.append(f"route replace {vip}/{plen} via {e.backend} dev {e.dev} onlink table {e.table}")
        lines.append(f"rule add fwmark {e.mark:#x} lookup {e.table} pref {pref}")
    return lines


def by_family(entries: Sequence[SteeringEntry]) -> list[tuple[int, list[SteeringEntry]]]:
    """Pure: (IP version, its entries) for each version that has any; `ip` takes one per batch."""
    groups = ((version, [e for e in entries if e.backend.version == version]) for version in (4, 6))
    return [(version, fam) for version, fam in groups if fam]


def remove_commands(entries: Sequence[SteeringEntry], pref: int) -> list[str]:
    lines = []
    for e in entries:
        lines.append(f"rule del fwmark {e.mark:#x} lookup {e.table} pref {pref}")
        lines.append(f"route flush table {e.table}")
    return lines


class NetnsSockets:
    """Creates sockets inside a named network namespace (``/run/netns/<name>``)."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self._target = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def __call__(self, family: int) -> stdsocket.socket:
        _setns(self._target)
        try:
            return stdsocket.socket(family, stdsocket.SOCK_STREAM)
        finally:
            _return_home(self._home)

    def close(self) -> None:
        for fd in (self._target, self._home):
            os.close(fd)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise SteeringError(f"setns: {os.strerror(err)}")


def _return_home(fd: int) -> None:
    """Back to the thread's own namespace, or abort the process.

    If this fails the thread, which runs every trio task of the node, stays in the check
    namespace: every socket it opens after that (BGP sessions, the status socket, netlink for
    the XDP detach) would silently land there. An exception cannot be made safe: `check_once`
    turns `Exception` into a failed check, and even a `BaseException` would run the node's
    shutdown path (withdraw, detach) in the wrong namespace on the way out. So the process
    aborts: the kernel closes its BGP sessions, the peers withdraw its routes (the node stops
    advertising, which is what a crashed component must cause), and the supervisor restarts it.
    """
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        log.critical("setns back to the home network namespace failed: %s; this thread would open its "
                     "sockets in the check namespace from now on: aborting", os.strerror(err))
        logging.shutdown()  # flush the handlers: os.abort() does not
        os.abort()


class VipSteering:
    """Installs and removes the through-VIP policy routing in one namespace (None: our own)."""

    def __init__(self, netns: str | None = None, *, mark_base: int = MARK_BASE, table_base: int = TABLE_BASE,
                 pref: int = RULE_PREF, relax_rp_filter: bool = True) -> None:
        self.netns = netns
        self.mark_base = mark_base
        self.table_base = table_base
        self.pref = pref
        self.relax_rp_filter = relax_rp_filter
        self.entries: tuple[SteeringEntry, ...] = ()
        self._marks: dict[IPAddress, int] = {}
        self._saved_sysctls: dict[str, str] = {}  # values `apply` changed, restored by `remove`

    def mark_for(self, backend: IPAddress) -> int:
        try:
            return self._marks[backend]
        except KeyError:
            raise SteeringError(f"no through-VIP route for backend {backend}; apply() first") from None

    async def apply(self, pairs: Sequence[tuple[IPAddress, IPAddress]]) -> None:
        """Route each (vip, backend) pair; replaces what a crashed earlier run left at `pref`."""
        vips = sorted({v for v, _ in pairs}, key=lambda a: (a.version, a))
        backends = sorted({b for _, b in pairs}, key=lambda a: (a.version, a))
        routes = await self._routes_get([*vips, *backends])
        for vip in vips:
            if routes.get(vip, {}).get("type") == "local":
                raise SteeringError(f"VIP {vip} is a local address in netns {self.netns or '(own)'}: "
                                    "through-VIP checks need a namespace without it")
        devs: dict[IPAddress, str] = {}
        for backend in backends:
            route = routes.get(backend)
            if route is None:
                raise SteeringError(f"no route to backend {backend} in netns {self.netns or '(own)'}")
            if route.get("gateway") or route.get("type") not in (None, "unicast") or "dev" not in route:
                raise SteeringError(f"backend {backend} is not on a directly connected network "
                                    f"(route: {json.dumps(route)}); L2 DSR needs it on the segment")
            devs[backend] = route["dev"]
        entries = plan(pairs, devs, mark_base=self.mark_base, table_base=self.table_base)
        await self._flush_pref()
        try:
            for version, fam in by_family(entries):
                await self._batch(version, add_commands(fam, self.pref), force=False)
        except BaseException:
            with trio.CancelScope(shield=True):
                for version, fam in by_family(entries):
                    await self._batch(version, remove_commands(fam, self.pref), force=True)
            raise
        # Recorded before anything else can fail or be cancelled, so that `remove` undoes it all.
        self.entries = entries
        self._marks = {e.backend: e.mark for e in entries}
        v4_devs = [e.dev for e in entries if e.backend.version == 4]
        if self.relax_rp_filter and v4_devs:
            keys = [f"net.ipv4.conf.{dev}.rp_filter" for dev in dict.fromkeys(["all", *v4_devs])]
            previous = await self._sysctl_read(keys)
            # Keep what an earlier `apply` saved: the values before *any* of ours.
            self._saved_sysctls = {**{k: v for k, v in previous.items() if v != "0"}, **self._saved_sysctls}
            if self._saved_sysctls:
                await self._sysctl({k: "0" for k in self._saved_sysctls})
        log.info("%s: through-VIP steering for %d backends (marks %#x.., pref %d)", self.netns or "(own netns)",
                 len(entries), self.mark_base, self.pref)

    async def remove(self) -> None:
        """Remove the rules and tables, then put back the rp_filter values `apply` changed.

        Raises `SteeringError` if the sysctls could not be restored (the routing is gone by then).
        """
        entries, self.entries, self._marks = self.entries, (), {}
        saved, self._saved_sysctls = self._saved_sysctls, {}
        for version, fam in by_family(entries):
            await self._batch(version, remove_commands(fam, self.pref), force=True)
        if saved:
            await self._sysctl(saved)

    async def _flush_pref(self) -> None:
        for version in (4, 6):
            out = await self._ip(version, ["-j", "rule", "show", "pref", str(self.pref)])
            rules = json.loads(out or "[]")
            lines = [f"rule del pref {self.pref}" for _ in rules]
            tables = {r.get("table") for r in rules}
            lines += [f"route flush table {t}" for t in tables if t and str(t).isdigit()]
            if lines:
                log.warning("%s: removing %d stale rules at pref %d", self.netns or "(own netns)", len(rules), self.pref)
                await self._batch(version, lines, force=True)

    async def _routes_get(self, addrs: Sequence[IPAddress]) -> dict[IPAddress, dict[str, Any]]:
        """`ip route get` for many addresses in one batch per family; unroutable ones are absent."""
        routes: dict[IPAddress, dict[str, Any]] = {}
        for version in (4, 6):
            lines = [f"route get {a}" for a in addrs if a.version == version]
            if not lines:
                continue
            out = await self._ip(version, ["-j", "-force", "-batch", "-"], stdin="\n".join(lines) + "\n", check=False)
            decoder, pos = json.JSONDecoder(), 0
            while True:
                while pos < len(out) and out[pos].isspace():
                    pos += 1
                if pos >= len(out):
                    break
                docs, pos = decoder.raw_decode(out, pos)
                for route in docs:
                    routes[ip_address(route["dst"])] = route
        return routes

    async def _batch(self, version: int, lines: list[str], *, force: bool) -> None:
        args = ["-force"] if force else []
        await self._ip(version, [*args, "-batch", "-"], stdin="\n".join(lines) + "\n", check=not force)

    async def _ip(self, version: int, args: list[str], *, stdin: str | None = None, check: bool = True) -> str:
        cmd = ["ip", *(["-n", self.netns] if self.netns else []), f"-{version}", *args]
        proc = await trio.run_process(cmd, stdin=stdin.encode() if stdin else b"", capture_stdout=True,
                                      capture_stderr=True, check=False)
        if check and proc.returncode != 0:
            raise SteeringError(f"{' '.join(cmd)} -> exit {proc.returncode}: {proc.stderr.decode().strip()}")
        return proc.stdout.decode()

    async def _sysctl(self, values: Mapping[str, str]) -> None:
        await self._run_sysctl(["-q", "-w", *(f"{k}={v}" for k, v in values.items())])

    async def _sysctl_read(self, keys: Sequence[str]) -> dict[str, str]:
        out = await self._run_sysctl(["-n", *keys])
        values = out.split()
        if len(values) != len(keys):
            raise SteeringError(f"sysctl -n {' '.join(keys)}: expected {len(keys)} values, got {out!r}")
        return dict(zip(keys, values))

    async def _run_sysctl(self, args: list[str]) -> str:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        cmd = [*prefix, "sysctl", *args]
        proc = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
        if proc.returncode != 0:
            raise SteeringError(f"{' '.join(cmd)} -> exit {proc.returncode}: {proc.stderr.decode().strip()}")
        return proc.stdout.decode()
