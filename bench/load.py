"""Load-aware weighting: `make demo-load`'s simulation, shorter, with the figures on one line.

Four backends of capacity 1, 2, 4 and 8 behind one real lbnode (examples/lab/loadlab.py); an
open-loop client; phases static, load-aware, least connections, switched by SIGHUP.

    make bench-load
    .venv/bin/python bench/load.py [--phase-s 25] [--rate 200] [--aware agent|http] [--nodes 1|3] [--out PNG]

The last line is `static_spread=<x> aware_spread=<y> leastconn_spread=<z> settle_s=<s>
broken=<n> plot=<png>`. A spread is the highest backend utilisation divided by the lowest, each
averaged over the phase's second half; settle_s is how long after the switch to load-aware
weights every backend's weight share stays within 10% of the step of its final value (the
mean over the phase's second half; the step is the largest change of any share); broken
counts requests that failed or returned wrong bytes, over the whole run. Targets:
aware_spread <= 1.3 while static_spread >= 2, settle_s <= 10, broken = 0. Exits 1 if a target
is missed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.demo_load import arguments, default_plot, params, report, run  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments(ap, phase_s=25.0)
    args = ap.parse_args()
    result = run(params(args), args.out or default_plot("bench"), prefix="lbbl", nodes=args.nodes, verbose=False)
    report(result)
    static, aware = result.spread(result.phase("static")), result.spread(result.phase("aware"))
    met = static >= 2 and aware <= 1.3 and result.settle_s(result.phase("aware")) <= 10 and result.broken == 0
    if not met:
        print("   targets missed: aware_spread <= 1.3, static_spread >= 2, settle_s <= 10, broken = 0")
    print(result.summary())
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
