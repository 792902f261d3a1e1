"""Small complete outputs (shards, records, index, manifest) from in-memory columns, without Ray.

The same writer and record format as the pipeline job (`pipeline.writer.ShardWriter`), finished
the way `pipeline/run.py` finishes a run but on one process: for tests and benchmarks with
synthetic latents, where running the whole job would only add minutes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.manifest import build_manifest, records_digest, write_manifest
from pipeline.records import INDEX_COLUMNS, RECORDS_DIR, of_kind, read_record
from pipeline.shards import TENSOR_COLUMNS, read_shard
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
        shapes[bucket] = {c: list(schema.field(c).type.shape) for c in TENSOR_COLUMNS}
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
