"""weighting: {mode: http, http_header: X-Load} on a real lbnode (examples/lab/loadlab.py, one node)
in front of four real HTTP backends of capacity 1, 2, 4, 8 (examples/lab/loadsim.py serve), under
an open-loop client: each backend reports its load (requests in service or queued, in capacity
units) in the X-Load header of the service's http check path; the node reads it every interval,
shows it in status (backends[].weight.observed), and its controller moves the effective weights
towards capacity (the 8-unit backend ends up with several times the 1-unit one's weight), while
no request breaks. The backends refuse connections to their own addresses (nftables): the load
is read through the VIP, steered to each backend's MAC as the health checks are.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from examples.lab.loadlab import CAPACITIES, WORK_PORT, LoadLab, LoadParams
from examples.lab.netns import Lab, wait_until

pytestmark = pytest.mark.netns


def backends(lab: LoadLab) -> dict[str, dict[str, Any]] | None:
    """The node's backend rows by address, or None before it serves."""
    snap = lab._status(lab.nodes[0])
    if snap is None or snap["node"]["state"] != "serving" or not snap["services"]:
        return None
    return {b["address"]: b for b in snap["services"][0]["backends"]}


def test_http_load_reports_move_the_weights_towards_capacity() -> None:
    params = LoadParams(rate=60.0, interval_ms=500)
    with tempfile.TemporaryDirectory(prefix="lblh-") as workdir, Lab(prefix="lblh") as owner:
        lab = LoadLab(owner, Path(workdir), params)
        try:
            lab.start_backends()
            for b in lab.backends:  # serve only on the VIP, as DSR backends may: the load is read through it
                owner.ns_run(b.ns, "nft", "add", "table", "inet", "lbviponly")
                owner.ns_run(b.ns, "nft", "add", "chain", "inet", "lbviponly", "in",
                             "{ type filter hook input priority 0 ; }")
                owner.ns_run(b.ns, "nft", "add", "rule", "inet", "lbviponly", "in", "ip", "daddr", b.ip4, "tcp",
                             "dport", str(WORK_PORT), "counter", "drop")
            lab.start_nodes("http")
            capacity = {b.ip4: c for b, c in zip(lab.backends, CAPACITIES, strict=True)}
            small, big = lab.backends[0].ip4, lab.backends[-1].ip4
            rows = backends(lab)
            assert rows is not None
            assert {a: r["weight"]["configured"] for a, r in rows.items()} == dict.fromkeys(capacity, 1)
            lab.start_client()
            seen: dict[str, list[float]] = {a: [] for a in capacity}

            def moved() -> bool:
                rows = backends(lab)
                if rows is None:
                    return False
                for address, row in rows.items():
                    if row["weight"]["observed"] is not None:
                        seen[address].append(row["weight"]["observed"])
                effective = {a: r["weight"]["effective"] for a, r in rows.items()}
                by_capacity = [effective[a] for a in sorted(capacity, key=capacity.__getitem__)]
                return effective[big] >= 3 * effective[small] and by_capacity == sorted(by_capacity)

            t0 = time.monotonic()
            wait_until(moved, timeout_s=60, interval_s=0.25, what="weights ordered by capacity, 8 units >= 3 x 1")
            took = time.monotonic() - t0
            # The loads follow the weights a window (1 s) later: read them for a few more seconds.
            settled: dict[str, list[float]] = {a: [] for a in capacity}
            deadline = time.monotonic() + 6.0
            while time.monotonic() < deadline:
                rows = backends(lab)
                assert rows is not None
                for address, row in rows.items():
                    if row["weight"]["observed"] is not None:
                        settled[address].append(row["weight"]["observed"])
                time.sleep(0.25)  # noqa: ASYNC251 -- a sampling period under a deadline, not a wait for a condition
            report = lab.client_report("stop")
        finally:
            lab.close()
    weights = {a: r["weight"] for a, r in rows.items()}
    print(f"weights ordered by capacity {took:.1f} s after the client started: "
          + ", ".join(f"{a} (capacity {capacity[a]}): effective {w['effective']} multiplier {w['multiplier']} "
                      f"observed {w['observed']}" for a, w in weights.items()))
    # Every backend's X-Load was read and shown (a number per backend).
    assert all(seen[a] and settled[a] for a in capacity), (seen, settled)
    assert all(w["observed"] is not None and w["observed"] >= 0 for w in weights.values()), weights
    assert all(w["multiplier"] > 0 for w in weights.values()), weights
    # The load is in capacity units (requests / slots per unit): as the weights follow capacity,
    # the 8-unit backend carries several times the 1-unit one's load (its utilisation, load /
    # capacity, is what the controller equalises).
    recent = {a: sum(v[len(v) // 2:]) / len(v[len(v) // 2:]) for a, v in settled.items()}
    print("mean observed load over the last 3 s: " + ", ".join(f"{a} {v:.3f}" for a, v in recent.items()))
    assert recent[big] > 2 * recent[small], recent
    assert report["broken"] == 0, report
