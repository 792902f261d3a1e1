"""The corpus-wide near-duplicate pass: which clips the clip index drops, and which clip each copies.

Runs when run.finalize builds the index, over the committed clip rows (RECORD_SCHEMA, kind ==
"clip"): in one process when the driver holds the records already (small outputs), otherwise as
Ray Data group-bys with nothing per clip on the driver. The same table functions do the work
both ways; a group function gets whole groups (one or many) and decides each alone
(pipeline/neardup.py says why that is enough):

  perceptual  clips → `tables` key rows each → group by key → Hamming search per group → pairs
  semantic    clips → group by shard → that shard's image_embedding column (ranged reads of the
              column only) → a hash-chosen sample → k-means (one task) → nearest centroid
              → group by cluster → SemDedup per cluster → pairs
  pairs       → group by clip → the best-ranked neighbour of each copy → decisions
  clips ∪ decisions → group by clip → clips with `duplicate_of` set on the dropped ones

Group-bys run on a coarse hash of the key (`_part`, a few values per CPU), so one call handles
thousands of keys in numpy rather than one Python call per key.

Cost at 100M clips (20 tables × 16 bits, 768-d float16 embeddings, 5% copies): 2e9 key rows ×
~70 B = 140 GB through the shuffle and 1.5e12 Hamming comparisons; embeddings 100M × 1.5 KB =
154 GB read as one ranged read per column chunk of each shard (~100k shards) and shuffled once
by cluster; k-means in one task over `kmeans_sample` rows (50k × 768 × 4 B = 154 MB); the final
split shuffles the clip rows once (~1 KB each, ~100 GB). Driver memory is O(sample + clusters),
never O(clips).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.blocks import non_empty_blocks
from pipeline.neardup import (
    DedupConfig,
    assign,
    band_keys,
    color_delta,
    bit_tables,
    hamming,
    kmeans,
    semdedup_cluster,
    survivor_key,
)
from pipeline.manifest import REJECTS_SCHEMA
from pipeline.records import RECORD_SCHEMA, SCORE_COLUMNS
from pipeline.shards import read_columns, tensor

PERCEPTUAL, SEMANTIC = "perceptual", "semantic"
PAIR_FIELDS = [("duplicate_of", pa.string()), ("dup_pixels", pa.int64()), ("dup_sharpness", pa.float64()),
               ("dup_kind", pa.string()), ("dup_value", pa.float64())]
PAIR_SCHEMA = pa.schema([("clip_id", pa.string()), *PAIR_FIELDS])
# Clip rows with the decision about them (null: kept) = what the pass returns; JOINED_SCHEMA adds
# the group-by part, for clip and decision rows on their way into the split.
DECIDED_SCHEMA = pa.schema([*RECORD_SCHEMA, *PAIR_FIELDS])
JOINED_SCHEMA = DECIDED_SCHEMA.append(pa.field("_part", pa.int64()))
CANDIDATE_SCHEMA = pa.schema([("clip_id", pa.string()), ("source_id", pa.string()), ("phash", pa.int64()),
                              ("chash", pa.int64()),
                              ("pixels", pa.int64()), ("sharpness", pa.float64()), ("shard", pa.string()),
                              ("row", pa.int64())])
# Variable-size list: blocks from shards of different embedding widths would not concatenate as
# fixed-size lists of different sizes; one model per output makes them all the same in practice.
EMBEDDING_SCHEMA = pa.schema([("clip_id", pa.string()), ("source_id", pa.string()), ("pixels", pa.int64()),
                              ("sharpness", pa.float64()), ("embedding", pa.list_(pa.float16()))])
REASON = {PERCEPTUAL: "perceptual copy of {other}: {value:.0f} of 64 middle-frame hash bits differ",
          SEMANTIC: "semantic copy of {other}: CLIP image embeddings at cosine similarity {value:.4f}"}


def part_of_strings(values: pa.Array | pa.ChunkedArray, parts: int) -> np.ndarray:
    return np.array([zlib.crc32(v.encode()) % parts for v in values.to_pylist()], np.int64)


# ---------------------------------------------------------------------------
# Table functions (a group function gets one or more whole groups)
# ---------------------------------------------------------------------------


def candidates(clips: pa.Table) -> pa.Table:
    """Clip rows → what the search needs: id, source, hash, and the survivor rank's inputs."""
    n = clips.num_rows
    pixels = (pc.fill_null(clips["height_px"], 0).to_numpy().astype(np.int64)
              * pc.fill_null(clips["width_px"], 0).to_numpy().astype(np.int64)
              * pc.fill_null(clips["num_frames"], 0).to_numpy().astype(np.int64))
    return pa.table([clips["clip_id"], clips["source_id"], clips["phash"],  # null: no hash, no perceptual search
                     pc.fill_null(clips["chash"], 0),
                     pa.array(pixels, pa.int64()), pc.fill_null(clips["sharpness"], 0.0).cast(pa.float64()),
                     clips["shard"], clips["row"].cast(pa.int64())], schema=CANDIDATE_SCHEMA) if n else \
        CANDIDATE_SCHEMA.empty_table()


def key_rows(cands: pa.Table, tables: np.ndarray, parts: int) -> pa.Table:
    """One row per (clip, bit table) with its `key`, and `_part` = the key's group-by part.

    Clips without a hash (null: records written before hashes were kept) are left out; filled
    with 0 they would all be perceptual copies of each other.
    """
    cands = cands.filter(pc.is_valid(cands["phash"]))
    keys = band_keys(cands["phash"].to_numpy(), tables)  # (N, L)
    n, num_tables = keys.shape
    take = np.repeat(np.arange(n), num_tables)
    flat = keys.reshape(-1)
    rows = cands.select(["clip_id", "source_id", "phash", "chash", "pixels", "sharpness"]).take(
        pa.array(take, pa.int64()))
    mixed = (flat.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(33)  # spread keys over parts
    return rows.append_column("key", pa.array(flat, pa.int64())).append_column(
        "_part", pa.array((mixed % np.uint64(parts)).astype(np.int64), pa.int64()))


def _groups(table: pa.Table, column: str) -> list[np.ndarray]:
    """Row indices of each value of `column` (groups of two or more rows only)."""
    values = table[column].to_numpy()
    order = np.argsort(values, kind="stable")
    bounds = np.flatnonzero(np.diff(values[order])) + 1
    return [g for g in np.split(order, bounds) if len(g) > 1]


def _pairs(rows: list[tuple[str, str, str, float]], info: dict[str, tuple[int, float]]) -> pa.Table:
    """(clip, other, kind, value) → PAIR_SCHEMA rows, with the other's rank inputs."""
    if not rows:
        return PAIR_SCHEMA.empty_table()
    clip, other, kind, value = zip(*rows)
    return pa.table([list(clip), list(other), [info[o][0] for o in other], [info[o][1] for o in other],
                     list(kind), list(value)], schema=PAIR_SCHEMA)


def _strings(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=str)


def perceptual_pairs(rows: pa.Table, cfg: DedupConfig, max_group: int = 4096) -> pa.Table:
    """Key rows of whole key groups → one (copy, best better-ranked clip within max_distance bits) per copy.

    Vectorised over all groups at once (a Python loop per group cost ~90 s per 100k clips):
    rows sorted by key, candidate pairs are rows `d` apart with equal keys for d = 1, 2, ...
    A key shared by more than `max_group` rows (flat or dark frames) pairs each row with its
    `max_group` sorted neighbours only, bounding the work at O(rows · max_group); a pair missed
    there is still found through any other table it shares a key in.
    """
    if rows.num_rows < 2:
        return PAIR_SCHEMA.empty_table()
    key = rows["key"].to_numpy()
    order = np.argsort(key, kind="stable")
    k = key[order]
    firsts, seconds = [], []
    for d in range(1, max_group):
        same = np.flatnonzero(k[d:] == k[:-d])
        if len(same) == 0:
            break
        firsts.append(order[same])
        seconds.append(order[same + d])
    if not firsts:
        return PAIR_SCHEMA.empty_table()
    a, b = np.concatenate(firsts), np.concatenate(seconds)
    hashes = rows["phash"].to_numpy()
    dist = hamming(hashes[a], hashes[b])
    chash = rows["chash"].to_numpy()
    keep = (dist <= cfg.max_distance) & (color_delta(chash[a], chash[b]) <= cfg.max_color_delta)
    if not cfg.same_source:
        src = _strings(rows["source_id"])
        keep &= src[a] != src[b]
    a, b, dist = a[keep], b[keep], dist[keep]
    if len(a) == 0:
        return PAIR_SCHEMA.empty_table()
    ids = _strings(rows["clip_id"])
    pixels, sharp = rows["pixels"].to_numpy(), rows["sharpness"].to_numpy()
    rank = np.empty(len(ids), np.int64)
    rank[np.lexsort((ids, -np.round(sharp, 3), -pixels))] = np.arange(len(ids))  # survivor_key order
    worse = np.where(rank[a] > rank[b], a, b)
    better = np.where(rank[a] > rank[b], b, a)
    pick = np.lexsort((rank[better], ids[worse]))  # per copy, its best-ranked neighbour first
    first = pick[np.r_[True, ids[worse][pick][1:] != ids[worse][pick][:-1]]]
    w, o = worse[first], better[first]
    return pa.table([pa.array(ids[w]), pa.array(ids[o]), pa.array(pixels[o], pa.int64()),
                     pa.array(sharp[o], pa.float64()), pa.array([PERCEPTUAL] * len(w), pa.string()),
                     pa.array(dist[first].astype(np.float64))], schema=PAIR_SCHEMA)


def embedding_rows(cands: pa.Table, out: str) -> pa.Table:
    """Candidates (of any shards) + their image embeddings, read from each shard's column alone."""
    parts = [EMBEDDING_SCHEMA.empty_table()]
    # Sorted by shard, each shard's rows are one slice: O(n log n), not a filter per shard.
    cands = cands.sort_by([("shard", "ascending"), ("row", "ascending")])
    shards = cands["shard"].to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]]) if len(shards) else np.zeros(0, int)
    for start, stop in zip(starts, np.r_[starts[1:], len(shards)]):
        mine, shard = cands.slice(start, stop - start), shards[start]
        emb = tensor(read_columns(storage.join(out, shard), ["image_embedding"]), "image_embedding")
        got = emb[mine["row"].to_numpy()]  # (n, D) in the stored dtype (float16)
        parts.append(pa.table([mine["clip_id"], mine["source_id"], mine["pixels"], mine["sharpness"],
                               pa.FixedSizeListArray.from_arrays(pa.array(got.reshape(-1).astype(np.float16)),
                                                                 got.shape[1]).cast(pa.list_(pa.float16()))],
                              schema=EMBEDDING_SCHEMA))
    return pa.concat_tables(parts)


def in_sample(clip_ids: pa.Array | pa.ChunkedArray, fraction: float, seed: int) -> np.ndarray:
    """A fixed sample whatever the partitioning: clips whose hash falls below `fraction`."""
    salt = f"{seed}:"
    return np.array([zlib.crc32((salt + c).encode()) < fraction * 2**32 for c in clip_ids.to_pylist()], bool)


def vectors(table: pa.Table) -> np.ndarray:
    """(N, D) float32 embeddings of embedding rows."""
    col = table["embedding"].combine_chunks()
    if len(col) == 0:
        return np.zeros((0, 1), np.float32)
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), -1)


def with_cluster(table: pa.Table, centroids: np.ndarray) -> pa.Table:
    label = assign(vectors(table), centroids) if table.num_rows else np.zeros(0, np.int64)
    return table.append_column("_part", pa.array(label.astype(np.int64), pa.int64()))


def semantic_pairs(rows: pa.Table, cfg: DedupConfig) -> pa.Table:
    """Embedding rows of whole clusters → (copy, better-ranked clip at cosine > 1 - eps) pairs.

    A cluster over `max_cluster` is split by a k-means of its own (seeded), so one group's work
    stays O(max_cluster^2) and its similarity blocks O(block × max_cluster).
    """
    ids = rows["clip_id"].to_pylist()
    x = vectors(rows)
    src = rows["source_id"].to_numpy(zero_copy_only=False)
    info = {c: (p, s) for c, p, s in zip(ids, rows["pixels"].to_pylist(), rows["sharpness"].to_pylist())}
    out = []
    for g in _groups(rows, "_part"):
        members = [g]
        if len(g) > cfg.max_cluster:
            k = math.ceil(len(g) / cfg.cluster_size)
            sub = assign(x[g], kmeans(x[g][:cfg.kmeans_sample], k, cfg.seed))
            members = [g[sub == j] for j in range(k)]
        for m in members:
            m_ids = [ids[i] for i in m]
            for clip, other, sim in semdedup_cluster(m_ids, x[m], [survivor_key(c, *info[c]) for c in m_ids],
                                                     cfg.eps, sources=None if cfg.same_source else src[m]):
                out.append((clip, other, SEMANTIC, sim))
    return _pairs(out, info)


def best_pairs(pairs: pa.Table) -> pa.Table:
    """Pairs of whole clips → one per clip: its best-ranked neighbour (perceptual first on a tie), by clip id."""
    if pairs.num_rows == 0:
        return PAIR_SCHEMA.empty_table()
    ids, other = _strings(pairs["clip_id"]), _strings(pairs["duplicate_of"])
    order = np.lexsort((pairs["dup_value"].to_numpy(), _strings(pairs["dup_kind"]), other,
                        -np.round(pairs["dup_sharpness"].to_numpy(), 3), -pairs["dup_pixels"].to_numpy(), ids))
    first = order[np.r_[True, ids[order][1:] != ids[order][:-1]]]
    return pairs.take(pa.array(first, pa.int64())).cast(PAIR_SCHEMA)


def as_joined(table: pa.Table, parts: int) -> pa.Table:
    """Clip rows (RECORD_SCHEMA) or decision rows (PAIR_SCHEMA) in JOINED_SCHEMA, `_part` by clip id."""
    n = table.num_rows
    cols = [table[f.name] if f.name in table.column_names else pa.nulls(n, f.type) for f in JOINED_SCHEMA]
    if "kind" not in table.column_names:  # decision rows
        cols[JOINED_SCHEMA.get_field_index("kind")] = pa.array(["decision"] * n, pa.string())
    cols[JOINED_SCHEMA.get_field_index("_part")] = pa.array(part_of_strings(table["clip_id"], parts), pa.int64())
    return pa.table(cols, schema=JOINED_SCHEMA)


def split(joined: pa.Table) -> pa.Table:
    """Clip and decision rows of whole clips → the clip rows, decision fields set on dropped ones."""
    is_decision = pc.equal(joined["kind"], "decision")
    clips = joined.filter(pc.invert(is_decision)).drop_columns(["_part"]).cast(DECIDED_SCHEMA)
    decisions = joined.filter(is_decision)
    if decisions.num_rows == 0:
        return clips
    found = pc.index_in(clips["clip_id"], value_set=decisions["clip_id"])
    hit = pc.is_valid(found)
    for name, _ in PAIR_FIELDS:
        values = pc.take(decisions[name], pc.fill_null(found, 0))
        clips = clips.set_column(clips.schema.get_field_index(name), name,
                                 pc.if_else(hit, values, pa.scalar(None, values.type)))
    return clips


def kept(joined: pa.Table) -> pa.Table:
    return joined.filter(pc.is_null(joined["duplicate_of"]))


def reject_rows(joined: pa.Table) -> pa.Table:
    """Dropped clips as rejects (REJECT_COLUMNS): stage near_dup, naming the clip each copies."""
    d = joined.filter(pc.is_valid(joined["duplicate_of"]))
    n = d.num_rows
    reasons = [REASON[k].format(other=o, value=v) for k, o, v in
               zip(d["dup_kind"].to_pylist(), d["duplicate_of"].to_pylist(), d["dup_value"].to_pylist())]
    cols = {"source_id": d["source_id"], "source_uri": d["source_uri"], "stage": pa.array(["near_dup"] * n),
            "reason": pa.array(reasons, pa.string()), "clip_id": d["clip_id"],
            "score": pc.if_else(pc.equal(d["dup_kind"], PERCEPTUAL), "phash_bits", "cosine"),
            "value": d["dup_value"], "duplicate_of": d["duplicate_of"],
            **{c: d[c] for c in SCORE_COLUMNS}}
    return pa.table([cols[f.name] if f.name in cols else pa.nulls(n, f.type) for f in REJECTS_SCHEMA],
                    schema=REJECTS_SCHEMA)


def dropped_counts(joined: pa.Table) -> dict:
    """Totals of the dropped clips: per bucket (rows, bytes) and per kind."""
    d = joined.filter(pc.is_valid(joined["duplicate_of"]))
    by_bucket: dict[str, int] = {}
    bytes_by_bucket: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    for b, nbytes, kind in zip(d["bucket"].to_pylist(), d["clip_bytes"].to_pylist(), d["dup_kind"].to_pylist()):
        by_bucket[b] = by_bucket.get(b, 0) + 1
        bytes_by_bucket[b] = bytes_by_bucket.get(b, 0) + (nbytes or 0)
        by_kind[kind] = by_kind.get(kind, 0) + 1
    return {"clips_by_bucket": by_bucket, "bytes_by_bucket": bytes_by_bucket, "near_duplicates": by_kind}


# ---------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------


def centroids_for(sample: pa.Table, clips: int, cfg: DedupConfig) -> np.ndarray | None:
    """k-means centroids from the sample's embedding rows (in clip id order: the same for any partitioning)."""
    if sample.num_rows == 0:
        return None
    x = vectors(sample.sort_by("clip_id"))
    return kmeans(x, max(1, min(len(x), math.ceil(clips / cfg.cluster_size))), cfg.seed)


KMEANS_CPUS = 8.0  # cores asked for the k-means task (its matrix products use them all)


def _centroids_task(clips: int, cfg: DedupConfig, *blocks: pa.Table) -> np.ndarray | None:
    """centroids_for over the sample's blocks (Ray passes each block ref in as its table)."""
    return centroids_for(pa.concat_tables([EMBEDDING_SCHEMA.empty_table(), *blocks]), clips, cfg)


def run_local(clips: pa.Table, out: str, cfg: DedupConfig, semantic: bool) -> pa.Table:
    """Small outputs: every step on one table in this process. Returns DECIDED_SCHEMA clip rows."""
    cands = candidates(clips)
    pairs = [PAIR_SCHEMA.empty_table()]
    if cfg.perceptual and cands.num_rows:
        pairs.append(perceptual_pairs(key_rows(cands, bit_tables(cfg.tables, cfg.bits, cfg.seed), 1), cfg))
    if semantic and cands.num_rows:
        emb = embedding_rows(cands, out)
        fraction = min(1.0, cfg.kmeans_sample / emb.num_rows)
        centroids = centroids_for(emb.filter(pa.array(in_sample(emb["clip_id"], fraction, cfg.seed))),
                                  emb.num_rows, cfg)
        if centroids is not None:
            pairs.append(semantic_pairs(with_cluster(emb, centroids), cfg))
    decisions = best_pairs(pa.concat_tables(pairs))
    return split(pa.concat_tables([as_joined(clips, 1), as_joined(decisions, 1)]))


def _grouped(ds, fn: Callable[[pa.Table], pa.Table], parts: int):
    return ds.groupby("_part", num_partitions=parts).map_groups(fn, batch_format="pyarrow")


def _by_string(column: str, parts: int) -> Callable[[pa.Table], pa.Table]:
    return lambda t: t.append_column("_part", pa.array(part_of_strings(t[column], parts), pa.int64()))


def perceptual_pairs_ds(cands, cfg: DedupConfig, parts: int):
    """Candidate rows (Dataset) → perceptual pairs (Dataset, PAIR_SCHEMA)."""
    tables = bit_tables(cfg.tables, cfg.bits, cfg.seed)
    keys = cands.map_batches(lambda t: key_rows(t, tables, parts), batch_format="pyarrow")
    return _grouped(keys, lambda t: perceptual_pairs(t, cfg), parts)


def semantic_pairs_ds(ray, emb, cfg: DedupConfig, parts: int):
    """Embedding rows (a materialized Dataset) → semantic pairs (Dataset, PAIR_SCHEMA), or None when empty."""
    n = emb.count()
    if n == 0:
        return None
    fraction = min(1.0, cfg.kmeans_sample / n)
    sample = emb.map_batches(lambda t: t.filter(pa.array(in_sample(t["clip_id"], fraction, cfg.seed))),
                             batch_format="pyarrow").materialize()
    # k-means (minutes of BLAS at k = 10k) in a task on a worker's cores, not on the driver's
    # node, which also drives the job; the sample's blocks go to it by reference.
    cpus = max(1.0, min(KMEANS_CPUS, float(ray.cluster_resources().get("CPU", 1))))
    centroids = ray.get(ray.remote(num_cpus=cpus)(_centroids_task).remote(n, cfg, *sample.to_arrow_refs()))
    if centroids is None:
        return None
    clustered = emb.map_batches(lambda t: with_cluster(t, centroids), batch_format="pyarrow")
    return _grouped(clustered, lambda t: semantic_pairs(t, cfg), parts)


def decisions_ds(pair_sets: list, parts: int):
    """Pair Datasets → one decision per copied clip (Dataset, PAIR_SCHEMA)."""
    pairs = pair_sets[0].union(*pair_sets[1:]) if len(pair_sets) > 1 else pair_sets[0]
    return _grouped(pairs.map_batches(_by_string("clip_id", parts), batch_format="pyarrow"),
                    lambda t: best_pairs(t.drop_columns(["_part"])), parts)


def run_distributed(ray, clips_ds, out: str, cfg: DedupConfig, semantic: bool, parts: int):
    """Large outputs: the same steps as Ray Data group-bys. Returns a materialized Dataset of DECIDED_SCHEMA."""
    cands = clips_ds.map_batches(candidates, batch_format="pyarrow").materialize()
    pair_sets = []
    if cfg.perceptual:
        pair_sets.append(perceptual_pairs_ds(cands, cfg, parts))
    if semantic:
        by_shard = cands.map_batches(_by_string("shard", parts), batch_format="pyarrow")
        emb = _grouped(by_shard, lambda t: embedding_rows(t.drop_columns(["_part"]), out), parts).materialize()
        found = semantic_pairs_ds(ray, emb, cfg, parts)
        if found is not None:
            pair_sets.append(found)
    # Every block the final group-by meets must carry `_part`: blocks of no rows (an empty
    # group-by partition of the decisions, say) are dropped first (pipeline/blocks.py).
    joined = non_empty_blocks(ray, clips_ds.map_batches(lambda t: as_joined(t, parts), batch_format="pyarrow"),
                              JOINED_SCHEMA)
    decided = non_empty_blocks(ray, decisions_ds(pair_sets, parts)) if pair_sets else None
    if decided is not None:
        joined = joined.union(decided.map_batches(lambda t: as_joined(t, parts), batch_format="pyarrow"))
    return _grouped(joined, split, parts).materialize()
