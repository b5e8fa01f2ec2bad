"""Weighted rendezvous table: disruption bounds and weight tolerance (bpf/consistent_hash.py)."""
from __future__ import annotations

import pytest

from bpf.consistent_hash import NO_BACKEND, Member, build_table

pytestmark = pytest.mark.unit

SIZE = 4096
WEIGHT_TOLERANCE = 0.02  # stated in bpf/consistent_hash.py


def members(weights: list[int], first_index: int = 0) -> list[Member]:
    return [Member(identity=f"10.0.0.{10 + i}", weight=w, index=first_index + i) for i, w in enumerate(weights)]


def moved(before: list[int], after: list[int]) -> list[int]:
    return [s for s, (a, b) in enumerate(zip(before, after)) if a != b]


@pytest.mark.parametrize("n", [2, 3, 5, 10, 33])
def test_removing_one_backend_moves_only_its_slots(n: int) -> None:
    ms = members([1] * n)
    before = build_table(ms, SIZE)
    gone = ms[n // 2]
    after = build_table([m for m in ms if m != gone], SIZE)
    changed = moved(before, after)
    assert changed, "the removed backend owned no slot"
    assert all(before[s] == gone.index for s in changed)
    assert gone.index not in after


def test_adding_a_backend_moves_slots_only_to_it() -> None:
    ms = members([1, 1, 1, 1])
    before = build_table(ms, SIZE)
    new = Member("10.0.0.99", 1, 99)
    after = build_table([*ms, new], SIZE)
    changed = moved(before, after)
    assert all(after[s] == new.index for s in changed)
    assert abs(len(changed) / SIZE - 1 / 5) < WEIGHT_TOLERANCE


def test_changing_a_weight_moves_slots_only_to_or_from_that_backend() -> None:
    ms = members([1, 1, 1, 1])
    before = build_table(ms, SIZE)
    heavier = [Member(m.identity, 3 if m.index == 2 else m.weight, m.index) for m in ms]
    after = build_table(heavier, SIZE)
    assert all(after[s] == 2 for s in moved(before, after))
    lighter = [Member(m.identity, 0 if m.index == 2 else m.weight, m.index) for m in ms]
    after = build_table(lighter, SIZE)
    assert all(before[s] == 2 for s in moved(before, after))


@pytest.mark.parametrize("weights", [[1, 1, 1], [1, 2, 3], [10, 1], [5, 5, 1, 1, 8], [1] * 16, [100, 1, 1, 1]])
def test_weights_are_honoured_within_tolerance(weights: list[int]) -> None:
    table = build_table(members(weights), SIZE)
    total = sum(weights)
    for index, weight in enumerate(weights):
        share = table.count(index) / SIZE
        assert abs(share - weight / total) <= WEIGHT_TOLERANCE, (index, share, weight / total)


def test_same_identities_give_the_same_table_whatever_the_indexes() -> None:
    """Nodes that number backends differently still agree on which backend gets each slot."""
    a = build_table(members([1, 2, 3]), SIZE)
    b = build_table(list(reversed(members([1, 2, 3], first_index=100))), SIZE)
    assert [x + 100 for x in a] == b


def test_no_weight_means_no_backend() -> None:
    assert build_table([], 16) == [NO_BACKEND] * 16
    assert build_table(members([0, 0]), 16) == [NO_BACKEND] * 16


@pytest.mark.parametrize("size", [0, 3, 1000])
def test_size_must_be_a_power_of_two(size: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        build_table(members([1]), size)


def test_duplicate_identities_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        build_table([Member("a", 1, 0), Member("a", 1, 1)], 16)
