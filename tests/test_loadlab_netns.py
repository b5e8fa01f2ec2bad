"""The load lab end to end, short: a real lbnode, four simulated backends, an open-loop client.

Checks that the measurement works (samples cover every phase, utilisation is sane and follows
capacity under equal weights, the node's weights are read, nothing breaks, the PNG is written),
not the spread targets: those belong to `make bench-load`, which runs long enough to meet them.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from examples.demo_load import run
from examples.lab.loadlab import LoadParams

pytestmark = pytest.mark.netns


def test_short_simulation_measures_every_phase_and_writes_the_plot(tmp_path: Path) -> None:
    params = LoadParams(phase_s=4.0, rate=40.0)
    result = run(params, tmp_path / "load.png", prefix="lbll", verbose=False)

    assert [p.name for p in result.phases] == ["static", "aware", "leastconn"]
    assert result.broken == 0, result.errors
    assert all(p.ok > 0 and p.broken == 0 for p in result.phases), result.phases
    for phase in result.phases:
        utils = result.utilisation(phase)
        assert set(utils) == {"b1", "b2", "b3", "b4"}
        assert all(0.0 <= u <= 1.0 for u in utils.values()), utils
        assert result.spread(phase) >= 1.0
    # Equal weights: the 1-unit backend serves as many requests as the 8-unit one with an
    # eighth of the slots, so it is several times busier.
    static = result.utilisation(result.phase("static"))
    assert static["b1"] > 2 * static["b4"], static
    # The sampler read the node's weights for every backend, and in the load-aware phase they
    # moved towards capacity (the agent reports idle capacity: 8 units against 1).
    assert any(set(iv.weights) == {"b1", "b2", "b3", "b4"} for iv in result.intervals)
    aware = result.phase("aware")
    last = [iv.weights for iv in result.intervals if aware.start_s < iv.end_s <= aware.end_s and iv.weights][-1]
    assert last["b4"] > 2 * last["b1"], last
    assert result.settle_s(result.phase("aware")) <= params.phase_s
    assert result.summary().startswith("static_spread=") and f"plot={tmp_path / 'load.png'}" in result.summary()
    png = (tmp_path / "load.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
