"""A data card of the shards a run trained on: clips per bucket and split, rejects by reason, captions.

Plain data (no HTML): `data_card(data_uri, manifest)` reads the manifest, the shards' scalar
columns (memory-mapped; latents are never touched) and `rejects.parquet`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.shards import read_shard


def _rejects(data_uri: str) -> list[dict[str, Any]]:
    """[{stage, reason, rows}] from rejects.parquet, most frequent first."""
    uri = storage.join(data_uri, "rejects.parquet")
    if not storage.exists(uri):
        return []
    table = pq.read_table(pa.BufferReader(storage.read_bytes(uri)))
    counts = Counter(zip(table.column("stage").to_pylist(), table.column("reason").to_pylist()))
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [{"stage": s, "reason": r, "rows": n} for (s, r), n in ordered]


def data_card(data_uri: str, manifest: dict[str, Any], num_examples: int = 8) -> dict[str, Any]:
    """Buckets (clips by split), totals, rejects by reason, caption stats and example clips."""
    buckets, clips = [], []
    for name, spec in manifest["buckets"].items():
        splits: Counter = Counter()
        for f in spec["files"]:
            table = read_shard(storage.join(data_uri, f["path"]))
            cols = {k: table.column(k).to_pylist() for k in ("clip_id", "split", "caption", "caption_source",
                                                             "clip_score")}
            splits.update(cols["split"])
            clips += [dict(zip(cols, values), bucket=name, path=f["path"], row=i)
                      for i, values in enumerate(zip(*cols.values()))]
        buckets.append({"bucket": name, "width_px": spec.get("width_px"), "height_px": spec.get("height_px"),
                        "num_frames": spec.get("num_frames"), "fps": spec.get("fps"), "clips": spec["rows"],
                        "splits": dict(sorted(splits.items()))})
    clips.sort(key=lambda c: c["clip_id"])
    # evenly spread examples over the clip-id order, so every night shows the same ones
    step = max(1, len(clips) // max(1, num_examples))
    examples = clips[::step][:num_examples]
    for ex in examples:
        table = read_shard(storage.join(data_uri, ex["path"]))
        ex["keyframe_jpeg"] = table.column("keyframe_jpeg")[ex["row"]].as_py()
    captions = [c["caption"] for c in clips]
    models = {k: {f: v for f, v in m.items() if f != "config"} for k, m in manifest["fingerprint"]["models"].items()}
    return {
        "data_uri": data_uri,
        "data_sha256": manifest["fingerprint"]["data_sha256"],
        "config_sha256": manifest["fingerprint"].get("config_sha256"),
        "code_version": manifest["fingerprint"].get("code_version"),
        "random_init": bool(manifest.get("random_init")),
        "models": models,
        "totals": manifest.get("totals", {}),
        "splits": dict(sorted(Counter(c["split"] for c in clips).items())),
        "buckets": buckets,
        "rejects": _rejects(data_uri),
        "captions": {"clips": len(captions), "distinct": len(set(captions)),
                     "sources": dict(Counter(c["caption_source"] for c in clips)),
                     "most_common": Counter(captions).most_common(5)},
        "examples": examples,
    }


__all__ = ["data_card"]
