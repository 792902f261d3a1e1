"""Ray Data Datasink that writes clip rows into per-bucket Arrow shards in a staging area.

Each write task groups its rows by bucket and writes one Arrow IPC file per bucket
(atomically: temp + rename) under `<staging>/shards/<bucket>/`. Files are only
*staged*: the driver commits them (renames into `shards/`) once the whole batch of
sources is complete, using the write results returned here — files left behind by a
task that died are never committed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import Datasink, WriteResult

from pipeline import storage
from pipeline.shards import SCALAR_COLUMNS, TENSOR_COLUMNS, clips_table, write_shard

COLUMNS = list(SCALAR_COLUMNS) + list(TENSOR_COLUMNS)


def group_rows_by_bucket(batch: dict[str, np.ndarray]) -> dict[str, dict[str, list[Any]]]:
    """Column batch → {bucket: {column: values}}, keeping only shard columns."""
    groups: dict[str, dict[str, list[Any]]] = {}
    for i, bucket in enumerate(batch["bucket"]):
        g = groups.setdefault(str(bucket), {c: [] for c in COLUMNS})
        for c in COLUMNS:
            g[c].append(batch[c][i])
    return groups


def write_bucket_files(groups: dict[str, dict[str, list[Any]]], staging_uri: str, tag: str) -> list[dict[str, Any]]:
    """Write one staged shard per bucket; return what was written (incl. clip ids per file)."""
    written = []
    for bucket, cols in sorted(groups.items()):
        uri = storage.join(staging_uri, "shards", bucket, f"{tag}.arrow")
        table = clips_table(bucket, cols)
        info = write_shard(table, uri)
        shapes = {c: list(table.schema.field(c).type.shape) for c in TENSOR_COLUMNS}
        info.update(bucket=bucket, shapes=shapes, clip_ids=[str(c) for c in cols["clip_id"]],
                    source_ids=[str(s) for s in cols["source_id"]])
        written.append(info)
    return written


class ShardSink(Datasink[list[dict[str, Any]]]):
    """Stage shards; `self.results` holds every write task's report after the write."""

    def __init__(self, staging_uri: str) -> None:
        self.staging_uri = staging_uri
        self.results: list[dict[str, Any]] = []

    def write(self, blocks: Iterable[Block], ctx: Any) -> list[dict[str, Any]]:
        groups: dict[str, dict[str, list[Any]]] = {}
        for block in blocks:
            acc = BlockAccessor.for_block(block)
            if acc.num_rows() == 0:
                continue
            for bucket, cols in group_rows_by_bucket(acc.to_batch_format("numpy")).items():
                g = groups.setdefault(bucket, {c: [] for c in COLUMNS})
                for c in COLUMNS:
                    g[c].extend(cols[c])
        tag = f"task{getattr(ctx, 'task_idx', 0):05d}-{uuid.uuid4().hex[:8]}"
        return write_bucket_files(groups, self.staging_uri, tag)

    def on_write_complete(self, write_result: WriteResult[list[dict[str, Any]]]) -> None:
        self.results = [info for task in write_result.write_returns for info in (task or [])]
