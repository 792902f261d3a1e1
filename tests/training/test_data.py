"""training/data.py: shard index, deterministic global steps, worker shares, exact resume, prefetch."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline import storage
from pipeline.shards import ShardError, read_shard, tensor, text_tokens
from tests import datasets
from tests.pipeline.test_shards import make_columns
from training.data import (
    FingerprintMismatch,
    Loader,
    LoaderState,
    Prefetcher,
    check_fingerprint,
    epoch_order,
    plan_steps,
)
from training.index import ShardIndex, group_by_file
from training.packing import plan_packs, unpack

PATCH = (1, 2, 2)
BUDGET = 48
PACKS = 4
# bucket → (latent shape (C, T', H', W'), rows per file); tokens with PATCH: 8, 24, 64 (over BUDGET)
BUCKETS = {
    "a": ((4, 2, 4, 4), [13, 11]),
    "b": ((4, 3, 4, 8), [10]),
    "big": ((4, 4, 8, 8), [6]),
}
TOKENS = {"a": 8, "b": 24, "big": 64}
FINGERPRINT = {"code_version": "git:test", "config_sha256": "c" * 64, "models": {"vae": {"weights": "sha:1"}}}


def write_dataset(out: Path) -> dict[str, Any]:
    """Small real shards (two files in one bucket, an oversized bucket), their records, index and manifest."""
    parts = []
    for k, (bucket, (shape, rows)) in enumerate(BUCKETS.items()):
        for part, n in enumerate(rows):
            cols = make_columns(n, bucket=bucket, seed=10 * k + part)
            rng = np.random.default_rng(100 + 10 * k + part)
            cols["latents"] = rng.standard_normal((n, *shape)).astype(np.float16)
            cols["clip_id"] = [f"clip-{bucket}-{part}-{i:03d}" for i in range(n)]
            parts.append(cols)
    return datasets.write_dataset(out, parts, FINGERPRINT)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    write_dataset(out)
    return out


@pytest.fixture(scope="module")
def index(data_dir: Path) -> ShardIndex:
    return ShardIndex.open(str(data_dir), PATCH, split="train")


def all_train_ids(data_dir: Path) -> dict[str, str]:
    """clip_id → bucket of every train clip, read the plain way."""
    ids = {}
    for path in sorted((data_dir / "shards").rglob("*.arrow")):
        t = read_shard(str(path))
        for c, s, b in zip(t.column("clip_id").to_pylist(), t.column("split").to_pylist(),
                           t.column("bucket").to_pylist()):
            if s == "train":
                ids[c] = b
    return ids


def loader(index: ShardIndex, **kw: Any) -> Loader:
    return Loader(index, **{"seed": 7, "packs_per_step": PACKS, "token_budget": BUDGET, **kw})


def step_ids(step: Any) -> list[str]:
    return sorted(c for ids in step.clip_ids for c in ids)


def epoch_steps(index: ShardIndex, epoch: int = 0, **kw: Any) -> list[Any]:
    """The global plans of one epoch."""
    plans = plan_steps(index, LoaderState(epoch, 0, 0), kw.get("seed", 7), PACKS, BUDGET, kw.get("window_shards", 0))
    out = []
    for p in plans:
        out.append(p)
        if p.state.epoch != epoch:
            return out
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------
# Index and order
# ---------------------------------------------------------------------------


def test_index_lists_clips_sorted_with_token_counts(data_dir: Path, index: ShardIndex) -> None:
    train = all_train_ids(data_dir)
    assert [c.clip_id for c in index.clips] == sorted(train)
    assert all(c.num_tokens == TOKENS[c.bucket] for c in index.clips)
    assert index.fingerprint == json.loads((data_dir / "manifest.json").read_text())["fingerprint"]["data_sha256"]
    everything = ShardIndex.open(str(data_dir), PATCH, split=None)
    val = ShardIndex.open(str(data_dir), PATCH, split="val")
    assert len(everything.clips) == len(index.clips) + len(val.clips) == sum(sum(r) for _, r in BUCKETS.values())
    assert val.clips and all(c.clip_id not in train for c in val.clips)


def test_columnar_index_matches_the_shards_and_eval_lists_clips_without_opening_one(data_dir: Path) -> None:
    """Every ClipRef made from the columns points at its own row; eval's real clips come from the index alone."""
    from eval.plan import real_clips

    idx = ShardIndex.open(str(data_dir), PATCH, split=None, scalars=True)
    clips = real_clips(idx, range(len(idx.clips)))
    assert idx.opened == 0  # the index said it all
    assert len(clips) == len(idx.clips) == len(idx.clip_ids)
    for ref, real in zip(idx.clips, clips):
        table = read_shard(str(data_dir / idx.files[ref.file]))
        row = table.slice(ref.row, 1).to_pylist()[0]
        assert (row["clip_id"], row["bucket"]) == (ref.clip_id, ref.bucket) == (real.clip_id, real.bucket)
        assert (row["split"], row["caption"], row["width_px"], row["height_px"], row["num_frames"]) == \
            (real.split, real.caption, real.width_px, real.height_px, real.num_frames)
    assert idx.clips[-1] == idx.clips[len(idx.clips) - 1] and list(idx.clips)[0] == idx.clips[0]
    with pytest.raises(IndexError):
        idx.clips[len(idx.clips)]
    small = idx.smallest_clip()
    assert small == min(idx.clips, key=lambda c: (c.num_tokens, c.clip_id))
    with pytest.raises(ValueError, match="scalars=True"):
        real_clips(ShardIndex.open(str(data_dir), PATCH, split=None), [0])


def test_index_naming_an_unknown_bucket_is_refused(tmp_path: Path, data_dir: Path) -> None:
    import shutil

    shutil.copytree(data_dir, tmp_path / "d")
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    del manifest["buckets"]["b"]
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="names bucket\\(s\\) the manifest does not, e.g. 'b'"):
        ShardIndex.open(str(tmp_path / "d"), PATCH, split=None)


def test_order_depends_on_seed_and_epoch_only() -> None:
    assert np.array_equal(epoch_order(50, 3, 1), epoch_order(50, 3, 1))
    assert not np.array_equal(epoch_order(50, 3, 1), epoch_order(50, 3, 2))
    assert not np.array_equal(epoch_order(50, 3, 1), epoch_order(50, 4, 1))
    assert sorted(epoch_order(50, 3, 1)) == list(range(50))


def test_shuffle_windows_keep_each_windows_shards_together() -> None:
    """window_shards=W: an epoch is windows of W whole shard files, clips shuffled inside each; W=0 is unchanged."""
    file_of = np.repeat(np.arange(10), 7)  # 10 files of 7 clips
    order = epoch_order(len(file_of), 3, 1, file_of, window_shards=3)
    assert sorted(order) == list(range(70))
    assert np.array_equal(order, epoch_order(70, 3, 1, file_of, 3))
    assert not np.array_equal(order, epoch_order(70, 3, 2, file_of, 3))
    windows = [order[i:i + 21] for i in (0, 21, 42)] + [order[63:]]  # 3, 3, 3 and 1 files
    files = [set(file_of[w].tolist()) for w in windows]
    assert [len(f) for f in files] == [3, 3, 3, 1] and set().union(*files) == set(range(10))
    assert files[0] != {0, 1, 2}  # the files themselves were permuted
    assert not np.array_equal(windows[0], np.sort(windows[0]))  # and the clips inside a window
    assert np.array_equal(epoch_order(70, 3, 1, file_of, 0), epoch_order(70, 3, 1))  # uniform as before


def test_same_seed_same_steps_other_epoch_other_steps(index: ShardIndex) -> None:
    run1 = [step_ids(s) for s in islice(loader(index), 3)]
    run2 = [step_ids(s) for s in islice(loader(index), 3)]
    epoch1 = [step_ids(s) for s in islice(loader(index, state=LoaderState(1, 0, 0)), 3)]
    assert run1 == run2 and run1 != epoch1


# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------


def test_epoch_takes_every_fitting_clip_once_and_skips_oversized(data_dir: Path, index: ShardIndex) -> None:
    train = all_train_ids(data_dir)
    fitting = sorted(c for c, b in train.items() if TOKENS[b] <= BUDGET)
    oversized = sorted(c for c, b in train.items() if TOKENS[b] > BUDGET)
    assert oversized, "the fixture must hold oversized train clips"
    plans = epoch_steps(index)
    seen = sorted(index.clips[i].clip_id for p in plans for pk in p.packs for i in pk)
    skipped = sorted(index.clips[i].clip_id for p in plans for i in p.skipped)
    assert seen == fitting and skipped == oversized
    assert plans[-1].state == LoaderState(1, 0, len(plans))  # the last step rolls the state over
    assert [p.step for p in plans] == list(range(len(plans)))
    ldr = loader(index)
    steps = list(islice(ldr, len(plans)))
    assert ldr.num_skipped == sum(s.num_skipped for s in steps) == len(oversized)


def test_packs_fit_budget_and_step_size(index: ShardIndex) -> None:
    plans = epoch_steps(index) + epoch_steps(index, epoch=1)
    for p in plans:
        assert 1 <= len(p.packs) <= PACKS
        assert all(sum(index.clips[i].num_tokens for i in pk) <= BUDGET for pk in p.packs)
    full = [p for p in plans if p.state.epoch == p.epoch]  # every step but an epoch's last
    assert full and all(len(p.packs) == PACKS for p in full)
    assert any(len(p.packs) < PACKS for p in plans)  # epoch 1 ends on a short step, which is kept
    # Greedy: a full step ends at the first clip that would need one pack more.
    for p, q in zip(plans, plans[1:]):
        if p.state.epoch == p.epoch:
            taken = [index.clips[i].num_tokens for pk in p.packs for i in pk]
            assert len(plan_packs(taken + [index.clips[q.packs[0][0]].num_tokens], BUDGET)) > PACKS \
                or q.skipped  # (or an oversized clip came first, which q then skipped)
    for step in islice(loader(index), len(plans)):
        assert len(step.packs) == step.num_packs <= PACKS
        assert all(b.num_packs == 1 and b.tokens.shape[0] == BUDGET and b.num_real_tokens <= BUDGET
                   for b in step.packs)


@pytest.mark.parametrize("window", [0, 2])
def test_worker_count_does_not_change_the_global_step(index: ShardIndex, window: int) -> None:
    n = len(epoch_steps(index, window_shards=window)) + 2  # across an epoch boundary
    one = [step_ids(s) for s in islice(loader(index, window_shards=window), n)]
    for world in (2, 4):
        shards = [list(islice(loader(index, rank=r, world_size=world, window_shards=window), n)) for r in range(world)]
        for k in range(n):
            assert sorted(c for w in shards for c in step_ids(w[k])) == one[k]
            assert sum(len(w[k].packs) for w in shards) == shards[0][k].num_packs
            assert all(len(w[k].packs) <= PACKS // world for w in shards)
    # Every worker knows the whole step's totals and (asked for) its clips in global pack order:
    # what the trainer logs without a collective.
    for world in (1, 2):
        ranks = [list(islice(loader(index, rank=r, world_size=world, all_clip_ids=True), 3)) for r in range(world)]
        for k in range(3):
            steps = [w[k] for w in ranks]
            mine = [c for s in steps for ids in s.clip_ids for c in ids]
            assert all(s.all_clip_ids == mine for s in steps)
            assert all(s.num_samples == len(mine) for s in steps)
            assert all(s.num_tokens == sum(b.num_real_tokens for t in steps for b in t.packs) for s in steps)
    assert next(iter(loader(index))).all_clip_ids is None
    with pytest.raises(ValueError, match="not divisible by 3 workers"):
        loader(index, world_size=3)
    with pytest.raises(ValueError, match="rank 2"):
        loader(index, rank=2, world_size=2)


@pytest.mark.parametrize("window", [0, 2])
def test_resume_with_other_worker_count_neither_skips_nor_repeats(index: ShardIndex, window: int) -> None:
    n, k = len(epoch_steps(index, window_shards=window)) + 3, 2
    straight = [[step_ids(s) for s in islice(loader(index, rank=r, world_size=2, window_shards=window), n)]
                for r in range(2)]
    straight_global = [sorted(a + b) for a, b in zip(*straight)]
    first = list(islice(loader(index, rank=0, world_size=2, window_shards=window), k + 1))
    saved = json.loads(json.dumps(first[k].state.to_dict()))  # through a checkpoint file
    state = LoaderState.from_dict(saved)
    assert state == first[k].state and state.step == k + 1
    resumed = [step_ids(s) for s in islice(loader(index, state=state, window_shards=window), n - k - 1)]
    assert resumed == straight_global[k + 1:]
    epoch0 = [c for ids in straight_global[:len(epoch_steps(index, window_shards=window))] for c in ids]
    assert len(epoch0) == len(set(epoch0))


@pytest.mark.parametrize("window", [0, 2])
def test_a_state_saved_before_order_formats_resumes_along_the_whole_array_order(index: ShardIndex,
                                                                               window: int) -> None:
    # trainer_state.json of runs begun before training/order.py has no "order": format 1, whose
    # steps take consecutive runs of epoch_order's array — the order those runs were trained on.
    state = LoaderState.from_dict({"epoch": 1, "position": 5, "step": 9})
    assert state.order == 1
    epoch, pos = 1, 5
    for plan in islice(plan_steps(index, state, 7, PACKS, BUDGET, window), 8):  # past the epoch end
        if plan.epoch != epoch:
            epoch, pos = plan.epoch, 0
        order = epoch_order(len(index.clips), 7, epoch, index.file_of, window)
        taken = [i for pk in plan.packs for i in pk] + plan.skipped
        assert taken and sorted(taken) == sorted(order[pos:pos + len(taken)].tolist())
        pos += len(taken)
        assert plan.state.order == 1  # and it stays format 1 through the next checkpoints
    assert epoch > 1  # across epoch ends
    new = [sorted(i for pk in p.packs for i in pk) for p in islice(plan_steps(
        index, LoaderState(1, 5, 9), 7, PACKS, BUDGET, window), 3)]
    old = [sorted(i for pk in p.packs for i in pk) for p in islice(plan_steps(index, state, 7, PACKS, BUDGET, window), 3)]
    assert new != old  # a new run's format-2 order is another order


def test_small_budget_without_fitting_clips_fails_clearly(index: ShardIndex, data_dir: Path) -> None:
    from training.index import DataError, check_data
    from training.loop import usable

    with pytest.raises(DataError, match="no clip .* fits a pack of 4 tokens"):
        next(iter(loader(index, token_budget=4)))
    with pytest.raises(DataError, match=r"no clip .* fits a pack of 4 tokens \(smallest has 8\); raise data.token_budget"):
        usable(index, 4)  # what a worker checks before its prefetch thread starts
    usable(index, 8)
    with pytest.raises(DataError, match="holds no clips of split 'Train'"):
        check_data(str(data_dir), "Train")


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def test_packed_tokens_unpack_to_the_stored_latents_and_text(data_dir: Path, index: ShardIndex) -> None:
    rows = {}
    for path in sorted((data_dir / "shards").rglob("*.arrow")):
        t = read_shard(str(path))
        for c, lat, txt in zip(t.column("clip_id").to_pylist(), tensor(t, "latents"), text_tokens(t)):
            rows[c] = (lat, txt)
    checked = 0
    for step in islice(loader(index, rank=1, world_size=2), 3):
        for batch, ids in zip(step.packs, step.clip_ids):
            for i, (x, c) in enumerate(zip(unpack(batch.tokens, batch), ids)):
                lat, txt = rows[c]
                assert x.dtype == torch.float32
                assert torch.equal(x, torch.from_numpy(lat.astype(np.float32)))
                text = batch.text[batch.text_offsets[i]:batch.text_offsets[i] + batch.text_lengths[i]]
                assert torch.equal(text, torch.from_numpy(txt.astype(np.float32)))
                checked += 1
    assert checked > 10


def test_bfloat16_latents_load_as_values_not_bit_patterns(tmp_path: Path) -> None:
    """`vae.latent_dtype: bfloat16` shards: the loader sees the latents' values (it once saw raw uint16 bits)."""
    from pipeline.steps import store_latents

    shape, n = BUCKETS["a"][0], 6
    z = torch.randn(n, *shape, generator=torch.Generator().manual_seed(3))
    cols = make_columns(n, bucket="a", seed=3)
    cols["latents"] = [store_latents(z[i], "bfloat16") for i in range(n)]
    cols["clip_id"] = [f"clip-bf16-{i}" for i in range(n)]
    datasets.write_dataset(tmp_path, [cols], FINGERPRINT)
    idx = ShardIndex.open(str(tmp_path), PATCH, split=None)
    for clip in idx.clips:
        latents, _, _ = idx.load(clip)
        want = z[int(clip.clip_id.rsplit("-", 1)[1])]
        assert latents.dtype == torch.float32
        assert torch.equal(latents, want.to(torch.bfloat16).float())
        assert latents.abs().max() < 10  # bit patterns read as numbers are ~1e4


def test_open_shards_stay_within_the_lru_bounds_and_maps_are_released(tmp_path: Path) -> None:
    """Many shard files, few allowed open: every clip still loads right, and the process's maps stay bounded."""
    import gc

    parts = datasets.one_bucket_parts(24, 2, BUCKETS["a"][0])
    datasets.write_dataset(tmp_path, parts, FINGERPRINT)
    want = datasets.latents_by_clip(parts)
    shard_dir = str(tmp_path / "shards")

    def maps(bound: int = 3) -> int:
        def count() -> int:
            return sum(shard_dir in line for line in Path("/proc/self/maps").read_text().splitlines())
        n = count()
        if n > bound:  # a full gc in a long pytest process takes ~1 s: only when the count is over
            gc.collect()
            n = count()
        return n

    idx = ShardIndex.open(str(tmp_path), PATCH, split=None, max_open_shards=3)
    for rnd in range(2):  # twice over: closed shards reopen
        for clip in idx.clips:
            latents, _, _ = idx.load(clip)
            assert torch.equal(latents, torch.from_numpy(want[clip.clip_id].astype(np.float32)))
            assert idx.num_open <= 3 and maps() <= 3
    assert len(idx.files) == 24 and idx.opened == 48
    one = ShardIndex.open(str(tmp_path), PATCH, split=None, max_open_bytes=1)  # bytes bound: one at a time
    for clip in one.clips[:6]:
        one.load(clip)
        assert one.num_open == 1
    del idx, one
    assert maps(bound=0) == 0


def test_damaged_missing_and_non_finite_shards_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each shard is checked when first opened; bad latents are refused with file and row."""
    import shutil

    parts = datasets.one_bucket_parts(5, 3, BUCKETS["a"][0], id_format="clip-{part}-{i}")
    parts[4]["latents"][1, 0, 0, 0, 0] = np.nan
    datasets.write_dataset(tmp_path, parts, FINGERPRINT)
    idx = ShardIndex.open(str(tmp_path), PATCH, split=None)
    by_part = {int(c.clip_id.split("-")[1]): c for c in idx.clips if c.clip_id.endswith("-1")}
    path = {p: tmp_path / idx.files[c.file] for p, c in by_part.items()}
    for p in (0, 1, 2, 3):
        idx.load(by_part[p])  # all good first
    once = ShardIndex.open(str(tmp_path), PATCH, split=None, max_open_shards=1, verify=True)
    hashed: list[str] = []
    real_sha256 = storage.sha256
    monkeypatch.setattr(storage, "sha256", lambda uri: hashed.append(uri) or real_sha256(uri))
    for p in (0, 3, 0, 3):  # reopened after eviction: a verified shard is not hashed again
        once.load(by_part[p])
    assert len(hashed) == 2 and once.opened == 4
    data = path[0].read_bytes()
    path[0].write_bytes(data[: len(data) // 2])  # truncated
    path[1].unlink()  # missing
    flipped = bytearray(path[2].read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # same size, other bytes
    path[2].write_bytes(bytes(flipped))
    footer = bytearray(path[3].read_bytes())
    footer[-3:] = b"XYZ"  # the trailing magic: not an Arrow file any more
    path[3].write_bytes(bytes(footer))
    fresh = ShardIndex.open(str(tmp_path), PATCH, split=None)
    with pytest.raises(ShardError, match=rf"{path[0].name}: \d+ bytes, committed with {len(data)} .*re-run the pipeline"):
        fresh.load(by_part[0])
    with pytest.raises(ShardError, match=rf"{path[1].name}: shard missing"):
        fresh.load(by_part[1])
    fresh.load(by_part[2])  # sizes only: not seen ...
    checked = ShardIndex.open(str(tmp_path), PATCH, split=None, verify=True)
    with pytest.raises(ShardError, match=rf"{path[2].name}: content differs from its committed sha256"):
        checked.load(by_part[2])  # ... verify sees it

    with pytest.raises(ShardError, match=rf"{path[3].name}: not a readable Arrow shard"):
        fresh.load(by_part[3])
    with pytest.raises(ShardError, match=rf"{path[4].name} row \d+ \(clip clip-4-1\): latents hold NaN or inf"):
        fresh.load(by_part[4])
    shutil.rmtree(tmp_path)


def test_prefetch_yields_the_same_steps_and_reports_wait(index: ShardIndex) -> None:
    n = 6
    plain = [(s.step, s.clip_ids, s.state) for s in islice(loader(index, rank=1, world_size=2), n)]
    pre = Prefetcher(iter(loader(index, rank=1, world_size=2)), depth=2)
    try:
        fetched = [(s.step, s.clip_ids, s.state) for s in islice(pre, n)]
    finally:
        pre.close()
    assert fetched == plain
    assert pre.wait_s >= 0.0 and pre.last_wait_s >= 0.0
    finite = Prefetcher(islice(loader(index), 2), depth=1)
    assert len(list(finite)) == 2  # ends when its source ends


def test_prefetch_raises_the_producer_error_in_the_consumer() -> None:
    def broken():
        yield from ()
        raise RuntimeError("shard vanished")

    with pytest.raises(RuntimeError, match="shard vanished"):
        next(Prefetcher(broken()))


def test_fingerprint_check(data_dir: Path, index: ShardIndex) -> None:
    current = index.fingerprint
    check_fingerprint(current, index.manifest, allow_mismatch=False)
    with pytest.raises(FingerprintMismatch) as e:
        check_fingerprint("f" * 64, index.manifest, allow_mismatch=False)
    assert "f" * 64 in str(e.value) and current in str(e.value)
    check_fingerprint("f" * 64, index.manifest, allow_mismatch=True)


# ---------------------------------------------------------------------------
# Joint image-video order (data.image_fraction)
# ---------------------------------------------------------------------------


def test_image_fraction_mixes_images_into_one_pass_over_the_videos() -> None:
    is_image = np.zeros(100, bool)
    is_image[::10] = True  # 10 images, 90 videos
    base = epoch_order(100, 3, 1)
    up = epoch_order(100, 3, 1, is_image=is_image, image_fraction=0.5)
    assert len(up) == 180 and is_image[up].sum() == 90  # half of the epoch's clips are images
    assert np.array_equal(up[~is_image[up]], base[~is_image[base]])  # every video once, in the same order
    counts = np.bincount(up[is_image[up]], minlength=100)[is_image]
    assert counts.tolist() == [9] * 10  # 90 draws over 10 images: each image 9 times (whole cycles)
    assert np.array_equal(up, epoch_order(100, 3, 1, is_image=is_image, image_fraction=0.5))  # deterministic
    assert not np.array_equal(up, epoch_order(100, 3, 2, is_image=is_image, image_fraction=0.5))
    down = epoch_order(100, 3, 1, is_image=is_image, image_fraction=0.05)
    assert is_image[down].sum() == 5 and len(set(down[is_image[down]].tolist())) == 5  # 5 of 10, none twice
    first_half, second_half = np.array_split(np.flatnonzero(is_image[up]), 2)
    assert abs(len(first_half) - len(second_half)) <= 1  # images spread over the epoch, not bunched
    assert np.flatnonzero(is_image[up])[0] < 20 and np.flatnonzero(is_image[up])[-1] > 160
    assert np.array_equal(epoch_order(100, 3, 1, is_image=is_image, image_fraction=None), base)
    assert np.array_equal(epoch_order(10, 3, 1, is_image=np.ones(10, bool), image_fraction=0.5),
                          epoch_order(10, 3, 1))  # nothing to mix


def test_image_fraction_in_the_step_plan_is_the_same_for_any_worker_count(data_dir: Path) -> None:
    # Clips of 1-frame buckets are images: here the 8-token bucket "a" stands in (24 clips of 34).
    index = ShardIndex.open(str(data_dir), PATCH, split="train")
    assert index.num_frames.tolist() == [9] * len(index.num_frames)  # read from the clip index
    index.num_frames = np.where(np.array(index.bucket_names)[index.bucket_code] == "a", 1, 9)
    index.by_file, index.file_videos, index.file_images = group_by_file(index.file_of, index.num_frames,
                                                                        len(index.files))
    is_image = index.num_frames == 1
    plans = list(islice(plan_steps(index, LoaderState(), 7, PACKS, BUDGET, image_fraction=0.25), 40))
    drawn = [c for p in plans if p.epoch == 0 for pack in p.packs for c in pack]
    videos = [c for c in drawn if not is_image[c]]
    assert sorted(videos) == sorted(np.flatnonzero(~is_image & (index.num_tokens <= BUDGET)).tolist())
    skipped = [c for p in plans if p.epoch == 0 for c in p.skipped]  # the oversized "big" videos
    assert is_image[drawn].sum() / (len(drawn) + len(skipped)) == pytest.approx(0.25, abs=0.05)
    one = [step_ids(s) for s in islice(loader(index, image_fraction=0.25), 6)]
    two = [sorted(step_ids(a) + step_ids(b)) for a, b in zip(
        islice(loader(index, image_fraction=0.25, rank=0, world_size=2), 6),
        islice(loader(index, image_fraction=0.25, rank=1, world_size=2), 6))]
    assert one == two  # the global plan does not depend on how many workers share it
    plain = [step_ids(s) for s in islice(loader(index), 6)]
    assert plain != one  # and the fraction does change it
