"""Fault injection on the ECMP lab: kill, freeze and cut nodes, change backends, lose gossip.

    python -m examples.lab.faults [--only 1,4] [--long 200]     (make faults)

Each scenario builds a fresh lab (examples/lab/ecmp.py), starts both nodes with flow sync and
BFD, and runs the load generator: LONG long-lived echo connections checked byte by byte plus a
steady stream of new short connections. It injects one fault, waits for convergence, stops the
load and reports:

- kept / lost: long-lived connections alive at the end / lost although they should survive
  (connections on a backend that the scenario kills are expected to die and counted apart);
- max stall: the longest gap between two good echoes of any connection (the interruption);
- converged: seconds from the fault until the router's route is final and every surviving
  connection echoes again.

The control run repeats scenario 4 with flow sync disabled: it must lose connections, which
shows the suite can fail. Last line: scenarios=<n> kept=<kept> lost=<lost that should have survived>
"""
from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from examples.lab.ecmp import EcmpLab, Load
from examples.lab.netns import Lab, wait_until

N1, N2 = "10.0.0.1", "10.0.0.2"
SYNC_PORT = 7946


@dataclass(frozen=True)
class Result:
    scenario: str
    kept: int
    lost: int  # lost although they should have survived
    expected_lost: int  # on a backend the scenario killed
    max_stall_ms: int
    converged_s: float
    short_failed: int
    detail: dict[str, Any]


class Run:
    """One scenario's lab, nodes and load."""

    def __init__(self, ecmp: EcmpLab, *, sync: bool, long: int) -> None:
        self.ecmp, self.sync, self.long = ecmp, sync, long
        ecmp.start_backends()
        ecmp.start_router()
        for node in ecmp.nodes:
            ecmp.start_node(node, sync=sync)
        ecmp.wait_next_hops({N1, N2}, timeout_s=40)
        # BFD reacts only to a session that was Up, at its fast rate: a silent failure injected
        # before that would be caught by the hold timer instead.
        wait_until(lambda: all(self.bfd_fast(n) for n in ecmp.nodes), timeout_s=20, what="BFD up at 100 ms")
        self.load = Load(ecmp, long=long, short_rate=20)
        if sync:
            wait_until(lambda: min(self.entries(n) for n in ecmp.nodes) >= long, timeout_s=20,
                       what="every flow on both nodes")

    def bfd_fast(self, node: str) -> bool:
        status = self.ecmp.node_status(node)
        peers = status.get("bgp", {}).get("peers", []) if status else []
        return bool(peers) and all(
            (bfd := p.get("bfd")) and str(bfd["state"]).upper() == "UP" and not bfd["poll_active"]
            and bfd["detection_time_ms"] is not None and bfd["detection_time_ms"] <= 300 for p in peers)

    def entries(self, node: str) -> int:
        status = self.ecmp.node_status(node)
        return status["flows"]["entries"] if status else -1

    def converge(self, hops: set[str], t0: float, timeout_s: float = 60) -> float:
        """Seconds from t0 until the route is `hops` and every live connection echoes again."""
        self.ecmp.wait_next_hops(hops, timeout_s=timeout_s)

        def echoing() -> bool:
            report = self.load.report()
            return report["long"]["alive"] == 0 or report["long"]["current_stall_ms"] < 500
        wait_until(echoing, timeout_s=timeout_s, interval_s=0.1, what="every connection echoing")
        return time.monotonic() - t0

    def finish(self, name: str, converged_s: float, dead_backends: frozenset[str] = frozenset()) -> Result:
        # Every surviving connection completes a few more echoes: a late reset would show here.
        echoed = self.load.report()["long"]["echoed"]
        wait_until(lambda: (r := self.load.report()["long"])["echoed"] >= echoed + 5 * r["alive"], timeout_s=30,
                   interval_s=0.1, what="five more echoes per connection")
        report = self.load.stop()
        lost_by_backend: dict[str, int] = report["long"]["lost_by_backend"]
        expected = sum(n for b, n in lost_by_backend.items() if b in dead_backends)
        return Result(name, kept=report["long"]["alive"], lost=sum(lost_by_backend.values()) - expected,
                      expected_lost=expected, max_stall_ms=report["long"]["max_stall_ms"],
                      converged_s=round(converged_s, 2), short_failed=report["short"]["failed"], detail=report)


def kill9(run: Run) -> Result:
    t0 = time.monotonic()
    run.ecmp.kill_node("node1", signal.SIGKILL)
    return run.finish("1 kill -9 node1", run.converge({N2}, t0))


def link_cut(run: Run) -> Result:
    t0 = time.monotonic()
    run.ecmp.lab.ns_run(run.ecmp.nodes["node1"].ns, "ip", "link", "set", "eth0", "down")
    return run.finish("2a link cut node1", run.converge({N2}, t0))


def freeze(run: Run) -> Result:
    t0 = time.monotonic()
    run.ecmp.kill_node("node1", signal.SIGSTOP)
    try:
        converged = run.converge({N2}, t0)
    finally:
        run.ecmp.kill_node("node1", signal.SIGCONT)
    return run.finish("2b SIGSTOP node1", converged)


def node_return(run: Run) -> Result:
    run.ecmp.kill_node("node1", signal.SIGKILL)
    run.converge({N2}, time.monotonic())
    t0 = time.monotonic()
    run.ecmp.start_node("node1", sync=run.sync)
    return run.finish("3 node1 returns", run.converge({N1, N2}, t0))


def add_backend(run: Run) -> None:
    """b4 joins both nodes' config (SIGHUP): hash slots move to it; pinned flows must not."""
    b4 = run.ecmp.backends[3]
    for node in run.ecmp.nodes:
        path = run.ecmp.workdir / f"{node}.yaml"
        config = yaml.safe_load(path.read_text())
        config["services"][0]["backends"].append({"address": b4.ip4})
        path.write_text(yaml.safe_dump(config))
        run.ecmp.node_procs[node].send_signal(signal.SIGHUP)

    def b4_in_hash() -> bool:  # healthy *and* its MAC learned: only then do hash slots move
        statuses = [run.ecmp.node_status(n) for n in run.ecmp.nodes]
        return all(s is not None and all(any(b["backend"].startswith(b4.ip4 + ":") and b["in_hash"]
                                             for b in svc["backends"]) for svc in s["services"]) for s in statuses)
    wait_until(b4_in_hash, timeout_s=20, what="b4 in both nodes' hash")


def backend_change_then_kill(run: Run, name: str = "4 add backend, kill node1") -> Result:
    add_backend(run)
    t0 = time.monotonic()
    run.ecmp.kill_node("node1", signal.SIGKILL)
    return run.finish(name, run.converge({N2}, t0))


def gossip_loss(run: Run) -> Result:
    for node in run.ecmp.nodes.values():
        drop_sync_datagrams(run.ecmp, node.ns, percent=20)
    return backend_change_then_kill(run, "5 as 4, 20% gossip loss")


def drop_sync_datagrams(ecmp: EcmpLab, ns: str, percent: int) -> None:
    for rule in (["add", "table", "inet", "lbfault"],
                 ["add", "chain", "inet", "lbfault", "input", "{ type filter hook input priority 0; policy accept; }"],
                 ["add", "rule", "inet", "lbfault", "input", "udp", "dport", str(SYNC_PORT), "numgen", "random",
                  "mod", "100", "lt", str(percent), "counter", "drop"]):
        ecmp.lab.ns_run(ns, "nft", *rule)


def backend_dies(run: Run) -> Result:
    fault_at = run.load.report()["elapsed_s"]  # in the load generator's clock
    t0 = time.monotonic()
    run.ecmp.lab.stop(run.ecmp.backend_procs["b2"])
    b2 = run.ecmp.backends[1].ip4 + ":"
    wait_until(lambda: not any(b["backend"].startswith(b2) and b["in_hash"]
                               for n in run.ecmp.nodes for s in [run.ecmp.node_status(n)] if s
                               for svc in s["services"] for b in svc["backends"]),
               timeout_s=10, what="b2 out of both nodes' hash")
    result = run.finish("6 backend b2 dies", time.monotonic() - t0, dead_backends=frozenset({"b2"}))
    last_fail = result.detail["short"]["last_fail_s"]
    avoid_after = round(max(0.0, last_fail - fault_at), 2) if last_fail is not None else 0.0
    return dataclasses.replace(result, detail={**result.detail, "new_conns_avoid_b2_after_s": avoid_after})


SCENARIOS: dict[str, tuple[Callable[[Run], Result], bool]] = {
    "1": (kill9, True),
    "2a": (link_cut, True),
    "2b": (freeze, True),
    "3": (node_return, True),
    "4": (backend_change_then_kill, True),
    "5": (gossip_loss, True),
    "6": (backend_dies, True),
    "control": (lambda run: backend_change_then_kill(run, "control: 4 without flow sync"), False),
}


def run_scenario(key: str, *, long: int = 200) -> Result:
    scenario, sync = SCENARIOS[key]
    with tempfile.TemporaryDirectory(prefix="lbfault-") as workdir, Lab(prefix="lbf") as lab:
        ecmp = EcmpLab(lab, Path(workdir), backends=4, initial_backends=3)
        try:
            return scenario(Run(ecmp, sync=sync, long=long))
        finally:
            ecmp.close()


def table(results: list[Result]) -> str:
    rows = [f"{'scenario':30} {'kept':>5} {'lost':>5} {'expected':>8} {'max stall ms':>12} {'converged s':>11} {'short failed':>12}"]
    rows += [f"{r.scenario:30} {r.kept:5d} {r.lost:5d} {r.expected_lost:8d} {r.max_stall_ms:12d} {r.converged_s:11.2f} "
             f"{r.short_failed:12d}" for r in results]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated scenario keys: " + ",".join(SCENARIOS))
    parser.add_argument("--long", type=int, default=200, help="long-lived connections per scenario")
    args = parser.parse_args()
    keys = args.only.split(",") if args.only else list(SCENARIOS)
    results = []
    for key in keys:
        print(f"running scenario {key} ...", flush=True)
        results.append(run_scenario(key, long=args.long))
        print(table(results[-1:]).splitlines()[1], flush=True)
    print()
    print(table(results))
    real = [r for r in results if not r.scenario.startswith("control")]
    control = [r for r in results if r.scenario.startswith("control")]
    if control:
        print(f"control (flow sync off) lost {control[0].lost} connections: the suite can see a failure")
    print(f"scenarios={len(real)} kept={sum(r.kept for r in real)} lost={sum(r.lost for r in real)}")
    return 0 if all(r.lost == 0 for r in real) and all(r.lost > 0 for r in control) else 1


if __name__ == "__main__":
    sys.exit(main())
