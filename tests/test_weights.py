"""The load-aware weight controller against simulated servers (cluster/weights.py).

Servers of capacities 1, 2, 4, 8 share a steady offered load; a server's utilisation is its share
of that load over its capacity. A report describes the weights in force one interval before the
last one (the delay that makes the naive `weight = 1/load` oscillate). Spread is the highest
utilisation over the lowest.
"""
from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from cluster.weights import MAX_WEIGHT, BackendInput, ControllerParams, LoadSample, WeightController, WeightsError

pytestmark = pytest.mark.unit

CAPACITIES = (1.0, 2.0, 4.0, 8.0)
OFFERED = 7.5  # half the total capacity: balanced, every server is at 0.5
DELAY = 2  # the report read at step k reflects the output of step k - 2
SETTLE_WITHIN = 15  # intervals


class Sim:
    def __init__(self, capacities: tuple[float, ...] = CAPACITIES, params: ControllerParams | None = None,
                 noise: float = 0.0, seed: int = 1) -> None:
        self.names = [f"b{i}" for i in range(len(capacities))]
        self.capacity = dict(zip(self.names, capacities, strict=True))
        self.controller = WeightController(params or ControllerParams())
        self.history: list[dict[str, int]] = [{n: 100 for n in self.names}] * DELAY
        self.noise = noise
        self.rng = random.Random(seed)
        self.spreads: list[float] = []
        self.outputs: list[dict[str, int]] = []
        self.k = 0

    def utilisation(self, weights: dict[str, int]) -> dict[str, float]:
        total = sum(weights.values())
        return {n: OFFERED * weights[n] / total / self.capacity[n] for n in self.names}

    def step(self, sample_for: Callable[[str], bool] = lambda name: True) -> dict[str, int]:
        util = self.utilisation(self.history[-DELAY])
        self.spreads.append(max(util.values()) / min(util.values()))
        inputs = {}
        for n in self.names:
            load = util[n] * self.capacity[n] * (1 + self.rng.uniform(-self.noise, self.noise))
            inputs[n] = BackendInput(100, LoadSample(load, float(self.k)) if sample_for(n) else None, self.capacity[n])
        out = self.controller.update(inputs, float(self.k))
        self.history.append(out)
        self.outputs.append(out)
        self.k += 1
        return out

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()


def settle_step(spreads: list[float], start: int = 0, bound: float = 1.3) -> int:
    """Intervals after `start` until the spread stays <= bound for the rest of the run."""
    return next(k for k in range(start, len(spreads)) if all(s <= bound for s in spreads[k:])) - start


def test_settles_from_equal_weights() -> None:
    sim = Sim()
    sim.run(60)
    assert sim.spreads[0] == pytest.approx(8.0)
    settle = settle_step(sim.spreads)
    print(f"settle={settle} intervals, final spread={sim.spreads[-1]:.3f}, weights={sim.outputs[-1]}")
    assert settle <= SETTLE_WITHIN
    assert sim.spreads[-1] <= 1.1
    assert all(1 <= w <= MAX_WEIGHT for w in sim.outputs[-1].values())


def test_naive_inverse_load_oscillates_under_the_same_delay() -> None:
    """The reason for the damping: weight = 1/utilisation never settles with a one-interval delay."""
    names = [f"b{i}" for i in range(4)]
    cap = dict(zip(names, CAPACITIES, strict=True))
    history: list[dict[str, float]] = [{n: 1.0 for n in names}] * DELAY
    spreads = []
    for _ in range(40):
        w = history[-DELAY]
        total = sum(w.values())
        util = {n: OFFERED * w[n] / total / cap[n] for n in names}
        spreads.append(max(util.values()) / min(util.values()))
        history.append({n: 1 / util[n] for n in names})
    assert min(spreads[20:]) > 1.3 or max(spreads[20:]) > 2  # still swinging after 20 intervals
    assert max(spreads[30:]) >= 7.9


@pytest.mark.parametrize(("name", "new_capacity"), [("b3", 2.0), ("b0", 4.0), ("b3", 16.0), ("b1", 0.5)])
def test_step_change_followed_without_overshoot(name: str, new_capacity: float) -> None:
    sim = Sim()
    sim.run(40)
    sim.capacity[name] = new_capacity
    sim.run(60)
    shares = [out[name] / sum(out.values()) for out in sim.outputs]
    before, after = shares[39], shares[-1]
    moved = after - before
    beyond = max(s - after for s in shares[40:]) if moved > 0 else max(after - s for s in shares[40:])
    overshoot = beyond / abs(moved)
    settle = settle_step(sim.spreads, start=40)
    print(f"{name} -> capacity {new_capacity}: share {before:.3f} -> {after:.3f}, overshoot={overshoot:.1%}, "
          f"settle={settle} intervals")
    assert abs(moved) > 0.05
    assert overshoot <= 0.20
    assert settle <= SETTLE_WITHIN


def test_dead_load_source_falls_back_to_static_weight() -> None:
    params = ControllerParams(stale_after_s=3.0)
    sim = Sim(params=params)
    sim.run(30)
    assert sim.outputs[-1]["b0"] < 60  # under load control, the smallest server gets less
    silent_from = sim.k
    outs = [sim.step(lambda n: n != "b0") for _ in range(10)]
    # Its last sample stays the newest one; until it is older than stale_after_s the weight holds.
    fallback_at = next(i for i, o in enumerate(outs) if o["b0"] == 100)
    assert fallback_at == 0  # sample None: no report at all this interval means no source
    sim2 = Sim(params=params)
    sim2.run(30)
    last = sim2.controller.update({n: BackendInput(100, LoadSample(0.5, float(silent_from - 1)), sim2.capacity[n])
                                   for n in sim2.names}, float(silent_from - 1 + 3))
    assert last["b0"] < 60  # 3 s old: still fresh
    stale = sim2.controller.update({n: BackendInput(100, LoadSample(0.5, float(silent_from - 1)), sim2.capacity[n])
                                    for n in sim2.names}, float(silent_from - 1 + 3.5))
    assert stale == {n: 100 for n in sim2.names}  # every source silent: all static


def test_stale_backend_rejoins_from_its_static_weight_and_others_keep_control() -> None:
    sim = Sim()
    sim.run(30)
    out = sim.step(lambda n: n != "b3")
    assert out["b3"] == 100
    assert "b3" not in sim.controller.multipliers()
    assert out["b0"] < 100  # the other three stay under load control
    sim.run(40)
    assert sim.spreads[-1] <= 1.3


def test_identical_inputs_give_identical_outputs() -> None:
    a, b = Sim(noise=0.1, seed=7), Sim(noise=0.1, seed=7)
    a.run(50)
    b.run(50)
    assert a.outputs == b.outputs
    # Input order does not matter: backends are processed in name order.
    c1, c2 = WeightController(), WeightController()
    inputs = {n: BackendInput(100, LoadSample(u, 1.0), cap) for n, u, cap in
              [("x", 0.9, 1.0), ("a", 0.3, 4.0), ("m", 0.5, 2.0)]}
    assert c1.update(inputs, 1.0) == c2.update(dict(reversed(list(inputs.items()))), 1.0)


def test_hysteresis_holds_output_under_small_noise() -> None:
    sim = Sim(noise=0.03, seed=3)
    sim.run(40)
    settled = sim.outputs[-1]
    sim.run(100)
    changes = sum(1 for prev, cur in zip(sim.outputs[40:], sim.outputs[41:], strict=False) if prev != cur)
    print(f"output changes in 100 noisy intervals after settling: {changes}")
    assert changes == 0
    assert sim.outputs[-1] == settled


def test_floor_keeps_every_backend_in_the_pool() -> None:
    sim = Sim(capacities=(0.01, 8.0, 8.0, 8.0))
    sim.run(80)
    params = ControllerParams()
    assert min(sim.controller.multipliers().values()) >= params.floor * 0.999
    assert sim.outputs[-1]["b0"] >= 1


def test_configured_zero_stays_zero_and_single_backend_is_static() -> None:
    c = WeightController()
    out = c.update({"a": BackendInput(0, LoadSample(0.9, 0.0)), "b": BackendInput(50, LoadSample(0.1, 0.0))}, 0.0)
    assert out == {"a": 0, "b": 50 * (MAX_WEIGHT // 400)}


@pytest.mark.parametrize(("kwargs", "field"), [({"gain": 1.0}, "gain"), ({"smoothing": 0.0}, "smoothing"),
                                               ({"max_step": 1.0}, "max_step"), ({"floor": 0.0}, "floor"),
                                               ({"stale_after_s": 0.0}, "stale_after_s")])
def test_bad_params_are_refused(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(WeightsError, match=field):
        ControllerParams(**kwargs)


@pytest.mark.parametrize("inp", [BackendInput(1001), BackendInput(-1), BackendInput(1, None, 0.0),
                                 BackendInput(1, LoadSample(float("nan"), 0.0))])
def test_bad_inputs_are_refused(inp: BackendInput) -> None:
    with pytest.raises(WeightsError, match="b1"):
        WeightController().update({"b1": inp}, 0.0)


def test_a_resumed_controller_continues_where_the_other_stopped() -> None:
    """A leader failover (cluster/loadshare.py): the new leader's controller starts from the
    published multipliers and output, and its next output is within the hysteresis of the last."""
    sim = Sim()
    sim.run(30)
    last, multipliers = sim.outputs[-1], sim.controller.multipliers()
    fresh = WeightController(ControllerParams())
    fresh.resume(multipliers, last)
    sim.controller = fresh
    out = sim.step()
    assert all(abs(out[n] - last[n]) <= 0.05 * last[n] + 1 for n in last), (last, out)
    cold = Sim()
    cold.run(1)
    assert cold.outputs[0] != last  # without it, the new leader would start from m = 1
