"""Fault injection on the ECMP lab (examples/lab/faults.py): 200 long-lived connections checked
byte by byte and a stream of new ones, through node death, silent death, link flaps, a switch
reboot, a partition, a router restart, a reload during an outage, backend changes, sync loss and
backend failure. Every fault that can end is undone, and every node must come back by itself.
No connection that should survive may be lost, and each scenario keeps its stated bounds on
stall, convergence and recovery (`faults.SCENARIOS`); control runs without flow sync must lose
connections, so these tests can fail."""
from __future__ import annotations

import pytest

from examples.lab.faults import SCENARIOS, run_scenario, violations

pytestmark = pytest.mark.netns

HEALTH_FALL_S = 2 * 0.5  # the lab's checks: fall 2 x interval 500 ms


@pytest.mark.parametrize("key", [k for k, s in SCENARIOS.items() if not s.control])
def test_no_connection_that_should_survive_is_lost(key: str) -> None:
    result = run_scenario(key)
    print(f"\n{result.scenario}: kept={result.kept} lost={result.lost} expected={result.expected_lost} "
          f"max_stall_ms={result.max_stall_ms} converged_s={result.converged_s} recovered_s={result.recovered_s} "
          f"after_bfd_s={result.after_bfd_s} short_failed={result.short_failed}")
    assert not violations(key, result), (violations(key, result), result.detail)
    if key == "6":
        assert result.detail["new_conns_avoid_b2_after_s"] <= HEALTH_FALL_S + 1.5, result.detail


@pytest.mark.parametrize("key", [k for k, s in SCENARIOS.items() if s.control])
def test_control_without_flow_sync_loses_connections(key: str) -> None:
    """Without flow sync the node that takes over (or returns) re-hashes flows it never saw with
    b4 in the table, and some land on a backend that never saw them (reset)."""
    result = run_scenario(key)
    print(f"\n{result.scenario}: kept={result.kept} lost={result.lost}")
    assert not violations(key, result), result.detail
    assert set(result.detail["long"]["lost"]) <= {"reset", "eof"}
