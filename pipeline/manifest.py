"""Commit staged batches into the output, keep the journal, and write `manifest.json`.

Output layout (all names come from ids, never from input file names):
    shards/<bucket>/part-00000.arrow   committed shards
    rejects/part-00000.parquet         rejects of committed batches
    rejects.parquet                    every reject of the dataset (written with the manifest)
    _state/journal.jsonl               one line per committed batch: its sources and files
    manifest.json, config.yaml         written last
A source is complete once its batch's journal line exists; re-runs skip it. Anything in
`shards/` that the journal does not name is debris of an interrupted commit and is removed.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.shards import SCHEMA_VERSION, rejects_table

JOURNAL = "_state/journal.jsonl"


class CommitError(RuntimeError):
    """A batch's outputs are incomplete or inconsistent; the batch must be redone."""


def _rel(out_uri: str, uri: str) -> str:
    base, full = storage.canonical(out_uri).rstrip("/") + "/", storage.canonical(uri)
    if not full.startswith(base):
        raise ValueError(f"{uri!r} is not inside {out_uri!r}")
    return full[len(base) :]


def load_journal(out_uri: str) -> list[dict[str, Any]]:
    uri = storage.join(out_uri, JOURNAL)
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]


def completed_sources(journal: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["source_id"]: s for entry in journal for s in entry["sources"]}


def remove_debris(out_uri: str, journal: list[dict[str, Any]]) -> list[str]:
    """Delete shard/reject files no journal entry names, and any staging area."""
    named = {f["path"] for e in journal for f in e["files"]} | {e["rejects"] for e in journal if e.get("rejects")}
    removed = []
    for sub in ("shards", "rejects"):
        root = storage.join(out_uri, sub)
        if not storage.exists(root):
            continue
        for uri, _ in storage.list_files(root):
            if _rel(out_uri, uri) not in named:
                fs, path = storage.resolve(uri)
                fs.delete_file(path)
                removed.append(uri)
    storage.delete_dir(storage.join(out_uri, "_staging"))
    return removed


def commit_batch(
    out_uri: str, staging_uri: str, batch_index: int, sources: list[dict[str, Any]],
    written: list[dict[str, Any]], journal: list[dict[str, Any]], code_version: str,
) -> dict[str, Any]:
    """Check a finished batch, move its shards into place, append the journal line."""
    summaries = {}
    for src in sources:
        uri = storage.join(staging_uri, "sources", f"{src['source_id']}.json")
        if not storage.exists(uri):
            raise CommitError(f"source {src['uri']} ({src['source_id']}) never finished cutting")
        summaries[src["source_id"]] = json.loads(storage.read_bytes(uri))
    ids = [c for w in written for c in w["clip_ids"]]
    dupes = [c for c, n in Counter(ids).items() if n > 1]
    if dupes:
        raise CommitError(f"{len(dupes)} clip id(s) written twice, e.g. {dupes[0]}")
    per_source = Counter(s for w in written for s in w["source_ids"])
    for sid, summary in summaries.items():
        if per_source.get(sid, 0) != summary["clips"]:
            raise CommitError(f"source {summary['uri']}: {summary['clips']} clips cut but "
                              f"{per_source.get(sid, 0)} written")
    next_part = Counter(f["bucket"] for e in journal for f in e["files"])
    files = []
    for w in sorted(written, key=lambda w: (w["bucket"], w["uri"])):
        rel = f"shards/{w['bucket']}/part-{next_part[w['bucket']]:05d}.arrow"
        next_part[w["bucket"]] += 1
        storage.move(w["uri"], storage.join(out_uri, rel))
        files.append({"path": rel, "bucket": w["bucket"], "rows": w["rows"], "bytes": w["bytes"],
                      "sha256": w["sha256"], "shapes": w["shapes"]})
    reject_rows = [r for s in summaries.values() for r in s["rejects"]]
    rejects_rel = f"rejects/part-{batch_index:05d}.parquet" if reject_rows else ""
    if reject_rows:
        sink = pa.BufferOutputStream()
        pq.write_table(rejects_table(reject_rows), sink)
        storage.write_bytes_atomic(storage.join(out_uri, rejects_rel), sink.getvalue().to_pybytes())
    entry = {
        "batch": batch_index, "code_version": code_version, "files": files, "rejects": rejects_rel,
        "sources": [{"source_id": s["source_id"], "uri": s["uri"], "clips": s["clips"],
                     "duration_s": s["duration_s"], "rejects": len(s["rejects"])}
                    for s in sorted(summaries.values(), key=lambda s: s["uri"])],
    }
    lines = [json.dumps(e, sort_keys=True) for e in journal + [entry]]
    storage.write_bytes_atomic(storage.join(out_uri, JOURNAL), ("\n".join(lines) + "\n").encode())
    storage.delete_dir(staging_uri)
    return entry


def all_rejects(out_uri: str, journal: list[dict[str, Any]], driver_rejects: list[dict[str, Any]]) -> pa.Table:
    tables = [rejects_table(driver_rejects)]
    for e in journal:
        if e.get("rejects"):
            tables.append(pq.read_table(pa.BufferReader(storage.read_bytes(storage.join(out_uri, e["rejects"])))))
    table = pa.concat_tables(tables)
    return table.sort_by([("source_uri", "ascending"), ("start_frame", "ascending"), ("reason", "ascending")])


def build_manifest(
    journal: list[dict[str, Any]], rejects: pa.Table, fingerprint: dict[str, Any], bucket_specs: dict[str, dict],
    num_inputs: int, ignored_files: list[str],
) -> dict[str, Any]:
    """The dataset's manifest: deterministic given the same journal and inputs (no timestamps)."""
    buckets: dict[str, dict[str, Any]] = {}
    for e in journal:
        for f in e["files"]:
            b = buckets.setdefault(f["bucket"], dict(bucket_specs.get(f["bucket"], {}), rows=0, files=[]))
            b["rows"] += f["rows"]
            b["latent_shape"] = f["shapes"]["latents"]
            b["text_shape"] = f["shapes"]["text_embedding"]
            b["image_embedding_dim"] = f["shapes"]["image_embedding"][0]
            b["files"].append({k: f[k] for k in ("path", "rows", "bytes", "sha256")})
    sources = [s for e in journal for s in e["sources"]]
    listing = sorted((f["path"], f["sha256"], f["rows"]) for b in buckets.values() for f in b["files"])
    fp = dict(fingerprint, data_sha256=hashlib.sha256(json.dumps(listing).encode()).hexdigest())
    stages = Counter(rejects.column("stage").to_pylist())
    return {
        "kind": "ditharos-shards",
        "schema_version": SCHEMA_VERSION,
        "random_init": any(m.get("weights") == "random-init" for m in fingerprint["models"].values()),
        "fingerprint": fp,
        "buckets": dict(sorted(buckets.items())),
        "totals": {
            "inputs": num_inputs,
            "sources_processed": len(sources),
            "sources_with_clips": sum(1 for s in sources if s["clips"] > 0),
            "clips": sum(b["rows"] for b in buckets.values()),
            "source_seconds": round(sum(s["duration_s"] for s in sources), 3),
            "reject_rows": rejects.num_rows,
            "rejects_by_stage": dict(sorted(stages.items())),
            "ignored_files": len(ignored_files),
        },
        "files": {"rejects": "rejects.parquet", "config": "config.yaml", "journal": JOURNAL},
    }


def write_outputs(out_uri: str, manifest: dict[str, Any], rejects: pa.Table, config_yaml: str) -> None:
    """rejects.parquet and config.yaml first, manifest.json last (its presence means complete)."""
    sink = pa.BufferOutputStream()
    pq.write_table(rejects, sink)
    storage.write_bytes_atomic(storage.join(out_uri, "rejects.parquet"), sink.getvalue().to_pybytes())
    storage.write_bytes_atomic(storage.join(out_uri, "config.yaml"), config_yaml.encode())
    storage.write_bytes_atomic(storage.join(out_uri, "manifest.json"),
                               (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())


def read_manifest(out_uri: str) -> dict[str, Any]:
    uri = storage.join(out_uri, "manifest.json")
    if not storage.exists(uri):
        raise FileNotFoundError(f"no manifest.json under {out_uri!r}: run the pipeline first")
    manifest = json.loads(storage.read_bytes(uri))
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{uri}: schema_version {manifest.get('schema_version')}, this code reads {SCHEMA_VERSION}")
    return manifest
