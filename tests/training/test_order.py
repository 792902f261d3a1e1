"""training/order.py: epoch orders computed a block at a time are exact permutations, well mixed,
windowed, image-mixed to the asked share, and the same however they are read."""

from __future__ import annotations

import numpy as np
import pytest

from training.data import ORDER_FORMAT, LoaderState, epoch_order, plan_step
from training.order import BLOCK, ArrayOrder, Permutation, ShuffledOrder, _image_blocks


def population(num_clips: int = 3000, num_files: int = 40, image_share: float = 0.2, seed: int = 0):
    """(file_of, is_image, by_file, file_videos, file_images) of a synthetic index."""
    rng = np.random.default_rng(seed)
    file_of = rng.integers(0, num_files, num_clips)
    is_image = rng.random(num_clips) < image_share
    by_file = np.lexsort((is_image, file_of)).astype(np.int32)
    return (file_of, is_image, by_file, np.bincount(file_of[~is_image], minlength=num_files),
            np.bincount(file_of[is_image], minlength=num_files))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 16, 17, 63, 64, 65, 1000, 4097, 65537])
def test_permutation_is_a_bijection_of_0_to_n(n: int) -> None:
    p = Permutation(n, (3, 1))
    y = p(np.arange(n))
    assert np.array_equal(np.sort(y), np.arange(n))
    assert np.array_equal(y, Permutation(n, (3, 1))(np.arange(n)))  # a function of the key
    if n > 3:
        assert not np.array_equal(y, Permutation(n, (3, 2))(np.arange(n)))
        assert not np.array_equal(y, np.arange(n))
    assert np.array_equal(p(np.arange(n)[::-1]), y[::-1])  # any subset of positions, in any order


def test_permutation_refuses_positions_outside_its_range() -> None:
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        Permutation(10, (1,))(np.array([10]))


def test_permutation_places_every_element_and_every_pair_anywhere_with_equal_chance() -> None:
    # 8,000 keys of a 16-element permutation. Where element x lands: a 16×16 table of ~500 each.
    # Where two elements land together: 240 ordered pairs of ~33 each — a shift or a weak mix
    # (too few rounds for 2-bit halves, a round function ignoring its key) passes the first and
    # fails this. Chi-square above 340 on 239 (225) degrees of freedom has p < 1e-5.
    n, trials = 16, 8000
    single = np.zeros((n, n))
    pairs = {(0, 1): np.zeros((n, n)), (0, 4): np.zeros((n, n))}  # same high half / same low half
    fixed = 0
    for k in range(trials):
        y = Permutation(n, (11, k))(np.arange(n))
        single[np.arange(n), y] += 1
        fixed += int((y == np.arange(n)).sum())
        for (a, b), table in pairs.items():
            table[y[a], y[b]] += 1
    expected = trials / n
    assert ((single - expected) ** 2 / expected).sum() < 340
    off = ~np.eye(n, dtype=bool)
    for table in pairs.values():
        expected = trials / (n * (n - 1))
        assert ((table[off] - expected) ** 2 / expected).sum() < 340
    assert fixed / trials == pytest.approx(1.0, abs=0.1)  # a random permutation has one fixed point on average


def test_tweaks_give_independent_bijections_in_one_call() -> None:
    # The image cycles of an epoch: one permutation per tweak, computed together.
    n, trials = 16, 8000
    p = Permutation(n, (5, 6))
    x = np.tile(np.arange(n), trials)
    tweak = np.repeat(np.arange(trials), n)
    y = p(x, tweak).reshape(trials, n)
    assert all(np.array_equal(np.sort(row), np.arange(n)) for row in y)  # each tweak: a bijection
    assert np.array_equal(y[3], p(np.arange(n), np.full(n, 3)))  # the same alone as among others
    assert not np.array_equal(y[0], p(np.arange(n)))  # tweak 0 is not the untweaked permutation
    table = np.zeros((n, n))
    np.add.at(table, (y[:, 0], y[:, 1]), 1)  # where elements 0 and 1 land, over the tweaks
    off = ~np.eye(n, dtype=bool)
    expected = trials / (n * (n - 1))
    assert ((table[off] - expected) ** 2 / expected).sum() < 340  # 239 d.o.f., p < 1e-5
    big = Permutation(4097, (1,))(np.arange(4097), np.full(4097, 9))  # with cycle-walking
    assert np.array_equal(np.sort(big), np.arange(4097))


def test_uniform_order_holds_every_clip_once_and_reads_the_same_in_any_blocks() -> None:
    _, _, by_file, videos, images = population()
    order = ShuffledOrder(by_file, videos, images, seed=7, epoch=0)
    whole = order.at(0, len(order))
    assert len(order) == 3000 and np.array_equal(np.sort(whole), np.arange(3000))
    for size in (1, 97, BLOCK):
        parts = [order.at(lo, min(lo + size, len(order))) for lo in range(0, len(order), size)]
        assert np.array_equal(np.concatenate(parts), whole)
    assert np.array_equal(whole, ShuffledOrder(by_file, videos, images, seed=7, epoch=0).at(0, 3000))
    assert not np.array_equal(whole, ShuffledOrder(by_file, videos, images, seed=7, epoch=1).at(0, 3000))
    assert not np.array_equal(whole, ShuffledOrder(by_file, videos, images, seed=8, epoch=0).at(0, 3000))
    # mixed: consecutive positions are not neighbours in the index
    assert np.abs(np.diff(whole)).mean() == pytest.approx(1000, rel=0.1)  # n/3 for a random permutation
    with pytest.raises(IndexError):
        order.at(2990, 3001)


def test_windowed_order_reads_window_after_window_of_shard_files() -> None:
    file_of, _, by_file, videos, images = population(num_clips=4000, num_files=40)
    order = ShuffledOrder(by_file, videos, images, seed=7, epoch=0, window_files=8)
    whole = order.at(0, len(order))
    assert np.array_equal(np.sort(whole), np.arange(4000))
    files = file_of[whole]
    first_seen = list(dict.fromkeys(files.tolist()))  # files in order of first use
    window = (np.argsort(first_seen)[np.searchsorted(np.sort(first_seen), files)]) // 8
    assert window.max() == 4 and (np.diff(window) >= 0).all()  # 5 windows of 8 files, one after another
    changes = [0, *(np.flatnonzero(np.diff(window)) + 1).tolist(), 4000]
    # within a window the order is shuffled, not file by file
    first = files[changes[0]:changes[1]]
    assert (first[1:] != first[:-1]).mean() > 0.6
    other = ShuffledOrder(by_file, videos, images, seed=7, epoch=1, window_files=8).at(0, 4000)
    assert set(file_of[other[:changes[1]]].tolist()) != set(first.tolist())  # a new file permutation each epoch


@pytest.mark.parametrize("fraction,window", [(0.5, 0), (0.5, 8), (0.05, 0)])
def test_image_mix_has_the_asked_share_every_video_once_and_images_evenly(fraction: float, window: int) -> None:
    _, is_image, by_file, videos, images = population(num_clips=20000, num_files=40, image_share=0.1)
    order = ShuffledOrder(by_file, videos, images, seed=3, epoch=2, window_files=window, image_fraction=fraction)
    whole = order.at(0, len(order))
    num_videos, num_images = int((~is_image).sum()), int(is_image.sum())
    draws = int(round(num_videos * fraction / (1 - fraction)))
    assert len(whole) == num_videos + draws
    assert int(is_image[whole].sum()) == draws
    assert np.array_equal(np.sort(whole[~is_image[whole]]), np.flatnonzero(~is_image))  # every video once
    counts = np.bincount(whole[is_image[whole]], minlength=len(is_image))[is_image]
    if draws >= num_images:  # up-weighted: whole cycles, so no image is drawn twice more than another
        assert counts.max() - counts.min() <= 1
    else:  # down: distinct images
        assert counts.max() == 1 and (counts == 1).sum() == draws
    slots = np.flatnonzero(is_image[whole])
    quarters = np.histogram(slots, bins=4, range=(0, len(whole)))[0]
    assert quarters == pytest.approx([draws / 4] * 4, rel=0.1)  # images spread over the whole epoch
    parts = [order.at(lo, min(lo + 1000, len(order))) for lo in range(0, len(order), 1000)]
    assert np.array_equal(np.concatenate(parts), whole)


def test_image_slots_are_uniform_over_positions() -> None:
    # 300 epochs, 2 blocks of slots (one partial): every slot is an image with chance draws/length
    _, is_image, by_file, videos, images = population(num_clips=6000, num_files=10, image_share=0.3)
    hits = None
    for epoch in range(300):
        order = ShuffledOrder(by_file, videos, images, seed=1, epoch=epoch, image_fraction=0.25)
        got = is_image[order.at(0, len(order))].astype(float)
        hits = got if hits is None else hits + got
    share = hits / 300
    assert share.mean() == pytest.approx(0.25, abs=0.002)
    by_block = [share[:BLOCK].mean(), share[BLOCK:].mean()]
    assert by_block == pytest.approx([0.25, 0.25], abs=0.01)
    tenths = [c.mean() for c in np.array_split(share, 10)]
    assert tenths == pytest.approx([0.25] * 10, abs=0.02)


def test_image_blocks_split_the_total_exactly_even_past_numpys_hypergeometric_limit() -> None:
    rng = np.random.default_rng(0)
    small = _image_blocks(10 * BLOCK + 5, 7000, rng)
    assert small.sum() == 7000 and len(small) == 11 and small[-1] <= 5 and (small <= BLOCK).all()
    big = _image_blocks(2_500_000_000, 1_200_000_000, rng)  # > 10^9 goods at the top of the tree
    assert big.sum() == 1_200_000_000 and (big <= BLOCK).all()
    assert big.mean() / BLOCK == pytest.approx(0.48, abs=0.001)


def test_orders_cost_memory_per_file_not_per_clip() -> None:
    _, _, by_file, videos, images = population(num_clips=200_000, num_files=50)
    order = ShuffledOrder(by_file, videos, images, seed=7, epoch=0, window_files=5, image_fraction=0.3)
    order.at(0, 5000)
    objects = [order, order.videos, order.images]
    held = [v for o in objects for v in vars(o).values() if isinstance(v, np.ndarray) and v is not by_file]
    held += list(order._blocks.values())
    assert len(held) > 5 and max(len(v) for v in held) <= max(50 + 1, BLOCK)  # per file or per block, never per clip


def test_loader_state_records_its_order_format() -> None:
    state = LoaderState(2, 10, 5)
    assert state.order == ORDER_FORMAT == 2
    assert LoaderState.from_dict(state.to_dict()) == state
    old = LoaderState.from_dict({"epoch": 2, "position": 10, "step": 5})  # saved before formats were recorded
    assert old.order == 1
    with pytest.raises(ValueError, match="format 9"):
        LoaderState.from_dict({"epoch": 0, "position": 0, "order": 9})


def test_plan_step_reads_an_array_order_and_a_computed_one_alike() -> None:
    file_of, _, by_file, videos, images = population(num_clips=20000, num_files=20)
    tokens = np.random.default_rng(1).integers(1, 600, 20000)
    order = ShuffledOrder(by_file, videos, images, seed=7, epoch=0, window_files=4)
    state = LoaderState()
    for _ in range(5):  # steps spanning several PLAN_BLOCKs
        got = plan_step(tokens, order, state, 512, 1024)
        want = plan_step(tokens.tolist(), ArrayOrder(order.at(0, len(order))).order, state, 512, 1024)
        assert got == want
        state = LoaderState(0, got[2], 0)
    assert state.position > 4096  # crossed a block


def test_format_1_orders_are_the_arrays_runs_begun_before_used() -> None:
    file_of, is_image, *_ = population(num_clips=500, num_files=10)
    order = epoch_order(500, 7, 3, file_of, 4, is_image, 0.3)
    assert np.array_equal(ArrayOrder(order).at(0, len(order)), order)


def test_epoch_order_bench_runs_and_shows_format_2_holding_no_array_per_clip() -> None:
    """tests/bench/epoch_order.py at a small size: every run completes, plans the same-sized steps,
    and format 2's private memory is a fraction of the whole-array order's."""
    import json
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "tests/bench/epoch_order.py", "--clips", "400000", "--files", "400",
                          "--window", "8", "--steps", "3"], capture_output=True, text=True, check=True, timeout=600)
    runs = json.loads(out.stdout)["runs"]
    assert len(runs) == 9 and not [r for r in runs if "error" in r]
    for kind in range(3):
        before, fmt1, fmt2 = runs[3 * kind:3 * kind + 3]
        assert (before["format"], fmt1["format"], fmt2["format"]) == ("before", "format_1", "format_2")
        assert fmt2["private_mb"] < before["private_mb"] / 4  # 400k clips: ~15 MB of list + permutation
        assert fmt2["clips_per_step"] == pytest.approx(fmt1["clips_per_step"], rel=0.05)


def test_an_epoch_with_no_fitting_clip_is_an_error_not_an_endless_loop() -> None:
    # Images fit, every video is over the budget, and image_fraction 0 leaves the images out:
    # each epoch is all oversized; the planner rolled from epoch to epoch forever.
    from types import SimpleNamespace

    from training.data import plan_steps
    from training.index import DataError, group_by_file

    file_of, frames = np.array([0, 0, 1, 1]), np.array([9, 9, 1, 1])
    by_file, videos, images = group_by_file(file_of, frames, 2)
    index = SimpleNamespace(num_tokens=np.array([100, 100, 4, 4]), num_frames=frames, file_of=file_of,
                            by_file=by_file, file_videos=videos, file_images=images, data_uri="/d")
    for fmt in (1, 2):
        with pytest.raises(DataError, match=r"no clip of epoch 0's order .* fits a pack of 10 tokens.*image_fraction=0"):
            next(plan_steps(index, LoaderState(order=fmt), 1, 1, 10, 0, 0.0))
        plan = next(plan_steps(index, LoaderState(order=fmt), 1, 1, 10, 0, 0.5))  # with images it plans
        assert sorted(i for pk in plan.packs for i in pk) and set(plan.skipped) <= {0, 1}
