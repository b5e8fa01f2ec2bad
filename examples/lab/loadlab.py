"""The load-aware weighting lab: one real `lbnode` in front of four backends of capacity 1, 2, 4, 8.

    client 10.99.0.2 --- sw (bridge) --- node 10.99.0.5 (lbnode, XDP native, L2 DSR)
                                     +-- b1..b4 10.99.0.11-14, capacities 1, 2, 4, 8

Built on examples/lab/single_node.py. Each backend runs `examples.lab.loadsim serve`: it serves
at most capacity * slots_per_unit requests at once, each for a fixed service time, and queues
the rest, so its utilisation grows with the requests it is given. The client sends new
connections at a fixed rate (open loop) to the VIP; the node forwards them by MAC rewrite and
the backends answer the client directly. A sampler thread in this process reads every backend's
integrals (unix sockets in the work directory, so no address in the lab namespaces is needed)
and the node's effective weights (its status socket) every `sample_s`.

The run goes through phases, switched by rewriting the node's config and SIGHUP (the phase
starts when the node confirms the reload): static equal weights, load-aware, least connections.
One node, not the three-node ECMP lab: every node of a cluster computes and agrees on the same
weights (flow sync), so one node shows the controller and the data plane; a cluster would add
two more lbnode processes, BIRD and BGP to a machine whose 2 cores are shared.
"""
from __future__ import annotations

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
from examples.lab.hosts import REPO, Host
from examples.lab.loadstats import Interval, phase_spread, phase_utilisation, settle_time
from examples.lab.netns import Lab, LabError, read_line, wait_until
from examples.lab.single_node import VIP4, SingleNodeLab

log = logging.getLogger(__name__)

CAPACITIES = (1, 2, 4, 8)
WORK_PORT, AGENT_PORT = 80, 9777
PHASES = ("static", "aware", "leastconn")


@dataclass(frozen=True, slots=True)
class LoadParams:
    phase_s: float = 30.0  # each phase's length, from the node's reload
    rate: float = 150.0  # new connections per second, open loop
    service_ms: float = 80.0  # fixed service time of one request
    slots_per_unit: int = 4  # requests one capacity unit serves at once
    reply_bytes: int = 200
    sample_s: float = 0.25
    aware: str = "http"  # phase 2's weighting mode: http (X-Load, the controller) or agent (HAProxy agent-check)
    agent_style: str = "idle-capacity"  # what the agent port says (loadstats.AgentStyle)
    interval_ms: int = 500  # the node's weighting interval (and its check interval)
    window_ms: int = 1000  # what the backends' X-Load and agent reply average over
    settle_tolerance: float = 0.2

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

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    def summary(self) -> str:
        """The bench's last line."""
        spreads = " ".join(f"{p.name}_spread={self.spread(p):.2f}" for p in self.phases)
        return (f"{spreads} settle_s={self.settle_s(self.phase('aware')):.1f} broken={self.broken} "
                f"plot={self.plot}")


class Sampler:
    """Reads every backend's integrals and the node's weights every `period_s`, on a thread
    (the reads block; the main thread switches phases meanwhile)."""

    def __init__(self, stats_sockets: dict[str, Path], status_socket: Path, addresses: dict[str, str],
                 period_s: float) -> None:
        self.stats_sockets, self.status_socket, self.addresses = stats_sockets, status_socket, addresses
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
                stats = {name: _read_json_line(path) for name, path in self.stats_sockets.items()}
            except (OSError, ValueError) as exc:
                self.errors += 1
                log.warning("load sampler: %s", exc)
                previous = None
            else:
                if previous is not None:
                    self.intervals.append(_interval(previous, (now, stats), self._weights()))
                previous = (now, stats)
            next_at += self.period_s
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _weights(self) -> dict[str, int]:
        """The node's effective weights by backend name; {} when the node does not answer."""
        try:
            doc = status.query(str(self.status_socket), timeout_s=2)
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
              weights: dict[str, int]) -> Interval:
    (t0, s0), (t1, s1) = previous, current
    busy: dict[str, float] = {}
    for name, now in s1.items():
        # Each backend stamps its own integral; rescale its busy time onto the sampler's interval.
        own = now["t"] - s0[name]["t"]
        busy[name] = (now["busy_s"] - s0[name]["busy_s"]) * ((t1 - t0) / own if own > 0 else 0.0)
    return Interval(t0, t1, busy, {name: int(s["slots"]) for name, s in s1.items()}, weights)


def _read_json_line(path: Path, timeout_s: float = 2.0) -> dict[str, Any]:
    import json
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(path))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))  # type: ignore[no-any-return]


class LoadLab:
    """The topology, its processes and the phases; teardown belongs to the `Lab` it is built in."""

    def __init__(self, owner: Lab, workdir: Path, params: LoadParams) -> None:
        self.owner, self.workdir, self.params = owner, workdir, params
        self.single = SingleNodeLab(owner, backends=len(CAPACITIES))
        self.capacity = {b.name: c for b, c in zip(self.single.backends, CAPACITIES, strict=True)}
        self.config = workdir / "node.yaml"
        self.status_socket = workdir / "node.sock"
        self.node: subprocess.Popen[bytes] | None = None
        self.client: subprocess.Popen[bytes] | None = None

    @property
    def backends(self) -> list[Host]:
        return self.single.backends

    def close(self) -> None:
        self.single.stop_dataplane()

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

    def node_config(self, mode: str) -> dict[str, Any]:
        p = self.params
        weighting: dict[str, Any] = {"mode": mode}
        if mode != "static":
            weighting.update(interval_ms=p.interval_ms, timeout_ms=min(300, p.interval_ms // 2))
        if mode == "agent":
            weighting["agent_port"] = AGENT_PORT
        if mode == "http":
            weighting["http_header"] = "X-Load"
        return {
            "xdp": "native",
            "drain_s": 0.5,
            "services": [{
                "name": "web", "vips": [str(VIP4)], "ports": [WORK_PORT], "need": 1,
                # The check reads /load, which answers at once (never queued behind work), and
                # in http mode carries the load the node's controller takes (X-Load).
                "checks": [{"kind": "http", "path": "/load", "interval_ms": p.interval_ms,
                            "timeout_ms": min(300, p.interval_ms // 2), "rise": 1, "fall": 3}],
                "weighting": weighting,
                "backends": [{"address": b.ip4, "weight": 1, "capacity": self.capacity[b.name]}
                             for b in self.backends],
            }],
        }

    def write_config(self, mode: str) -> None:
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.node_config(mode), sort_keys=False))
        tmp.replace(self.config)  # a reload never reads a half-written file

    def start_node(self, mode: str) -> None:
        self.write_config(mode)
        self.single.attach_peer_pass()
        log_file = open(self.workdir / "node.log", "ab")
        self.node = self.owner.spawn(self.single.node.ns, sys.executable, "-m", "cluster.cli", "--ip",
                                     self.single.node.ip4, "--if", "eth0", "--config", str(self.config),
                                     "--status-socket", str(self.status_socket), cwd=REPO,
                                     stdout=log_file, stderr=log_file)
        log_file.close()
        everyone = {f"{b.ip4}:{WORK_PORT}" for b in self.backends}
        wait_until(lambda: self._usable() == everyone, timeout_s=60, interval_s=0.2, what="all backends usable")

    def node_log(self) -> str:
        return (self.workdir / "node.log").read_text(errors="replace")[-4000:]

    def _status(self) -> dict[str, Any] | None:
        try:
            return status.query(str(self.status_socket))
        except (OSError, ValueError):
            return None

    def _usable(self) -> set[str]:
        self._check_node()
        snap = self._status()
        if snap is None or snap["node"]["state"] != "serving":
            return set()
        return {b["backend"] for s in snap["services"] for b in s["backends"] if b["usable"]}

    def _check_node(self) -> None:
        if self.node is not None and self.node.poll() is not None:
            raise LabError(f"lbnode exited with {self.node.returncode}:\n{self.node_log()}")

    def reload(self, mode: str) -> None:
        """Rewrite the config for `mode`, SIGHUP, and return once the node applied it."""
        assert self.node is not None
        snap = self._status()
        before = snap["node"]["reloads"]["ok"] if snap else 0
        self.write_config(mode)
        self.node.send_signal(signal.SIGHUP)

        def applied() -> bool:
            self._check_node()
            s = self._status()
            if s and s["node"]["reloads"].get("refused", 0) and s["node"].get("last_reload_error"):
                raise LabError(f"reload to {mode} refused: {s['node']['last_reload_error']}")
            return bool(s and s["node"]["reloads"]["ok"] > before)

        wait_until(applied, timeout_s=20, interval_s=0.05, what=f"reload to weighting {mode}")

    def start_client(self) -> None:
        p = self.params
        self.client = self.owner.spawn(
            self.single.client.ns, sys.executable, "-m", "examples.lab.loadsim", "client", str(VIP4),
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
        self.start_node(modes[phases[0]])
        sampler = Sampler({b.name: self.stats_socket(b.name) for b in self.backends}, self.status_socket,
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
                    self._check_node()
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
