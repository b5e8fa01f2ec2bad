"""The load lab's plot: each backend's utilisation and weight share over time, phases marked.

matplotlib with the Agg backend (no display), imported only here so the lab's other modules
load without it.
"""
from __future__ import annotations

from pathlib import Path

from examples.lab.loadlab import LoadResult
from examples.lab.loadstats import weight_shares

SMOOTH_S = 1.0  # the utilisation curve is a trailing mean over this long (a few intervals)


def plot(result: LoadResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    intervals = result.intervals
    if not intervals or not result.phases:
        raise ValueError("nothing to plot: no samples or no phases")
    t0 = result.phases[0].start_s
    names = sorted(result.backends)
    total_capacity = sum(result.backends.values())
    fig, (ax_u, ax_w) = plt.subplots(2, 1, sharex=True, figsize=(11, 7), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    for i, name in enumerate(names):
        label = f"{name} (capacity {result.backends[name]})"
        times, utils = [], []
        first = 0  # the oldest interval inside the trailing window
        for k, iv in enumerate(intervals):
            while intervals[first].end_s <= iv.end_s - SMOOTH_S:
                first += 1
            window = intervals[first:k + 1]
            duration = sum(w.end_s - w.start_s for w in window)
            times.append(iv.end_s - t0)
            utils.append(100 * sum(w.busy_s[name] for w in window) / (iv.slots[name] * duration))
        ax_u.plot(times, utils, color=colours[i % len(colours)], label=label, linewidth=1.2)
        shares = [(iv.end_s - t0, 100 * weight_shares(iv.weights)[name]) for iv in intervals if iv.weights]
        if shares:
            ax_w.step([t for t, _ in shares], [s for _, s in shares], where="post",
                      color=colours[i % len(colours)], label=label, linewidth=1.2)
        for peer in sorted({p for iv in intervals for p in iv.peers}):
            # The other nodes' shares, thin: where they are visible at all, the nodes disagree.
            theirs = [(iv.end_s - t0, 100 * weight_shares(iv.peers[peer]).get(name, 0.0))
                      for iv in intervals if iv.peers.get(peer)]
            ax_w.step([t for t, _ in theirs], [s for _, s in theirs], where="post",
                      color=colours[i % len(colours)], linewidth=0.6, alpha=0.6, linestyle="--")
        ideal = 100 * result.backends[name] / total_capacity
        ax_w.axhline(ideal, color=colours[i % len(colours)], linestyle=":", linewidth=0.8)

    for k, phase in enumerate(result.phases):
        for ax in (ax_u, ax_w):
            ax.axvspan(phase.start_s - t0, phase.end_s - t0, color="grey", alpha=0.08 if k % 2 else 0.0)
            ax.axvline(phase.start_s - t0, color="black", linewidth=0.8)
        ax_u.annotate(f"{phase.name} ({phase.mode})\nspread {result.spread(phase):.2f}",
                      xy=(phase.start_s - t0, 1.0), xycoords=("data", "axes fraction"),
                      xytext=(4, -4), textcoords="offset points", va="top", fontsize=9)
        half = (phase.start_s + phase.end_s) / 2 - t0
        ax_u.axvline(half, color="black", linewidth=0.5, linestyle="--")

    ax_u.set_ylabel(f"utilisation, % (trailing {SMOOTH_S:.0f} s)")
    ax_u.set_ylim(0, 105)
    ax_u.legend(loc="center right", fontsize=8)
    peers = sorted({p for iv in intervals for p in iv.peers})
    ax_w.set_ylabel("share of the node's weight, %\n(dotted: capacity share)" if not peers else
                    f"weight share, % (dashed: {', '.join(peers)};\ndotted: capacity share)")
    ax_w.set_xlabel("seconds since phase 1 started")
    ax_w.set_ylim(bottom=0)
    p = result.params
    fig.suptitle(f"lbnode, four backends of capacity {', '.join(str(result.backends[n]) for n in names)}: "
                 f"{p.rate:.0f} new connections/s, {p.service_ms:.0f} ms per request, {p.slots_per_unit} requests "
                 "at once per capacity unit\nspread = highest / lowest utilisation over each phase's second half "
                 "(after the dashed line)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
