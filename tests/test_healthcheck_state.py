"""Rise/fall hysteresis tables, drains and need-N aggregation (pure, explicit `now`)."""
from __future__ import annotations

import pytest

from healthcheck.config import ServiceHealthConfig
from healthcheck.errors import HealthCheckError
from healthcheck.state import BackendChanged, Health, Hysteresis, ServiceChanged, ServiceHealth, Transition
from tests.healthcheck_yaml import service_from_dict

pytestmark = pytest.mark.unit

U, D = Health.UP, Health.DOWN

# (description, rise, fall, initial, results "+"/"-", expected state after each result, flips at index)
HYSTERESIS_TABLE = [
    ("rise 2 from down", 2, 3, D, "++", [D, U], [1]),
    ("rise 1 goes up at once", 1, 1, D, "+-+", [U, D, U], [0, 1, 2]),
    ("fall 3 from up", 2, 3, U, "---", [U, U, D], [2]),
    ("failures keep down", 2, 3, D, "----", [D, D, D, D], []),
    ("a failure resets the rise streak", 3, 3, D, "++-++-+++", [D, D, D, D, D, D, D, D, U], [8]),
    ("a pass resets the fall streak", 2, 2, U, "-+-+--", [U, U, U, U, U, D], [5]),
    ("flapping never flips with rise=fall=2", 2, 2, D, "+-+-+-+-", [D] * 8, []),
    ("flapping never flips when up", 2, 2, U, "-+-+-+", [U] * 6, []),
    ("full cycle", 2, 2, D, "++--++", [D, U, U, D, D, U], [1, 3, 5]),
]


@pytest.mark.parametrize(("desc", "rise", "fall", "initial", "results", "states", "flips"), HYSTERESIS_TABLE,
                         ids=[row[0] for row in HYSTERESIS_TABLE])
def test_hysteresis_table(desc: str, rise: int, fall: int, initial: Health, results: str, states: list[Health],
                          flips: list[int]) -> None:
    h = Hysteresis(rise, fall, initial, now=0.0)
    seen_flips = []
    for i, (r, expected) in enumerate(zip(results, states, strict=True)):
        old = h.state
        t = h.observe(r == "+", now=float(i + 1))
        assert h.state is expected, f"after result {i} ({r})"
        if t is not None:
            assert t == Transition(old, expected, float(i + 1))
            assert h.since == float(i + 1) and h.streak == 0
            seen_flips.append(i)
    assert seen_flips == flips


def test_hysteresis_rejects_zero_rise() -> None:
    with pytest.raises(HealthCheckError):
        Hysteresis(0, 1)


def _svc(n: int, need: int = 1, rise: int = 1, fall: int = 1, checks: int = 1,
         **backend: object) -> ServiceHealthConfig:
    return service_from_dict({
        "name": "web", "vip": "192.0.2.10", "port": 80, "need": need,
        "checks": [{"kind": "tcp", "rise": rise, "fall": fall}] * checks,
        "backends": [{"address": f"10.0.0.{i + 1}", "port": 80, **backend} for i in range(n)],
    }, "services[0]")


def test_need_n_aggregation() -> None:
    sh = ServiceHealth(_svc(3, need=2), now=0.0)
    assert not sh.up and sh.usable_count == 0
    assert sh.observe("10.0.0.1:80", 0, True, 1.0) == \
        [BackendChanged("web", "10.0.0.1:80", True, True, False, "passed", 1.0)]
    assert not sh.up
    assert sh.observe("10.0.0.2:80", 0, True, 2.0) == [
        BackendChanged("web", "10.0.0.2:80", True, True, False, "passed", 2.0),
        ServiceChanged("web", True, 2, 2, 2.0)]
    assert sh.observe("10.0.0.3:80", 0, True, 3.0)[-1] == \
        BackendChanged("web", "10.0.0.3:80", True, True, False, "passed", 3.0)
    assert sh.observe("10.0.0.1:80", 0, False, 4.0, error="refused") == [
        BackendChanged("web", "10.0.0.1:80", False, False, False, "refused", 4.0)]
    assert sh.up  # 2 of need 2 still usable
    assert sh.observe("10.0.0.2:80", 0, False, 5.0, error="reset") == [
        BackendChanged("web", "10.0.0.2:80", False, False, False, "reset", 5.0),
        ServiceChanged("web", False, 1, 2, 5.0)]
    assert sh.usable_backends() == ("10.0.0.3:80",)
    snap = sh.snapshot()
    assert (snap.up, snap.usable, snap.need, snap.since) == (False, 1, 2, 5.0)
    b2 = snap.backends[1]
    assert (b2.backend, b2.usable, b2.since) == ("10.0.0.2:80", False, 5.0)
    assert (b2.checks[0].last_ok, b2.checks[0].last_error, b2.checks[0].runs, b2.checks[0].failures) == (
        False, "reset", 2, 1)


def test_disabled_backend_is_checked_but_never_counted() -> None:
    sh = ServiceHealth(_svc(2, disabled=True), now=0.0)
    assert sh.observe("10.0.0.1:80", 0, True, 1.0) == []  # healthy, but drained: no change in the hash
    st = sh.snapshot().backends[0]
    assert (st.healthy, st.disabled, st.usable) == (True, True, False)
    assert not sh.up
    assert sh.set_disabled("10.0.0.1:80", False, 2.0) == [
        BackendChanged("web", "10.0.0.1:80", True, True, False, "enabled", 2.0),
        ServiceChanged("web", True, 1, 1, 2.0)]
    assert sh.set_disabled("10.0.0.1:80", False, 3.0) == []
    assert sh.set_disabled("10.0.0.1:80", True, 4.0) == [
        BackendChanged("web", "10.0.0.1:80", False, True, True, "disabled", 4.0),
        ServiceChanged("web", False, 0, 1, 4.0)]


def test_initial_up_and_all_checks_must_pass() -> None:
    sh = ServiceHealth(_svc(1, checks=2, initial="up", fall=2), now=0.0)
    assert sh.up and sh.usable_backends() == ("10.0.0.1:80",)
    assert sh.observe("10.0.0.1:80", 1, False, 1.0, error="timeout") == []
    events = sh.observe("10.0.0.1:80", 1, False, 2.0, error="timeout")
    assert events == [BackendChanged("web", "10.0.0.1:80", False, False, False, "timeout", 2.0),
                      ServiceChanged("web", False, 0, 1, 2.0)]
    # check 0 passing alone does not bring the backend back
    assert sh.observe("10.0.0.1:80", 0, True, 3.0) == []
    snap = sh.snapshot().backends[0]
    assert [c.state for c in snap.checks] == [Health.UP, Health.DOWN]
    assert snap.checks[1].last_error == "timeout" and snap.checks[1].last_error_at == 2.0


def test_last_error_survives_later_passes() -> None:
    sh = ServiceHealth(_svc(1, rise=2), now=0.0)
    sh.observe("10.0.0.1:80", 0, False, 1.0, error="bad status 500 (expected 200-299)", latency_ms=1.5)
    sh.observe("10.0.0.1:80", 0, True, 2.0, latency_ms=0.5)
    c = sh.snapshot().backends[0].checks[0]
    assert (c.last_ok, c.last_latency_ms, c.last_error, c.last_error_at, c.streak) == (
        True, 0.5, "bad status 500 (expected 200-299)", 1.0, 1)


def test_unknown_backend_is_an_error() -> None:
    sh = ServiceHealth(_svc(1), now=0.0)
    with pytest.raises(HealthCheckError, match="unknown backend"):
        sh.observe("10.9.9.9:80", 0, True, 1.0)
