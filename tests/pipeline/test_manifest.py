"""pipeline/state.py + pipeline/manifest.py: shard checks, per-source status, totals, the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.manifest import ManifestError, build_manifest, read_index, read_manifest, read_rejects, records_digest
from pipeline.records import record_table
from pipeline.shards import SCHEMA_VERSION
from pipeline.state import add_totals, check_shards, status_block, totals_block


def clip(uri: str, cid: str, bucket: str = "b1", nbytes: int = 10) -> dict:
    return {"kind": "clip", "source_uri": uri, "source_id": "s" + uri, "clip_id": cid, "bucket": bucket,
            "clip_bytes": nbytes}


def source(uri: str, n: int, seconds: float = 2.0) -> dict:
    return {"kind": "source", "source_uri": uri, "source_id": "s" + uri, "num_clips": n, "size_bytes": 100,
            "mtime_ns": 7, "duration_s": seconds, "num_rejects": 0}


def reject(uri: str, stage: str, reason: str, cid: str | None = None) -> dict:
    return {"kind": "reject", "source_uri": uri, "source_id": "s" + uri, "stage": stage, "reason": reason,
            "start_frame": -1, "end_frame": -1, "clip_id": cid}


def test_check_shards_finds_debris_missing_and_damaged() -> None:
    records = {
        "r1": {"path": "shards/b/part-1.arrow", "bytes": 100, "sha256": "aa"},
        "r2": {"path": "shards/b/part-2.arrow", "bytes": 50, "sha256": "bb"},
        "r3": {"path": "shards/b/part-3.arrow", "bytes": 70, "sha256": "cc"},
        "r4": {},  # side rows only
    }
    sizes = {"shards/b/part-1.arrow": 100, "shards/b/part-2.arrow": 49, "shards/b/part-9.arrow": 5}
    check = check_shards(records, sizes)
    assert check.debris == ["shards/b/part-9.arrow"]
    assert set(check.damaged) == {"r2", "r3"}
    assert "49 bytes, committed with 50" in check.damaged["r2"] and "missing" in check.damaged["r3"]
    assert check.ok_shards == 1 and check.ok_bytes == 100
    deep = check_shards(records, {"shards/b/part-1.arrow": 100}, checksums={"shards/b/part-1.arrow": "ab"})
    assert "content differs" in deep.damaged["r1"]  # same size, other bytes: only --verify sees it


def test_status_counts_clips_and_clip_level_rejects_and_lists_committed_ids() -> None:
    table = record_table([
        source("a", 2), clip("a", "a1"), clip("a", "a2"),  # complete
        source("b", 3), clip("b", "b1"), reject("b", "vae", "nan", "b2"),  # 2 of 3 accounted
        clip("c", "c1"),  # clips but no source row yet
        source("d", 0), reject("d", "probe", "not a video"),  # complete with no clips
        source("a", 2),  # a redone source's summary again: counted once
    ], "r")
    status = {r["source_uri"]: r for r in status_block(table).to_pylist()}
    assert status["a"]["complete"] and status["a"]["committed_ids"] == []
    assert not status["b"]["complete"] and status["b"]["committed_ids"] == ["b1", "b2"]
    assert status["c"]["num_clips"] == -1 and not status["c"]["complete"] and status["c"]["committed_ids"] == ["c1"]
    assert status["d"]["complete"] and status["d"]["num_clips"] == 0


def test_a_closed_source_is_complete_with_the_clips_it_has() -> None:
    from pipeline.records import CLOSED_STAGE

    table = record_table([source("b", 3), clip("b", "b1"),  # 1 of 3 committed, then closed (gone)
                          reject("b", CLOSED_STAGE, "closed: no longer listed"),
                          clip("c", "c1"), reject("c", CLOSED_STAGE, "closed: no longer listed"),  # no source row
                          source("e", 2), clip("e", "e1"), reject("e", "probe", "cannot read file")], "r")
    status = {r["source_uri"]: r for r in status_block(table).to_pylist()}
    assert status["b"]["complete"] and status["b"]["committed_clips"] == 1 and status["b"]["committed_ids"] == []
    assert status["c"]["complete"] and status["c"]["num_clips"] == -1
    assert not status["e"]["complete"]  # an ordinary reject does not close a source: it is retried


def test_totals_count_repeated_side_rows_once_and_add_up() -> None:
    part1 = record_table([source("a", 2, 3.0), clip("a", "a1", "x", 5), clip("a", "a2", "y", 7),
                          reject("a", "scene", "too short"), reject("a", "scene", "too short"), source("a", 2, 3.0)],
                         "r1")
    part2 = record_table([source("z", 0, 1.0), reject("z", "discover", "not a video: text file")], "r2")
    t1, t2 = totals_block(part1), totals_block(part2)
    assert t1["sources"] == 1 and t1["reject_rows"] == 1 and t1["source_seconds"] == 3.0
    total = add_totals(t1, t2)
    assert total["clips"] == 2 and total["clips_by_bucket"] == {"x": 1, "y": 1}
    assert total["bytes_by_bucket"] == {"x": 5, "y": 7}
    assert total["sources"] == 2 and total["sources_with_clips"] == 1
    assert total["rejects_by_stage"] == {"scene": 1, "discover": 1}


def _manifest(digest: str = "ab" * 32) -> dict:
    totals = {"clips": 3, "clips_by_bucket": {"b1": 3}, "bytes_by_bucket": {"b1": 30}, "sources": 3,
              "sources_with_clips": 2, "source_seconds": 4.0, "reject_rows": 1, "rejects_by_stage": {"discover": 1}}
    return build_manifest(digest=digest, totals=totals, fingerprint={"models": {"clip": {"weights": "random-init"}}},
                          bucket_specs={"b1": {"num_frames": 9}},
                          bucket_shapes={"b1": {"latents": [4, 9, 8, 8], "text_embedding": [77, 64],
                                                "image_embedding": [64]}},
                          shard_files={"b1": 2})


def test_manifest_is_small_deterministic_and_counts_files() -> None:
    m = _manifest()
    assert m == _manifest() and json.dumps(m) == json.dumps(_manifest())
    assert m["schema_version"] == SCHEMA_VERSION and m["random_init"] is True
    assert m["totals"]["inputs"] == 2 and m["totals"]["ignored_files"] == 1  # the discover reject is not an input
    assert m["totals"]["files_per_1000_clips"] == pytest.approx(666.67)
    assert m["buckets"]["b1"] == {"num_frames": 9, "rows": 3, "files": 2, "bytes": 30, "latent_shape": [4, 9, 8, 8],
                                  "text_shape": [77, 64], "image_embedding_dim": 64}
    assert m["files"]["index"] == "index/" + "ab" * 8
    assert "files" not in m["buckets"]["b1"] or isinstance(m["buckets"]["b1"]["files"], int)  # no file lists
    assert records_digest([("a", 1), ("b", 2)]) == records_digest([("b", 2), ("a", 1)]) != records_digest([("a", 1)])


def test_old_manifest_versions_get_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1}))
    with pytest.raises(ManifestError, match=f"schema_version 1, this code reads {SCHEMA_VERSION}; version 1 outputs"):
        read_manifest(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="run the pipeline first"):
        read_manifest(str(tmp_path / "none"))


def test_index_and_rejects_of_an_empty_output_read_as_empty_tables(tmp_path: Path) -> None:
    m = _manifest()
    assert read_index(str(tmp_path), m, ["clip_id", "shard"]).num_rows == 0
    assert read_rejects(str(tmp_path), m).num_rows == 0
    (tmp_path / m["files"]["rejects"]).mkdir(parents=True)  # a run with no rejects writes an empty folder
    assert read_rejects(str(tmp_path), m).column_names[:2] == ["source_id", "source_uri"]
    assert read_index(str(tmp_path), m, split="val").num_rows == 0


def test_only_a_gone_source_with_its_source_row_and_not_in_a_tar_is_closed() -> None:
    """attach_skip_ids: rows to do get their source's committed ids; a partly committed source with
    no row to do comes back as a row to close only when closing is safe."""
    import pyarrow as pa

    from pipeline.records import NOT_LISTED
    from pipeline.state import STATUS_SCHEMA, TO_DO_SCHEMA, attach_skip_ids, partial_rows

    def status(uri: str, sid: str | None, ids: list[str]) -> dict:
        return {"source_uri": uri, "source_id": sid, "size_bytes": 5 if sid else None, "mtime_ns": 1,
                "num_clips": 3 if sid else -1, "committed_clips": len(ids), "complete": False, "committed_ids": ids}

    parts = partial_rows(pa.Table.from_pylist([
        status("/v/listed.mp4", "s0", ["l1"]), status("/v/gone.mp4", "s1", ["g1"]),
        status("/v/nosrc.mp4", None, ["n1"]), status("/v/t.tar#512+5/m.mp4", "s3", ["t1"])], schema=STATUS_SCHEMA))
    todo = pa.Table.from_pylist([{"uri": "/v/listed.mp4", "size_bytes": 5, "mtime_ns": 1, "candidate": True,
                                  "reason": "", "source_id": "", "dup_of": "", "skip_clip_ids": ""}], schema=TO_DO_SCHEMA)
    out = {r["uri"]: (r["skip_clip_ids"], r["reason"]) for r in attach_skip_ids(pa.concat_tables([todo, parts])).to_pylist()}
    assert out == {"/v/listed.mp4": ('["l1"]', ""), "/v/gone.mp4": ('["g1"]', NOT_LISTED)}
