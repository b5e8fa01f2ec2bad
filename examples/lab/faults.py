"""Fault injection on the ECMP lab: kill, freeze, cut and partition nodes, flap links, restart the
router, change backends, lose sync datagrams, and undo every fault that can end.

    python -m examples.lab.faults [--only 1,7] [--long 200]     (make faults)

Each scenario builds a fresh lab (examples/lab/ecmp.py), starts the nodes with flow sync and
BFD, and runs the load generator: LONG long-lived echo connections checked byte by byte plus a
steady stream of new short connections. It injects a fault while the state that fault stresses
is being built, ends the fault where faults end (a link comes back, a partition heals, the
router restarts), waits until the route is final again, and reports:

- kept / lost: long-lived connections alive at the end / lost although they should survive
  (connections on a backend that the scenario kills are expected to die and counted apart);
- max stall: the longest gap between two good echoes of any connection (the interruption);
- converged: seconds from the fault until the router's route is final and every surviving
  connection echoes again;
- recovered: for a fault that ends, seconds from its end until every node is back in the route,
  and (`after_bfd`) from the moment BFD was Up again.

Every scenario has stated bounds (`Scenario`) on max stall, convergence and recovery; after the
fault each surviving connection must echo five more times (checked per connection). Control
runs repeat a scenario without flow sync: they must lose connections, which shows that the
scenario can fail. Last line: scenarios=<n> kept=<kept> lost=<lost that should have survived>
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
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

SYNC_PORT = 7946
FAULT_S = 6.0  # how long a fault that ends lasts: well past BFD's 0.3 s and BGP's 3 s hold time
LOG_TAIL_LINES = 40
LOOP_STALL_MS = 250  # under BFD's 300 ms detection time; 3-40 ms measured on a quiet machine
SHORT_RECOVER_S = 4.0  # after a total outage: the loadgen's 3 s timeout, plus room
ECHOES_AFTER = 5  # each surviving connection echoes this many times after the fault


@dataclass(frozen=True)
class Result:
    scenario: str
    kept: int
    lost: int  # lost although they should have survived
    expected_lost: int  # on a backend the scenario killed
    max_stall_ms: int
    converged_s: float
    short_failed: int
    recovered_s: float | None  # a fault that ends: from its end until every node is in the route
    after_bfd_s: float | None  # ... counted from the moment BFD was Up again
    detail: dict[str, Any]


class Run:
    """One scenario's lab, nodes and load."""

    def __init__(self, ecmp: EcmpLab, *, sync: bool, long: int) -> None:
        self.ecmp, self.sync, self.long = ecmp, sync, long
        self.recovered_s: float | None = None
        self.after_bfd_s: float | None = None
        self.recovered_at_load_s: float | None = None  # in the load generator's clock
        ecmp.start_backends()
        ecmp.start_router()
        for node in ecmp.nodes:
            ecmp.start_node(node, sync=sync)
        self.all_hops = {ecmp.node_ip(n) for n in ecmp.nodes}
        ecmp.wait_next_hops(self.all_hops, timeout_s=40)
        # BFD reacts only to a session that was Up, at its fast rate: a silent failure injected
        # before that would be caught by the hold timer instead.
        wait_until(lambda: all(self.bfd_fast(n) for n in ecmp.nodes), timeout_s=20, what="BFD up at 100 ms")
        self._load: Load | None = None

    @property
    def load(self) -> Load:
        assert self._load is not None, "start_load() first"
        return self._load

    def start_load(self) -> None:
        """The checked connections; with sync, wait until every one of them is on every node."""
        self._load = Load(self.ecmp, long=self.long, short_rate=20)
        if self.sync:
            self.wait_flows_everywhere(self.long)

    def wait_flows_everywhere(self, count: int) -> None:
        wait_until(lambda: min(self.entries(n) for n in self.ecmp.nodes) >= count, timeout_s=20,
                   what=f"{count} flows on every node")

    def hops_without(self, *nodes: str) -> set[str]:
        return self.all_hops - {self.ecmp.node_ip(n) for n in nodes}

    def bfd_sessions(self, node: str) -> list[dict[str, Any]]:
        """The node's BFD session per BGP peer; empty if it cannot say, or a peer has none."""
        status = self.ecmp.node_status(node)
        peers = status.get("bgp", {}).get("peers", []) if status else []
        sessions = [p.get("bfd") for p in peers]
        return [s for s in sessions if s] if all(sessions) else []

    def bfd_up(self, node: str, *, fast: bool = False) -> bool:
        """Every session Up; `fast`: also at its fast rate (no Poll under way, detection <= 300 ms)."""
        sessions = self.bfd_sessions(node)
        return bool(sessions) and all(
            str(s["state"]).upper() == "UP"
            and (not fast or (not s["poll_active"] and s["detection_time_ms"] is not None
                              and s["detection_time_ms"] <= 300)) for s in sessions)

    def bfd_fast(self, node: str) -> bool:
        return self.bfd_up(node, fast=True)

    def entries(self, node: str) -> int:
        status = self.ecmp.node_status(node)
        return status["flows"]["entries"] if status else -1

    def converge(self, hops: set[str], t0: float, timeout_s: float = 60) -> float:
        """Seconds from t0 until the route is `hops` and every live connection echoes again."""
        self.ecmp.wait_next_hops(hops, timeout_s=timeout_s)

        def echoing() -> bool:
            report = self.load.report()
            return bool(report["long"]["alive"] == 0 or report["long"]["current_stall_ms"] < 500)
        wait_until(echoing, timeout_s=timeout_s, interval_s=0.1, what="every connection echoing")
        return time.monotonic() - t0

    def recover(self, nodes: list[str], ended_at: float, timeout_s: float = 60) -> None:
        """The fault ended at `ended_at`: wait until every node is back in the route, and record
        the time from the end, and from the moment each node's BFD was Up again (the latest)."""
        bfd_up_at: dict[str, float] = {}

        def back() -> bool:
            for n in nodes:
                if n not in bfd_up_at and self.bfd_up(n):
                    bfd_up_at[n] = time.monotonic()
            return self.ecmp.next_hops() == self.all_hops
        wait_until(back, timeout_s=timeout_s, interval_s=0.05,
                   what=f"every node back in the route (now {sorted(self.ecmp.next_hops())})")
        now = time.monotonic()
        self.recovered_s = round(now - ended_at, 2)
        self.recovered_at_load_s = self.load.report()["elapsed_s"]
        if len(bfd_up_at) == len(nodes):
            self.after_bfd_s = round(now - max(bfd_up_at.values()), 2)

    def finish(self, name: str, converged_s: float, dead_backends: frozenset[str] = frozenset()) -> Result:
        # Every surviving connection completes a few more echoes: a late reset would show here.
        self.load.report("mark")
        wait_until(lambda: self.load.report()["long"]["min_echoed_since_mark"] >= ECHOES_AFTER, timeout_s=40,
                   interval_s=0.1, what=f"{ECHOES_AFTER} more echoes on every surviving connection")
        loops = {n: s["loop"]["max_stall_ms"] for n in self.ecmp.nodes if (s := self.ecmp.node_status(n))}
        report = {**self.load.stop(), "node_loop_max_stall_ms": loops, "recovered_at_s": self.recovered_at_load_s}
        lost_by_backend: dict[str, int] = report["long"]["lost_by_backend"]
        expected = sum(n for b, n in lost_by_backend.items() if b in dead_backends)
        return Result(name, kept=report["long"]["alive"], lost=sum(lost_by_backend.values()) - expected,
                      expected_lost=expected, max_stall_ms=report["long"]["max_stall_ms"],
                      converged_s=round(converged_s, 2), short_failed=report["short"]["failed"],
                      recovered_s=self.recovered_s, after_bfd_s=self.after_bfd_s, detail=report)


def hold_fault(started_at: float) -> None:
    """Keep a fault in place until FAULT_S after it started: the fault's length is the point here,
    not a condition to wait for."""
    time.sleep(max(0.0, started_at + FAULT_S - time.monotonic()))


# ---- faults ------------------------------------------------------------------------------------


def set_link(run: Run, node: str, up: bool) -> None:
    """The node's own interface, administratively (its routes and neighbours are flushed)."""
    run.ecmp.lab.ns_run(run.ecmp.nodes[node].ns, "ip", "link", "set", "eth0", "up" if up else "down")


def set_switch_ports(run: Run, up: bool) -> None:
    """Every port of the switch (br0), as when it reboots: every host loses carrier at once."""
    ecmp = run.ecmp
    for host in [*ecmp.nodes.values(), *ecmp.backends]:
        ecmp.lab.ns_run(ecmp.router, "ip", "link", "set", f"p-{host.name}", "up" if up else "down")


def set_partition(run: Run, node: str, on: bool) -> None:
    """The switch stops forwarding to and from the node's port; the node's link stays up."""
    ecmp, port = run.ecmp, f"p-{node}"
    if not on:
        ecmp.lab.ns_run(ecmp.router, "nft", "delete", "table", "bridge", "lbpartition")
        return
    rules = [["add", "table", "bridge", "lbpartition"]]
    for hook in ("forward", "input", "output"):
        rules.append(["add", "chain", "bridge", "lbpartition", hook, f"{{ type filter hook {hook} priority 0; }}"])
        if hook != "output":
            rules.append(["add", "rule", "bridge", "lbpartition", hook, "iifname", port, "counter", "drop"])
        if hook != "input":
            rules.append(["add", "rule", "bridge", "lbpartition", hook, "oifname", port, "counter", "drop"])
    for rule in rules:
        ecmp.lab.ns_run(ecmp.router, "nft", *rule)


def drop_sync_datagrams(ecmp: EcmpLab, ns: str, percent: int) -> None:
    for rule in (["add", "table", "inet", "lbfault"],
                 ["add", "chain", "inet", "lbfault", "input", "{ type filter hook input priority 0; policy accept; }"],
                 ["add", "rule", "inet", "lbfault", "input", "udp", "dport", str(SYNC_PORT), "numgen", "random",
                  "mod", "100", "lt", str(percent), "counter", "drop"]):
        ecmp.lab.ns_run(ns, "nft", *rule)


def sync_datagrams_dropped(ecmp: EcmpLab, ns: str) -> int:
    out = ecmp.lab.ns_run(ns, "nft", "-j", "list", "table", "inet", "lbfault").stdout
    return sum(item["rule"]["expr"][-2]["counter"]["packets"] for item in json.loads(out)["nftables"]
               if "rule" in item)


def add_backend(run: Run, *, wait_nodes: list[str] | None = None, b1_weight: int | None = None) -> None:
    """b4 joins every node's config (SIGHUP): hash slots move to it; pinned flows must not.
    `b1_weight`: b1's weight changes too, so slots move whether or not b4 is up yet."""
    ecmp = run.ecmp
    b4 = ecmp.backends[3]
    for node in ecmp.nodes:
        path = ecmp.workdir / f"{node}.yaml"
        config = yaml.safe_load(path.read_text())
        backends = config["services"][0]["backends"]
        backends.append({"address": b4.ip4})
        if b1_weight is not None:
            backends[0]["weight"] = b1_weight
        path.write_text(yaml.safe_dump(config))
        ecmp.node_procs[node].send_signal(signal.SIGHUP)

    def b4_in_hash() -> bool:  # healthy *and* its MAC learned: only then do hash slots move
        statuses = [ecmp.node_status(n) for n in (wait_nodes or ecmp.nodes)]
        return all(s is not None and all(any(b["backend"].startswith(b4.ip4 + ":") and b["in_hash"]
                                             for b in svc["backends"]) for svc in s["services"]) for s in statuses)
    wait_until(b4_in_hash, timeout_s=20, what="b4 in the nodes' hash")


# ---- scenarios ---------------------------------------------------------------------------------


def kill9(run: Run) -> Result:
    t0 = time.monotonic()
    run.ecmp.kill_node("node1", signal.SIGKILL)
    return run.finish("1 kill -9 node1", run.converge(run.hops_without("node1"), t0))


def link_cut(run: Run) -> Result:
    t0 = time.monotonic()
    set_link(run, "node1", up=False)
    return run.finish("2a link cut node1", run.converge(run.hops_without("node1"), t0))


def freeze(run: Run) -> Result:
    t0 = time.monotonic()
    run.ecmp.kill_node("node1", signal.SIGSTOP)
    try:
        converged = run.converge(run.hops_without("node1"), t0)
    finally:
        run.ecmp.kill_node("node1", signal.SIGCONT)
    run.recover(["node1"], time.monotonic())
    return run.finish("2b SIGSTOP node1, SIGCONT", converged)


def node_return(run: Run) -> Result:
    run.ecmp.kill_node("node1", signal.SIGKILL)
    run.converge(run.hops_without("node1"), time.monotonic())
    t0 = time.monotonic()
    run.ecmp.start_node("node1", sync=run.sync)
    return run.finish("3 node1 returns", run.converge(run.all_hops, t0))


def backend_change_then_kill(run: Run, name: str = "4 add backend, kill node1") -> Result:
    add_backend(run)
    t0 = time.monotonic()
    run.ecmp.kill_node("node1", signal.SIGKILL)
    return run.finish(name, run.converge(run.hops_without("node1"), t0))


def gossip_loss(run: Run) -> Result:
    """20% of sync datagrams dropped on every node *before* the checked connections open, so their
    flows reach the peer only through gap repair (resends), then scenario 4."""
    for node in run.ecmp.nodes.values():
        drop_sync_datagrams(run.ecmp, node.ns, percent=20)
    run.start_load()  # Scenario.load_first is off: the loss is on first
    result = backend_change_then_kill(run, "5 as 4, 20% sync loss")
    dropped = {n: sync_datagrams_dropped(run.ecmp, node.ns) for n, node in run.ecmp.nodes.items()}
    return dataclasses.replace(result, detail={**result.detail, "sync_datagrams_dropped": dropped})


def backend_dies(run: Run) -> Result:
    fault_at = run.load.report()["elapsed_s"]  # in the load generator's clock
    t0 = time.monotonic()
    run.ecmp.lab.stop(run.ecmp.backend_procs["b2"])
    b2 = run.ecmp.backends[1].ip4 + ":"
    wait_until(lambda: not any(b["backend"].startswith(b2) and b["in_hash"]
                               for n in run.ecmp.nodes for s in [run.ecmp.node_status(n)] if s
                               for svc in s["services"] for b in svc["backends"]),
               timeout_s=10, what="b2 out of every node's hash")
    converged = run.converge(run.all_hops, t0)
    result = run.finish("6 backend b2 dies", converged, dead_backends=frozenset({"b2"}))
    last_fail = result.detail["short"]["last_fail_s"]
    avoid_after = round(max(0.0, last_fail - fault_at), 2) if last_fail is not None else 0.0
    return dataclasses.replace(result, detail={**result.detail, "new_conns_avoid_b2_after_s": avoid_after})


def link_flap(run: Run) -> Result:
    """node1's link goes down for FAULT_S, then comes back: node1 must return by itself."""
    t0 = time.monotonic()
    set_link(run, "node1", up=False)
    converged = run.converge(run.hops_without("node1"), t0)
    hold_fault(t0)
    set_link(run, "node1", up=True)
    run.recover(["node1"], time.monotonic())
    return run.finish("7 link flap node1", converged)


def switch_reboot(run: Run) -> Result:
    """Every switch port loses carrier for FAULT_S (a switch reboot): a total outage, then both
    nodes must return by themselves."""
    t0 = time.monotonic()
    set_switch_ports(run, up=False)
    run.ecmp.wait_next_hops(set(), timeout_s=10)
    hold_fault(t0)
    set_switch_ports(run, up=True)
    ended = time.monotonic()
    run.recover(list(run.ecmp.nodes), ended)
    return run.finish("8 switch reboot (all links)", run.converge(run.all_hops, ended))


def reload_link_down(run: Run) -> Result:
    """A config push (SIGHUP, b4 added) reaches node1 while its link is down: the reload must
    apply, the node must stay up, and it must return when the link does."""
    t0 = time.monotonic()
    set_link(run, "node1", up=False)
    converged = run.converge(run.hops_without("node1"), t0)
    before = run.ecmp.node_status("node1")
    assert before is not None
    add_backend(run, wait_nodes=["node2"])
    wait_until(lambda: (s := run.ecmp.node_status("node1")) is not None
               and sum(s["node"]["reloads"].values()) > sum(before["node"]["reloads"].values()),
               timeout_s=20, what="node1 handled the reload")
    status = run.ecmp.node_status("node1")
    assert status is not None and run.ecmp.node_procs["node1"].poll() is None
    reload_error = status["node"]["last_reload_error"]
    hold_fault(t0)
    set_link(run, "node1", up=True)
    run.recover(["node1"], time.monotonic())
    result = run.finish("9 reload while link down", converged)
    return dataclasses.replace(result, detail={**result.detail, "reload_error": reload_error,
                                               "reloads": status["node"]["reloads"]})


def partition(run: Run, name: str = "10 partition, new conns + b4, heal") -> Result:
    """The switch cuts node1 off (its link stays up). Meanwhile new connections open, all through
    node2, then b4 joins the config and b1's weight triples, so node1 would hash them differently
    (b1's weight alone moves slots even while node1 does not have b4 up yet). When the partition
    heals, node1 must know those flows before the router sends it their packets again."""
    t0 = time.monotonic()
    set_partition(run, "node1", on=True)
    converged = run.converge(run.hops_without("node1"), t0)
    run.load.report(f"open {run.long // 2}")
    add_backend(run, wait_nodes=["node2"], b1_weight=3)
    hold_fault(t0)
    set_partition(run, "node1", on=False)
    run.recover(["node1"], time.monotonic())
    return run.finish(name, converged)


def router_restart(run: Run) -> Result:
    """BIRD is restarted (SIGTERM, as a service manager does: it withdraws its routes), then
    started again: every node must come back into the route by itself."""
    ecmp = run.ecmp
    assert ecmp.bird is not None
    t0 = time.monotonic()
    ecmp.lab.stop(ecmp.bird)
    ecmp.wait_next_hops(set(), timeout_s=10)
    wait_until(lambda: not any(run.bfd_up(n) for n in ecmp.nodes), timeout_s=10, what="BFD down on every node")
    ecmp.start_router()
    ended = time.monotonic()
    run.recover(list(ecmp.nodes), ended)
    return run.finish("11 router (BIRD) restart", run.converge(run.all_hops, t0))


def kill_two_of_four(run: Run, name: str = "12 4 nodes: b4 added, kill -9 node1+node2") -> Result:
    """Half the cluster dies at once: the two survivors take over each other's share as well."""
    add_backend(run)
    t0 = time.monotonic()
    for node in ("node1", "node2"):
        run.ecmp.node_procs[node].send_signal(signal.SIGKILL)
    for node in ("node1", "node2"):
        run.ecmp.node_procs[node].wait(timeout=30)
    return run.finish(name, run.converge(run.hops_without("node1", "node2"), t0))


def loss_four_then_kill(run: Run) -> Result:
    """20% of sync datagrams dropped on all four nodes before the checked connections open, so
    that repair must work with three peers per sender; then b4 joins and node1 dies."""
    for node in run.ecmp.nodes.values():
        drop_sync_datagrams(run.ecmp, node.ns, percent=20)
    run.start_load()  # Scenario.load_first is off: the loss is on first
    result = backend_change_then_kill(run, "13 4 nodes: 20% sync loss, kill node1")
    dropped = {n: sync_datagrams_dropped(run.ecmp, node.ns) for n, node in run.ecmp.nodes.items()}
    return dataclasses.replace(result, detail={**result.detail, "sync_datagrams_dropped": dropped})


def rolling_restart(run: Run, name: str = "14 4 nodes: b4 added, rolling restart") -> Result:
    """Each node in turn: SIGTERM (drain), out of the route, started again (resync before it
    announces), back in the route; then the next."""
    add_backend(run)
    t0 = time.monotonic()
    for node in run.ecmp.nodes:
        run.ecmp.kill_node(node, signal.SIGTERM)
        run.ecmp.wait_next_hops(run.hops_without(node), timeout_s=30)
        run.ecmp.start_node(node, sync=run.sync)
        run.ecmp.wait_next_hops(run.all_hops, timeout_s=60)
    return run.finish(name, run.converge(run.all_hops, t0))


@dataclass(frozen=True)
class Scenario:
    run: Callable[[Run], Result]
    max_stall_ms: int  # the longest interruption any connection may see
    converged_s: float  # fault -> final route and every connection echoing
    recovered_s: float | None = None  # fault's end -> every node back in the route
    sync: bool = True
    control: bool = False  # flow sync off: must lose connections
    load_first: bool = True  # the checked connections open before the scenario starts
    nodes: int = 2
    frozen: str | None = None  # a node the fault freezes (SIGSTOP): its loop "stalls" by design
    outage: bool = False  # every node is out for a while: new connections fail meanwhile


# Bounds: stated here, asserted by tests/test_faults_netns.py and by main(). A total outage of
# FAULT_S stalls a connection for the outage plus TCP's retransmission backoff (up to ~2x).
SCENARIOS: dict[str, Scenario] = {
    "1": Scenario(kill9, max_stall_ms=1000, converged_s=3.0),
    "2a": Scenario(link_cut, max_stall_ms=1500, converged_s=3.0),
    "2b": Scenario(freeze, max_stall_ms=1500, converged_s=3.0, recovered_s=10.0, frozen="node1"),
    "3": Scenario(node_return, max_stall_ms=1000, converged_s=15.0),
    "4": Scenario(backend_change_then_kill, max_stall_ms=1000, converged_s=3.0),
    "5": Scenario(gossip_loss, max_stall_ms=1000, converged_s=3.0, load_first=False),
    "6": Scenario(backend_dies, max_stall_ms=1000, converged_s=5.0),
    "7": Scenario(link_flap, max_stall_ms=1500, converged_s=3.0, recovered_s=10.0),
    "8": Scenario(switch_reboot, max_stall_ms=25000, converged_s=25.0, recovered_s=12.0, outage=True),
    "9": Scenario(reload_link_down, max_stall_ms=1500, converged_s=3.0, recovered_s=10.0),
    "10": Scenario(partition, max_stall_ms=1500, converged_s=3.0, recovered_s=10.0),
    "11": Scenario(router_restart, max_stall_ms=25000, converged_s=25.0, recovered_s=12.0, outage=True),
    "12": Scenario(kill_two_of_four, max_stall_ms=1000, converged_s=3.0, nodes=4),
    "13": Scenario(loss_four_then_kill, max_stall_ms=1000, converged_s=3.0, nodes=4, load_first=False),
    # Four nodes, each compiling in turn on two cores: the slowest scenario to schedule.
    "14": Scenario(rolling_restart, max_stall_ms=3000, converged_s=120.0, nodes=4),
    "control": Scenario(lambda run: backend_change_then_kill(run, "control: 4 without flow sync"),
                        max_stall_ms=0, converged_s=0, sync=False, control=True),
    "control10": Scenario(lambda run: partition(run, "control: 10 without flow sync"),
                          max_stall_ms=0, converged_s=0, sync=False, control=True),
    "control14": Scenario(lambda run: rolling_restart(run, "control: 14 without flow sync"),
                          max_stall_ms=0, converged_s=0, sync=False, control=True, nodes=4),
}


def run_scenario(key: str, *, long: int = 200, logs: Path | None = None) -> Result:
    """`logs`: copy the nodes' and the router's logs into `logs/<key>/` at the end."""
    scenario = SCENARIOS[key]
    with tempfile.TemporaryDirectory(prefix="lbfault-") as workdir, Lab(prefix="lbf") as lab:
        ecmp = EcmpLab(lab, Path(workdir), nodes=scenario.nodes, backends=4, initial_backends=3)
        try:
            run = Run(ecmp, sync=scenario.sync, long=long)
            if scenario.load_first:
                run.start_load()
            return scenario.run(run)
        except BaseException:
            for node in ecmp.nodes:  # the nodes' own account of a failed scenario, before it is deleted
                tail = ecmp.node_log(node).splitlines()[-LOG_TAIL_LINES:]
                print(f"---- {node}.log (last {len(tail)} lines) ----", *tail, sep="\n", file=sys.stderr)
            raise
        finally:
            ecmp.close()
            if logs is not None:
                (logs / key).mkdir(parents=True, exist_ok=True)
                for log in Path(workdir).glob("*.log"):
                    shutil.copy(log, logs / key / log.name)


def violations(key: str, result: Result, *, long: int = 200) -> list[str]:
    """What in `result` breaks scenario `key`'s stated bounds (empty: it passed)."""
    s = SCENARIOS[key]
    if s.control:
        return [] if result.lost > 0 else ["the control run lost no connection: the scenario cannot fail"]
    out = []
    if result.lost:
        out.append(f"lost {result.lost} connections that should have survived")
    if result.kept + result.expected_lost + result.lost < long:
        out.append(f"only {result.kept + result.expected_lost + result.lost} of {long} connections accounted for")
    if result.max_stall_ms > s.max_stall_ms:
        out.append(f"max stall {result.max_stall_ms} ms > {s.max_stall_ms} ms")
    if result.converged_s > s.converged_s:
        out.append(f"converged in {result.converged_s} s > {s.converged_s} s")
    if s.recovered_s is not None and (result.recovered_s is None or result.recovered_s > s.recovered_s):
        out.append(f"recovered in {result.recovered_s} s > {s.recovered_s} s")
    if key == "6":
        if result.expected_lost == 0:
            out.append("b2 had no connections to lose")
    elif not s.outage and result.short_failed:
        out.append(f"{result.short_failed} new connections failed")
    elif s.outage:
        last_fail, recovered = result.detail["short"]["last_fail_s"], result.detail["recovered_at_s"]
        if last_fail is not None and recovered is not None and last_fail > recovered + SHORT_RECOVER_S:
            out.append(f"new connections still failed {last_fail - recovered:.1f} s after every node was back")
    if loop_stall_ms(result, s.frozen) > LOOP_STALL_MS:
        out.append(f"a node's event loop stalled for {loop_stall_ms(result, s.frozen):.0f} ms > {LOOP_STALL_MS} ms")
    if "sync_datagrams_dropped" in result.detail and not sum(result.detail["sync_datagrams_dropped"].values()):
        out.append(f"no sync datagram was dropped: {result.detail['sync_datagrams_dropped']}")
    if key == "9" and result.detail["reload_error"]:
        out.append(f"the reload during the outage was refused: {result.detail['reload_error']}")
    return out


def loop_stall_ms(result: Result, frozen: str | None = None) -> float:
    """The longest any live node's event loop was blocked during the scenario (after start-up),
    leaving out a node the scenario froze."""
    return max((ms for n, ms in result.detail["node_loop_max_stall_ms"].items() if n != frozen), default=0.0)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(results: list[Result]) -> str:
    rows = [f"{'scenario':34} {'kept':>5} {'lost':>5} {'expected':>8} {'max stall ms':>12} {'converged s':>11} "
            f"{'recovered s':>11} {'after BFD s':>11} {'short failed':>12} {'loop ms':>7}"]
    rows += [f"{r.scenario:34} {r.kept:5d} {r.lost:5d} {r.expected_lost:8d} {r.max_stall_ms:12d} {r.converged_s:11.2f} "
             f"{_fmt(r.recovered_s):>11} {_fmt(r.after_bfd_s):>11} {r.short_failed:12d} {loop_stall_ms(r):7.0f}"
             for r in results]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated scenario keys: " + ",".join(SCENARIOS))
    parser.add_argument("--long", type=int, default=200, help="long-lived connections per scenario")
    parser.add_argument("--logs", type=Path, help="keep each scenario's logs in LOGS/<scenario>/")
    args = parser.parse_args()
    keys = args.only.split(",") if args.only else list(SCENARIOS)
    results, failures = [], []
    for key in keys:
        print(f"running scenario {key} ...", flush=True)
        result = run_scenario(key, long=args.long, logs=args.logs)
        results.append(result)
        print(table([result]).splitlines()[1], flush=True)
        failures += [f"{key}: {v}" for v in violations(key, result, long=args.long)]
    print()
    print(table(results))
    for failure in failures:
        print("FAILED", failure)
    real = [r for k, r in zip(keys, results, strict=True) if not SCENARIOS[k].control]
    print(f"scenarios={len(real)} kept={sum(r.kept for r in real)} lost={sum(r.lost for r in real)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
