"""A data card of the shards a run trained on: clips per bucket and split, rejects by reason, captions.

Plain data (no HTML): `data_card(data_uri, manifest)` reads the manifest, the clip index and the rejects table.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pipeline import storage
from pipeline.manifest import read_index, read_rejects
from pipeline.shards import read_shard


def _rejects(data_uri: str, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """[{stage, reason, rows}] from the rejects table, most frequent first."""
    table = read_rejects(data_uri, manifest)
    counts = Counter(zip(table.column("stage").to_pylist(), table.column("reason").to_pylist()))
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [{"stage": s, "reason": r, "rows": n} for (s, r), n in ordered]


def data_card(data_uri: str, manifest: dict[str, Any], num_examples: int = 8) -> dict[str, Any]:
    """Buckets (clips by split), totals, rejects by reason, caption stats and example clips."""
    cols = ("clip_id", "split", "caption", "caption_source", "clip_score", "bucket", "shard", "row")
    index = read_index(data_uri, manifest, list(cols))
    clips = [dict(zip(cols, values)) for values in zip(*(index.column(c).to_pylist() for c in cols))]
    for c in clips:
        c["path"] = c.pop("shard")
    buckets = []
    for name, spec in manifest["buckets"].items():
        splits = Counter(c["split"] for c in clips if c["bucket"] == name)
        buckets.append({"bucket": name, "width_px": spec.get("width_px"), "height_px": spec.get("height_px"),
                        "num_frames": spec.get("num_frames"), "fps": spec.get("fps"), "clips": spec["rows"],
                        "splits": dict(sorted(splits.items()))})
    clips.sort(key=lambda c: c["clip_id"])
    # evenly spread examples over the clip-id order, so every night shows the same ones
    step = max(1, len(clips) // max(1, num_examples))
    examples = clips[::step][:num_examples]
    for ex in examples:  # only the example clips' shards are opened, for their keyframes
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
        "rejects": _rejects(data_uri, manifest),
        "captions": {"clips": len(captions), "distinct": len(set(captions)),
                     "sources": dict(Counter(c["caption_source"] for c in clips)),
                     "most_common": Counter(captions).most_common(5)},
        "examples": examples,
    }


__all__ = ["data_card"]
