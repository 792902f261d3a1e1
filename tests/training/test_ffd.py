"""training/ffd.py + data.plan_step: the same step plans as re-running FFD for every clip, exactly."""

from __future__ import annotations

import numpy as np
import pytest

from training.data import LoaderState, plan_step
from training.ffd import _NO_RUNS, GrowingFFD, _new_packs_bound, _place, _place_runs
from training.packing import plan_packs


def reference_plan_step(counts: list[int], order: np.ndarray, position: int, packs_per_step: int,
                        budget: int) -> tuple[list[list[int]], list[int], int]:
    """The plan as it was defined first: FFD over all taken clips, re-run for each new clip."""
    taken: list[int] = []
    skipped: list[int] = []
    plan: list[list[int]] = []
    total, pos = 0, position
    while pos < len(order):
        clip = int(order[pos])
        n = counts[clip]
        if n > budget:
            skipped.append(clip)
            pos += 1
            continue
        if total + n > packs_per_step * budget:
            break
        trial = plan_packs([counts[c] for c in taken + [clip]], budget)
        if len(trial) > packs_per_step:
            break
        taken.append(clip)
        total += n
        plan = trial
        pos += 1
    return [[taken[i] for i in p] for p in plan], skipped, pos


def token_counts(rng: np.random.Generator, kind: str, n: int, budget: int) -> list[int]:
    if kind == "buckets":  # a few sizes, as bucketed latents give
        sizes = rng.integers(1, budget + 1, size=int(rng.integers(1, 12)))
        return [int(s) for s in rng.choice(sizes, size=n)]
    if kind == "distinct":  # every size different, some over the budget
        return [int(s) for s in rng.integers(1, int(budget * 1.2), size=n)]
    return [int(s) for s in rng.choice([budget // 2 + 1, budget // 3 + 1, budget // 4, 1, budget], size=n)]


@pytest.mark.parametrize("kind", ["buckets", "distinct", "awkward"])
def test_step_plans_equal_the_reference_for_fixed_seeds(kind: str) -> None:
    compared = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        budget = int(rng.choice([7, 64, 1000, 16384]))
        packs = int(rng.integers(1, 9))
        counts = token_counts(rng, kind, 160, budget)
        order = rng.permutation(len(counts))
        pos = 0
        while pos < len(order):
            want = reference_plan_step(counts, order, pos, packs, budget)
            got = plan_step(counts, order, LoaderState(0, pos, 0), packs, budget)
            assert got == want, (seed, pos)
            compared += 1
            if got[2] == pos:
                break
            pos = got[2]
    assert compared > 100


def test_growing_ffd_plan_is_plan_packs_and_undo_restores() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        budget = int(rng.integers(5, 60))
        sizes = [int(s) for s in rng.integers(1, budget + 1, size=int(rng.integers(1, 40)))]
        ffd = GrowingFFD(budget, max_packs=10**6)
        for i, s in enumerate(sizes):
            ffd.add(i, s)
            assert ffd.fits()
        assert ffd.plan() == plan_packs(sizes, budget)
        ffd.add(len(sizes), budget)  # a full pack more, then taken back
        ffd.remove_last(budget)
        assert ffd.plan() == plan_packs(sizes, budget)
        ffd.max_packs = len(plan_packs(sizes, budget)) - 1
        ffd.stale, ffd.total = 0, ffd.total + ffd.max_packs * budget  # force a full placement
        assert not ffd.fits()


def test_the_half_budget_shortcut_never_disagrees_with_ffd() -> None:
    """Below half the step's tokens no placement runs; FFD must indeed fit there."""
    rng = np.random.default_rng(1)
    for _ in range(300):
        budget = int(rng.integers(2, 50))
        packs = int(rng.integers(1, 6))
        sizes = []
        while True:
            s = int(rng.integers(1, budget + 1))
            if 2 * (sum(sizes) + s) > packs * budget:
                break
            sizes.append(s)
        assert len(plan_packs(sizes, budget)) <= packs if sizes else True


def test_run_length_placement_equals_the_per_pack_placement() -> None:
    """`_place_runs` is `_place` on run-length coded rooms: the same rooms, pack by pack."""
    rng = np.random.default_rng(2)
    for _ in range(300):
        budget = int(rng.integers(2, 80))
        rooms, runs = np.zeros(0, np.int64), _NO_RUNS
        for size in sorted(rng.integers(1, budget + 1, size=int(rng.integers(1, 9))).tolist(), reverse=True):
            count = int(rng.integers(1, 30))
            rooms, _ = _place(rooms, size, count, budget)
            runs = _place_runs(runs, size, count, budget)
            assert np.repeat(runs[0], runs[1]).tolist() == rooms.tolist()
            assert (runs[1] > 0).all()


def test_the_new_packs_bound_holds_for_first_fit() -> None:
    """However items at most `largest` arrive, first fit opens no more packs than the bound."""
    rng = np.random.default_rng(3)
    for _ in range(2000):
        budget = int(rng.integers(2, 60))
        largest = int(rng.integers(1, budget + 1))
        sizes = rng.integers(1, largest + 1, size=int(rng.integers(1, 40))).tolist()
        if rng.random() < 0.5:
            sizes.sort(reverse=True)
        packs: list[int] = []  # free room of each opened pack
        for s in sizes:
            at = next((i for i, r in enumerate(packs) if r >= s), None)
            if at is None:
                packs.append(budget - s)
            else:
                packs[at] -= s
        assert len(packs) <= _new_packs_bound(sum(sizes), largest, budget), (budget, largest, sizes)
