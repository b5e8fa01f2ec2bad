"""The load lab's pure parts: meters, the agent's reply, spread, settle time, answers and weights."""
from __future__ import annotations

import math

import pytest

from examples.lab.loadlab import effective_weight
from examples.lab.loadsim import check_answer, parse_work, payload, response
from examples.lab.loadstats import (
    AgentStyle,
    Interval,
    Occupancy,
    Window,
    agent_reply,
    disagreement,
    phase_spread,
    phase_utilisation,
    settle_time,
    spread,
    weight_shares,
)
from healthcheck.agent import AgentHealth, parse_agent_reply

pytestmark = pytest.mark.unit

SLOTS = {"a": 4, "b": 8}


def test_occupancy_integrates_a_step_function() -> None:
    m = Occupancy(since_s=10.0)
    m.set(11.0, 2)  # 0 for 1 s
    m.set(11.5, 1)  # 2 for 0.5 s
    assert m.integral_at(13.5) == pytest.approx(1.0 + 2.0)  # then 1 for 2 s


def test_window_averages_the_trailing_window_and_forgets_older_snapshots() -> None:
    m = Occupancy(since_s=0.0)
    w = Window(window_s=1.0, tick_s=0.1)
    assert w.mean(0.0, m) == 0.0  # before any snapshot: the current value
    for k in range(31):
        t = k * 0.1
        if k == 10:
            m.set(t, 3)  # 0 until t=1, then 3
        w.snapshot(t, m)
    assert w.mean(3.0, m) == pytest.approx(3.0)
    assert len(w._snapshots) <= 12  # bounded: window / tick + 2


@pytest.mark.parametrize(("style", "util", "capacity", "line", "weight_pct"), [
    (AgentStyle.IDLE, 0.25, 4, "up 75%\n", 75),
    (AgentStyle.IDLE, 1.7, 4, "up 0%\n", 0),  # clamped: never negative
    (AgentStyle.IDLE_CAPACITY, 0.25, 4, "up 300%\n", 300),
    (AgentStyle.IDLE_CAPACITY, 0.9, 1, "up 10%\n", 10),
    (AgentStyle.LOAD, 0.5, 2, "up load:1.250\n", None),
])
def test_agent_reply_is_a_line_the_nodes_parser_reads(style: AgentStyle, util: float, capacity: float, line: str,
                                                      weight_pct: int | None) -> None:
    text = agent_reply(style, utilisation=util, load=1.25, capacity=capacity)
    assert text == line
    report = parse_agent_reply(text)
    assert report.health is AgentHealth.UP and report.weight_pct == weight_pct and not report.warnings


def test_idle_capacity_weights_have_their_fixed_point_at_equal_utilisation() -> None:
    """Iterate the naive law the agent implies (weights = reported idle capacity, shares = weight
    over the sum): at 20% mean utilisation it converges to equal utilisation."""
    capacity = {"b1": 1, "b2": 2, "b3": 4, "b4": 8}
    work = 0.2 * sum(capacity.values())  # requests' worth in service, in capacity units
    shares = {n: 0.25 for n in capacity}
    for _ in range(40):
        utils = {n: work * shares[n] / capacity[n] for n in capacity}
        pct = {n: parse_agent_reply(agent_reply(AgentStyle.IDLE_CAPACITY, utilisation=utils[n], load=0,
                                                capacity=capacity[n])).weight_pct for n in capacity}
        shares = weight_shares({n: p or 0 for n, p in pct.items()})
    assert spread([work * shares[n] / capacity[n] for n in capacity]) < 1.05


def test_spread() -> None:
    assert spread([0.5, 0.25, 0.4]) == 2.0
    assert spread([0.3]) == 1.0
    assert math.isfinite(spread([0.5, 0.0]))  # an idle backend: large, not infinite
    with pytest.raises(ValueError):
        spread([])


def iv(start: float, busy: dict[str, float], weights: dict[str, int] | None = None, length: float = 1.0) -> Interval:
    return Interval(start, start + length, busy, SLOTS, weights or {})


def test_phase_utilisation_weights_intervals_by_length() -> None:
    intervals = [iv(0, {"a": 4.0, "b": 0.0}), iv(1, {"a": 0.0, "b": 8.0 * 3}, length=3.0)]
    assert phase_utilisation(intervals, 0, 4) == {"a": 0.25, "b": 0.75}
    with pytest.raises(ValueError, match="no samples"):
        phase_utilisation(intervals, 10, 20)


def test_phase_spread_uses_the_second_half_and_averages_before_dividing() -> None:
    # First half: a settling transient that must not count.
    intervals = [iv(t, {"a": 4.0, "b": 0.8}) for t in range(6)]
    # Second half: noisy but even on average (a alternates 0.2 / 0.6 of its slots, b stays 0.4).
    intervals += [iv(t, {"a": 4 * (0.2 if t % 2 else 0.6), "b": 8 * 0.4}) for t in range(6, 12)]
    assert phase_spread(intervals, 0, 12) == pytest.approx(1.0)
    assert phase_spread(intervals, 0, 6) == pytest.approx(10.0)  # the transient alone: a full, b at 10%
    assert iv(0, {"a": 2.0, "b": 2.0}).utilisation("a") == 0.5


def test_settle_time_is_when_the_weight_shares_last_leave_the_band() -> None:
    busy = {"a": 0.0, "b": 0.0}
    before = [iv(-1, busy, {"a": 1, "b": 1})]  # the previous phase: shares 0.5 / 0.5
    weights = [{"a": 1, "b": 1}, {"a": 1, "b": 2}, {"a": 1, "b": 3}, {"a": 1, "b": 99}, {"a": 1, "b": 4}]
    weights += [{"a": 10, "b": 41}, {"a": 10, "b": 39}] * 4  # settled around a = 0.2, b = 0.8
    intervals = before + [iv(t, busy, w) for t, w in enumerate(weights)]
    # The step is 0.5 -> 0.2 = 0.3; a's shares 0.5, 0.33, 0.25, 0.01, 0.2, ...: with a band of
    # 20% of the step (0.06) the last one out ends at t=4; with 50% (0.15) it is 0.01 too.
    assert settle_time(intervals, 0, len(weights), tolerance=0.2) == 4.0
    assert settle_time(intervals, 0, len(weights), tolerance=0.5) == 4.0
    assert settle_time(intervals, 0, len(weights), tolerance=0.7) == 1.0  # 0.33 is within 0.21
    # Without the previous phase the step starts from the first weights inside (the same here).
    assert settle_time(intervals[1:], 0, len(weights), tolerance=0.2) == 4.0
    assert settle_time([iv(t, busy) for t in range(4)], 0, 4) == 4.0  # no weights reported: never settled
    steady = [iv(t, busy, {"a": 1, "b": 1}) for t in range(4)]
    assert settle_time(steady, 0, 4) == 0.0  # no step at all


def test_payload_and_answers_are_checked_byte_for_byte() -> None:
    body = payload(7, 100)
    assert len(body) == 100 and body != payload(8, 100) and payload(7, 40) == body[:40]
    good = response("200 OK", {"X-Backend": "b3"}, body)
    assert check_answer(good, 7, 100) == "b3"
    assert check_answer(good, 8, 100) is None  # another request's bytes
    assert check_answer(good[:-1], 7, 100) is None  # truncated
    assert check_answer(response("503 Busy", {}, body), 7, 100) is None


def test_parse_work() -> None:
    assert parse_work("/work?id=12&bytes=200") == (12, 200)
    assert parse_work("/load") is None
    for bad in ("/work?id=x&bytes=1", "/work?id=1", "/work?id=1&bytes=-1", "/work?id=1&bytes=99999999"):
        with pytest.raises((ValueError, KeyError)):
            parse_work(bad)


def test_effective_weight_reads_either_status_shape() -> None:
    assert effective_weight({"weight": 3, "in_hash": True}) == 3
    assert effective_weight({"weight": {"configured": 1, "observed": 0.4, "effective": 7}, "in_hash": True}) == 7
    assert effective_weight({"weight": {"configured": 2}}) == 2
    assert effective_weight({"weight": 3, "in_hash": False}) == 0


def test_disagreement_is_the_largest_share_gap_between_nodes() -> None:
    busy = {"a": 0.0, "b": 0.0}
    same = Interval(0, 1, busy, SLOTS, {"a": 1, "b": 3}, {"node2": {"a": 2, "b": 6}})
    apart = Interval(1, 2, busy, SLOTS, {"a": 1, "b": 3}, {"node2": {"a": 1, "b": 1}, "node3": {"a": 1, "b": 3}})
    missing = Interval(2, 3, busy, SLOTS, {"a": 1, "b": 3}, {"node2": {}})  # a node did not answer: skipped
    assert disagreement([same], 0, 10) == 0.0
    assert disagreement([same, apart, missing], 0, 10) == pytest.approx(0.25)
    assert disagreement([iv(0, busy, {"a": 1, "b": 1})], 0, 10) is None  # one node
