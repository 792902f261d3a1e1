"""The dataset's manifest, clip index and rejects table: the output contract, O(buckets) in size.

Output layout (all names come from ids, never from input file names):
    shards/<bucket>/part-<run>-w<writer>-<seq>.arrow   committed shards (pipeline/writer.py)
    _state/records/<run>-w<writer>-<seq>.parquet      one commit record per commit (pipeline/records.py)
    index/<digest>/*.parquet                          the clip index: one row per clip
    rejects/<digest>/*.parquet                        every reject, once
    manifest.json, config.yaml, summary.json          written last
`<digest>` hashes the set of records, so a re-run that commits nothing finds the same digest,
rewrites nothing and leaves a byte-identical manifest. The manifest holds totals, the
fingerprint, the bucket specs and the index / rejects locations — never a list of files or
clips: readers list clips from the index, never by opening shards.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from pipeline import storage
from pipeline.records import INDEX_COLUMNS, REJECT_COLUMNS
from pipeline.shards import SCHEMA_VERSION

MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """A manifest this code cannot read (missing, or another schema version)."""


def records_digest(records: list[tuple[str, int]]) -> str:
    """Digest of the committed state: (record name, size) of every record."""
    return hashlib.sha256(json.dumps(sorted(records)).encode()).hexdigest()


def build_manifest(
    *, digest: str, totals: dict[str, Any], fingerprint: dict[str, Any], bucket_specs: dict[str, dict],
    bucket_shapes: dict[str, dict[str, list[int]]], shard_files: dict[str, int],
) -> dict[str, Any]:
    """The manifest: deterministic given the same records and inputs (no timestamps)."""
    buckets = {}
    for name, rows in sorted(totals.get("clips_by_bucket", {}).items()):
        shapes = bucket_shapes.get(name, {})
        buckets[name] = dict(bucket_specs.get(name, {}), rows=rows, files=shard_files.get(name, 0),
                             bytes=totals.get("bytes_by_bucket", {}).get(name, 0),
                             latent_shape=shapes.get("latents"), text_shape=shapes.get("text_embedding"),
                             image_embedding_dim=(shapes.get("image_embedding") or [None])[0])
    stages = totals.get("rejects_by_stage", {})
    ignored = stages.get("discover", 0)  # listed files that are not videos: committed as sources of 0 clips
    clips = totals.get("clips", 0)
    files = sum(shard_files.values())
    return {
        "kind": "ditharos-shards",
        "schema_version": SCHEMA_VERSION,
        "random_init": any(m.get("weights") == "random-init" for m in fingerprint["models"].values()),
        "fingerprint": dict(fingerprint, data_sha256=digest),
        "buckets": buckets,
        "totals": {
            "inputs": totals.get("sources", 0) - ignored,
            "sources_processed": totals.get("sources", 0) - ignored,
            "sources_with_clips": totals.get("sources_with_clips", 0),
            "clips": clips,
            "source_seconds": round(totals.get("source_seconds", 0.0), 3),
            "shard_files": files,
            "files_per_1000_clips": round(1000 * files / clips, 2) if clips else 0.0,
            "reject_rows": totals.get("reject_rows", 0),
            "rejects_by_stage": dict(sorted(stages.items())),
            "filtered_by_score": dict(sorted(totals.get("filtered_by_score", {}).items())),
            "near_duplicates": dict(sorted(totals.get("near_duplicates", {}).items())),
            "ignored_files": ignored,
        },
        "files": {"index": f"index/{digest[:16]}", "rejects": f"rejects/{digest[:16]}", "config": "config.yaml"},
    }


def write_manifest(out_uri: str, manifest: dict[str, Any], config_yaml: str) -> None:
    """config.yaml first, manifest.json last (its presence means the output is complete)."""
    storage.write_bytes_atomic(storage.join(out_uri, "config.yaml"), config_yaml.encode())
    storage.write_bytes_atomic(storage.join(out_uri, MANIFEST), (json.dumps(manifest, indent=2) + "\n").encode())


def read_manifest(out_uri: str) -> dict[str, Any]:
    uri = storage.join(out_uri, MANIFEST)
    if not storage.exists(uri):
        raise FileNotFoundError(f"no manifest.json under {out_uri!r}: run the pipeline first")
    manifest = json.loads(storage.read_bytes(uri))
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        older = {1: "journal + file lists", 2: "no shard sizes in the index", 3: "no curation scores",
                 4: "no text score", 5: "padded text states, no colour signature"}
        raise ManifestError(f"{uri}: schema_version {version}, this code reads {SCHEMA_VERSION}"
                            + (f"; version {version} outputs ({older[version]}) must be re-made with the pipeline"
                               if version in older else ""))
    return manifest


def _dataset(out_uri: str, rel: str, schema: pa.Schema) -> pads.Dataset:
    """A Parquet folder of the output (an absent or empty one reads as no rows of `schema`)."""
    uri = storage.join(out_uri, rel)
    if not storage.exists(uri):
        return pads.dataset(schema.empty_table())
    fs, path = storage.resolve(uri)
    return pads.dataset(path, filesystem=fs, format="parquet", schema=schema)


def index_dataset(out_uri: str, manifest: dict[str, Any]) -> pads.Dataset:
    """The clip index as a pyarrow dataset, to stream in record batches (see read_index for whole columns)."""
    return _dataset(out_uri, manifest["files"]["index"], INDEX_SCHEMA)


# Record batches a stream decodes ahead. pyarrow's defaults (16 batches, 4 files) decode up to
# ~64 row groups ahead: +350 MB of transient memory reading 3 of 7 columns of a 3M-clip index
# (549 -> 196 MB with 1/1, 237 MB with 2/2, which keeps one read in flight on object stores).
STREAM_READAHEAD = {"batch_readahead": 2, "fragment_readahead": 2}


def stream_index(out_uri: str, manifest: dict[str, Any], columns: list[str], split: str | None = None,
                 use_threads: bool = True) -> Iterator[pa.RecordBatch]:
    """The clip index's columns (optionally one split), record batch by record batch, with little read-ahead."""
    flt = (pads.field("split") == split) if split is not None else None
    return index_dataset(out_uri, manifest).to_batches(columns=columns, filter=flt, use_threads=use_threads,
                                                       **STREAM_READAHEAD)


def read_index(out_uri: str, manifest: dict[str, Any], columns: list[str] | None = None,
               split: str | None = None) -> pa.Table:
    """The clip index (selected columns; optionally one split) — Parquet, read column-wise."""
    flt = (pads.field("split") == split) if split is not None else None
    return _dataset(out_uri, manifest["files"]["index"], INDEX_SCHEMA).to_table(columns=columns or INDEX_COLUMNS,
                                                                                 filter=flt)


def rejects_dataset(out_uri: str, manifest: dict[str, Any]) -> pads.Dataset:
    """The rejects table as a pyarrow dataset, to stream in record batches."""
    return _dataset(out_uri, manifest["files"]["rejects"], REJECTS_SCHEMA)


def read_rejects(out_uri: str, manifest: dict[str, Any]) -> pa.Table:
    return _dataset(out_uri, manifest["files"]["rejects"], REJECTS_SCHEMA).to_table(columns=REJECT_COLUMNS)


def _schema(names: list[str]) -> pa.Schema:
    from pipeline.records import RECORD_SCHEMA

    return pa.schema([RECORD_SCHEMA.field(n) if n in RECORD_SCHEMA.names else pa.field(n, pa.string())
                      for n in names])


INDEX_SCHEMA = _schema(INDEX_COLUMNS)
REJECTS_SCHEMA = _schema(REJECT_COLUMNS)
