"""Commit records: what a run committed, one small Parquet file per commit, never rewritten.

A shard writer commits by (1) putting a finished shard in place under `shards/<bucket>/`
and then (2) writing one record file `_state/records/<name>.parquet` atomically. The record
is the only proof of a commit: a shard that no record names is debris of a crash between
(1) and (2) and is deleted by the next run. Nothing that grows with the corpus is ever
rewritten: each commit adds one record of O(clips in one shard) rows.

A record holds rows of three kinds (one table, nullable columns per kind):
  clip    one committed clip: where it lives (shard, row) and its index columns
  source  one finished source: how many clips its cut produced, its listing key
  reject  one dropped piece of a source, from any stage, with stage and reason
A source is complete when a `source` row for it is committed and the committed `clip` rows
of that source number `num_clips`. Re-runs skip complete sources by their listing key
(uri, size, mtime) without reading or hashing them again.

At 10M sources / 100M clips with 512 MB shards (~100k shards): ~100k records of ~1k rows,
a few GB of Parquet in all, read in parallel by Ray Data on re-run (`read_records` works on
Arrow tables so the same functions serve a Ray Data block and a unit test).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.shards import SCORE_COLUMNS

# 2: curation scores, crop, filter score/value; 3: text_area; 4: phash of the mean frame;
# 5: one clip per record batch, with its byte range in the shard (batch_offset, batch_bytes);
# 6: shards of schema 6 (ragged text states), chash colour signature
RECORD_VERSION = 6
RECORDS_DIR = "_state/records"

# Columns of a record (and, for kind == "clip", of the clip index). Every column is nullable:
# a row fills the columns of its kind.
RECORD_SCHEMA = pa.schema([
    ("kind", pa.string()),  # clip | source | reject
    ("record", pa.string()),  # the record's own name (so a damaged shard's records can be dropped)
    ("source_id", pa.string()),
    ("source_uri", pa.string()),
    # clip
    ("clip_id", pa.string()),
    ("split", pa.string()),
    ("bucket", pa.string()),
    ("shard", pa.string()),  # path relative to the output root
    ("row", pa.int64()),  # row inside the shard (= its record batch, pipeline.shards.ROWS_PER_BATCH)
    ("batch_offset", pa.int64()),  # the clip's record batch message: first byte in the shard …
    ("batch_bytes", pa.int64()),  # … and length (metadata + body): one ranged read fetches the clip
    ("shard_bytes", pa.int64()),
    ("shard_sha256", pa.string()),
    ("num_frames", pa.int32()),
    ("height_px", pa.int32()),
    ("width_px", pa.int32()),
    ("fps", pa.float32()),
    ("start_s", pa.float64()),
    ("end_s", pa.float64()),
    ("latent_shape", pa.list_(pa.int32())),  # (C, T', H', W')
    ("num_tokens", pa.int64()),  # T'·H'/2·W'/2: tokens at the DiT's default (1, 2, 2) patch
    ("caption", pa.string()),
    ("caption_source", pa.string()),
    ("clip_score", pa.float32()),
    ("clip_bytes", pa.int64()),  # bytes of latents + embeddings of this clip in its shard
    ("source_meta", pa.string()),  # JSON: the listing file's extra columns for this source
    ("crop_px", pa.list_(pa.int32())),  # black bars cut off the source (top, bottom, left, right)
    ("phash", pa.int64()),  # perceptual hash of the temporal mean frame (near-duplicate search)
    ("chash", pa.int64()),  # colour signature of the mean frame (a perceptual copy must match it too)
    # clip, and reject of stage filter: the curation scores
    *SCORE_COLUMNS.items(),
    # source
    ("size_bytes", pa.int64()),
    ("mtime_ns", pa.int64()),  # listing's modification time; -1 when the listing has none
    ("num_clips", pa.int64()),
    ("num_rejects", pa.int64()),
    ("duration_s", pa.float64()),
    # reject
    ("stage", pa.string()),
    ("reason", pa.string()),
    ("start_frame", pa.int64()),
    ("end_frame", pa.int64()),
    ("score", pa.string()),  # stage filter: the score outside its range …
    ("value", pa.float64()),  # … and its value
    ("keyframe_jpeg", pa.binary()),  # stage filter, a sample of them (filter.example_fraction): for contact sheets
])
INDEX_COLUMNS = [
    "clip_id", "source_id", "source_uri", "split", "bucket", "shard", "row", "batch_offset", "batch_bytes",
    "shard_bytes", "shard_sha256", "num_frames", "height_px",
    "width_px", "fps", "start_s", "end_s", "latent_shape", "num_tokens", "caption", "caption_source",
    "clip_score", "clip_bytes", "source_meta", "crop_px", "phash", "chash", *SCORE_COLUMNS,
]
REJECT_COLUMNS = ["source_id", "source_uri", "stage", "reason", "start_frame", "end_frame", "clip_id", "score", "value",
                  *SCORE_COLUMNS, "keyframe_jpeg", "duplicate_of"]
# Rejects made when the index is built (near-duplicates) name the clip they copy; records do not hold it.
REJECT_ONLY_COLUMNS = ["duplicate_of"]
SOURCE_KEY = ["source_uri", "size_bytes", "mtime_ns"]
# A reject row of this stage closes a source an interrupted run committed in part and that can
# no longer be cut under its URI (not listed any more, or now a copy of another source): its
# committed clips are kept and it counts as complete (source_status), so later runs finish.
CLOSED_STAGE = "resume"
NOT_LISTED = "no longer listed"


def record_table(rows: Iterable[dict[str, Any]], name: str, shard: dict[str, Any] | None = None) -> pa.Table:
    """Rows (dicts with any subset of the columns) → a record table; unknown keys are an error.

    `shard` ({path, bytes, sha256}) names the one shard this record commits; it is also kept
    in the file's schema metadata, so a resume can check shards against records reading only
    Parquet footers.
    """
    rows = list(rows)
    known = set(RECORD_SCHEMA.names)
    for r in rows:
        extra = set(r) - known
        if extra:
            raise ValueError(f"record row has unknown columns {sorted(extra)}; valid: {RECORD_SCHEMA.names}")
        if r.get("kind") not in ("clip", "source", "reject"):
            raise ValueError(f"record row kind {r.get('kind')!r} is not clip, source or reject")
    cols = {f.name: [r.get(f.name) for r in rows] for f in RECORD_SCHEMA}
    cols["record"] = [name] * len(rows)
    meta = {"ditharos.record_version": str(RECORD_VERSION), "ditharos.shard": json.dumps(shard or {})}
    return pa.table(cols, schema=RECORD_SCHEMA.with_metadata(meta))


def record_uri(out_uri: str, name: str) -> str:
    return storage.join(out_uri, RECORDS_DIR, f"{name}.parquet")


def write_record(out_uri: str, name: str, rows: Iterable[dict[str, Any]], shard: dict[str, Any] | None = None) -> str:
    """Write one record atomically (temp + rename; a single PUT on object stores)."""
    buf = io.BytesIO()
    pq.write_table(record_table(rows, name, shard), buf)
    uri = record_uri(out_uri, name)
    storage.write_bytes_atomic(uri, buf.getvalue())
    return uri


def record_shard(uri: str) -> dict[str, Any]:
    """The shard a record commits ({} for a record of side rows only), from the Parquet footer alone."""
    fs, path = storage.resolve(uri)
    meta = pq.read_schema(path, filesystem=fs).metadata or {}
    if meta.get(b"ditharos.record_version") != str(RECORD_VERSION).encode():
        raise ValueError(f"{uri}: commit record version {meta.get(b'ditharos.record_version')!r}, "
                         f"this code reads {RECORD_VERSION}")
    return json.loads(meta.get(b"ditharos.shard", b"{}"))


def read_record(uri: str) -> pa.Table:
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    version = (table.schema.metadata or {}).get(b"ditharos.record_version")
    if version != str(RECORD_VERSION).encode():
        raise ValueError(f"{uri}: commit record version {version!r}, this code reads {RECORD_VERSION}")
    return table.cast(RECORD_SCHEMA.with_metadata(table.schema.metadata))


# ---------------------------------------------------------------------------
# What the records say (pure functions on Arrow tables)
# ---------------------------------------------------------------------------


def of_kind(table: pa.Table, kind: str) -> pa.Table:
    return table.filter(pc.equal(table["kind"], kind))


def shards_named(table: pa.Table) -> pa.Table:
    """Distinct (shard, shard_bytes, shard_sha256, record) of the clip rows: one row per shard."""
    clips = of_kind(table, "clip").select(["shard", "shard_bytes", "shard_sha256", "record"])
    return clips.group_by(["shard", "shard_bytes", "shard_sha256", "record"]).aggregate([])


def source_status(table: pa.Table) -> pa.Table:
    """Per source (a listed file, keyed by URI): clips promised, clips accounted for, complete or not
    (or closed: a CLOSED_STAGE reject row).

    A source row promises `num_clips` (what its cut produced). A clip is accounted for when a
    clip row or a clip-level reject row (a later stage dropped it) with its id is committed.
    Several source rows for one URI are fine (a redone source re-commits its summary) and
    agree, cutting being deterministic. URIs with clips but no source row yet get
    num_clips = -1 (incomplete).
    """
    src = of_kind(table, "source")
    summary = src.group_by("source_uri").aggregate([
        ("num_clips", "max"), ("source_id", "min"), ("size_bytes", "max"), ("mtime_ns", "max"),
    ]).rename_columns(["source_uri", "num_clips", "source_id", "size_bytes", "mtime_ns"])
    kind, has_clip = table["kind"], pc.is_valid(table["clip_id"])
    accounted = table.filter(pc.or_(pc.equal(kind, "clip"), pc.and_(pc.equal(kind, "reject"), has_clip)))
    counted = accounted.group_by("source_uri").aggregate([("clip_id", "count_distinct")]).rename_columns(
        ["source_uri", "committed_clips"])
    joined = summary.join(counted, "source_uri", join_type="full outer")
    committed = pc.fill_null(joined["committed_clips"], 0)
    promised = pc.fill_null(joined["num_clips"], -1)
    closed = table.filter(pc.and_(pc.equal(kind, "reject"), pc.equal(table["stage"], CLOSED_STAGE)))["source_uri"]
    complete = pc.or_(pc.equal(committed, promised), pc.is_in(joined["source_uri"], value_set=closed.combine_chunks()))
    return pa.table({
        "source_uri": joined["source_uri"], "source_id": joined["source_id"],
        "size_bytes": joined["size_bytes"], "mtime_ns": joined["mtime_ns"],
        "num_clips": promised, "committed_clips": committed, "complete": pc.fill_null(complete, False),
    })


def duplicate_clip_ids(table: pa.Table) -> list[str]:
    """Clip ids committed more than once (must be empty: exactly-once)."""
    clips = of_kind(table, "clip")
    counts = clips.group_by("clip_id").aggregate([("clip_id", "count")])
    return sorted(counts.filter(pc.greater(counts["clip_id_count"], 1))["clip_id"].to_pylist())


def empty_records() -> pa.Table:
    return RECORD_SCHEMA.empty_table()

