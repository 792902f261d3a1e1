"""pipeline/manifest.py: staged batches committed into shards/, the journal, debris, the manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.manifest import (
    JOURNAL,
    CommitError,
    all_rejects,
    build_manifest,
    commit_batch,
    load_journal,
    remove_debris,
)
from pipeline.shards import read_shard, tensor
from pipeline.sink import write_bucket_files
from tests.pipeline.test_shards import make_columns

A, B = "96p_16x9_9f", "128p_1x1_17f"
FINGERPRINT = {"code_version": "git:test", "config_sha256": "c" * 64,
               "models": {"vae": {"weights": "random-init"}, "clip": {"weights": "sha:1"}}}


def _source(sid: str) -> dict[str, Any]:
    return {"source_id": sid, "uri": f"/in/{sid}.mp4"}


def stage_batch(
    staging: Path, clips: dict[str, list[str]], *, seed: int = 0, tag: str = "task00000-aaaa",
    rejects: dict[str, list[dict]] | None = None, summaries: bool = True, clips_in_summary: dict | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Write staged shards for {bucket: [source_id per clip]} plus per-source summaries like make_cut_fn.

    Returns (sources, written) as pipeline/run.py hands them to commit_batch.
    """
    groups = {}
    for k, (bucket, sids) in enumerate(sorted(clips.items())):
        cols = make_columns(len(sids), bucket=bucket, seed=seed + k)
        cols["source_id"] = list(sids)
        cols["clip_id"] = [f"{s}-{i:07d}-9f" for i, s in enumerate(sids)]
        groups[bucket] = cols
    written = write_bucket_files(groups, str(staging), tag)
    sids = sorted({s for v in clips.values() for s in v} | set(rejects or {}))
    if summaries:
        for sid in sids:
            n = sum(s == sid for v in clips.values() for s in v)
            summary = {"source_id": sid, "uri": f"/in/{sid}.mp4", "clips": (clips_in_summary or {}).get(sid, n),
                       "rejects": (rejects or {}).get(sid, []), "duration_s": 2.5, "cut_wall_s": 0.1}
            (staging / "sources").mkdir(parents=True, exist_ok=True)
            (staging / "sources" / f"{sid}.json").write_text(json.dumps(summary))
    return [_source(s) for s in sids], written


def _reject(sid: str, reason: str, stage: str = "scene") -> dict[str, Any]:
    return {"source_id": sid, "source_uri": f"/in/{sid}.mp4", "stage": stage, "reason": reason,
            "start_frame": 10, "end_frame": 20}


def commit_two_batches(out: Path) -> list[dict[str, Any]]:
    """Batch 0: sources s1, s2 into buckets A and B; batch 1: s3 into A. Returns the journal."""
    staging = out / "_staging" / "batch-00000"
    sources, written = stage_batch(staging, {A: ["s1", "s1", "s2"], B: ["s2"]},
                                   rejects={"s1": [_reject("s1", "scene too short")]})
    commit_batch(str(out), str(staging), 0, sources, written, [], "git:test")
    staging = out / "_staging" / "batch-00001"
    sources, written = stage_batch(staging, {A: ["s3", "s3"]}, seed=10, tag="task00001-bbbb",
                                   rejects={"s4": [_reject("s4", "no clip could be cut")]})
    commit_batch(str(out), str(staging), 1, sources, written, load_journal(str(out)), "git:test")
    return load_journal(str(out))


# ---------------------------------------------------------------------------
# commit_batch
# ---------------------------------------------------------------------------


def test_commit_moves_shards_and_writes_journal(tmp_path: Path) -> None:
    out = tmp_path / "out"
    staging = out / "_staging" / "batch-00000"
    sources, written = stage_batch(staging, {A: ["s1", "s1", "s2"], B: ["s2"]},
                                   rejects={"s1": [_reject("s1", "scene too short")]})
    staged_a = next(w for w in written if w["bucket"] == A)
    entry = commit_batch(str(out), str(staging), 0, sources, written, [], "git:test")

    assert sorted(p.relative_to(out).as_posix() for p in (out / "shards").rglob("*")
                  if p.is_file()) == [f"shards/{B}/part-00000.arrow", f"shards/{A}/part-00000.arrow"]
    assert not staging.exists()  # staging cleaned up
    table = read_shard(str(out / "shards" / A / "part-00000.arrow"))
    assert table.column("clip_id").to_pylist() == staged_a["clip_ids"]
    assert tensor(table, "latents").shape == (3, 4, 5, 8, 14)

    assert entry["batch"] == 0 and entry["code_version"] == "git:test"
    by_path = {f["path"]: f for f in entry["files"]}
    fa = by_path[f"shards/{A}/part-00000.arrow"]
    assert (fa["bucket"], fa["rows"], fa["sha256"]) == (A, 3, staged_a["sha256"])
    assert fa["bytes"] == (out / fa["path"]).stat().st_size
    assert fa["shapes"]["latents"] == [4, 5, 8, 14] and fa["shapes"]["text_embedding"] == [77, 64]
    assert [(s["source_id"], s["clips"], s["rejects"]) for s in entry["sources"]] == [("s1", 2, 1), ("s2", 2, 0)]

    assert entry["rejects"] == "rejects/part-00000.parquet"
    rej = pq.read_table(out / entry["rejects"]).to_pylist()
    assert rej == [_reject("s1", "scene too short")]

    lines = (out / JOURNAL).read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == entry
    assert load_journal(str(out)) == [entry]


def test_second_batch_continues_numbering(tmp_path: Path) -> None:
    out = tmp_path / "out"
    journal = commit_two_batches(out)
    assert len(journal) == 2
    assert [f["path"] for f in journal[1]["files"]] == [f"shards/{A}/part-00001.arrow"]
    assert (out / "shards" / A / "part-00000.arrow").is_file()  # batch 0's file untouched
    assert read_shard(str(out / "shards" / A / "part-00001.arrow")).column("source_id").to_pylist() == ["s3", "s3"]
    assert journal[1]["rejects"] == "rejects/part-00001.parquet"
    # A source with only rejects is still recorded as processed.
    assert {s["source_id"]: s["clips"] for s in journal[1]["sources"]} == {"s3": 2, "s4": 0}


def test_two_files_of_one_bucket_in_one_batch_get_consecutive_parts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    staging = out / "_staging" / "b0"
    sources1, w1 = stage_batch(staging, {A: ["s1"]}, tag="task00000-x")
    sources2, w2 = stage_batch(staging, {A: ["s2", "s2"]}, seed=5, tag="task00001-y")
    entry = commit_batch(str(out), str(staging), 0, sources1 + sources2, w1 + w2, [], "v")
    assert [(f["path"], f["rows"]) for f in entry["files"]] == [
        (f"shards/{A}/part-00000.arrow", 1), (f"shards/{A}/part-00001.arrow", 2)]


def test_commit_error_when_a_summary_is_missing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    staging = out / "_staging" / "b0"
    sources, written = stage_batch(staging, {A: ["s1"]}, summaries=False)
    with pytest.raises(CommitError, match=r"/in/s1\.mp4 \(s1\) never finished cutting"):
        commit_batch(str(out), str(staging), 0, sources, written, [], "v")
    assert not (out / "shards").exists() and not (out / JOURNAL).exists()


def test_commit_error_when_a_clip_id_is_written_twice(tmp_path: Path) -> None:
    out = tmp_path / "out"
    staging = out / "_staging" / "b0"
    sources, w1 = stage_batch(staging, {A: ["s1"]}, tag="task00000-x")
    _, w2 = stage_batch(staging, {A: ["s1"]}, tag="task00001-retry")  # a retried task wrote it again
    with pytest.raises(CommitError, match=r"1 clip id\(s\) written twice, e\.g\. s1-0000000-9f"):
        commit_batch(str(out), str(staging), 0, sources, w1 + w2, [], "v")
    assert not (out / "shards").exists() and not (out / JOURNAL).exists()


def test_commit_error_when_written_count_differs_from_summary(tmp_path: Path) -> None:
    out = tmp_path / "out"
    staging = out / "_staging" / "b0"
    sources, written = stage_batch(staging, {A: ["s1", "s1"], B: ["s2"]}, clips_in_summary={"s1": 3})
    with pytest.raises(CommitError, match=r"/in/s1\.mp4: 3 clips cut but 2 written"):
        commit_batch(str(out), str(staging), 0, sources, written, [], "v")
    assert not (out / "shards").exists()
    # Nothing was moved: the staged files are all still there for the retry to overwrite.
    assert all(Path(w["uri"]).is_file() for w in written)


# ---------------------------------------------------------------------------
# remove_debris
# ---------------------------------------------------------------------------


def _add_debris(out: Path) -> list[Path]:
    debris = [out / "shards" / A / "part-00002.arrow", out / "shards" / "999p_1x1_1f" / "part-00000.arrow",
              out / "shards" / A / "part-00000.arrow.tmp-1234abcd", out / "rejects" / "part-00007.parquet"]
    for p in debris:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half-written")
    (out / "_staging" / "batch-00009" / "sources").mkdir(parents=True)
    (out / "_staging" / "batch-00009" / "sources" / "x.json").write_text("{}")
    return debris


@pytest.mark.parametrize("spelling", ["relative", "relative/", "absolute"])
def test_remove_debris_keeps_journal_files_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                spelling: str) -> None:
    out = tmp_path / "out"
    journal = commit_two_batches(out)
    kept = sorted(p for p in out.rglob("*") if p.is_file() and "_state" not in p.parts)
    debris = _add_debris(out)
    monkeypatch.chdir(tmp_path)
    out_uri = {"relative": "out", "relative/": "out/", "absolute": str(out)}[spelling]

    removed = remove_debris(out_uri, journal)

    assert sorted(Path(os.path.abspath(r)) for r in removed) == sorted(debris)
    assert all(not p.exists() for p in debris)
    assert all(p.is_file() for p in kept) and len(kept) == 5  # 3 shards + 2 reject parts
    assert not (out / "_staging").exists()
    assert (out / JOURNAL).is_file()
    assert remove_debris(out_uri, journal) == []  # idempotent


def test_remove_debris_with_empty_journal_clears_everything(tmp_path: Path) -> None:
    out = tmp_path / "out"
    commit_two_batches(out)
    remove_debris(str(out), [])
    assert not [p for p in (out / "shards").rglob("*") if p.is_file()]
    assert not [p for p in (out / "rejects").rglob("*") if p.is_file()]


# ---------------------------------------------------------------------------
# build_manifest
# ---------------------------------------------------------------------------


def _manifest(out: Path, journal: list[dict[str, Any]]) -> dict[str, Any]:
    driver_rejects = [_reject("s9", "not a readable media container", stage="probe")]
    rejects = all_rejects(str(out), journal, driver_rejects)
    specs = {A: {"height_px": 96, "width_px": 176}, B: {"height_px": 128, "width_px": 128}}
    return build_manifest(journal, rejects, FINGERPRINT, specs, num_inputs=6, ignored_files=["/in/readme.md"])


def test_build_manifest_totals(tmp_path: Path) -> None:
    out = tmp_path / "out"
    m = _manifest(out, commit_two_batches(out))
    assert m["kind"] == "ditharos-shards" and m["schema_version"] == 1
    assert m["random_init"] is True
    assert m["totals"] == {
        "inputs": 6, "sources_processed": 4, "sources_with_clips": 3, "clips": 6, "source_seconds": 10.0,
        "reject_rows": 3, "rejects_by_stage": {"probe": 1, "scene": 2}, "ignored_files": 1,
    }
    assert list(m["buckets"]) == sorted([A, B])
    ba = m["buckets"][A]
    assert (ba["rows"], ba["height_px"], ba["latent_shape"], ba["text_shape"], ba["image_embedding_dim"]) == (
        5, 96, [4, 5, 8, 14], [77, 64], 64)
    assert [f["path"] for f in ba["files"]] == [f"shards/{A}/part-00000.arrow", f"shards/{A}/part-00001.arrow"]
    assert m["fingerprint"]["config_sha256"] == "c" * 64
    # all_rejects: committed parts plus driver rejects, sorted by source uri.
    assert [r["source_id"] for r in all_rejects(str(out), load_journal(str(out)), [_reject("s9", "x")]).to_pylist()] \
        == ["s1", "s4", "s9"]


def test_manifest_and_data_sha_are_deterministic_and_track_content(tmp_path: Path) -> None:
    m1 = _manifest(tmp_path / "run1", commit_two_batches(tmp_path / "run1"))
    m2 = _manifest(tmp_path / "run2", commit_two_batches(tmp_path / "run2"))
    # Two runs over the same inputs: byte-identical shards and manifest.
    assert json.dumps(m1, sort_keys=True) == json.dumps(m2, sort_keys=True)
    assert len(m1["fingerprint"]["data_sha256"]) == 64

    # Same layout, one latent value different in one clip: the data hash changes.
    out3 = tmp_path / "run3"
    staging = out3 / "_staging" / "b0"
    sources, written = stage_batch(staging, {A: ["s1", "s1", "s2"], B: ["s2"]},
                                   rejects={"s1": [_reject("s1", "scene too short")]})
    w = next(w for w in written if w["bucket"] == A)
    table = read_shard(w["uri"])
    assert table.num_rows == 3
    cols = {name: table.column(name).to_pylist() for name in table.column_names
            if name not in ("latents", "text_embedding", "text_mask", "image_embedding")}
    for name in ("latents", "text_embedding", "text_mask", "image_embedding"):
        cols[name] = tensor(table, name).copy()
    # Rebuilt unchanged, the file is byte-identical, so only the edit below can move the hash.
    assert write_bucket_files({A: cols}, str(tmp_path / "scratch"), "t")[0]["sha256"] == w["sha256"]
    cols["latents"][1, 0, 0, 0, 0] += np.float16(1.0)
    w.update(write_bucket_files({A: cols}, str(staging), "task00000-aaaa")[0])
    commit_batch(str(out3), str(staging), 0, sources, written, [], "git:test")
    staging = out3 / "_staging" / "b1"
    sources, written = stage_batch(staging, {A: ["s3", "s3"]}, seed=10, tag="task00001-bbbb",
                                   rejects={"s4": [_reject("s4", "no clip could be cut")]})
    commit_batch(str(out3), str(staging), 1, sources, written, load_journal(str(out3)), "git:test")
    m3 = _manifest(out3, load_journal(str(out3)))
    assert m3["totals"] == m1["totals"]
    assert m3["fingerprint"]["data_sha256"] != m1["fingerprint"]["data_sha256"]
