"""`make demo-load`: four backends of capacity 1, 2, 4 and 8 behind one lbnode, balanced three ways.

A live simulation in namespaces (examples/lab/loadlab.py): each backend serves a limited number
of requests at once, for a fixed time each, and queues the rest; a client opens new
connections to the VIP at a fixed rate. Phase 1 hashes with equal static weights, so the small
backend runs hot and the big one idles. Phase 2 turns on load-aware weights (the node's
controller, fed each backend's load); phase 3 least connections. Phases switch by rewriting the
node's config and SIGHUP. Prints each phase's load spread (the highest backend utilisation over
the lowest, over the phase's second half) and writes a PNG of utilisation and weights over time.
Tears everything down, also on Ctrl-C or failure. Needs root; about 2.5 minutes by default.

    .venv/bin/python -m examples.demo_load [--phase-s 40] [--rate 200] [--aware agent|http] [--nodes 1|3]
                                           [--out PNG]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from examples.lab.loadlab import PHASES, LoadLab, LoadParams, LoadResult
from examples.lab.loadplot import plot
from examples.lab.netns import Lab


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def default_plot(kind: str) -> Path:
    return Path(tempfile.gettempdir()) / "lbnode-load" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.png"


def run(params: LoadParams, out: Path, *, prefix: str, nodes: int = 1, verbose: bool = True) -> LoadResult:
    """Build the lab, run the phases, tear down; plot into `out`."""
    progress = (lambda text: print(f"   {text}", flush=True)) if verbose else (lambda text: None)
    with tempfile.TemporaryDirectory(prefix=f"{prefix}-") as workdir, Lab(prefix=prefix) as owner:
        lab = LoadLab(owner, Path(workdir), params, nodes=nodes)
        try:
            if verbose:
                front = "node (lbnode" if nodes == 1 else f"router (BIRD, ECMP) -> {nodes} nodes (lbnode, flow sync"
                say(f"the lab: client -> {front}, XDP, L2 DSR) -> b1..b4; the VIP lives on the backends' loopback")
                for b in lab.backends:
                    print(f"   {b.name} {b.ip4:12} capacity {lab.capacity[b.name]} "
                          f"({lab.capacity[b.name] * params.slots_per_unit} requests at once, "
                          f"{params.service_ms:.0f} ms each)")
                print(f"   client: {params.rate:.0f} new connections/s to the VIP, "
                      f"about {params.offered_slots():.1f} requests in service at any time")
                say(f"three phases of {params.phase_s:.0f}s: " + ", ".join(PHASES))
            result = lab.run(progress=progress)
        except BaseException:
            print("\nlbnode's log (last lines):\n" + lab.node_log(), file=sys.stderr)
            raise
        finally:
            lab.close()
    result.plot = plot(result, out)
    return result


def report(result: LoadResult) -> None:
    print(f"   {'phase':10} {'mode':10} {'spread':>7}   utilisation per backend (second half)   ok  broken")
    for phase in result.phases:
        utils = "  ".join(f"{n} {100 * u:4.1f}%" for n, u in sorted(result.utilisation(phase).items()))
        print(f"   {phase.name:10} {phase.mode:10} {result.spread(phase):7.2f}   {utils}  "
              f"{phase.ok:6d} {phase.broken:5d}")
    for phase in result.phases:
        gap, late = result.disagreement(phase), result.disagreement(phase, second_half=True)
        if gap is not None and late is not None:
            print(f"   {phase.name}: the nodes' weight shares differed by at most {100 * gap:.1f} points "
                  f"(the switch included), {100 * late:.1f} in the second half")
    print(f"   load-aware weights settled in {result.settle_s(result.phase('aware')):.1f}s "
          f"(every weight share within {100 * result.params.settle_tolerance:.0f}% of the step of its final value)")
    if result.errors:
        print(f"   errors: {result.errors}")


def arguments(ap: argparse.ArgumentParser, *, phase_s: float) -> None:
    """The options demo-load and bench-load share."""
    defaults = LoadParams()
    ap.add_argument("--phase-s", type=float, default=phase_s)
    ap.add_argument("--rate", type=float, default=defaults.rate, help="new connections per second (keep it modest)")
    ap.add_argument("--service-ms", type=float, default=defaults.service_ms)
    ap.add_argument("--aware", choices=["http", "agent"], default=defaults.aware,
                    help="phase 2: agent (HAProxy agent-check, idle capacity as the weight percentage) or http "
                         "(X-Load into the node's controller)")
    ap.add_argument("--window-ms", type=int, default=defaults.window_ms,
                    help="what the backends' load reports average over")
    ap.add_argument("--nodes", type=int, choices=[1, 3], default=1,
                    help="1: one node; 3: the ECMP lab (BIRD, BGP, flow sync), which also shows the nodes agree")
    ap.add_argument("--out", type=Path, default=None, help="where the PNG goes")


def params(args: argparse.Namespace) -> LoadParams:
    return LoadParams(phase_s=args.phase_s, rate=args.rate, service_ms=args.service_ms, aware=args.aware,
                      window_ms=args.window_ms)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments(ap, phase_s=40.0)
    args = ap.parse_args()
    result = run(params(args), args.out or default_plot("demo"), prefix="lbload", nodes=args.nodes)
    say("load spread per phase (1.00 = every backend equally busy)")
    report(result)
    print(f"\nplot: {result.plot}")
    return 0 if result.broken == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
