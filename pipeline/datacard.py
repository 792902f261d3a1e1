"""The data card of a pipeline output: what it holds and what the filters dropped, to tune them by.

Plain data (no HTML; `pipeline/inspect.py` renders it, and the nightly report embeds it).
Everything is computed in one streaming pass over the clip index and one over the rejects
table, in record batches, so memory is O(bins + examples) whatever the corpus: at 100M clips
the pass reads ~3 GB of index columns (scores, bucket, split, caption) and holds a few MB.

* counts per bucket and split, caption sources, a histogram of caption lengths (words);
* a histogram of every curation score over kept clips and over filtered clips by the score
  that filtered them, on fixed axes, with the configured thresholds (from the output's
  config.yaml) to mark on them;
* rejects by stage and reason (numbers in reasons folded, so "stopped after 31 frames" and
  "… 40 frames" are one line), filtered clips by score;
* example clips: the kept clips with the smallest hash of their clip id (the same ones every
  night), and per filtering score the filtered clips with a stored frame
  (filter.example_fraction); keyframes are read from the example shards' keyframe column only.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from pipeline import storage
from pipeline.config import ConfigError, from_dict, to_dict
from pipeline.filters import SCORE_ORDER, FilterConfig
from pipeline.manifest import index_dataset, rejects_dataset
from pipeline.shards import SCORE_COLUMNS, read_columns

BATCH_ROWS = 65_536
NUM_BINS = 40
MAX_CAPTION_WORDS = 80  # longer captions share the last bin
CAPTION_SAMPLE = 2_000  # captions (smallest clip-id hashes) the most-common list is counted over
# Histogram axes: (low, high, log scale). Values outside land in the end bins; on a log axis
# zero (a still's motion) lands in the first.
SCORE_AXES: dict[str, tuple[float, float, bool]] = {
    "motion": (1e-4, 10.0, True),
    "max_frame_diff": (0.01, 100.0, True),
    "sharpness": (1.0, 1e5, True),
    "black_fraction": (0.0, 1.0, False),
    "bright_fraction": (0.0, 1.0, False),
    "aesthetic": (0.0, 10.0, False),
    "text_area": (0.0, 0.5, False),
}
assert set(SCORE_AXES) == set(SCORE_COLUMNS) == set(SCORE_ORDER)


def bin_edges(name: str) -> np.ndarray:
    low, high, log = SCORE_AXES[name]
    return np.geomspace(low, high, NUM_BINS + 1) if log else np.linspace(low, high, NUM_BINS + 1)


def bin_counts(name: str, values: np.ndarray) -> np.ndarray:
    """(NUM_BINS,) counts of `values` on the score's axis, out-of-range values in the end bins.

    NaN (a null: a score the clip never got, e.g. the aesthetic of a clip filtered at the cut) is
    not counted.
    """
    edges = bin_edges(name)
    values = values.astype(np.float64)
    clipped = np.clip(values[~np.isnan(values)], edges[0], edges[-1])
    return np.histogram(clipped, bins=edges)[0]


def fold_reason(reason: str) -> str:
    """A reason with its clip ids replaced by CLIP and its numbers by N, so details group into one line."""
    reason = re.sub(r"\bsrc[0-9a-f]{8,}-\d+-\d+f\b", "CLIP", reason)  # shards.clip_id (a near_dup's original)
    return re.sub(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?", "N", reason)


def clip_hash(clip_id: str) -> int:
    return zlib.crc32(clip_id.encode())


@dataclass
class _Smallest:
    """The k rows with the smallest hash seen so far (a deterministic sample in O(k) memory)."""

    k: int
    rows: list[tuple[int, dict[str, Any]]] = field(default_factory=list)

    def offer(self, table: pa.Table, hashes: np.ndarray) -> None:
        if not self.k or not table.num_rows:
            return
        take = np.argsort(hashes, kind="stable")[: self.k]
        merged = self.rows + [(int(hashes[i]), r) for i, r in zip(take, table.take(pa.array(take)).to_pylist())]
        self.rows = sorted(merged, key=lambda hr: (hr[0], hr[1].get("clip_id") or ""))[: self.k]

    def values(self) -> list[dict[str, Any]]:
        return [r for _, r in self.rows]


def thresholds(data_uri: str) -> dict[str, dict[str, float | None]] | None:
    """The filter ranges the output was made with (its config.yaml), or None if it has none."""
    uri = storage.join(data_uri, "config.yaml")
    if not storage.exists(uri):
        return None
    section = (yaml.safe_load(storage.read_bytes(uri)) or {}).get("filter")
    if section is None:
        return None
    try:
        cfg = from_dict(FilterConfig, section, "filter")
    except (ConfigError, ValueError):
        return None  # made by another version: show the histograms without marks
    return {name: to_dict(rng) for name, rng in cfg.ranges().items()}


def _index_pass(data_uri: str, manifest: dict[str, Any], num_examples: int) -> dict[str, Any]:
    cols = ["clip_id", "split", "bucket", "caption", "caption_source", "clip_score", "shard", "row",
            *SCORE_COLUMNS]
    per_bucket: Counter = Counter()
    sources: Counter = Counter()
    lengths = np.zeros(MAX_CAPTION_WORDS + 1, np.int64)
    kept = {name: np.zeros(NUM_BINS, np.int64) for name in SCORE_COLUMNS}
    multi = {name: np.zeros(NUM_BINS, np.int64) for name in ("motion", "max_frame_diff")}
    examples, captions = _Smallest(num_examples), _Smallest(CAPTION_SAMPLE)
    for batch in index_dataset(data_uri, manifest).to_batches(columns=cols + ["num_frames"], batch_size=BATCH_ROWS):
        t = pa.Table.from_batches([batch])
        if not t.num_rows:
            continue
        for row in t.group_by(["bucket", "split"]).aggregate([("clip_id", "count")]).to_pylist():
            per_bucket[(row["bucket"], row["split"])] += row["clip_id_count"]
        for row in t.group_by("caption_source").aggregate([("clip_id", "count")]).to_pylist():
            sources[row["caption_source"]] += row["clip_id_count"]
        words = pc.list_value_length(pc.utf8_split_whitespace(pc.fill_null(t["caption"], ""))).to_numpy(
            zero_copy_only=False)
        lengths += np.bincount(np.minimum(words, MAX_CAPTION_WORDS), minlength=MAX_CAPTION_WORDS + 1)
        moving = t["num_frames"].to_numpy() > 1
        for name in SCORE_COLUMNS:
            values = t[name].to_numpy(zero_copy_only=False)
            kept[name] += bin_counts(name, values)
            if name in multi:  # motion scores of 1-frame clips are 0 by construction: shown apart
                multi[name] += bin_counts(name, values[moving])
        hashes = np.array([clip_hash(c) for c in t["clip_id"].to_pylist()], np.int64)
        examples.offer(t.select(cols[:8]), hashes)
        captions.offer(t.select(["clip_id", "caption"]), hashes)
    sample = [r["caption"] for r in captions.values()]
    return {"per_bucket": per_bucket, "sources": sources, "lengths": lengths, "kept": kept, "kept_moving": multi,
            "examples": examples.values(),
            "captions_sample": {"clips": len(sample), "distinct": len(set(sample)),
                                "most_common": [list(kv) for kv in Counter(sample).most_common(5)]}}


def _rejects_pass(data_uri: str, manifest: dict[str, Any], num_examples: int) -> dict[str, Any]:
    reasons: Counter = Counter()
    by_score: Counter = Counter()
    filtered = {s: {name: np.zeros(NUM_BINS, np.int64) for name in SCORE_COLUMNS} for s in SCORE_ORDER}
    examples = {s: _Smallest(num_examples) for s in SCORE_ORDER}
    cols = ["stage", "reason", "score", "value", "clip_id", "source_uri", "keyframe_jpeg", *SCORE_COLUMNS]
    for batch in rejects_dataset(data_uri, manifest).to_batches(columns=cols, batch_size=BATCH_ROWS):
        t = pa.Table.from_batches([batch])
        if not t.num_rows:
            continue
        flt = t.filter(pc.equal(t["stage"], "filter"))
        others = t.filter(pc.not_equal(t["stage"], "filter"))
        for stage, reason in zip(others["stage"].to_pylist(), others["reason"].to_pylist()):
            reasons[(stage, fold_reason(reason or ""))] += 1
        for score in SCORE_ORDER:
            rows = flt.filter(pc.equal(flt["score"], score))
            if not rows.num_rows:
                continue
            by_score[score] += rows.num_rows
            for name in SCORE_COLUMNS:
                filtered[score][name] += bin_counts(name, rows[name].to_numpy(zero_copy_only=False))
            shown = rows.filter(pc.greater(pc.binary_length(pc.fill_null(rows["keyframe_jpeg"], b"")), 0))
            hashes = np.array([clip_hash(c or "") for c in shown["clip_id"].to_pylist()], np.int64)
            examples[score].offer(shown.select(["clip_id", "source_uri", "reason", "value", "keyframe_jpeg"]), hashes)
    for score, n in by_score.items():
        reasons[("filter", f"{score} outside filter.{score}")] += n
    return {"reasons": reasons, "by_score": by_score, "filtered": filtered,
            "examples": {s: e.values() for s, e in examples.items() if e.values()}}


def _keyframes(data_uri: str, examples: list[dict[str, Any]]) -> None:
    """Fill each kept example's keyframe, opening each example shard once for that column only."""
    by_shard: dict[str, list[dict[str, Any]]] = {}
    for ex in examples:
        by_shard.setdefault(ex["shard"], []).append(ex)
    for shard, exs in by_shard.items():
        column = read_columns(storage.join(data_uri, shard), ["keyframe_jpeg"]).column("keyframe_jpeg")
        for ex in exs:
            ex["keyframe_jpeg"] = column[ex["row"]].as_py()


def data_card(data_uri: str, manifest: dict[str, Any], num_examples: int = 8) -> dict[str, Any]:
    """Buckets (clips by split), totals, score histograms with thresholds, rejects, captions, examples."""
    idx = _index_pass(data_uri, manifest, num_examples)
    rej = _rejects_pass(data_uri, manifest, num_examples)
    _keyframes(data_uri, idx["examples"])
    for ex in idx["examples"]:
        ex["path"] = ex.pop("shard")
    buckets = []
    for name, spec in manifest["buckets"].items():
        splits = {s: n for (b, s), n in sorted(idx["per_bucket"].items()) if b == name}
        buckets.append({"bucket": name, "width_px": spec.get("width_px"), "height_px": spec.get("height_px"),
                        "num_frames": spec.get("num_frames"), "fps": spec.get("fps"), "clips": spec["rows"],
                        "splits": splits})
    splits: Counter = Counter()
    for (_, s), n in idx["per_bucket"].items():
        splits[s] += n
    scores = {name: {"edges": bin_edges(name).tolist(), "log": SCORE_AXES[name][2],
                     "kept": idx["kept"][name].tolist(),
                     "kept_moving": idx["kept_moving"][name].tolist() if name in idx["kept_moving"] else None,
                     "filtered": {s: rej["filtered"][s][name].tolist() for s in SCORE_ORDER if rej["by_score"][s]}}
              for name in SCORE_ORDER}
    models = {k: {f: v for f, v in m.items() if f != "config"} for k, m in manifest["fingerprint"]["models"].items()}
    return {
        "data_uri": data_uri,
        "data_sha256": manifest["fingerprint"]["data_sha256"],
        "config_sha256": manifest["fingerprint"].get("config_sha256"),
        "code_version": manifest["fingerprint"].get("code_version"),
        "random_init": bool(manifest.get("random_init")),
        "models": models,
        "totals": manifest.get("totals", {}),
        "splits": dict(sorted(splits.items())),
        "buckets": buckets,
        "rejects": [{"stage": s, "reason": r, "rows": n}
                    for (s, r), n in sorted(rej["reasons"].items(), key=lambda kv: (-kv[1], kv[0]))],
        "filtered_by_score": dict(rej["by_score"]),
        "thresholds": thresholds(data_uri),
        "scores": scores,
        "captions": {"clips": int(idx["lengths"].sum()), "sources": dict(idx["sources"]),
                     "word_counts": idx["lengths"].tolist(), **{f"sample_{k}": v for k, v in idx["captions_sample"].items()}},
        "examples": idx["examples"],
        "filtered_examples": rej["examples"],
    }


__all__ = ["data_card", "fold_reason", "bin_counts", "bin_edges", "SCORE_AXES"]
