"""The pipeline's last hop: how many MB/s of latents the router stage moves to the writers; prints JSON.

    python tests/bench/router.py [--mb 2048] [--batch-mb 16] [--writers 4] [--routers 1,2]

A Ray Data stream of `--mb` of stream rows (float16 latents, `--batch-mb` per batch, made in
read tasks so the driver holds none) goes through `pipeline.writer_actors.Router` (an actor pool
of each `--routers` size, as `pipeline/run.py` builds it) to `--writers` stand-in writers that
only count what they receive (no disk), so the figure is the routing hop alone: deserialise a
batch, split it by writer, send each part. `mb_per_s` = latent bytes ÷ wall from the first
batch to the drained stream. On one machine the routers share its cores with the producers;
across nodes each router adds its node's NIC. Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


class CountingWriter:
    """Stands in for a WriterActor: takes appends, keeps only the byte count."""

    def __init__(self) -> None:
        self.rows = 0
        self.bytes = 0

    def append(self, batch: dict) -> None:
        self.rows += len(batch["kind"])
        self.bytes += sum(np.asarray(a).nbytes for a in batch["latents"])

    def progress(self) -> dict:
        return {"rows": self.rows, "bytes": self.bytes}


def make_batch(item: dict, batch_mb: float) -> dict:
    n = 8
    per = int(batch_mb * 2**20 / n / 2)  # float16 values per row
    rng = np.random.default_rng(int(item["id"]))
    return {
        "kind": np.array(["clip"] * n, dtype=object),
        "bucket": np.array([f"b{int(i) % 12:02d}" for i in rng.integers(0, 12, n)], dtype=object),
        "source_id": np.array([f"s{int(item['id'])}-{i}" for i in range(n)], dtype=object),
        "source_uri": np.array([f"s3://c/{int(item['id'])}-{i}.mp4" for i in range(n)], dtype=object),
        "latents": np.full((n, per), int(item["id"]) % 7, np.float16),  # cheap to make: the hop is measured
    }


def run(ray, total_mb: float, batch_mb: float, num_writers: int, routers: int) -> dict:
    from pipeline.writer_actors import Router

    writers = [ray.remote(num_cpus=0)(CountingWriter).remote() for _ in range(num_writers)]
    batches = max(1, int(total_mb / batch_mb))
    ds = (ray.data.range(batches, override_num_blocks=batches)
          .map_batches(lambda b: make_batch({"id": b["id"][0]}, batch_mb), batch_size=1, batch_format="numpy")
          .map_batches(Router, fn_constructor_args=(writers, 600.0), compute=ray.data.ActorPoolStrategy(size=routers),
                       num_cpus=0, scheduling_strategy="SPREAD", batch_format="numpy", batch_size=None))
    start = time.perf_counter()
    rows = sum(int(b["rows"].sum()) for b in ds.iter_batches(batch_format="numpy", batch_size=None))
    wall = time.perf_counter() - start
    got = ray.get([w.progress.remote() for w in writers])
    moved = sum(g["bytes"] for g in got)
    assert rows == sum(g["rows"] for g in got) == batches * 8, (rows, got)
    return {"routers": routers, "batches": batches, "mb": round(moved / 2**20, 1), "wall_s": round(wall, 2),
            "mb_per_s": round(moved / 2**20 / wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=2048)
    p.add_argument("--batch-mb", type=float, default=16)
    p.add_argument("--writers", type=int, default=4)
    p.add_argument("--routers", default="1,2")
    args = p.parse_args()
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    out = {"cpus": os.cpu_count(), "writers": args.writers, "batch_mb": args.batch_mb,
           "runs": [run(ray, args.mb, args.batch_mb, args.writers, int(r)) for r in args.routers.split(",")]}
    ray.shutdown()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
