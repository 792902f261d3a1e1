"""pipeline/steps.py on plain rows: cut emits clips then side rows; model stages pass side rows and reject clips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.listing import listing_row
from pipeline.settings import PipelineConfig
from pipeline.steps import VAEStage, make_cut_fn, make_probe_fn, side_row


def probed(path: Path, cfg: PipelineConfig) -> dict:
    st = path.stat()
    row = dict(listing_row(str(path), st.st_size, st.st_mtime_ns), source_id="", dup_of="")
    return make_probe_fn(cfg)(row)


def as_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    out = {}
    for k in rows[0]:
        arr = np.empty(len(rows), dtype=object)
        arr[:] = [r[k] for r in rows]
        out[k] = arr
    return out


def test_cut_yields_clips_then_rejects_then_one_source_row(sample_clips: dict[str, Path]) -> None:
    cfg = PipelineConfig()
    row = probed(sample_clips["bikes"], cfg)
    out = list(make_cut_fn(cfg)(row))
    kinds = [r["kind"] for r in out]
    assert kinds[-1] == "source" and "clip" in kinds
    assert kinds == sorted(kinds, key=lambda k: {"clip": 0, "reject": 1, "source": 2}[k])  # clips first
    clips = [r for r in out if r["kind"] == "clip"]
    source = json.loads(out[-1]["record_json"])
    assert source["num_clips"] == len(clips) and source["source_uri"] == str(sample_clips["bikes"])
    assert all(set(r) == set(out[0]) for r in out)  # one set of columns for every kind of row
    # an interrupted run committed the first clip: it is not cut again, but still counted
    again = list(make_cut_fn(cfg)(dict(row, skip_clip_ids=json.dumps([clips[0]["clip_id"]]))))
    assert [r["clip_id"] for r in again if r["kind"] == "clip"] == [c["clip_id"] for c in clips[1:]]
    assert json.loads(again[-1]["record_json"])["num_clips"] == len(clips)


def test_a_rejected_source_becomes_a_reject_and_an_empty_source_row(tmp_path: Path) -> None:
    cfg = PipelineConfig()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    out = list(make_cut_fn(cfg)(probed(bad, cfg)))
    assert [r["kind"] for r in out] == ["reject", "source"]
    rej, src = (json.loads(r["record_json"]) for r in out)
    assert rej["stage"] == "probe" and "not a readable media container" in rej["reason"]
    assert src["num_clips"] == 0 and src["num_rejects"] == 1 and rej["source_id"] == src["source_id"] != ""


def test_vae_failure_rejects_that_clip_only_and_side_rows_pass(sample_clips: dict[str, Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = PipelineConfig()
    rows = list(make_cut_fn(cfg)(probed(sample_clips["bikes"], cfg)))
    clips = [r for r in rows if r["kind"] == "clip"][:3]
    assert len(clips) == 3
    side = side_row({"kind": "reject", "source_id": "s", "source_uri": "u", "stage": "scene", "reason": "short"})
    stage = VAEStage(cfg)
    real = stage.vae.encode
    poisoned = clips[1]["clip_id"]

    def encode(frames: np.ndarray):
        if any(np.array_equal(f, clips[1]["frames"]) for f in frames):
            raise RuntimeError("NaN in latents")
        return real(frames)

    monkeypatch.setattr(stage.vae, "encode", encode)
    out = stage(as_batch(clips + [side]))
    kinds = dict(zip(out["clip_id"], out["kind"]))
    assert kinds[poisoned] == "reject" and list(out["kind"]).count("clip") == 2
    rec = json.loads(out["record_json"][list(out["clip_id"]).index(poisoned)])
    assert rec["stage"] == "vae" and "NaN in latents" in rec["reason"] and rec["clip_id"] == poisoned
    assert out["kind"][-1] == "reject" and json.loads(out["record_json"][-1])["reason"] == "short"
    good = [i for i, k in enumerate(out["kind"]) if k == "clip"]
    assert all(out["latents"][i].ndim == 4 and out["latents"][i].size > 0 for i in good)
    assert "frames" not in out


def test_source_fn_reads_a_remote_source_once_and_gives_what_probe_then_cut_give(
        sample_clips: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tar member stands for a remote file (its bytes are always copied out): the fused step reads
    it once — hashed for its id while copied — where probe + cut read it three times."""
    import tarfile

    from pipeline import storage
    from pipeline.steps import make_source_fn

    src = sample_clips["carphone_pristine"]
    tar = tmp_path / "videos.tar"
    with tarfile.open(tar, "w") as t:
        t.add(src, arcname="a/carphone.mp4")
    with tarfile.open(tar) as t:
        info = t.getmember("a/carphone.mp4")
    uri = storage.member_uri(str(tar), info.offset_data, info.size, info.name)
    row = dict(listing_row(uri, info.size, 0), source_id="", dup_of="")
    reads: list[str] = []
    real = storage.iter_chunks

    def counting(u: str, *a, **kw):
        reads.append(u)
        return real(u, *a, **kw)

    monkeypatch.setattr(storage, "iter_chunks", counting)
    cfg = PipelineConfig()
    fused = list(make_source_fn(cfg)(row))
    assert len(reads) == 1
    reads.clear()
    apart = list(make_cut_fn(cfg)(make_probe_fn(cfg)(row)))
    assert len(reads) == 3  # the two-stage path: hash, probe's copy, cut's copy
    assert [r["kind"] for r in fused] == [r["kind"] for r in apart] and "clip" in [r["kind"] for r in fused]
    assert [r["clip_id"] for r in fused] == [r["clip_id"] for r in apart]
    assert json.loads(fused[-1]["record_json"]) == json.loads(apart[-1]["record_json"])  # same source id and row
    assert all(np.array_equal(a["frames"], b["frames"]) for a, b in zip(fused, apart) if a["kind"] == "clip")


def test_source_fn_rejects_unreadable_and_listed_rejects_without_a_copy(tmp_path: Path) -> None:
    from pipeline.steps import make_source_fn

    cfg = PipelineConfig()
    gone = dict(listing_row(str(tmp_path / "gone.mp4"), 1000, 0), source_id="", dup_of="")
    out = list(make_source_fn(cfg)(gone))
    rej = json.loads(out[0]["record_json"])
    assert [r["kind"] for r in out] == ["reject", "source"] and rej["stage"] == "probe"
    assert "cannot read file" in rej["reason"]
    dup = dict(listing_row(str(tmp_path / "gone.mp4"), 1000, 0), source_id="src" + "0" * 29,
               dup_of=str(tmp_path / "first.mp4"))
    rej = json.loads(list(make_source_fn(cfg)(dup))[0]["record_json"])
    assert rej["stage"] == "dedupe" and "same content as" in rej["reason"]


def test_only_a_partly_committed_source_that_cannot_be_cut_again_is_closed() -> None:
    from pipeline.listing import listing_row
    from pipeline.records import CLOSED_STAGE, NOT_LISTED
    from pipeline.steps import closing_row

    base = dict(listing_row("/v/a.mp4", 10, 1), source_id="s1", dup_of="", skip_clip_ids='["c1", "c2"]')
    gone = closing_row(dict(base, candidate=False, reason=NOT_LISTED))
    record = json.loads(gone["record_json"])
    assert gone["kind"] == "reject" and record["stage"] == CLOSED_STAGE and "2 clip(s)" in record["reason"]
    assert "same content as /v/b.mp4" in json.loads(closing_row(dict(base, dup_of="/v/b.mp4"))["record_json"])["reason"]
    assert closing_row(base) is None  # listed, not a copy: cut again, skipping c1 and c2
    assert closing_row(dict(base, dup_of="/v/b.mp4", skip_clip_ids="[]")) is None  # nothing committed: a plain dedupe reject
