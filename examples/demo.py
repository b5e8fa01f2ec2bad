"""`make demo`: an active/active lbnode pair behind a BIRD router with ECMP, in namespaces.

Brings the lab up (examples/lab/ecmp.py), shows the router's multipath route, runs long-lived
and short connections through it, prints how they spread over the nodes and the backends, kills
a node (SIGKILL), shows the route converge and that every connection survived, restarts the
node (it resyncs its flows before it advertises) and tears everything down, also on Ctrl-C or
failure. Needs root; takes about half a minute.
"""
from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from examples.lab.ecmp import VIP, EcmpLab, Load
from examples.lab.netns import Lab, wait_until

N1, N2 = "10.0.0.1", "10.0.0.2"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def route(lab: EcmpLab) -> str:
    return lab.lab.ns_run(lab.router, "ip", "route", "show", f"{VIP}/32").stdout.rstrip()


def spread(lab: EcmpLab, report: dict[str, Any]) -> None:
    print(f"   {'node':6} {'flows pinned here':>17} {'flows in table':>14} {'packets forwarded':>17}")
    for name in lab.nodes:
        status = lab.node_status(name)
        if status is None:
            print(f"   {name:6} (down)")
            continue
        c = status["counters"]
        print(f"   {name:6} {c['new_flow']:17d} {status['flows']['entries']:14d} {c['tx']:17d}")
    long = report["long"]
    print(f"   long-lived connections per backend: {dict(sorted(long['by_backend'].items()))}")


def connections(report: dict[str, Any]) -> str:
    long, short = report["long"], report["short"]
    return (f"long-lived: {long['alive']} of {long['total']} alive, lost {long['lost'] or 0}, "
            f"longest stall {long['max_stall_ms']} ms, {long['echoed']} echoes checked; "
            f"short: {short['ok']} ok, {short['failed']} failed")


def main() -> int:
    passed = False
    with tempfile.TemporaryDirectory(prefix="lbdemo-") as workdir, Lab(prefix="lbdemo") as owner:
        say("building the lab (network namespaces)")
        lab = EcmpLab(owner, Path(workdir))
        try:
            print(f"   client 10.1.0.2 -> router (BIRD, ECMP) -> node1 {N1}, node2 {N2} -> backends "
                  + ", ".join(b.ip4 for b in lab.backends))
            print(f"   VIP {VIP} lives on the backends' loopback; they answer the client directly (DSR)")
            lab.start_backends()
            lab.start_router()
            say("starting two lbnode nodes: XDP, health checks, flow sync, BGP + BFD to the router")
            for name in lab.nodes:
                lab.start_node(name)
            t0 = time.monotonic()
            lab.wait_next_hops({N1, N2}, timeout_s=60)
            print(f"   both nodes announced the VIP after {time.monotonic() - t0:.1f}s; the router's route:")
            print("   " + route(lab).replace("\n", "\n   "))

            say("traffic: 200 long-lived echo connections (each echo checked) + 20 new HTTP connections/s")
            load = Load(lab, long=200, short_rate=20)
            wait_until(lambda: all((s := lab.node_status(n)) and s["flows"]["entries"] >= 200 for n in lab.nodes),
                       timeout_s=20, what="flows synced")
            time.sleep(2)
            report = load.report()
            spread(lab, report)
            print("   each node pinned the flows the router sent it; flow sync gave each node all of them")
            print(f"   {connections(report)}")

            say("killing node1 (SIGKILL): its BGP session closes, the router moves its flows to node2")
            t0 = time.monotonic()
            lab.kill_node("node1", signal.SIGKILL)
            lab.wait_next_hops({N2})
            print(f"   route converged in {(time.monotonic() - t0) * 1000:.0f} ms: " + route(lab))
            time.sleep(3)
            report = load.report()
            print(f"   {connections(report)}")
            spread(lab, report)

            say("restarting node1: it resyncs node2's flow table, then advertises again")
            t0 = time.monotonic()
            lab.start_node("node1")
            lab.wait_next_hops({N1, N2}, timeout_s=60)
            status = lab.node_status("node1")
            entries = status["flows"]["entries"] if status else 0
            print(f"   back in the ECMP route after {time.monotonic() - t0:.1f}s, holding {entries} flows")
            time.sleep(3)
            report = load.stop()
            print(f"   {connections(report)}")
            spread(lab, report)
            long = report["long"]
            passed = long["alive"] == long["total"] and report["short"]["failed"] == 0
        finally:
            say("tearing down: nodes, router, backends, namespaces")
            lab.close()
    print("\ndemo " + ("passed: no connection was lost" if passed else "FAILED"))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
