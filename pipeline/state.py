"""What an output already holds, from its commit records: checks, resume state, totals.

Pure functions over Arrow tables and listings; `pipeline/run.py` applies them with Ray Data
(records hash-partitioned by `source_uri`, so every source's rows meet in one block) and the
driver only ever holds O(shards) facts, never O(sources) or O(clips):

* `check_shards`: every shard must be named by a record with its size (debris otherwise), and
  every record's shard must be there at that size (damaged otherwise: the record is dropped,
  so its sources are redone);
* `status_block`: per source, complete or not, plus the clip ids already committed of the
  incomplete ones; `partial_rows` / `attach_skip_ids` hand each incomplete source's ids to its
  own row to do (joined by URI in a shuffle), so the next cut skips them and no process holds
  the ids of every incomplete source;
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

from pipeline import storage
from pipeline.listing import LISTING_SCHEMA
from pipeline.records import NOT_LISTED, of_kind, source_status


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


# A row to do: a listing row after dedupe, with the clip ids of it an interrupted run committed
# (skip_clip_ids, a JSON list; "" while that is not decided: see attach_skip_ids).
TO_DO_SCHEMA = LISTING_SCHEMA.append(pa.field("source_id", pa.string())).append(
    pa.field("dup_of", pa.string())).append(pa.field("skip_clip_ids", pa.string()))


def todo_rows(t: pa.Table) -> pa.Table:
    """Dedupe's output block, typed as TO_DO_SCHEMA, skip_clip_ids undecided ("")."""
    if t.num_rows == 0:
        return TO_DO_SCHEMA.empty_table()
    t = t.select(TO_DO_SCHEMA.names[:-1]).cast(pa.schema(list(TO_DO_SCHEMA)[:-1]))
    return t.append_column("skip_clip_ids", pa.array([""] * t.num_rows, pa.string()))


def partial_rows(status: pa.Table) -> pa.Table:
    """Status rows → one TO_DO_SCHEMA row per incomplete source: its URI and its committed clip ids
    (never "", so attach_skip_ids tells them from rows to do); the other columns are unused."""
    part = status.filter(pc.invert(status["complete"])) if status.num_rows else status
    n = part.num_rows
    if n == 0:
        return TO_DO_SCHEMA.empty_table()
    return pa.table({  # as a row to close the source with when no row to do has its URI (attach_skip_ids)
        "uri": part["source_uri"], "size_bytes": pc.fill_null(part["size_bytes"], 0),
        "mtime_ns": pc.fill_null(part["mtime_ns"], -1), "sniffed": [""] * n, "sidecars": ["[]"] * n,
        "source_meta": ["{}"] * n, "candidate": [False] * n, "reason": [NOT_LISTED] * n,
        "source_id": pc.fill_null(part["source_id"], ""), "dup_of": [""] * n,
        "skip_clip_ids": [json.dumps(ids) for ids in part["committed_ids"].to_pylist()],
    }, schema=TO_DO_SCHEMA)


def attach_skip_ids(t: pa.Table) -> pa.Table:
    """Rows of whole URIs (rows to do and partial_rows, hash-partitioned by uri) → the rows to do,
    each with its source's committed clip ids ("[]" for none). A partial row whose URI has no
    row to do (the file is no longer listed) becomes one itself, with reason NOT_LISTED: the
    source step closes it (pipeline/steps.py), keeping what was committed (see below for which)."""
    if t.num_rows == 0:
        return TO_DO_SCHEMA.empty_table()
    t = t.cast(TO_DO_SCHEMA)
    undecided = pc.equal(t["skip_clip_ids"], "")
    part = t.filter(pc.invert(undecided))
    ids = dict(zip(part["uri"].to_pylist(), part["skip_clip_ids"].to_pylist()))
    todo = t.filter(undecided)
    skip = [ids.get(u, "[]") for u in todo["uri"].to_pylist()]
    todo = todo.set_column(todo.schema.get_field_index("skip_clip_ids"), "skip_clip_ids", pa.array(skip, pa.string()))
    gone = part.filter(pc.invert(pc.is_in(part["uri"], value_set=todo["uri"].combine_chunks())))
    # Closed only with its source row committed (with none, a file that came back could not be
    # known as done and would be cut again in full), and not a tar member (a tar unreadable for
    # a moment lists none of its members). The others stay incomplete: the run says so.
    closable = [bool(sid) and not storage.member_span(uri)
                for uri, sid in zip(gone["uri"].to_pylist(), gone["source_id"].to_pylist())]
    gone = gone.filter(pa.array(closable, pa.bool_()))
    return pa.concat_tables([todo, gone]) if gone.num_rows else todo


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
