"""The training loader at corpus scale: index open, bounded shard maps, step planning; prints JSON.

    python tests/bench/loader_scale.py [--clips 1000000] [--index-shards 100000]
                                       [--touch-shards 100000] [--packs 64,256,1024]

1. `index_open_s`, `index_rss_mb`: a synthetic clip index of `--clips` clips over
   `--index-shards` shard files (the pipeline's index schema and manifest, 12 buckets, 40-char
   clip ids; no shard needs to exist to open it), opened by `ShardIndex.open` in a fresh process.
   RSS is the process's growth from before the open to after it (imports excluded).
   Goals: ≤ 10 s, ≤ 1024 MB. Then as training workers open it (`shared_builder`: the node's
   first worker builds the memory-mapped copy; `shared_mapper`: the others map it):
   `index_private_mb` is the growth of memory no other process shares.
2. `touch`: `--touch-shards` real shard files (one tiny clip each, the real shard writer) all
   loaded once through one ShardIndex with the default LRU bounds: `max_open_shards_observed`
   and the process's peak memory-map count (Linux's default limit is 65,530).
3. `plan_step_s` at each of `--packs` packs per step (tests/bench/plan_step.py's measure).
4. `remote`: `--remote-shards` shards on a local S3 server (moto) read through the node cache
   (training/cache.py) sized `--cache-fraction` of the dataset, fetched 4 steps ahead, by a
   consumer that spends tokens / `--consumer-tokens-per-s` seconds per step:
   `remote_data_wait_fraction` (time blocked on data after the first 5 steps ÷ wall; goal ≤ 0.01)
   and `download_amplification` (bytes downloaded ÷ bytes of the shards each epoch's steps
   read, a shard counted once per epoch; goal ≤ 1.05), for the shuffle window given and for a
   uniform order (window 0) on the same data and cache, through the cache and clip by clip
   (`data.remote_reads: clips`: each clip's record batch by one ranged GET; amplification is
   then bytes downloaded ÷ bytes of the clips' stored batches, a clip counted once per epoch).
Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline.manifest import INDEX_SCHEMA, build_manifest, write_manifest  # noqa: E402

PATCH = (1, 2, 2)
BUCKETS = {f"b{k:02d}": [16, 1 + 4 * (k % 4), 8 + 4 * (k // 4), 8 + 4 * (k % 3)] for k in range(12)}  # (C, T', H', W')


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def synthetic_index(out: Path, num_clips: int, num_shards: int, seed: int = 0, buckets: dict | None = None,
                    shard_bytes: int = 0, shard_sha256: str = "") -> np.ndarray:
    """manifest.json + a clip index of num_clips rows over num_shards files (no shard written).

    Returns the shard paths. num_clips == num_shards: one clip per shard (row 0); given
    shard_bytes / shard_sha256 are every shard's committed size and checksum.
    """
    rng = np.random.default_rng(seed)
    buckets = buckets or BUCKETS
    names = sorted(buckets)
    shard = (np.arange(num_clips) if num_clips == num_shards  # clips of one shard are contiguous rows
             else np.sort(rng.integers(0, num_shards, num_clips)))
    bucket_of_shard = rng.integers(0, len(names), num_shards)
    bucket = bucket_of_shard[shard]
    row = np.arange(num_clips) - np.searchsorted(shard, shard, side="left")
    paths = np.array([f"shards/{names[bucket_of_shard[s]]}/w{s % 64:03d}-part-{s:06d}.arrow"
                      for s in range(num_shards)], dtype=object)
    ids = [f"{x:032x}-{f:06d}-9" for x, f in zip(rng.integers(0, 2**63, num_clips), rng.integers(0, 10**6, num_clips))]
    n = num_clips
    cols = {
        "clip_id": ids, "source_id": [i[:32] for i in ids], "source_uri": [f"s3://corpus/v/{i[:12]}.mp4" for i in ids],
        "split": np.where(rng.random(n) < 0.01, "val", "train"), "bucket": np.array(names, dtype=object)[bucket],
        "shard": paths[shard], "row": row,
        "shard_bytes": np.full(n, shard_bytes) if shard_bytes else rng.integers(2**20, 2**28, num_shards)[shard],
        "shard_sha256": np.full(n, shard_sha256, dtype=object) if shard_sha256 else np.array(
            [hashlib.sha256(str(s).encode()).hexdigest() for s in range(num_shards)], dtype=object)[shard],
        "num_frames": np.full(n, 33), "height_px": np.full(n, 256), "width_px": np.full(n, 448),
        "fps": np.full(n, 16.0), "start_s": np.zeros(n), "end_s": np.full(n, 2.0),
        "latent_shape": [buckets[names[b]] for b in bucket], "num_tokens": np.full(n, 256),
        "caption": [f"caption {i}" for i in range(n)], "caption_source": np.full(n, "clip", dtype=object),
        "clip_score": rng.uniform(15, 35, n), "clip_bytes": np.full(n, 40000), "source_meta": np.full(n, "", dtype=object),
    }
    missing = [f for f in INDEX_SCHEMA if f.name not in cols]  # curation scores: nulls, as on old data
    table = pa.table({f.name: pa.array(cols[f.name], f.type) if f.name in cols else pa.nulls(n, f.type)
                      for f in INDEX_SCHEMA}, schema=INDEX_SCHEMA)
    assert all(f.nullable for f in missing), [f.name for f in missing if not f.nullable]
    digest = hashlib.sha256(f"synthetic {num_clips} {num_shards} {seed}".encode()).hexdigest()
    counts = np.bincount(bucket, minlength=len(names))
    totals = {"sources": n, "sources_with_clips": n, "clips": n,
              "clips_by_bucket": {b: int(c) for b, c in zip(names, counts) if c}}
    shapes = {b: {"latents": s, "text_embedding": [77, 64], "image_embedding": [64]} for b, s in buckets.items()}
    files = {b: int(c) for b, c in zip(names, np.bincount(bucket_of_shard, minlength=len(names)))}
    manifest = build_manifest(digest=digest, totals=totals, bucket_specs={}, bucket_shapes=shapes, shard_files=files,
                              fingerprint={"models": {"vae": {"weights": "random-init"}}})
    (out / manifest["files"]["index"]).mkdir(parents=True)
    pq.write_table(table, out / manifest["files"]["index"] / "part-00000.parquet", row_group_size=128 * 1024)
    write_manifest(str(out), manifest, "synthetic: true\n")
    return paths


def private_mb() -> float:
    """This process's unique set size (pages no other process shares: not a mapped file's)."""
    import psutil

    return psutil.Process().memory_full_info().uss / 2**20


def open_in_child(data: Path, shared_dir: str | None = None) -> dict:
    """`ShardIndex.open` in this process (run as a child: fresh RSS); with `shared_dir`, the node's
    memory-mapped copy (built by the first child, mapped by the next)."""
    from training.index import ShardIndex

    before, before_private = rss_mb(), private_mb()
    t = time.perf_counter()
    index = ShardIndex.open(str(data), PATCH, split="train", shared_dir=shared_dir)
    seconds = time.perf_counter() - t
    return {"index_open_s": round(seconds, 2), "index_rss_mb": round(rss_mb() - before, 1),
            "index_private_mb": round(private_mb() - before_private, 1),
            "process_rss_mb": round(rss_mb(), 1), "clips": len(index.clips), "shard_files": len(index.files),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def touch_shards(out: Path, num_shards: int) -> dict:
    """num_shards one-clip shard files (one real shard's bytes, written to every path), then
    every clip loaded once through one ShardIndex with its default bounds."""
    from pipeline.shards import clips_table, table_bytes
    from tests.pipeline.test_shards import LATENT_SHAPE, make_columns
    from training.index import ShardIndex

    t = time.perf_counter()
    data = table_bytes(clips_table("b00", make_columns(1, bucket="b00", seed=0)))
    paths = synthetic_index(out, num_shards, num_shards, buckets={"b00": list(LATENT_SHAPE)}, shard_bytes=len(data),
                            shard_sha256=hashlib.sha256(data).hexdigest())
    (out / "shards" / "b00").mkdir(parents=True)
    for path in paths:
        (out / path).write_bytes(data)
    write_s = time.perf_counter() - t
    index = ShardIndex.open(str(out), PATCH, split=None)
    most_open, most_maps = 0, 0
    t = time.perf_counter()
    for i, clip in enumerate(index.clips):
        index.load(clip)
        most_open = max(most_open, index.num_open)
        if i % 1000 == 0:
            most_maps = max(most_maps, sum(1 for _ in open("/proc/self/maps")))
    return {"shards": len(index.files), "write_s": round(write_s, 1), "load_all_s": round(time.perf_counter() - t, 1),
            "max_open_shards": index.max_open_shards, "max_open_shards_observed": most_open,
            "peak_memory_maps": most_maps, "opened": index.opened}


def remote_reads(tmp: Path, num_shards: int, clips_per_shard: int, cache_fraction: float, tokens_per_s: float,
                 steps: int, max_open: int, windows: list[int]) -> dict:
    """A dataset on a local S3 server (moto), read through the node cache by a consumer of fixed speed."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    from tests.datasets import write_dataset
    from tests.pipeline.test_shards import make_columns

    shape = (16, 2, 16, 16)  # 128 tokens per clip with PATCH; ~16 KB of float16 latents
    local = tmp / "remote-src"
    parts = []
    for part in range(num_shards):
        cols = make_columns(clips_per_shard, bucket="b00", seed=part)
        cols["latents"] = np.random.default_rng(part).standard_normal((clips_per_shard, *shape)).astype(np.float16)
        cols["clip_id"] = [f"clip-{part:05d}-{i:03d}" for i in range(clips_per_shard)]
        parts.append(cols)
    write_dataset(local, parts, {"models": {"vae": {"weights": "random-init"}}})
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x",
                           "AWS_SECRET_ACCESS_KEY": "x", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
        fs = pafs.S3FileSystem(endpoint_override=f"http://127.0.0.1:{port}", scheme="http", access_key="x",
                               secret_key="x", region="us-east-1", allow_bucket_creation=True)
        fs.create_dir("bench")
        pafs.copy_files(str(local), "bench/data", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        dataset_bytes = sum(p.stat().st_size for p in local.glob("shards/*/*.arrow"))
        out = {f"shuffle_window_shards={w}": consume(tmp / f"cache-{w}", dataset_bytes, cache_fraction, tokens_per_s,
                                                     steps, max_open, w) for w in windows}
        out["shuffle_window_shards=0, remote_reads=clips"] = consume(
            tmp / "cache-clips", dataset_bytes, cache_fraction, tokens_per_s, steps, max_open, 0, batch_bytes(local))
        return out
    finally:
        server.stop()


def batch_bytes(local: Path) -> dict[tuple[str, int], int]:
    """(shard path relative to the dataset, row) → bytes of that clip's record batch as stored."""
    class Counted:
        def __init__(self, f):
            self.f, self.n = f, 0

        def read(self, n=-1):
            data = self.f.read(n)
            self.n += len(data)
            return data

        def seek(self, *a):
            return self.f.seek(*a)

        def tell(self):
            return self.f.tell()

        closed = property(lambda self: self.f.closed)

    out = {}
    for path in sorted(local.glob("shards/*/*.arrow")):
        with open(path, "rb") as f:
            counted = Counted(f)
            reader = pa.ipc.open_file(counted)
            for row in range(reader.num_record_batches):
                counted.n = 0
                reader.get_batch(row)
                out[(str(path.relative_to(local)), row)] = counted.n
    return out


def consume(cache_dir: Path, dataset_bytes: int, cache_fraction: float, tokens_per_s: float, steps: int,
            max_open: int, window: int, clip_batch_bytes: dict | None = None) -> dict:
    """One pass of `steps` steps over s3://bench/data with a fresh cache; wait and download figures.

    With `clip_batch_bytes`, clips are read one by one by range (training/clipreads.py, memory
    bound = the cache size) and amplification is bytes downloaded ÷ bytes of the clips' batches.
    """
    from training.cache import ShardCache
    from training.clipreads import ClipReads
    from training.data import Loader, Prefetcher
    from training.index import ShardIndex

    index = ShardIndex.open("s3://bench/data", PATCH, split=None, max_open_shards=max_open)
    cache = ShardCache(str(cache_dir), int(cache_fraction * dataset_bytes))
    index.use_cache(cache)
    reads = ClipReads(int(cache_fraction * dataset_bytes)) if clip_batch_bytes is not None else None
    index.use_clip_reads(reads)
    budget, packs = 128 * 8, 4
    loader = Loader(index, seed=0, packs_per_step=packs, token_budget=budget, fetch_ahead=4,
                    window_shards=window)
    needed: dict[int, set[int]] = {}  # epoch → shards its steps read
    needed_clips: dict[int, set[int]] = {}  # epoch → clips its steps read
    position = {cid: i for i, cid in enumerate(index.clip_ids.to_pylist())}
    stream = Prefetcher(iter(loader), depth=2)
    t0, waits, steps_clips = time.perf_counter(), [], 0
    for k, step in zip(range(steps), stream):
        needed.setdefault(step.epoch, set()).update(
            int(index.file_of[position[c]]) for ids in step.clip_ids for c in ids)
        needed_clips.setdefault(step.epoch, set()).update(position[c] for ids in step.clip_ids for c in ids)
        steps_clips += sum(map(len, step.clip_ids))
        waits.append(stream.last_wait_s)
        time.sleep(sum(p.num_real_tokens for p in step.packs) / tokens_per_s)  # the consumer's compute
    wall = time.perf_counter() - t0
    stream.close()
    cache.close()
    needed_bytes = sum(index.file_bytes[f] for files in needed.values() for f in files)
    downloaded = cache.downloaded_bytes
    extra = {}
    if reads is not None:
        reads.close()
        needed_bytes = sum(clip_batch_bytes[(index.files[int(index.file_of[i])], int(index.row_of[i]))]
                           for clips in needed_clips.values() for i in clips)
        downloaded += reads.downloaded_bytes
        extra = {"clip_reads": {"clips_fetched": reads.fetched, "requests": reads.requests,
                                "requests_per_clip": round(reads.requests / max(1, reads.fetched), 2),
                                "shards_read_whole": len(reads.whole_files),
                                "memory_bound_mb": round(reads.max_bytes / 2**20, 1)}}
    steady = waits[5:]  # after the first fetch_ahead + 1 steps
    return {"shards": len(index.files), "dataset_mb": round(dataset_bytes / 2**20, 1),
            "cache_mb": round(cache.max_bytes / 2**20, 1), "steps": len(waits),
            "consumer_tokens_per_s": tokens_per_s,
            "remote_data_wait_fraction": round(sum(steady) / max(1e-9, wall), 4),
            "first_steps_wait_s": round(sum(waits[:5]), 3),
            "download_amplification": round(downloaded / max(1, needed_bytes), 3),
            "shards_needed_per_epoch": [len(f) for _, f in sorted(needed.items())], "downloads": cache.downloads, "max_open_shards": max_open,
            "epochs": round(steps_clips / len(index.clips), 2), **extra}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=1_000_000)
    p.add_argument("--index-shards", type=int, default=100_000)
    p.add_argument("--touch-shards", type=int, default=100_000)
    p.add_argument("--packs", default="64,256,1024")
    p.add_argument("--remote-shards", type=int, default=200)
    p.add_argument("--clips-per-remote-shard", type=int, default=8)
    p.add_argument("--cache-fraction", type=float, default=0.5, help="cache size ÷ remote dataset size")
    p.add_argument("--consumer-tokens-per-s", type=float, default=20000.0)
    p.add_argument("--remote-steps", type=int, default=100)
    p.add_argument("--remote-window", type=int, default=16, help="data.shuffle_window_shards of the remote run "
                   "(a uniform order, 0, is measured too)")
    p.add_argument("--remote-max-open", type=int, default=16,
                   help="open shards per worker: below the shard count, so re-reads go through the cache")
    p.add_argument("--child-open", help=argparse.SUPPRESS)
    p.add_argument("--child-shared", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_open:
        print(json.dumps(open_in_child(Path(args.child_open), args.child_shared)))
        return
    result: dict = {"machine": {"cpus": os.cpu_count()}}
    with tempfile.TemporaryDirectory(prefix="ditharos-loader-scale-") as tmp:
        data = Path(tmp) / "index"
        t = time.perf_counter()
        synthetic_index(data, args.clips, args.index_shards)
        gen_s = time.perf_counter() - t
        r = subprocess.run([sys.executable, __file__, "--child-open", str(data)], capture_output=True, text=True,
                           cwd=ROOT)
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        result["index"] = {"clips": args.clips, "shard_files": args.index_shards, "generation_s": round(gen_s, 1),
                           **json.loads(r.stdout.strip().splitlines()[-1])}
        # The training workers' way: one node-local memory-mapped copy (training/indexfile.py).
        for who in ("shared_builder", "shared_mapper"):
            r = subprocess.run([sys.executable, __file__, "--child-open", str(data), "--child-shared",
                                str(Path(tmp) / "node-index")], capture_output=True, text=True, cwd=ROOT)
            if r.returncode:
                raise SystemExit(r.stderr[-3000:])
            result["index"][who] = json.loads(r.stdout.strip().splitlines()[-1])
        print(json.dumps(result["index"]), file=sys.stderr, flush=True)
        if args.touch_shards:
            result["touch"] = touch_shards(Path(tmp) / "touch", args.touch_shards)
            print(json.dumps(result["touch"]), file=sys.stderr, flush=True)
    r = subprocess.run([sys.executable, str(ROOT / "tests/bench/plan_step.py"), "--packs", args.packs,
                        "--reference-up-to", "0"], capture_output=True, text=True, cwd=ROOT)
    result["plan_step"] = json.loads(r.stdout)["runs"] if not r.returncode else r.stderr[-2000:]
    if args.remote_shards:
        with tempfile.TemporaryDirectory(prefix="ditharos-loader-remote-") as tmp:
            result["remote"] = remote_reads(Path(tmp), args.remote_shards, args.clips_per_remote_shard,
                                            args.cache_fraction, args.consumer_tokens_per_s, args.remote_steps,
                                            args.remote_max_open, [args.remote_window, 0])
    result["goals"] = {"index_open_s": "<= 10", "index_rss_mb": "<= 1024", "remote_data_wait_fraction": "<= 0.01",
                       "download_amplification": "<= 1.05",
                       "peak_memory_maps": "< 65530 (Linux default vm.max_map_count)"}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
