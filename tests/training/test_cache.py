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
