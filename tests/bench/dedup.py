"""Benchmark the near-duplicate pass (pipeline/neardup_pass.py) over synthetic clips; prints JSON.

    python tests/bench/dedup.py [--clips 100000] [--dim 768] [--cpus 2] [--no-ray]

Synthetic corpus (tests/datasets.near_dup_corpus): N clips with unit float16 embeddings (dim D)
and 64-bit hashes, 2% planted copies (embedding + 1% noise, hash with 0-4 flipped bits). Runs
the pass's real functions twice: in one process (what run.finalize does for small outputs) and
as the Ray Data group-bys of a large output on a local Ray of --cpus CPUs. Reports wall time per
kind, peak RSS of the driver and of the Ray workers together (sampled every 0.2 s), the largest
k-means cluster, and recall / false copies against the planted truth.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402

from pipeline.neardup import DedupConfig  # noqa: E402
from pipeline.neardup_pass import (  # noqa: E402
    best_pairs, bit_tables, centroids_for, decisions_ds, key_rows, perceptual_pairs, perceptual_pairs_ds,
    semantic_pairs, semantic_pairs_ds, with_cluster,
)
from tests.datasets import near_dup_corpus  # noqa: E402

COPY_SHARE = 0.02


def peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def score(decisions: pa.Table, truth: dict[str, str]) -> dict:
    found = dict(zip(decisions["clip_id"].to_pylist(), decisions["duplicate_of"].to_pylist()))
    return {"recall": round(sum(found.get(c) == o for c, o in truth.items()) / len(truth), 4),
            "false_copies": len(set(found) - set(truth))}


class WorkerMemory:
    """Peak summed RSS of Ray's worker processes (`ray::` in the title), sampled in a thread."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            total = 0
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::") and p.info["memory_info"]:
                    total += p.info["memory_info"].rss
            self.peak = max(self.peak, total / 2**20)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    n = args.clips
    cfg = DedupConfig(eps=0.005)
    t = time.perf_counter()
    cands, emb, truth = near_dup_corpus(n, int(n * COPY_SHARE), args.dim, seed=0)
    result: dict = {"clips": n, "dim": args.dim, "planted_copies": len(truth), "tables": cfg.tables,
                    "bits": cfg.bits, "cluster_size": cfg.cluster_size, "eps": cfg.eps,
                    "make_corpus_s": round(time.perf_counter() - t, 2), "rss_after_corpus_mb": peak_mb()}

    t = time.perf_counter()
    perceptual = perceptual_pairs(key_rows(cands, bit_tables(cfg.tables, cfg.bits, cfg.seed), 1), cfg)
    t_p = time.perf_counter() - t
    t = time.perf_counter()
    clustered = with_cluster(emb, centroids_for(emb, n, cfg))
    sizes = np.bincount(clustered["_part"].to_numpy())
    semantic = semantic_pairs(clustered, cfg)
    t_s = time.perf_counter() - t
    local = best_pairs(pa.concat_tables([perceptual, semantic]))
    result["one_process"] = {
        "perceptual_s": round(t_p, 2), "semantic_s": round(t_s, 2), "clusters": len(sizes),
        "largest_cluster": int(sizes.max()), "perceptual": score(perceptual, truth),
        "semantic": score(semantic, truth), "both": score(local, truth), "peak_rss_mb": peak_mb()}

    if not args.no_ray:
        import ray

        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        parts = 4 * 2 * args.cpus  # what run.finalize uses: 4 × compute.shuffle_blocks (2 per CPU)
        blocks = max(2, n // 5000)
        cds = ray.data.from_arrow(cands).repartition(blocks).materialize()
        eds = ray.data.from_arrow(emb).repartition(blocks).materialize()
        driver_before = psutil.Process().memory_info().rss / 2**20
        with WorkerMemory() as workers:
            t = time.perf_counter()
            p_ds = perceptual_pairs_ds(cds, cfg, parts).materialize()
            t_p = time.perf_counter() - t
            t = time.perf_counter()
            s_ds = semantic_pairs_ds(ray, eds, cfg, parts).materialize()
            t_s = time.perf_counter() - t
            t = time.perf_counter()
            decided = pa.concat_tables(ray.get(decisions_ds([p_ds, s_ds], parts).materialize().to_arrow_refs()))
            t_d = time.perf_counter() - t
        result["ray_data"] = {
            "cpus": args.cpus, "parts": parts, "input_blocks": blocks,
            "perceptual_s": round(t_p, 2), "semantic_s": round(t_s, 2), "merge_s": round(t_d, 2),
            "wall_s": round(t_p + t_s + t_d, 2), "both": score(decided, truth),
            "same_as_one_process": decided.sort_by("clip_id").select(local.column_names).equals(local),
            "driver_rss_growth_mb": round(psutil.Process().memory_info().rss / 2**20 - driver_before, 1),
            "workers_peak_rss_mb": round(workers.peak, 1)}
        ray.shutdown()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
