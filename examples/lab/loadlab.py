"""The load-aware weighting lab: real `lbnode`s in front of four backends of capacity 1, 2, 4, 8.

    client 10.99.0.2 --- sw (bridge) --- node 10.99.0.5 (lbnode, XDP native, L2 DSR)
                                     +-- b1..b4 10.99.0.11-14, capacities 1, 2, 4, 8

Built on examples/lab/single_node.py (one node, above, the default) or examples/lab/ecmp.py
(`nodes=3`: BIRD in front of three nodes with BGP, BFD and flow sync). Each backend runs
`examples.lab.loadsim serve`: it serves at most capacity * slots_per_unit requests at once,
each for a fixed service time, and queues the rest, so its utilisation grows with the
requests it is given. The client sends new
connections at a fixed rate (open loop) to the VIP; the node forwards them by MAC rewrite and
the backends answer the client directly. A sampler thread in this process reads every backend's
integrals (unix sockets in the work directory, so no address in the lab namespaces is needed)
and every node's effective weights (their status sockets) every `sample_s`.

The run goes through phases, switched by rewriting the node's config and SIGHUP (the phase
starts when the node confirms the reload): static equal weights, load-aware, least connections.
One node by default: the nodes of a cluster hash with the same published weights (flow sync),
so one node shows the load sources, the controller and the data plane; three add two lbnode
processes, BIRD and BGP on a machine whose 2 cores are shared, and show that the nodes agree.
"""
from __future__ import annotations

import functools
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster import status
from examples.lab.ecmp import VIP as ECMP_VIP
from examples.lab.ecmp import EcmpLab
from examples.lab.hosts import REPO, Host
from examples.lab.loadsim import read_stats
from examples.lab.loadstats import Interval, disagreement, phase_spread, phase_utilisation, settle_time
from examples.lab.netns import Lab, LabError, read_line, wait_until
from examples.lab.single_node import VIP4, SingleNodeLab

log = logging.getLogger(__name__)

CAPACITIES = (1, 2, 4, 8)
WORK_PORT, AGENT_PORT = 80, 9777
PHASES = ("static", "aware", "leastconn")


@dataclass(frozen=True, slots=True)
class LoadParams:
    phase_s: float = 40.0  # each phase's length, from the node's reload
    rate: float = 200.0  # new connections per second, open loop
    service_ms: float = 60.0  # fixed service time of one request
    slots_per_unit: int = 4  # requests one capacity unit serves at once
    reply_bytes: int = 200
    sample_s: float = 0.25
    aware: str = "agent"  # phase 2's weighting mode: agent (HAProxy agent-check) or http (X-Load, the controller)
    agent_style: str = "idle-capacity"  # what the agent port says (loadstats.AgentStyle)
    interval_ms: int = 500  # the node's weighting interval (and its check interval)
    window_ms: int = 1000  # what the backends' X-Load and agent reply average over
    settle_tolerance: float = 0.1  # settle_s: within this fraction of the step (loadstats.settle_time)

    def offered_slots(self) -> float:
        """Requests in service on average (Little's law, without queueing)."""
        return self.rate * self.service_ms / 1000


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    mode: str  # the node's weighting mode during the phase
    start_s: float
    end_s: float
    broken: int  # requests that failed during the phase
    ok: int


@dataclass
class LoadResult:
    params: LoadParams
    backends: dict[str, int]  # name -> capacity
    intervals: list[Interval] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    broken: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    plot: Path | None = None

    def spread(self, phase: Phase) -> float:
        return phase_spread(self.intervals, phase.start_s, phase.end_s)

    def utilisation(self, phase: Phase) -> dict[str, float]:
        """Each backend's utilisation over the phase's second half (what the spread compares)."""
        return phase_utilisation(self.intervals, (phase.start_s + phase.end_s) / 2, phase.end_s)

    def settle_s(self, phase: Phase) -> float:
        return settle_time(self.intervals, phase.start_s, phase.end_s, tolerance=self.params.settle_tolerance)

    def disagreement(self, phase: Phase, *, second_half: bool = False) -> float | None:
        """The nodes' largest gap in weight share during the phase, or its second half (None
        with one node). The whole phase includes the switch, when the nodes reload one by one."""
        start = (phase.start_s + phase.end_s) / 2 if second_half else phase.start_s
        return disagreement(self.intervals, start, phase.end_s)

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    def summary(self) -> str:
        """The bench's last line."""
        spreads = " ".join(f"{p.name}_spread={self.spread(p):.2f}" for p in self.phases)
        return (f"{spreads} settle_s={self.settle_s(self.phase('aware')):.1f} broken={self.broken} "
                f"plot={self.plot}")


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    host: Host
    config: Path
    status_socket: Path


class Sampler:
    """Reads every backend's integrals and every node's weights every `period_s`, on a thread
    (the reads block; the main thread switches phases meanwhile)."""

    def __init__(self, stats_sockets: dict[str, Path], nodes: Sequence[Node], addresses: dict[str, str],
                 period_s: float) -> None:
        self.stats_sockets, self.nodes, self.addresses = stats_sockets, list(nodes), addresses
        self.period_s = period_s
        self.intervals: list[Interval] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> list[Interval]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.intervals

    def _run(self) -> None:
        previous: tuple[float, dict[str, dict[str, Any]]] | None = None
        next_at = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                stats = {name: read_stats(str(path), timeout_s=2) for name, path in self.stats_sockets.items()}
            except (OSError, ValueError) as exc:
                self.errors += 1
                log.warning("load sampler: %s", exc)
                previous = None
            else:
                if previous is not None:
                    first, *others = (self._weights(node) for node in self.nodes)
                    peers = {node.name: w for node, w in zip(self.nodes[1:], others, strict=True)}
                    self.intervals.append(_interval(previous, (now, stats), first, peers))
                previous = (now, stats)
            next_at += self.period_s
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _weights(self, node: Node) -> dict[str, int]:
        """A node's effective weights by backend name; {} when the node does not answer."""
        try:
            doc = status.query(str(node.status_socket), timeout_s=2)
        except (OSError, ValueError):
            return {}
        by_address = {addr: name for name, addr in self.addresses.items()}
        weights: dict[str, int] = {}
        for svc in doc.get("services", []):
            for b in svc.get("backends", []):
                name = by_address.get(str(b.get("backend", "")).rsplit(":", 1)[0])
                if name is not None:
                    weights[name] = effective_weight(b)
        return weights


def effective_weight(row: dict[str, Any]) -> int:
    """A status backend row's weight in the hash: `weight` is an int (static) or
    {configured, observed, effective}; a backend out of the hash has 0."""
    weight = row.get("weight", 0)
    value = weight.get("effective", weight.get("configured")) if isinstance(weight, dict) else weight
    return int(value or 0) if row.get("in_hash", True) else 0


def _interval(previous: tuple[float, dict[str, dict[str, Any]]], current: tuple[float, dict[str, dict[str, Any]]],
              weights: dict[str, int], peers: dict[str, dict[str, int]]) -> Interval:
    (t0, s0), (t1, s1) = previous, current
    busy: dict[str, float] = {}
    for name, now in s1.items():
        # Each backend stamps its own integral; rescale its busy time onto the sampler's interval.
        own = now["t"] - s0[name]["t"]
        busy[name] = (now["busy_s"] - s0[name]["busy_s"]) * ((t1 - t0) / own if own > 0 else 0.0)
    return Interval(t0, t1, busy, {name: int(s["slots"]) for name, s in s1.items()}, weights, peers)


class LoadLab:
    """The topology, its processes and the phases; teardown belongs to the `Lab` it is built in.

    `nodes=1`: the single-node lab (the client routes the VIP via the node). `nodes=3`: the
    ECMP lab (examples/lab/ecmp.py): BIRD in front of three nodes with BGP, BFD and flow sync,
    so the plot can show that the nodes agree on the weights."""

    def __init__(self, owner: Lab, workdir: Path, params: LoadParams, *, nodes: int = 1) -> None:
        self.owner, self.workdir, self.params = owner, workdir, params
        self.ecmp: EcmpLab | None = None
        self.single: SingleNodeLab | None = None
        if nodes == 1:
            self.single = SingleNodeLab(owner, backends=len(CAPACITIES))
            self.backends, self.client_ns, self.vip = self.single.backends, self.single.client.ns, VIP4
            hosts = {"node": self.single.node}
        else:
            self.ecmp = EcmpLab(owner, workdir, nodes=nodes, backends=len(CAPACITIES))
            self.backends, self.client_ns, self.vip = self.ecmp.backends, self.ecmp.client, ECMP_VIP
            hosts = dict(self.ecmp.nodes)
        self.nodes = [Node(name, host, workdir / f"{name}.yaml", workdir / f"{name}.sock")
                      for name, host in hosts.items()]
        self.capacity = {b.name: c for b, c in zip(self.backends, CAPACITIES, strict=True)}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.client: subprocess.Popen[bytes] | None = None

    def close(self) -> None:
        if self.single is not None:
            self.single.stop_dataplane()
        if self.ecmp is not None:
            self.ecmp.close()

    # ---- processes ------------------------------------------------------------------------------

    def stats_socket(self, name: str) -> Path:
        return self.workdir / f"{name}.stats"

    def start_backends(self) -> None:
        p = self.params
        for b in self.backends:
            proc = self.owner.spawn(
                b.ns, sys.executable, "-m", "examples.lab.loadsim", "serve", "--name", b.name,
                "--capacity", str(self.capacity[b.name]), "--slots-per-unit", str(p.slots_per_unit),
                "--service-ms", str(p.service_ms), "--port", str(WORK_PORT), "--agent-port", str(AGENT_PORT),
                "--agent-style", p.agent_style, "--agent-window-ms", str(p.window_ms),
                "--stats-socket", str(self.stats_socket(b.name)), cwd=REPO, stdout=subprocess.PIPE)
            if read_line(proc, timeout_s=20) != "ready":
                raise LabError(f"backend {b.name} did not start")

    def service(self, mode: str) -> dict[str, Any]:
        p = self.params
        weighting: dict[str, Any] = {"mode": mode}
        if mode != "static":
            weighting.update(interval_ms=p.interval_ms, timeout_ms=min(300, p.interval_ms // 2))
        if mode == "agent":
            weighting["agent_port"] = AGENT_PORT
        if mode == "http":
            weighting["http_header"] = "X-Load"
        return {
            "name": "web", "vips": [str(self.vip)], "ports": [WORK_PORT], "need": 1,
            # The check reads /load, which answers at once (never queued behind work), and in
            # http mode carries the load the node's controller takes (X-Load).
            "checks": [{"kind": "http", "path": "/load", "interval_ms": p.interval_ms,
                        "timeout_ms": min(300, p.interval_ms // 2), "rise": 1, "fall": 3}],
            "weighting": weighting,
            "backends": [{"address": b.ip4, "weight": 1, "capacity": self.capacity[b.name]} for b in self.backends],
        }

    def node_config(self, node: Node, mode: str) -> dict[str, Any]:
        base: dict[str, Any] = {"xdp": "native", "drain_s": 0.5}
        if self.ecmp is not None:
            base = self.ecmp.node_config(node.name)  # BGP to the router, flow sync
        return {**base, "services": [self.service(mode)]}

    def write_config(self, node: Node, mode: str) -> None:
        tmp = node.config.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.node_config(node, mode), sort_keys=False))
        tmp.replace(node.config)  # a reload never reads a half-written file

    def start_nodes(self, mode: str) -> None:
        if self.single is not None:
            self.single.attach_peer_pass()
        if self.ecmp is not None:
            self.ecmp.start_router()
        for node in self.nodes:
            self.write_config(node, mode)
            log_file = open(self.workdir / f"{node.name}.log", "ab")
            self.procs[node.name] = self.owner.spawn(
                node.host.ns, sys.executable, "-m", "cluster.cli", "--ip", node.host.ip4, "--if", "eth0",
                "--config", str(node.config), "--status-socket", str(node.status_socket), cwd=REPO,
                stdout=log_file, stderr=log_file)
            log_file.close()
        everyone = {f"{b.ip4}:{WORK_PORT}" for b in self.backends}
        for node in self.nodes:
            wait_until(functools.partial(self._all_usable, node, everyone), timeout_s=60, interval_s=0.2,
                       what=f"all backends usable on {node.name}")
        if self.ecmp is not None:
            self.ecmp.wait_next_hops({n.host.ip4 for n in self.nodes}, timeout_s=60)

    def node_log(self) -> str:
        return "".join(f"--- {n.name}\n" + (self.workdir / f"{n.name}.log").read_text(errors="replace")[-3000:]
                       for n in self.nodes if (self.workdir / f"{n.name}.log").exists())

    def _status(self, node: Node) -> dict[str, Any] | None:
        try:
            return status.query(str(node.status_socket))
        except (OSError, ValueError):
            return None

    def _usable(self, node: Node) -> set[str]:
        self._check_nodes()
        snap = self._status(node)
        if snap is None or snap["node"]["state"] != "serving":
            return set()
        return {b["backend"] for s in snap["services"] for b in s["backends"] if b["usable"]}

    def _all_usable(self, node: Node, everyone: set[str]) -> bool:
        return self._usable(node) == everyone

    def _check_nodes(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise LabError(f"lbnode {name} exited with {proc.returncode}:\n{self.node_log()}")

    def reload(self, mode: str) -> None:
        """Rewrite every node's config for `mode`, SIGHUP them, and return once all applied it."""
        before = {}
        for node in self.nodes:
            snap = self._status(node)
            before[node.name] = snap["node"]["reloads"]["ok"] if snap else 0
            self.write_config(node, mode)
        for node in self.nodes:
            self.procs[node.name].send_signal(signal.SIGHUP)

        def applied(node: Node) -> bool:
            self._check_nodes()
            s = self._status(node)
            if s and s["node"]["reloads"].get("refused", 0) and s["node"].get("last_reload_error"):
                raise LabError(f"{node.name}: reload to {mode} refused: {s['node']['last_reload_error']}")
            return bool(s and s["node"]["reloads"]["ok"] > before[node.name])

        for node in self.nodes:
            wait_until(functools.partial(applied, node), timeout_s=20, interval_s=0.05,
                       what=f"{node.name}: reload to weighting {mode}")

    def start_client(self) -> None:
        p = self.params
        self.client = self.owner.spawn(
            self.client_ns, sys.executable, "-m", "examples.lab.loadsim", "client", str(self.vip),
            "--port", str(WORK_PORT), "--rate", str(p.rate), "--bytes", str(p.reply_bytes),
            "--max-s", str(4 * p.phase_s + 120), cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if read_line(self.client, timeout_s=20) != "ready":
            raise LabError("client did not start")

    def client_report(self, command: str = "report") -> dict[str, Any]:
        import json

        assert self.client is not None and self.client.stdin is not None
        self.client.stdin.write(command.encode() + b"\n")
        self.client.stdin.flush()
        return json.loads(read_line(self.client, timeout_s=30))  # type: ignore[no-any-return]

    # ---- the run --------------------------------------------------------------------------------

    def run(self, phases: Sequence[str] = PHASES, progress: Any = print) -> LoadResult:
        """Run the phases; `progress(text)` hears what happens. Returns the measurements."""
        p = self.params
        modes = {"static": "static", "aware": p.aware, "leastconn": "leastconn"}
        result = LoadResult(p, dict(self.capacity))
        self.start_backends()
        self.start_nodes(modes[phases[0]])
        sampler = Sampler({b.name: self.stats_socket(b.name) for b in self.backends}, self.nodes,
                          {b.name: b.ip4 for b in self.backends}, p.sample_s)
        self.start_client()
        sampler.start()
        try:
            last = self.client_report()
            for i, name in enumerate(phases):
                if i:
                    self.reload(modes[name])
                start = time.monotonic()
                progress(f"phase {name}: weighting {modes[name]} for {p.phase_s:.0f}s")
                deadline = start + p.phase_s
                while (left := deadline - time.monotonic()) > 0:
                    time.sleep(min(1.0, left))
                    self._check_nodes()
                end = time.monotonic()
                report = self.client_report()
                result.phases.append(Phase(name, modes[name], start, end, report["broken"] - last["broken"],
                                           report["ok"] - last["ok"]))
                last = report
            final = self.client_report("stop")
        finally:
            result.intervals = sampler.stop()
        result.broken, result.ok, result.errors = final["broken"], final["ok"], final["errors"]
        return result
