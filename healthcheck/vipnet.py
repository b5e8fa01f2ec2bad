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
from pathlib import Path
from typing import Any

import trio

from bpf.structs import IPAddress
from healthcheck.errors import SteeringError

log = logging.getLogger(__name__)

MARK_BASE = 0x4C420000  # "LB" in the high half; low half indexes backends
TABLE_BASE = 0x4C420000
RULE_PREF = 9000
ROUTE_PROTO = 76  # rtnetlink protocol tag of our routes ("L"), so one `ip route show` lists them all
CLEANUP_TIMEOUT_S = 5.0
STATE_DIR = "/run/lbnode"
REFRESH_S = 1.0  # how often `maintain` puts back what the kernel flushed (a link that went down)
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True, slots=True)
class SteeringEntry:
    """One backend's mark and routing table, and the VIPs it serves."""

    backend: IPAddress
    vips: tuple[IPAddress, ...]
    mark: int
    table: int


def plan(pairs: Iterable[tuple[IPAddress, IPAddress]], *, mark_base: int = MARK_BASE,
         table_base: int = TABLE_BASE) -> tuple[SteeringEntry, ...]:
    """Pure: (vip, backend) pairs -> one mark and table per backend, in address order."""
    vips_by_backend: dict[IPAddress, list[IPAddress]] = {}
    for vip, backend in pairs:
        vips = vips_by_backend.setdefault(backend, [])
        if vip not in vips:
            vips.append(vip)
    if len(vips_by_backend) > 0xFFFF:
        raise SteeringError(f"too many through-VIP backends: {len(vips_by_backend)} > 65535")
    return tuple(SteeringEntry(b, tuple(v), mark_base + i, table_base + i)
                 for i, (b, v) in enumerate(sorted(vips_by_backend.items(), key=lambda kv: (kv[0].version, kv[0]))))


def table_commands(entries: Sequence[SteeringEntry]) -> list[str]:
    """Pure: ``ip -batch`` lines putting an `unreachable` default in each entry's table. While a
    backend's route is missing (its link is down), its checks then fail with "network unreachable"
    instead of falling through to the main table and reaching the VIP by some other path, which
    could pass the check for the wrong backend."""
    return [f"route replace unreachable default proto {ROUTE_PROTO} table {e.table}" for e in entries]


def rule_commands(entries: Sequence[SteeringEntry], pref: int) -> list[str]:
    """Pure: ``ip -batch`` lines adding each entry's ``fwmark -> table`` rule."""
    return [f"rule add fwmark {e.mark:#x} lookup {e.table} pref {pref}" for e in entries]


def missing_rules(entries: Sequence[SteeringEntry], installed: Iterable[Mapping[str, Any]]) -> list[SteeringEntry]:
    """Pure: the entries whose rule is not in `installed` (``ip -j rule show pref <pref>``)."""
    have = {(int(str(r.get("fwmark", "0")), 0), str(r.get("table"))) for r in installed}
    return [e for e in entries if (e.mark, str(e.table)) not in have]


def route_commands(entries: Sequence[SteeringEntry], devs: Mapping[IPAddress, str]) -> list[str]:
    """Pure: ``ip -batch`` lines routing each VIP to its backend, for the backends in `devs`."""
    lines = []
    for e in entries:
        dev = devs.get(e.backend)
        if dev is None:
            continue
        plen = 32 if e.backend.version == 4 else 128
        for vip in e.vips:
            lines.append(f"route replace {vip}/{plen} via {e.backend} dev {dev} onlink proto {ROUTE_PROTO} "
                         f"table {e.table}")
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


def backend_device(backend: IPAddress, route: Mapping[str, Any] | None) -> tuple[str | None, str | None]:
    """Pure: (device, None) if `route` (from ``ip -j route get <backend>``) reaches the backend
    directly, else (None, why not). L2 DSR needs every backend on a directly connected network."""
    if route is None:
        return None, f"no route to backend {backend}"
    if route.get("gateway") or route.get("type") not in (None, "unicast") or "dev" not in route:
        return None, (f"backend {backend} is not on a directly connected network (route: {json.dumps(route)}); "
                      "L2 DSR needs it on the segment")
    return str(route["dev"]), None


def missing_routes(entries: Sequence[SteeringEntry], devs: Mapping[IPAddress, str],
                   installed: Iterable[Mapping[str, Any]]) -> list[SteeringEntry]:
    """Pure: the entries not all of whose routes are in `installed` (``ip -j route show table all
    proto ROUTE_PROTO``) as `devs` wants them, `unreachable` defaults included."""
    have = {(str(r.get("table")), str(r.get("dst")), r.get("gateway"), r.get("dev") if "gateway" in r else None)
            for r in installed}
    out = []
    for e in entries:
        wanted: list[tuple[str, str, str | None, str | None]] = [(str(e.table), "default", None, None)]
        dev = devs.get(e.backend)
        if dev is not None:
            wanted += [(str(e.table), str(vip), str(e.backend), dev) for vip in e.vips]
        if any(w not in have for w in wanted):
            out.append(e)
    return out


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
    """Installs, keeps and removes the through-VIP policy routing in one namespace (None: our own).

    `apply` installs what does not depend on the network's state (a rule and a table per backend)
    and raises only for what cannot work at all (a VIP that is local here, `ip` failing). The
    routes to the backends do depend on it: the kernel flushes them when their link goes down, and
    a backend may be unreachable when we start. So `refresh` (run by `maintain` every
    `refresh_s`) resolves every backend again and puts back whatever is missing; meanwhile
    `unrouted` says why a backend has no route, and its checks fail with that reason.
    """

    def __init__(self, netns: str | None = None, *, mark_base: int = MARK_BASE, table_base: int = TABLE_BASE,
                 pref: int = RULE_PREF, relax_rp_filter: bool = True, refresh_s: float = REFRESH_S,
                 state_dir: str | None = STATE_DIR) -> None:
        """`state_dir`: where the rp_filter values from before ours are kept while they are
        changed, so that the run after a SIGKILLed one can still put them back (None: memory only)."""
        self.netns = netns
        self.mark_base = mark_base
        self.table_base = table_base
        self.pref = pref
        self.relax_rp_filter = relax_rp_filter
        self.refresh_s = refresh_s
        self.entries: tuple[SteeringEntry, ...] = ()
        self.unrouted: dict[IPAddress, str] = {}  # backend -> why it has no route now
        self.repairs = 0  # routes or rules put back after they went missing
        self._marks: dict[IPAddress, int] = {}
        self._routed: set[IPAddress] = set()  # backends whose routes we installed
        self._saved_sysctls: dict[str, str] = {}  # values we changed, restored by `remove`
        self._state_path = (Path(state_dir) / f"rp_filter-{netns or os.stat('/proc/self/ns/net').st_ino}.json"
                            if state_dir else None)
        self._relaxed: set[str] = set()  # rp_filter keys set to 0 so far
        self._last_error: str | None = None

    @property
    def where(self) -> str:
        return self.netns or "(own netns)"

    def mark_for(self, backend: IPAddress) -> int:
        try:
            return self._marks[backend]
        except KeyError:
            raise SteeringError(f"no through-VIP route for backend {backend}; apply() first") from None

    async def apply(self, pairs: Sequence[tuple[IPAddress, IPAddress]]) -> None:
        """Steer each (vip, backend) pair; replaces what a crashed earlier run left at `pref`."""
        vips = sorted({v for v, _ in pairs}, key=lambda a: (a.version, a))
        routes = await self._routes_get(vips)
        for vip in vips:
            if routes.get(vip, {}).get("type") == "local":
                raise SteeringError(f"VIP {vip} is a local address in netns {self.netns or '(own)'}: "
                                    "through-VIP checks need a namespace without it")
        entries = plan(pairs, mark_base=self.mark_base, table_base=self.table_base)
        await self._flush_pref()
        try:
            for version, fam in by_family(entries):
                await self._batch(version, table_commands(fam) + rule_commands(fam, self.pref), force=False)
            # Recorded before anything else can fail or be cancelled, so that `remove` undoes it all.
            self.entries = entries
            self._marks = {e.backend: e.mark for e in entries}
            await self.refresh()
        except BaseException:
            with trio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
                await self.remove()
            raise
        log.info("%s: through-VIP steering for %d backends (marks %#x.., pref %d), %d without a route yet",
                 self.where, len(entries), self.mark_base, self.pref, len(self.unrouted))

    async def refresh(self) -> None:
        """Resolve every backend now; route the reachable ones and put back missing rules and
        routes; relax rp_filter on devices seen for the first time."""
        entries = self.entries
        if not entries:
            return
        routes = await self._routes_get([e.backend for e in entries])
        devs: dict[IPAddress, str] = {}
        unrouted: dict[IPAddress, str] = {}
        for e in entries:
            dev, why = backend_device(e.backend, routes.get(e.backend))
            if dev is not None:
                devs[e.backend] = dev
            else:
                unrouted[e.backend] = why or "unknown"
        lost = sorted(set(unrouted) - set(self.unrouted), key=lambda a: (a.version, a))
        if lost:
            log.warning("%s: through-VIP steering: %d backends without a route, e.g. %s", self.where, len(lost),
                        unrouted[lost[0]])
        for version, fam in by_family(entries):
            installed = await self._ip_json(version, ["route", "show", "table", "all", "proto", str(ROUTE_PROTO)])
            stale = missing_routes(fam, devs, installed)
            rules = missing_rules(fam, await self._ip_json(version, ["rule", "show", "pref", str(self.pref)]))
            if stale or rules:
                await self._batch(version, table_commands(stale) + route_commands(stale, devs)
                                  + rule_commands(rules, self.pref), force=True)
            repaired = sum(e.backend in self._routed for e in stale) + len(rules)
            if repaired:
                self.repairs += repaired
                log.info("%s: through-VIP steering: put back %d routing tables and rules that had gone missing",
                         self.where, repaired)
        self._routed = set(devs)
        self.unrouted = unrouted
        if self.relax_rp_filter:
            await self._relax_rp_filter(sorted({d for b, d in devs.items() if b.version == 4}))

    async def maintain(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """`refresh` every `refresh_s`, for ever. A failing `ip` is logged (once per distinct
        error) and tried again: the network's state must never stop the checks."""
        task_status.started()
        while True:
            await trio.sleep(self.refresh_s)
            try:
                await self.refresh()
                self._last_error = None
            except SteeringError as exc:
                if str(exc) != self._last_error:
                    log.error("%s: through-VIP steering refresh failed (retrying every %ss): %s", self.where,
                              self.refresh_s, exc)
                self._last_error = str(exc)

    async def _relax_rp_filter(self, devs: Sequence[str]) -> None:
        """Replies come from the VIP, which reverse-path filtering would drop: rp_filter=0 on
        `all` and on each device we steer through, remembering the values before ours."""
        keys = [k for k in (f"net.ipv4.conf.{dev}.rp_filter" for dev in ["all", *devs]) if k not in self._relaxed]
        if not devs or not keys:
            return
        previous = await self._sysctl_read(keys)
        changed = {k: v for k, v in previous.items() if v != "0"}
        # Keep the values from before *any* of ours: also those a killed earlier run recorded.
        self._saved_sysctls = {**changed, **self._saved_sysctls, **self._recorded()}
        if changed:
            self._record(self._saved_sysctls)  # before the change: a SIGKILL right after loses nothing
            await self._sysctl({k: "0" for k in changed})
        self._relaxed.update(keys)

    async def remove(self) -> None:
        """Remove the rules and tables, then put back the rp_filter values we changed.

        Raises `SteeringError` if the sysctls could not be restored (the routing is gone by then).
        """
        entries, self.entries, self._marks, self.unrouted, self._routed = self.entries, (), {}, {}, set()
        saved, self._saved_sysctls, self._relaxed = {**self._saved_sysctls, **self._recorded()}, {}, set()
        for version, fam in by_family(entries):
            await self._batch(version, remove_commands(fam, self.pref), force=True)
        if saved:
            await self._sysctl(saved)
        if self._state_path is not None:
            self._state_path.unlink(missing_ok=True)

    def _recorded(self) -> dict[str, str]:
        """The values a run (this one, or a killed earlier one) recorded before changing them."""
        if self._state_path is None:
            return {}
        try:
            data = json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("%s: ignoring unreadable %s: %s", self.where, self._state_path, exc)
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _record(self, values: Mapping[str, str]) -> None:
        if self._state_path is None:
            return
        self._state_path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(values)))
        tmp.replace(self._state_path)  # atomic: a reader sees the old file or the new one

    async def _ip_json(self, version: int, args: list[str]) -> list[dict[str, Any]]:
        out = await self._ip(version, ["-j", *args])
        return await _parse_json_docs(out)

    async def _flush_pref(self) -> None:
        for version in (4, 6):
            out = await self._ip(version, ["-j", "rule", "show", "pref", str(self.pref)])
            rules = json.loads(out or "[]")
            lines = [f"rule del pref {self.pref}" for _ in rules]
            tables = {r.get("table") for r in rules}
            lines += [f"route flush table {t}" for t in tables if t and str(t).isdigit()]
            if lines:
                log.warning("%s: removing %d stale rules at pref %d",
                            self.netns or "(own netns)", len(rules), self.pref)
                await self._batch(version, lines, force=True)

    async def _routes_get(self, addrs: Sequence[IPAddress]) -> dict[IPAddress, dict[str, Any]]:
        """`ip route get` for many addresses in one batch per family; unroutable ones are absent."""
        routes: dict[IPAddress, dict[str, Any]] = {}
        for version in (4, 6):
            lines = [f"route get {a}" for a in addrs if a.version == version]
            if not lines:
                continue
            out = await self._ip(version, ["-j", "-force", "-batch", "-"], stdin="\n".join(lines) + "\n", check=False)
            for route in await _parse_json_docs(out):
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
        return dict(zip(keys, values, strict=True))

    async def _run_sysctl(self, args: list[str]) -> str:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        cmd = [*prefix, "sysctl", *args]
        proc = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
        if proc.returncode != 0:
            raise SteeringError(f"{' '.join(cmd)} -> exit {proc.returncode}: {proc.stderr.decode().strip()}")
        return proc.stdout.decode()


async def _parse_json_docs(out: str) -> list[dict[str, Any]]:
    """The JSON arrays `ip -j` printed (one per batch line), concatenated. Thousands of backends make
    this tens of milliseconds of parsing, so it runs in a worker thread, off the event loop."""
    if len(out) < 4096:
        return _json_docs(out)
    return await trio.to_thread.run_sync(_json_docs, out)


def _json_docs(out: str) -> list[dict[str, Any]]:
    decoder, pos = json.JSONDecoder(), 0
    docs: list[dict[str, Any]] = []
    while True:
        while pos < len(out) and out[pos].isspace():
            pos += 1
        if pos >= len(out):
            return docs
        doc, pos = decoder.raw_decode(out, pos)
        docs.extend(doc if isinstance(doc, list) else [doc])
