"""The corpus-wide near-duplicate pass (pipeline/neardup_pass.py): table functions, the same answer
in one process and on Ray Data, and the job dropping a re-encoded copy from the index."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.manifest import read_index, read_manifest, read_rejects
from pipeline.neardup import DedupConfig
from pipeline.neardup_pass import (
    PAIR_SCHEMA,
    as_joined,
    best_pairs,
    bit_tables,
    centroids_for,
    decisions_ds,
    dropped_counts,
    key_rows,
    kept,
    perceptual_pairs,
    perceptual_pairs_ds,
    reject_rows,
    semantic_pairs,
    semantic_pairs_ds,
    split,
    with_cluster,
)
from pipeline.records import RECORD_SCHEMA
from pipeline.state import drop_near_duplicates
from tests.datasets import cand_table, flip, near_dup_corpus, refinalize

CFG = DedupConfig()


def test_perceptual_pairs_name_the_best_copy_and_skip_clips_of_one_source() -> None:
    h = -7179684266118290146
    cands = cand_table(["a", "b", "c", "d", "e"], ["s1", "s2", "s3", "s1", "s4"],
                       [h, flip(h, 3, 40), flip(h, 1, 2, 3, 4, 5, 6, 7, 8, 9), flip(h, 17), h ^ 0x0F0F0F0F0F0F],
                       [100, 400, 100, 100, 100], [1.0, 1.0, 9.0, 5.0, 1.0])
    rows = key_rows(cands, bit_tables(CFG.tables, CFG.bits, CFG.seed), parts=3)
    assert rows.num_rows == 5 * CFG.tables and set(rows["_part"].to_pylist()) <= {0, 1, 2}
    pairs = {r["clip_id"]: r for r in perceptual_pairs(rows, CFG).to_pylist()}
    # b has the most pixels: a and d copy it. d is 1 bit from a but a is of d's source, and worse than b anyway.
    assert pairs["a"]["duplicate_of"] == "b" and pairs["a"]["dup_value"] == 2.0 and pairs["a"]["dup_pixels"] == 400
    assert pairs["d"]["duplicate_of"] == "b" and pairs["d"]["dup_kind"] == "perceptual"
    assert "c" not in pairs and "e" not in pairs and "b" not in pairs  # 9 bits off; unrelated; the best
    # clips of one source are compared when asked
    one_source = cand_table(["a", "d"], ["s1", "s1"], [h, flip(h, 17)], [100, 100], [1.0, 5.0])
    rows = key_rows(one_source, bit_tables(CFG.tables, CFG.bits, CFG.seed), parts=1)
    assert perceptual_pairs(rows, CFG).num_rows == 0
    same = DedupConfig(same_source=True)
    assert perceptual_pairs(rows, same).to_pylist()[0] | {} == {
        "clip_id": "a", "duplicate_of": "d", "dup_pixels": 100, "dup_sharpness": 5.0, "dup_kind": "perceptual",
        "dup_value": 1.0}  # d is sharper
    # clips without a hash are never perceptual copies (not of 0, nor of each other)
    unhashed = cand_table(["x", "y", "z"], ["s1", "s2", "s3"], [None, None, 0], [100, 100, 100], [1.0, 1.0, 1.0])
    rows = key_rows(unhashed, bit_tables(CFG.tables, CFG.bits, CFG.seed), parts=2)
    assert rows.num_rows == CFG.tables and set(rows["clip_id"].to_pylist()) == {"z"}
    assert perceptual_pairs(rows, CFG).num_rows == 0


def test_a_copy_must_match_in_colour_too() -> None:
    """Same luma layout in another hue: pHash bits alike, colour signature not → not a copy."""
    from pipeline.neardup import clip_chash

    h = -7179684266118290146
    red = np.zeros((3, 64, 96, 3), np.uint8)
    red[..., 0] = 200
    blue = red[..., ::-1].copy()
    slightly = np.clip(red.astype(np.int16) + 10, 0, 255).astype(np.uint8)  # a brightness shift: still a copy
    colors = [clip_chash(red), clip_chash(blue), clip_chash(slightly)]
    cands = cand_table(["a", "b", "c"], ["s1", "s2", "s3"], [h, flip(h, 1), flip(h, 2)], [100, 400, 100],
                       [1.0, 1.0, 1.0], colors)
    rows = key_rows(cands, bit_tables(CFG.tables, CFG.bits, CFG.seed), parts=1)
    pairs = {r["clip_id"]: r["duplicate_of"] for r in perceptual_pairs(rows, CFG).to_pylist()}
    assert pairs == {"c": "a"}  # b (blue, most pixels) would have taken both without the colour check
    assert perceptual_pairs(rows, DedupConfig(max_color_delta=255)).num_rows == 2  # the gate is what kept them


def test_best_pairs_merge_groups_and_split_marks_only_the_copies() -> None:
    pairs = pa.Table.from_pylist([
        {"clip_id": "x", "duplicate_of": "p", "dup_pixels": 10, "dup_sharpness": 1.0, "dup_kind": "semantic",
         "dup_value": 0.99},
        {"clip_id": "x", "duplicate_of": "q", "dup_pixels": 20, "dup_sharpness": 1.0, "dup_kind": "perceptual",
         "dup_value": 3.0},
        {"clip_id": "y", "duplicate_of": "q", "dup_pixels": 20, "dup_sharpness": 1.0, "dup_kind": "semantic",
         "dup_value": 0.98},
    ], schema=PAIR_SCHEMA)
    best = best_pairs(pairs)
    assert [(r["clip_id"], r["duplicate_of"]) for r in best.to_pylist()] == [("x", "q"), ("y", "q")]
    assert best_pairs(pairs.take([2, 1, 0])).equals(best)  # order does not matter
    clips = pa.Table.from_pylist([
        {"kind": "clip", "clip_id": c, "source_id": "src-" + c, "source_uri": f"/v/{c}.mp4", "bucket": b,
         "clip_bytes": 100, "sharpness": 7.0} for c, b in (("x", "b1"), ("y", "b2"), ("q", "b2"), ("p", "b1"))],
        schema=RECORD_SCHEMA)
    decided = split(pa.concat_tables([as_joined(clips, 4), as_joined(best, 4)]))
    assert decided.num_rows == 4 and sorted(kept(decided)["clip_id"].to_pylist()) == ["p", "q"]
    rejects = {r["clip_id"]: r for r in reject_rows(decided).to_pylist()}
    assert rejects["x"]["stage"] == "near_dup" and rejects["x"]["duplicate_of"] == "q"
    assert rejects["x"]["reason"] == "perceptual copy of q: 3 of 64 middle-frame hash bits differ"
    assert rejects["x"]["score"] == "phash_bits" and rejects["x"]["value"] == 3.0
    assert rejects["y"]["reason"].startswith("semantic copy of q: CLIP image embeddings at cosine similarity 0.98")
    assert rejects["y"]["sharpness"] == 7.0 and rejects["y"]["source_uri"] == "/v/y.mp4"
    counts = dropped_counts(decided)
    assert counts == {"clips_by_bucket": {"b1": 1, "b2": 1}, "bytes_by_bucket": {"b1": 100, "b2": 100},
                      "near_duplicates": {"perceptual": 1, "semantic": 1}}
    totals = drop_near_duplicates({"clips": 5, "clips_by_bucket": {"b1": 2, "b2": 2, "b3": 1},
                                   "bytes_by_bucket": {"b1": 200, "b2": 200, "b3": 50}, "reject_rows": 1,
                                   "rejects_by_stage": {"probe": 1}}, counts)
    assert totals["clips"] == 3 and totals["clips_by_bucket"] == {"b1": 1, "b2": 1, "b3": 1}
    assert totals["reject_rows"] == 3 and totals["rejects_by_stage"] == {"probe": 1, "near_dup": 2}
    assert totals["bytes_by_bucket"] == {"b1": 100, "b2": 100, "b3": 50}
    # a bucket whose clips all go drops out of the totals
    gone = drop_near_duplicates({"clips": 1, "clips_by_bucket": {"b1": 1}, "bytes_by_bucket": {"b1": 100}},
                                {"clips_by_bucket": {"b1": 1}, "bytes_by_bucket": {"b1": 100},
                                 "near_duplicates": {"semantic": 1}})
    assert gone["clips_by_bucket"] == {} and gone["bytes_by_bucket"] == {} and gone["clips"] == 0


def test_distributed_pass_finds_the_planted_copies_like_the_local_one(ray_local: None) -> None:
    import ray

    cfg = DedupConfig(cluster_size=500, kmeans_sample=1500, eps=0.01)
    cands, emb, truth = near_dup_corpus(3000, 90, 32, seed=3)
    # in one process
    local_p = perceptual_pairs(key_rows(cands, bit_tables(cfg.tables, cfg.bits, cfg.seed), 1), cfg)
    centroids = centroids_for(emb, emb.num_rows, cfg)
    assert centroids.shape == (6, 32)
    local_s = semantic_pairs(with_cluster(emb, centroids), cfg)
    local = best_pairs(pa.concat_tables([local_p, local_s]))
    found = dict(zip(local["clip_id"].to_pylist(), local["duplicate_of"].to_pylist()))
    assert set(found) <= set(truth) and all(truth[c] == o for c, o in found.items())  # no false copy
    assert len(found) >= 0.97 * len(truth)  # a copy within 4 bits or 0.01 noise is found
    # on Ray Data, the same decisions, in blocks of 100 rows
    cds = ray.data.from_arrow(cands).repartition(30).materialize()
    eds = ray.data.from_arrow(emb).repartition(30).materialize()
    pairs = [perceptual_pairs_ds(cds, cfg, parts=8), semantic_pairs_ds(ray, eds, cfg, parts=8)]
    distributed = pa.concat_tables(ray.get(decisions_ds(pairs, parts=8).materialize().to_arrow_refs()))
    distributed = distributed.sort_by("clip_id")
    assert distributed.select(PAIR_SCHEMA.names).equals(local.select(PAIR_SCHEMA.names))


def test_an_oversized_cluster_is_split_and_still_finds_its_copies() -> None:
    cfg = DedupConfig(cluster_size=200, max_cluster=300, eps=0.01)
    _, emb, truth = near_dup_corpus(1000, 40, 16, seed=4)
    one = emb.append_column("_part", pa.array(np.zeros(emb.num_rows, np.int64)))  # everything in one cluster
    found = {r["clip_id"]: r["duplicate_of"] for r in semantic_pairs(one, cfg).to_pylist()}
    assert set(found) <= set(truth) and len(found) >= 0.9 * len(truth)


def reencoded(src: Path, path: Path, size: tuple[int, int] | None = None, skip: int = 0) -> Path:
    """`src` re-encoded at CRF 30, resized to `size` (W, H) and/or its first `skip` frames cut:
    copies a curator must catch."""
    import av
    import cv2

    from tests.media import write_video

    with av.open(str(src)) as c:
        fps = c.streams.video[0].average_rate
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)][skip:]
    if size:
        frames = [cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames]
    return write_video(path, frames, codec="libx264", fps=fps, pix_fmt="yuv420p", options={"crf": "30"})


@pytest.mark.slow
def test_a_reencoded_copy_is_dropped_from_the_index_naming_the_original(
        ray_local: None, tmp_path: Path, sample_clips: dict[str, Path]) -> None:
    from pipeline.run import main

    src = tmp_path / "raw"
    src.mkdir()
    shutil.copy(sample_clips["bikes"], src / "bikes.mp4")
    shutil.copy(sample_clips["carphone_pristine"], src / "carphone.mp4")
    reencoded(sample_clips["bikes"], src / "bikes_copy.mp4", size=(320, 136))  # half size
    reencoded(sample_clips["carphone_pristine"], src / "carphone_trim.mp4", skip=5)  # 0.2 s cut off
    out = tmp_path / "data"
    summary = main(["--input", str(src), "--output", str(out)])

    manifest = read_manifest(str(out))
    assert manifest["fingerprint"]["dedup"]["semantic"] is False  # auto: the demo CLIP is random-init
    index = read_index(str(out), manifest).to_pylist()
    rejects = [r for r in read_rejects(str(out), manifest).to_pylist() if r["stage"] == "near_dup"]
    on_disk = {}
    for f in out.glob("shards/*/*.arrow"):
        t = pa.ipc.open_file(pa.memory_map(str(f))).read_all()
        on_disk.update(zip(t["clip_id"].to_pylist(), t["source_uri"].to_pylist()))
    def of(name: str) -> set[str]:
        return {c for c, uri in on_disk.items() if uri.endswith("/" + name)}

    resized, trimmed = of("bikes_copy.mp4"), of("carphone_trim.mp4")
    copies = resized | trimmed
    assert len(resized) == len(of("bikes.mp4")) >= 5 and trimmed  # the shards keep every clip; the index decides
    assert {r["clip_id"] for r in rejects} == copies  # every window of both copies is caught ...
    for r in rejects:  # ... as a copy of the original, which survives (sharper)
        if r["clip_id"] in resized:  # the same window of the original
            assert r["duplicate_of"] in of("bikes.mp4")
            assert r["duplicate_of"].split("-", 1)[1] == r["clip_id"].split("-", 1)[1]
        else:  # windows 5 frames off: the clip hash is of the mean frame (a middle frame would miss them)
            assert r["duplicate_of"] in of("carphone.mp4")
        assert r["score"] == "phash_bits" and r["value"] <= 6 and r["duplicate_of"] in r["reason"]
        assert r["sharpness"] is not None
    assert {r["clip_id"] for r in index} == set(on_disk) - copies
    totals = manifest["totals"]
    assert totals["clips"] == len(index) == summary["clips"] and totals["near_duplicates"] == {"perceptual": len(copies)}
    assert totals["rejects_by_stage"]["near_dup"] == len(copies) == summary["near_duplicates"]["perceptual"]
    assert sum(b["rows"] for b in manifest["buckets"].values()) == len(index)

    # The Ray Data pass decides the same; semantic dedup (forced on, random-init CLIP: a tight eps)
    # finds the same copies; with both off the index lists every clip.
    small = refinalize(out, tmp_path / "small", 64.0)
    large = refinalize(out, tmp_path / "large", 0.0)
    assert small == large and small[0] == manifest
    # — on the driver and through Ray Data, which reads the embeddings from the shards by range.
    m, idx, rej = refinalize(out, tmp_path / "semantic", 64.0, perceptual=False, semantic="on", eps=0.001)
    sem = {r["clip_id"]: r for r in rej if r["stage"] == "near_dup"}
    assert set(sem) == copies and all(r["score"] == "cosine" and r["value"] > 0.999 for r in sem.values())
    assert m["totals"]["near_duplicates"] == {"semantic": len(copies)}
    assert m["fingerprint"]["data_sha256"] != manifest["fingerprint"]["data_sha256"]
    assert refinalize(out, tmp_path / "semantic_large", 0.0, perceptual=False, semantic="on", eps=0.001) == (m, idx, rej)

    # Changing the dedup settings on the output rebuilds the index alone: no shard is written again.
    again = main(["--input", str(src), "--output", str(out), "--set", "dedup.perceptual=false"])
    assert again["this_run"]["clips_written"] == 0 and again["clips"] == len(on_disk)
    m2 = read_manifest(str(out))
    assert m2["fingerprint"]["dedup"] is None and "near_dup" not in m2["totals"]["rejects_by_stage"]
    assert len(read_index(str(out), m2)) == len(on_disk)
    assert [p.name for p in (out / "index").iterdir()] == [m2["files"]["index"].split("/")[1]]
