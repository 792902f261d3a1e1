"""Small complete outputs (shards, records, index, manifest) from in-memory columns, without Ray.

The same writer and record format as the pipeline job (`pipeline.writer.ShardWriter`), finished
the way `pipeline/run.py` finishes a run but on one process: for tests and benchmarks with
synthetic latents, where running the whole job would only add minutes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.manifest import build_manifest, read_index, read_rejects, records_digest, write_manifest
from pipeline.records import INDEX_COLUMNS, RECORDS_DIR, of_kind, read_record
from pipeline.shards import column_shapes, read_shard
from pipeline.state import totals_block
from pipeline.writer import ShardWriter


def stream_batch(cols: dict[str, Any], side: list[dict[str, Any]] = ()) -> dict[str, np.ndarray]:
    """Clip columns + side rows as one stream batch (what the job's router hands a writer)."""
    n = len(cols["clip_id"])
    batch = {k: list(v) for k, v in cols.items()}
    batch["kind"] = ["clip"] * n
    batch["record_json"] = [""] * n
    for row in side:
        for k in cols:
            batch[k].append(cols[k][0])  # placeholders: the writer must not read them
        batch["kind"].append(row["kind"])
        batch["record_json"].append(json.dumps(row))
    out = {}
    for k, v in batch.items():
        arr = np.empty(len(v), dtype=object)
        arr[:] = v
        out[k] = arr
    return out


def write_dataset(out: Path, parts: list[dict[str, Any]], fingerprint: dict[str, Any]) -> dict[str, Any]:
    """One shard file per entry of `parts` (shard columns of one bucket each), then index + manifest."""
    writer = ShardWriter(str(out), "fixture-w000", target_bytes=1 << 40, max_open_bytes=1 << 40)
    for cols in parts:
        writer.append(stream_batch(cols))
        writer.flush()  # one file per part
    writer.close()
    records = [(p, p.stat().st_size) for p in sorted((out / RECORDS_DIR).glob("*.parquet"))]
    table = pa.concat_tables([read_record(str(p)) for p, _ in records])
    digest = records_digest([(p.name, s) for p, s in records])
    totals = totals_block(table)
    shard_files: dict[str, int] = {}
    shapes: dict[str, dict[str, list[int]]] = {}
    for shard in sorted(out.glob("shards/*/*.arrow")):
        bucket = shard.parent.name
        shard_files[bucket] = shard_files.get(bucket, 0) + 1
        schema = read_shard(str(shard)).schema
        shapes[bucket] = column_shapes(schema)
    manifest = build_manifest(digest=digest, totals=totals, fingerprint=fingerprint, bucket_specs={},
                              bucket_shapes=shapes, shard_files=shard_files)
    index_dir = out / manifest["files"]["index"]
    index_dir.mkdir(parents=True)
    pq.write_table(of_kind(table, "clip").select(INDEX_COLUMNS), index_dir / "part-00000.parquet")
    write_manifest(str(out), manifest, "fixture: true\n")
    return manifest


def one_bucket_parts(num_files: int, rows: int, shape: tuple[int, ...], bucket: str = "a",
                         id_format: str = "clip-{part:02d}-{i}") -> list[dict[str, Any]]:
    """Shard columns for `num_files` files of `rows` clips of one bucket, seeded float16 latents of `shape`
    and readable clip ids (for tests of many shard files)."""
    from tests.pipeline.test_shards import make_columns

    parts = []
    for part in range(num_files):
        cols = make_columns(rows, bucket=bucket, seed=part)
        cols["latents"] = np.random.default_rng(part).standard_normal((rows, *shape)).astype(np.float16)
        cols["clip_id"] = [id_format.format(part=part, i=i) for i in range(rows)]
        parts.append(cols)
    return parts


def latents_by_clip(parts: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {c: lat for cols in parts for c, lat in zip(cols["clip_id"], cols["latents"])}


# ---------------------------------------------------------------------------------------
# Near-duplicate pass inputs (pipeline/neardup_pass.py)
# ---------------------------------------------------------------------------------------


def cand_table(ids, sources, hashes, pixels, sharpness, colors=None) -> pa.Table:
    """Candidate rows (neardup_pass.CANDIDATE_SCHEMA) from columns (colour signatures all alike when None)."""
    from pipeline.neardup_pass import CANDIDATE_SCHEMA

    n = len(ids)
    return pa.table([pa.array(ids, pa.string()), pa.array(sources, pa.string()), pa.array(hashes, pa.int64()),
                     pa.array(colors if colors is not None else [0x7F7F7F7F7F7F7F7F] * n, pa.int64()),
                     pa.array(pixels, pa.int64()), pa.array(sharpness, pa.float64()), pa.array(["s"] * n),
                     pa.array(range(n), pa.int64())], schema=CANDIDATE_SCHEMA)


def flip(h: int, *bits: int) -> int:
    """An int64 hash with the given bits flipped."""
    u = (h & (2**64 - 1)) ^ sum(1 << int(b) for b in bits)
    return u - 2**64 if u >= 2**63 else u


def near_dup_corpus(n: int, copies: int, dim: int, seed: int) -> tuple[pa.Table, pa.Table, dict[str, str]]:
    """Candidates and embedding rows of n clips whose last `copies` copy random others.

    A copy's embedding is its original's plus 1% noise (cosine ~0.99995 at 768-d, ~0.998 at 32-d)
    and its hash differs in 0-4 bits; copies have fewer pixels, so the originals survive.
    Returns (candidates, embedding rows, {copy: original}).
    """
    from pipeline.neardup_pass import EMBEDDING_SCHEMA

    rng = np.random.default_rng(seed)
    originals = rng.choice(n - copies, copies, replace=False)
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    emb[n - copies:] = emb[originals] + 0.01 * rng.standard_normal((copies, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    hashes = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
    for j, o in enumerate(originals):
        hashes[n - copies + j] = flip(int(hashes[o]), *rng.choice(64, int(rng.integers(0, 5)), replace=False))
    ids = [f"clip{i:08d}" for i in range(n)]
    pixels = np.where(np.arange(n) < n - copies, 1000, 500)
    cands = cand_table(ids, [f"src{i}" for i in range(n)], hashes, pixels, np.ones(n))
    offsets = pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32))
    emb_rows = pa.table([cands["clip_id"], cands["source_id"], cands["pixels"], cands["sharpness"],
                         pa.ListArray.from_arrays(offsets, pa.array(emb.astype(np.float16).reshape(-1)))],
                        schema=EMBEDDING_SCHEMA)
    return cands, emb_rows, {ids[n - copies + j]: ids[int(o)] for j, o in enumerate(originals)}


def refinalize(src: Path, out: Path, small_state_mb: float, partial: bool = False,
               **dedup: Any) -> tuple[dict, list, list]:
    """A copy of job output `src` less manifest / index / rejects, finalized again by the job's own
    code: on the driver (`small_state_mb` > 0) or with Ray Data shuffles (0), with other `dedup`
    settings if given. Returns (manifest, index rows, reject rows), rows sorted by clip id.
    `partial`: the index and rejects folders are left holding one stray part of one row each, as
    a publish interrupted after some of its parts would."""
    import pyarrow.parquet as pq
    import ray

    from pipeline.run import finalize, read_state
    from pipeline.settings import PipelineConfig

    shutil.copytree(src, out)
    for name in ("index", "rejects"):
        for folder in (out / name).iterdir():
            if partial and folder.is_dir():
                first = pq.read_table(folder).slice(0, 1)
                shutil.rmtree(folder)
                folder.mkdir()
                pq.write_table(first, folder / "part-stray.parquet")
        if not partial:
            shutil.rmtree(out / name)
    (out / "manifest.json").unlink()
    cfg = PipelineConfig()
    cfg.compute.small_state_mb = small_state_mb
    for k, v in dedup.items():
        setattr(cfg.dedup, k, v)
    resume = read_state(ray, str(out), cfg, verify=False)
    assert (resume.table is not None) == (small_state_mb > 0)  # the path under test was taken
    old = json.loads((src / "manifest.json").read_text())
    manifest = finalize(ray, cfg, str(out), resume, {k: v for k, v in old["fingerprint"].items()
                                                     if k not in ("data_sha256", "dedup")})
    index = sorted(read_index(str(out), manifest).to_pylist(), key=lambda r: r["clip_id"])
    rejects = sorted(read_rejects(str(out), manifest).to_pylist(), key=lambda r: r["clip_id"])
    return manifest, index, rejects
