"""Remote shards through the node-local cache, on a real S3 server (moto): once per node, bounded, ahead of need."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from pipeline.shards import ShardError
from tests import datasets
from training.cache import ShardCache
from training.clipreads import ClipReads
from training.data import Loader
from training.index import ShardIndex

PATCH = (1, 2, 2)
SHAPE = (4, 2, 4, 4)  # 8 tokens per clip with PATCH
FINGERPRINT = {"code_version": "git:test", "config_sha256": "c" * 64, "models": {"vae": {"weights": "sha:1"}}}


def upload(local: Path, bucket: str) -> str:
    from tests.conftest import s3fs

    fs = s3fs()
    fs.create_dir(bucket)
    pafs.copy_files(str(local), f"{bucket}/data", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return f"s3://{bucket}/data"


@pytest.fixture(scope="module")
def remote(s3_env: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, np.ndarray], Path]:
    """12 shard files of 3 clips on S3; clip_id → latents; the local copy."""
    local = tmp_path_factory.mktemp("cache-data")
    parts = datasets.one_bucket_parts(12, 3, SHAPE)
    datasets.write_dataset(local, parts, FINGERPRINT)
    return upload(local, "cache-test"), datasets.latents_by_clip(parts), local


def shard_bytes(local: Path) -> list[int]:
    return [p.stat().st_size for p in sorted(local.glob("shards/*/*.arrow"))]


def test_remote_shards_are_downloaded_once_and_read_right(remote: tuple, tmp_path: Path) -> None:
    uri, want, local = remote
    index = ShardIndex.open(uri, PATCH, split=None)
    cache = ShardCache(str(tmp_path / "cache"), 1 << 30)
    index.use_cache(cache)
    loader = Loader(index, seed=1, packs_per_step=2, token_budget=24, fetch_ahead=2)
    seen = 0
    for step in loader:
        for pack, ids in zip(step.packs, step.clip_ids):
            assert len(ids) == pack.num_samples
        seen += sum(map(len, step.clip_ids))
        if seen >= 2 * len(want):  # two epochs
            break
    for clip in index.clips:
        latents, _, _ = index.load(clip)
        assert torch.equal(latents, torch.from_numpy(want[clip.clip_id].astype(np.float32)))
    assert cache.downloads == len(index.files) == 12  # the second epoch found every shard cached
    assert cache.downloaded_bytes == sum(shard_bytes(local))
    cache.close()


def test_the_shards_of_the_next_steps_are_asked_for_before_a_step_is_built(remote: tuple) -> None:
    uri, _, _ = remote
    index = ShardIndex.open(uri, PATCH, split=None)
    events: list[tuple[str, object]] = []
    index.prefetch = lambda files: events.append(("fetch", tuple(files)))  # type: ignore[method-assign]
    loader = Loader(index, seed=1, packs_per_step=2, token_budget=24, fetch_ahead=3)
    build = loader.build
    loader.build = lambda plan: events.append(("build", plan.step)) or build(plan)  # type: ignore[method-assign]
    steps = iter(loader)
    plans = [p for p, _ in zip(loader.plans(), range(8))]
    for _ in range(4):
        next(steps)
    fetched = [e[1] for e in events if e[0] == "fetch"]
    assert fetched == [tuple(loader.files(p)) for p in plans[:len(fetched)]]
    for k, event in enumerate(e for e in events if e[0] == "build"):
        before = events[:events.index(event)]
        assert sum(e[0] == "fetch" for e in before) >= event[1] + 1 + 3  # steps ≤ this one + 3 ahead


def test_a_small_cache_stays_within_its_bytes_and_still_reads_right(remote: tuple, tmp_path: Path) -> None:
    uri, want, local = remote
    limit = 3 * max(shard_bytes(local))
    cache = ShardCache(str(tmp_path / "cache"), limit)
    index = ShardIndex.open(uri, PATCH, split=None, max_open_shards=1)
    index.use_cache(cache)
    for _ in range(2):
        for clip in index.clips:
            latents, _, _ = index.load(clip)
            assert torch.equal(latents, torch.from_numpy(want[clip.clip_id].astype(np.float32)))
            assert sum(p.stat().st_size for p in (tmp_path / "cache").glob("*.arrow")) <= limit
    assert cache.downloads == 24  # evicted shards come back when needed again
    cache.close()


def _load_all(uri: str, cache_dir: str, queue: multiprocessing.Queue) -> None:
    index = ShardIndex.open(uri, PATCH, split=None)
    cache = ShardCache(cache_dir, 1 << 30, threads=4)
    index.use_cache(cache)
    index.prefetch(list(range(len(index.files))))  # both processes ask for everything at once
    for clip in index.clips:
        index.load(clip)
    queue.put((cache.downloads, cache.hits))
    cache.close()


def test_workers_of_a_node_share_one_download_per_shard(remote: tuple, tmp_path: Path) -> None:
    uri, _, _ = remote
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load_all, args=(uri, str(tmp_path / "cache"), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sum(d for d, _ in results) == 12  # each shard downloaded by exactly one of the three
    assert not list((tmp_path / "cache").glob("*.part-*"))


def test_missing_and_resized_remote_shards_are_named(remote: tuple, tmp_path: Path) -> None:
    from tests.conftest import s3fs

    uri, _, local = remote
    copy = upload(local, "cache-damaged")
    fs = s3fs()
    index = ShardIndex.open(copy, PATCH, split=None)
    index.use_cache(ShardCache(str(tmp_path / "cache"), 1 << 30))
    gone, short = index.files[0], index.files[1]
    fs.delete_file(f"cache-damaged/data/{gone}")
    with fs.open_output_stream(f"cache-damaged/data/{short}") as f:
        f.write(b"x" * 100)
    by_file = {c.file: c for c in index.clips}
    with pytest.raises(ShardError, match=rf"{gone}: shard missing"):
        index.load(by_file[0])
    with pytest.raises(ShardError, match=rf"{short}: 100 bytes, committed with \d+"):
        index.load(by_file[1])
    index.load(by_file[2])  # the others still load
    assert not list((tmp_path / "cache").glob("*.part-*"))


@pytest.mark.parametrize("window", [2, 0])
def test_shuffle_windows_download_each_shard_once_per_epoch_with_a_small_cache(remote: tuple, tmp_path: Path,
                                                                             window: int) -> None:
    """A cache of 8 of 12 shards: windows of 2 shards → 12 downloads an epoch; a uniform order → many more."""
    uri, _, local = remote
    cache = ShardCache(str(tmp_path / "cache"), 8 * max(shard_bytes(local)))
    index = ShardIndex.open(uri, PATCH, split=None, max_open_shards=2)  # re-reads must go through the cache
    index.use_cache(cache)
    # fetch_ahead=0: nothing of the next epoch is fetched before the count below
    loader = Loader(index, seed=3, packs_per_step=2, token_budget=24, fetch_ahead=0, window_shards=window)
    clips = 0
    for step in loader:
        clips += sum(map(len, step.clip_ids))
        if step.state.epoch > 0:  # the epoch's last step
            break
    assert clips == 36
    if window:
        assert cache.downloads == 12
    else:
        assert cache.downloads > 12
    cache.close()


def test_half_downloads_of_dead_processes_are_removed_and_live_ones_counted(tmp_path: Path) -> None:
    """A killed worker leaves `<key>.arrow.part-<pid>-<thread>`; eviction removes it, and counts a live one."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    cache = ShardCache(str(tmp_path), 1000)
    (tmp_path / f"a.arrow.part-{int(dead.stdout)}-1").write_bytes(b"x" * 600)  # its writer is gone
    (tmp_path / f"b.arrow.part-{os.getpid()}-1").write_bytes(b"x" * 300)  # ours: in flight
    (tmp_path / "c.arrow").write_bytes(b"x" * 500)
    cache._make_room(300)  # 300 in flight + 500 cached + 300 new > 1000: the cached shard goes
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [f"b.arrow.part-{os.getpid()}-1"]
    cache.close()


# -- clip by clip: one ranged read per clip (training/clipreads.py) ---------------------------


def test_a_uniform_order_reads_each_clip_by_range_never_a_whole_shard(remote: tuple) -> None:
    uri, want, local = remote
    index = ShardIndex.open(uri, PATCH, split=None)
    reads = ClipReads(1 << 30, threads=4)
    index.use_clip_reads(reads)
    loader = Loader(index, seed=3, packs_per_step=2, token_budget=24, fetch_ahead=2, window_shards=0)
    seen: dict[str, int] = {}
    for step in loader:
        for ids in step.clip_ids:
            for cid in ids:
                seen[cid] = seen.get(cid, 0) + 1
        if step.state.epoch > 0:
            break
    assert sorted(seen) == sorted(want) and set(seen.values()) == {1}
    for clip in index.clips:
        latents, _, _ = index.load(clip)
        assert torch.equal(latents, torch.from_numpy(want[clip.clip_id].astype(np.float32)))
    assert index.opened == 0 and not reads.whole_files  # no shard was read whole
    assert reads.fetched == len(want) == 36  # each clip fetched once (the second pass hit memory)
    # one GET per clip (its byte range) + one HEAD per shard + the bucket's schema (HEAD, two footer reads)
    assert reads.requests == 36 + 12 + 3
    batches = sum(int(n) for n in index.batch_bytes)
    assert 0 < reads.downloaded_bytes - batches < 8192  # the clips' bytes + one footer; less than the shards
    assert reads.downloaded_bytes < sum(shard_bytes(local))
    reads.close()

    index.batch_offset = index.batch_bytes = np.zeros(0, np.int64)  # as an index without byte ranges (older data)
    few = ClipReads(1 << 30, threads=4, max_open=2)  # per shard footer; readers come and go: footers read again
    index.use_clip_reads(few)
    for i in np.random.default_rng(0).permutation(36):
        latents, _, _ = index.load(index.clips[int(i)])
        assert torch.equal(latents, torch.from_numpy(want[index.clips[int(i)].clip_id].astype(np.float32)))
    assert few.fetched == 36 and 36 + 3 * 12 < few.requests <= 36 + 3 * 36
    few.close()


def test_clip_reads_stay_within_their_bytes_and_are_fetched_ahead(remote: tuple) -> None:
    uri, want, _ = remote
    index = ShardIndex.open(uri, PATCH, split=None)
    one = index.clips[0]
    reads = ClipReads(1, threads=2)  # holds a single clip at a time
    index.use_clip_reads(reads)
    index.prefetch_clips([0])
    pending = reads._pending.get((one.file, one.row))
    if pending is not None:
        pending.result()
    before = reads.requests
    latents, _, _ = index.load(one)  # fetched ahead: no read now
    assert reads.requests == before and reads.fetched == 1
    assert torch.equal(latents, torch.from_numpy(want[one.clip_id].astype(np.float32)))
    for clip in index.clips[1:4]:
        index.load(clip)
    assert len(reads._batches) == 1  # the byte bound evicts all but the newest
    index.load(one)
    assert reads.fetched == 5  # evicted, so fetched again
    reads.close()


def test_shards_of_the_old_layout_are_read_whole_through_the_cache(s3_env: dict, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.writer

    monkeypatch.setattr(pipeline.writer, "ROWS_PER_BATCH", 64)  # as shards were written before one clip per batch
    parts = datasets.one_bucket_parts(3, 3, SHAPE)
    datasets.write_dataset(tmp_path / "old", parts, FINGERPRINT)
    uri = upload(tmp_path / "old", "clipreads-old")
    index = ShardIndex.open(uri, PATCH, split=None)
    cache, reads = ShardCache(str(tmp_path / "cache"), 1 << 30), ClipReads(1 << 30)
    index.use_cache(cache)
    index.use_clip_reads(reads)
    want = datasets.latents_by_clip(parts)
    for clip in index.clips:
        latents, _, _ = index.load(clip)
        assert torch.equal(latents, torch.from_numpy(want[clip.clip_id].astype(np.float32)))
    assert reads.whole_files == {0, 1, 2} and reads.fetched == 0 and cache.downloads == 3
    cache.close()
    reads.close()


def test_clip_reads_name_a_missing_resized_or_swapped_shard(remote: tuple, tmp_path: Path) -> None:
    from tests.conftest import s3fs

    uri, _, local = remote
    copy = upload(local, "clipreads-damaged")
    fs = s3fs()
    index = ShardIndex.open(copy, PATCH, split=None)
    index.use_clip_reads(ClipReads(1 << 30))
    gone, short, a = index.files[:3]
    fs.delete_file(f"clipreads-damaged/data/{gone}")
    with fs.open_output_stream(f"clipreads-damaged/data/{short}") as f:
        f.write(b"x" * 100)
    by_file = {c.file: c for c in index.clips}
    wrong = by_file[2].clip_id[:-1] + ("0" if by_file[2].clip_id[-1] != "0" else "1")
    data = (local / a).read_bytes().replace(by_file[2].clip_id.encode(), wrong.encode())  # same size, other clip
    with fs.open_output_stream(f"clipreads-damaged/data/{a}") as f:
        f.write(data)
    with pytest.raises(ShardError, match=rf"{gone}: shard missing"):
        index.load(by_file[0])
    with pytest.raises(ShardError, match=rf"{short}: 100 bytes, committed with \d+"):
        index.load(by_file[1])
    with pytest.raises(ShardError, match=rf"{a}: row \d+ holds clip '{wrong}', the clip index says"):
        index.load(by_file[2])
    index.load(by_file[4])  # the others still load
    index.clip_reads.close()


def test_remote_reads_setting_picks_clips_for_a_uniform_order_and_names_its_values() -> None:
    from pipeline.config import from_dict
    from training.settings import TrainConfig

    def data(**kw):
        return from_dict(TrainConfig, {"data": kw}).data

    assert data().reads_clips()  # uniform order (window 0)
    assert not data(shuffle_window_shards=16).reads_clips()
    assert not data(verify=True).reads_clips()  # a sha256 needs the whole file
    assert data(remote_reads="clips", shuffle_window_shards=16).reads_clips()
    assert not data(remote_reads="shards").reads_clips()
    with pytest.raises(ValueError, match=r"data.remote_reads must be one of \['auto', 'shards', 'clips'\], got 'fast'"):
        data(remote_reads="fast")
