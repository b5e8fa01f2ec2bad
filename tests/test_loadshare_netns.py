"""Load-aware weights with 3 real lbnode processes behind a real BIRD router (examples/lab/ecmp.py).

Every backend runs an HAProxy agent (examples/lab/load_agent.py) whose percentage changes every
second, so the service's weights change every interval (500 ms). Meanwhile long-lived echo
connections, checked byte by byte by the load generator, must all survive: a weight change
rebuilds the hash tables, and must never move a pinned connection. The nodes must hash with the
same weights: each publication's adoption time is read from every node's status (the namespaces
share one clock), and the view digests must keep matching.
"""
from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from examples.lab.ecmp import EcmpLab, Load
from examples.lab.hosts import REPO
from examples.lab.netns import Lab, read_line, wait_until

pytestmark = pytest.mark.netns

NODES = {"10.0.0.1", "10.0.0.2", "10.0.0.3"}
AGENT_PORT = 9777
LONG = 60
RUN_S = 15.0
HEARTBEAT_S = 1.0  # sync.heartbeat_s (the default)


class WeightLab(EcmpLab):
    """Three nodes; the service is weighted by agents whose replies change every second (or,
    with `weighting` set, as that says)."""

    weighting: dict[str, Any] = {"mode": "agent", "agent_port": AGENT_PORT, "interval_ms": 500, "timeout_ms": 200,
                                 "max_step": 4.0}

    def __init__(self, lab: Lab, workdir: Path) -> None:
        super().__init__(lab, workdir, nodes=3, backends=3)
        self.agents: dict[str, subprocess.Popen[bytes]] = {}

    def node_config(self, name: str, *, sync: bool = True) -> dict[str, Any]:
        cfg = super().node_config(name, sync=sync)
        cfg["services"][0]["weighting"] = dict(self.weighting)
        return cfg

    def start_agents(self) -> None:
        for i, b in enumerate(self.backends):
            proc = self.lab.spawn(b.ns, sys.executable, "-m", "examples.lab.load_agent", "--port", str(AGENT_PORT),
                                  "--cycle", "25,100,400,50,200", "--offset", str(i), cwd=REPO,
                                  stdout=subprocess.PIPE)
            if read_line(proc, timeout_s=20) != "ready":
                raise RuntimeError(f"agent on {b.name} did not start")
            self.agents[b.name] = proc


@pytest.fixture
def weight_lab(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[WeightLab]:
    with Lab(prefix="lbw") as lab:
        e = WeightLab(lab, tmp_path)
        weighting = getattr(request, "param", None)
        if weighting is not None:
            e.weighting = weighting
        try:
            e.start_backends()
            if e.weighting["mode"] == "agent":
                e.start_agents()
            e.start_router()
            yield e
        finally:
            e.close()


def load_section(e: WeightLab, node: str) -> dict[str, Any] | None:
    status = e.node_status(node)
    if not status or "load" not in status:
        return None
    section: dict[str, Any] = status["load"]["web"]
    section["digest_mismatch"] = status.get("sync", {}).get("digest_mismatch")
    section["peers"] = [(p["node_id"], p["digest_match"]) for p in status.get("sync", {}).get("peers", [])]
    section["weights"] = [b["weight"] for b in status["services"][0]["backends"]]
    return section


def test_weights_change_every_second_agree_on_every_node_and_never_move_a_pinned_connection(
        weight_lab: WeightLab) -> None:
    e = weight_lab
    for node in e.nodes:
        e.start_node(node)
    e.wait_next_hops(NODES, timeout_s=60)
    # node1 leads once its start-up resync is done (another may lead while it is not ready).
    wait_until(lambda: all((s := load_section(e, n)) is not None and s["published_by"] == 0x0A000001
                           for n in e.nodes), timeout_s=30, what="node1's weights on every node")
    load = Load(e, long=LONG, short_rate=5)

    adopted: dict[tuple[int, int], dict[str, float]] = {}  # (leader, epoch) -> node -> adopted at
    mismatches = samples = 0
    mismatched: list[tuple[float, str, int, list[Any]]] = []
    effective: set[tuple[int, ...]] = set()
    deadline = time.monotonic() + RUN_S
    while time.monotonic() < deadline:
        for node in e.nodes:
            s = load_section(e, node)
            if s is None:
                continue
            samples += 1
            if s["digest_mismatch"]:
                mismatches += 1
                mismatched.append((round(time.time(), 3), node, s["epoch"], s["peers"]))
            adopted.setdefault((s["published_by"], s["epoch"]), {})[node] = s["adopted_at"]
            effective.add(tuple(w["effective"] for w in s["weights"]))
        time.sleep(0.05)  # noqa: ASYNC251 -- a sampling period under a deadline, not a wait for a condition

    # The leader dies (SIGKILL: no goodbye). The others keep hashing with its last publication
    # until they see it dead (3 missed heartbeats), then node2 leads and both take its weights.
    killed_at = time.time()
    e.kill_node("node1")
    survivors = ("node2", "node3")

    def node2_leads() -> list[dict[str, Any]] | None:
        sections = [load_section(e, n) for n in survivors]
        if all(s is not None and s["published_by"] == 0x0A000002 for s in sections):
            return sections  # type: ignore[return-value]
        return None

    wait_until(lambda: node2_leads() is not None, timeout_s=20, what="node2 publishing to node3")
    after = node2_leads()
    assert after is not None
    failover_s = max(s["adopted_at"] for s in after) - killed_at
    e.wait_next_hops(NODES - {"10.0.0.1"}, timeout_s=20)
    load.report("mark")  # the moved long connections echo again, each at least twice, before the checks
    wait_until(lambda: load.report()["long"]["min_echoed_since_mark"] >= 2, timeout_s=30, interval_s=0.5,
               what="every long connection echoing again after the failover")
    report = load.stop()
    apart_ms = 1000 * abs(after[0]["adopted_at"] - after[1]["adopted_at"])
    print(f"failover: node2 leads and node3 follows {failover_s:.2f} s after node1 was killed "
          f"(dead after {3 * HEARTBEAT_S:g} s); node2/node3 adopted it {apart_ms:.1f} ms apart")
    assert failover_s < 3 * HEARTBEAT_S + 2 * 0.5 + 1.0  # dead detection + an interval or two + slack
    # Seen on all three nodes (polled at ~0.2 s per round: short-lived epochs may be missed on one).
    complete = {k: v for k, v in adopted.items() if len(v) == 3}
    lags = sorted(max(v.values()) - min(v.values()) for v in complete.values())
    print(f"epochs seen on all nodes: {len(complete)} of {len(adopted)}; adoption spread max "
          f"{1000 * lags[-1]:.1f} ms, median {1000 * lags[len(lags) // 2]:.1f} ms; effective weight sets "
          f"{len(effective)}; digest mismatch in {mismatches} of {samples} samples")
    assert len(complete) >= RUN_S  # weights changed about every second (an interval is 500 ms)
    assert all(k[0] == 0x0A000001 for k in complete), "node1 (the lowest address) leads"
    assert lags[-1] < 2 * HEARTBEAT_S, "agreement within two heartbeats"
    assert report["long"]["alive"] == LONG and report["long"]["lost"] == {}, report
    health = [line for n in e.nodes for line in e.node_log(n).splitlines() if "-> down" in line]
    assert mismatches == 0, f"the view digests match while the weights change: {mismatched} {health}"
    for node in survivors:
        assert "Traceback" not in e.node_log(node)


def observed_connections(e: WeightLab, node: str) -> tuple[float, ...] | None:
    """The cluster's active connections per backend as `node` shows them (echo port row)."""
    status = e.node_status(node)
    if not status:
        return None
    row = next(r for r in status["services"] if r["name"].endswith(":9000"))
    observed = tuple(b["weight"]["observed"] for b in row["backends"])
    return None if any(o is None for o in observed) else observed


def counted(e: WeightLab, total: int) -> bool:
    """Every node shows the same connection counts, which add up to `total` (within 2)."""
    seen = [observed_connections(e, n) for n in e.nodes]
    return all(s is not None and abs(sum(s) - total) <= 2 for s in seen) and len(set(seen)) == 1


def start_counting(e: WeightLab, short_rate: float) -> Load:
    """All nodes up and routed, LONG long connections counted on every node."""
    for node in e.nodes:
        e.start_node(node)
    e.wait_next_hops(NODES, timeout_s=60)
    load = Load(e, long=LONG, short_rate=short_rate)
    wait_until(lambda: counted(e, LONG), timeout_s=20, what=f"{LONG} connections counted on every node")
    return load


@pytest.mark.parametrize("weight_lab", [{"mode": "leastconn", "interval_ms": 500}], indirect=True)
def test_leastconn_every_node_sees_the_clusters_connection_counts(weight_lab: WeightLab) -> None:
    """Each node counts the connections it forwards (pinned or closed here, recounted from its
    flow table every pass); the leader's sum is the cluster's count, the same on every node: the
    long connections, up and after they close."""
    e = weight_lab
    load = start_counting(e, short_rate=1)
    counts = observed_connections(e, "node1")
    report = load.stop()
    assert report["long"]["lost"] == {}, report
    assert counts is not None and all(c > 0 for c in counts), counts  # spread over the three backends
    wait_until(lambda: counted(e, 0), timeout_s=20, what="the closed connections uncounted on every node")


IDLE_S = 3.0  # weighting.idle_s of the next test (at least 2 x flows.refresh_s = 2 s)
MAINTAIN_S = 5.0  # a maintenance pass of the flow table every 5 s while idle (cluster/node.py)


@pytest.mark.parametrize("weight_lab", [{"mode": "leastconn", "interval_ms": 500, "idle_s": IDLE_S}],
                         indirect=True)
def test_leastconn_connections_that_end_unseen_stop_counting_after_the_idle_window(weight_lab: WeightLab) -> None:
    """Connections whose end no node sees (the client's FIN and RST dropped on its way out, then the
    client killed: as for a vanished client or a server's reset, which DSR never shows) are no longer
    counted once they have been idle for idle_s and a maintenance pass recounted the flow table;
    until then, and while they echo, they are counted once in the cluster's sum, not per node."""
    e = weight_lab
    load = start_counting(e, short_rate=0)
    # Counted over several passes and idle windows while they echo (every 100 ms): nothing drops out.
    deadline = time.monotonic() + 2 * MAINTAIN_S
    while time.monotonic() < deadline:
        assert counted(e, LONG), [observed_connections(e, n) for n in e.nodes]
        time.sleep(0.5)  # noqa: ASYNC251 -- a sampling period under a deadline, not a wait for a condition
    e.lab.ns_run(e.client, "nft", "add", "table", "inet", "lbunseen")
    e.lab.ns_run(e.client, "nft", "add", "chain", "inet", "lbunseen", "out",
                 "{ type filter hook output priority 0 ; }")
    e.lab.ns_run(e.client, "nft", "add", "rule", "inet", "lbunseen", "out", "tcp", "flags", "&", "(fin|rst)",
                 "!=", "0", "drop")
    load.proc.kill()  # its sockets close: FINs (or RSTs) that never leave the client
    load.proc.wait(timeout=30)
    killed = time.monotonic()
    assert counted(e, LONG)  # nothing told the nodes
    wait_until(lambda: counted(e, 0), timeout_s=IDLE_S + 2 * MAINTAIN_S + 10,
               what="the connections that ended unseen uncounted on every node")
    took = time.monotonic() - killed
    print(f"connections that ended unseen: uncounted on every node {took:.1f} s after the client died "
          f"(idle_s {IDLE_S:g}, a pass every {MAINTAIN_S:g} s)")
    assert took >= IDLE_S - 0.5  # not before the idle window
    for node in e.nodes:
        assert "Traceback" not in e.node_log(node)
