"""What an output already holds, from its commit records: checks, resume state, totals.

Pure functions over Arrow tables and listings; `pipeline/run.py` applies them with Ray Data
(records hash-partitioned by `source_uri`, so every source's rows meet in one block) and the
driver only ever holds O(shards) facts, never O(sources) or O(clips):

* `check_shards`: every shard must be named by a record with its size (debris otherwise), and
  every record's shard must be there at that size (damaged otherwise: the record is dropped,
  so its sources are redone);
* `status_block`: per source, complete or not, plus the clip ids already committed of the
  incomplete ones (the next cut skips them);
* `totals_block`: the counts the manifest reports, with repeated side rows of redone sources
  counted once.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.records import of_kind, source_status


@dataclass
class ShardCheck:
    """The outcome of comparing the shards on storage with what the records name."""

    debris: list[str] = field(default_factory=list)  # shard files no record names (crash before the record)
    damaged: dict[str, str] = field(default_factory=dict)  # record name → why its shard is unusable
    ok_shards: int = 0
    ok_bytes: int = 0


def check_shards(record_shards: dict[str, dict[str, Any]], shard_sizes: dict[str, int],
                 checksums: dict[str, str] | None = None) -> ShardCheck:
    """record name → {path, bytes, sha256} (from footers) vs shard path → size (one listing).

    `checksums` (path → sha256 of the bytes on storage) is the optional deep check (--verify).
    """
    out = ShardCheck()
    named = {s["path"] for s in record_shards.values() if s}
    out.debris = sorted(p for p in shard_sizes if p not in named)
    for record, shard in sorted(record_shards.items()):
        if not shard:
            continue
        size = shard_sizes.get(shard["path"])
        if size is None:
            out.damaged[record] = f"{shard['path']} is missing"
        elif size != shard["bytes"]:
            out.damaged[record] = f"{shard['path']} has {size} bytes, committed with {shard['bytes']}"
        elif checksums is not None and checksums.get(shard["path"]) != shard["sha256"]:
            out.damaged[record] = f"{shard['path']} content differs from its committed sha256"
        else:
            out.ok_shards += 1
            out.ok_bytes += size
    return out


STATUS_SCHEMA = pa.schema([
    ("source_uri", pa.string()), ("source_id", pa.string()), ("size_bytes", pa.int64()),
    ("mtime_ns", pa.int64()), ("num_clips", pa.int64()), ("committed_clips", pa.int64()),
    ("complete", pa.bool_()), ("committed_ids", pa.list_(pa.string())),
])


def status_block(table: pa.Table) -> pa.Table:
    """Record rows of whole sources → one status row per source (see records.source_status)."""
    status = source_status(table)
    incomplete = set(status.filter(pc.invert(status["complete"]))["source_uri"].to_pylist())
    ids: dict[str, list[str]] = {u: [] for u in incomplete}
    if incomplete:
        kind, has_clip = table["kind"], pc.is_valid(table["clip_id"])
        accounted = table.filter(pc.or_(pc.equal(kind, "clip"), pc.and_(pc.equal(kind, "reject"), has_clip)))
        for uri, cid in zip(accounted["source_uri"].to_pylist(), accounted["clip_id"].to_pylist()):
            if uri in ids:
                ids[uri].append(cid)
    committed = [sorted(set(ids.get(u, []))) for u in status["source_uri"].to_pylist()]
    cols = {name: status[name] for name in STATUS_SCHEMA.names if name != "committed_ids"}
    cols["committed_ids"] = pa.array(committed, pa.list_(pa.string()))
    return pa.table(cols, schema=STATUS_SCHEMA)


def totals_block(table: pa.Table) -> dict[str, Any]:
    """Counts over record rows of whole sources; repeated side rows (redone sources) counted once."""
    clips = of_kind(table, "clip")
    per_bucket = Counter(clips["bucket"].to_pylist())
    sources = of_kind(table, "source")
    seen: dict[str, tuple[int, float]] = {}
    for uri, n, d in zip(sources["source_uri"].to_pylist(), sources["num_clips"].to_pylist(),
                         sources["duration_s"].to_pylist()):
        seen[uri] = (max(n or 0, seen.get(uri, (0, 0.0))[0]), d or 0.0)
    rejects = of_kind(table, "reject")
    keys = set()
    for row in rejects.select(["source_uri", "stage", "reason", "start_frame", "end_frame", "clip_id",
                               "score"]).to_pylist():
        keys.add(tuple(row.values()))
    stages = Counter(k[1] for k in keys)
    filtered = Counter(k[6] for k in keys if k[1] == "filter")
    return {
        "clips": clips.num_rows, "clips_by_bucket": dict(per_bucket),
        "bytes_by_bucket": dict(_sum_by(clips, "bucket", "clip_bytes")),
        "sources": len(seen), "sources_with_clips": sum(1 for n, _ in seen.values() if n > 0),
        "source_seconds": sum(d for _, d in seen.values()),
        "reject_rows": len(keys), "rejects_by_stage": dict(stages), "filtered_by_score": dict(filtered),
    }


def _sum_by(table: pa.Table, key: str, value: str) -> Counter:
    out: Counter = Counter()
    for k, v in zip(table[key].to_pylist(), table[value].to_pylist()):
        out[k] += v or 0
    return out


def drop_near_duplicates(totals: dict[str, Any], dropped: dict[str, Any]) -> dict[str, Any]:
    """Totals of the committed clips less the near-duplicates the index drops (neardup_pass.dropped_counts)."""
    out = dict(totals)
    n = sum(dropped.get("near_duplicates", {}).values())
    for key in ("clips_by_bucket", "bytes_by_bucket"):
        left = Counter(out.get(key, {}))
        left.subtract(dropped.get(key, {}))
        out[key] = {b: v for b, v in left.items() if key == "bytes_by_bucket" or v > 0}
    out["bytes_by_bucket"] = {b: v for b, v in out["bytes_by_bucket"].items() if b in out["clips_by_bucket"]}
    out["clips"] = out.get("clips", 0) - n
    if n:
        out["reject_rows"] = out.get("reject_rows", 0) + n
        out["rejects_by_stage"] = dict(out.get("rejects_by_stage", {}), near_dup=n)
    out["near_duplicates"] = dict(dropped.get("near_duplicates", {}))
    return out


def add_totals(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Sum two totals dicts (counts and per-key counters)."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict):
            merged = Counter(out.get(k, {}))
            merged.update(v)
            out[k] = dict(merged)
        else:
            out[k] = out.get(k, 0) + v
    return out


def totals_json(table: pa.Table) -> pa.Table:
    """`totals_block` as a one-row table (what a Ray Data map_batches returns)."""
    return pa.table({"totals": [json.dumps(totals_block(table))]})
