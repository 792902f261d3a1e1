"""eval/nightly.py: the eval set, the history, and whole nights on a tiny run (demo shards + DiT-tiny checkpoints)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from eval.history import append_rows, history_key, pending_checkpoints, read_history
from eval.plan import (
    ALL, PlanError, RealClip, choose_num_frames, choose_reals, open_index, plan_videos, split_counts, usable,
)
from eval.weights import CONVERTED_SHA256
from pipeline.shards import read_shard
from training import checkpoint as ckpt
from training.index import ShardIndex
from training.runlog import RunLog
from tests.browser import render
from tests.training.test_sample import decode_mp4, make_checkpoint

FAST = ["--set", "sampling.steps=2", "--set", "reals.max_clips=3", "--set", "report.strip_videos=2"]


# ---------------------------------------------------------------------------
# The eval set (no Ray, no models)
# ---------------------------------------------------------------------------


def test_usable_clips_and_frame_count() -> None:
    frames = np.array([17, 17, 9, 17, 33])  # clips in clip-id order
    positions, n = usable(frames, max_clips=0, frames=0)
    assert (positions.tolist(), n) == ([0, 1, 3, 4], 17)  # 33 frames are cut to 17; 9 are too few
    assert usable(frames, max_clips=2, frames=0)[0].tolist() == [0, 1]
    assert usable(frames, max_clips=0, frames=33) is None  # one clip: FVD needs two
    with pytest.raises(PlanError, match=">= 10 frames"):
        choose_num_frames(np.array([9, 1]))
    assert choose_num_frames(np.array([17, 33, 33, 9])) == 33
    assert choose_num_frames(np.array([17, 33, 17, 33])) == 33  # ties: the longer


def eval_data(out: Path, frames_by_split: dict[str, list[int]]) -> Path:
    """Real shards of one bucket whose clips have the given splits and frame counts."""
    from tests import datasets
    from tests.pipeline.test_shards import make_columns

    parts = []
    for part, (split, frames) in enumerate(frames_by_split.items()):
        cols = make_columns(len(frames), seed=part)
        cols["latents"] = np.zeros((len(frames), 4, 2, 4, 4), np.float16)
        cols["clip_id"] = [f"c-{split}-{i:02d}" for i in range(len(frames))]
        cols["split"], cols["num_frames"] = [split] * len(frames), frames
        cols["caption"] = [f"{split} caption {i}" for i in range(len(frames))]
        parts.append(cols)
    datasets.write_dataset(out, parts, {"code_version": "git:test", "models": {"vae": {"weights": "sha:1"}}})
    return out


def test_reals_are_held_out_clips_read_from_their_split_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = str(eval_data(tmp_path / "d", {"train": [17] * 4, "val": [17, 9, 33, 17]}))
    opened = []
    real_open = ShardIndex.open
    monkeypatch.setattr(ShardIndex, "open", lambda *a, **k: opened.append(k.get("split")) or real_open(*a, **k))
    reals, frames, split = choose_reals(data, "val", allow_train=True, max_clips=0, num_frames=0)
    assert opened == ["val"]  # the training clips' index is never read
    assert (frames, split) == (17, "val") and [c.clip_id for c in reals] == ["c-val-00", "c-val-02", "c-val-03"]
    assert [(c.caption, c.num_frames, c.split) for c in reals] == [
        ("val caption 0", 17, "val"), ("val caption 2", 33, "val"), ("val caption 3", 17, "val")]
    # Each RealClip points at its own row in the index the eval tasks open.
    index = open_index(data, split)
    for c in reals:
        table = read_shard(str(Path(data) / index.files[c.file]))
        assert table.slice(c.row, 1).column("clip_id")[0].as_py() == c.clip_id
    reals, _, _ = choose_reals(data, "val", True, max_clips=2, num_frames=0)
    assert [c.clip_id for c in reals] == ["c-val-00", "c-val-02"]


def test_reals_fall_back_to_every_split_only_when_allowed(tmp_path: Path) -> None:
    data = str(eval_data(tmp_path / "d", {"train": [17, 17, 9], "val": [17]}))
    reals, frames, split = choose_reals(data, "val", allow_train=True, max_clips=0, num_frames=0)
    assert ([c.clip_id for c in reals], frames, split) == (["c-train-00", "c-train-01", "c-val-00"], 17, ALL)
    with pytest.raises(PlanError, match=r"need >= 2 clips of split 'val'.*'train': 3, 'val': 1.*"
                                        r"output.val_fraction.*allow_train=true"):
        choose_reals(data, "val", allow_train=False, max_clips=0, num_frames=0)
    assert split_counts(data) == {"train": 3, "val": 1}


def clip(i: int, split: str = "train", frames: int = 17, w: int = 224) -> RealClip:
    return RealClip(f"c{i:02d}", split, f"b{frames}", 0, i, f"caption {i}", w, 128, frames)


def test_videos_pair_with_reals_and_take_seed_plus_index() -> None:
    reals = [clip(0, w=224), clip(1, w=304)]
    videos = plan_videos(reals, [], seed=5, num_videos=0, width_px=0, height_px=0, num_frames=17)
    assert [(v.prompt, v.seed, v.width_px, v.name) for v in videos] == [
        ("caption 0", 5, 224, "000-seed5"), ("caption 1", 6, 304, "001-seed6")]
    videos = plan_videos(reals, ["a", "b", "c"], seed=0, num_videos=4, width_px=96, height_px=64, num_frames=9)
    assert [(v.prompt, v.seed, v.width_px, v.height_px, v.num_frames) for v in videos] == [
        ("a", 0, 96, 64, 9), ("b", 1, 96, 64, 9), ("c", 2, 96, 64, 9), ("a", 3, 96, 64, 9)]


# ---------------------------------------------------------------------------
# History
# ---------------------------------------------------------------------------


def test_pending_checkpoints_and_no_duplicate_rows(tmp_path: Path) -> None:
    ckpts = [(2, f"{tmp_path}/checkpoint-00000002"), (4, f"{tmp_path}/checkpoint-00000004")]
    row = {"checkpoint": "checkpoint-00000002", "steps_done": 2, "eval_sha256": "e1", "timestamp": "t"}
    append_rows(str(tmp_path), [row])
    history = read_history(str(tmp_path))
    assert pending_checkpoints(ckpts, history, "e1") == ([ckpts[1]], [ckpts[0]])
    assert pending_checkpoints(ckpts, history, "e1", latest_only=True) == ([ckpts[1]], [])
    assert pending_checkpoints(ckpts, history, "e2") == (ckpts, [])  # another eval set: everything again
    with pytest.raises(ValueError, match="already holds checkpoint-00000002"):
        append_rows(str(tmp_path), [dict(row, timestamp="later")])
    assert len(read_history(str(tmp_path))) == 1


def test_clear_errors_for_missing_run_or_checkpoints(tmp_path: Path) -> None:
    from eval.nightly import main

    with pytest.raises(SystemExit, match="run dir .*nope does not exist"):
        main(["--run", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="no checkpoints in"):
        main(["--run", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown config key 'sampling.stepz'"):
        main(["--run", str(tmp_path), "--set", "sampling.stepz=3"])


# ---------------------------------------------------------------------------
# Whole nights on local Ray
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(demo_pipeline_output: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo shards from the real pipeline, and a run dir with DiT-tiny checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("nightly")
    run = root / "run"
    for steps in (2, 4):
        make_checkpoint(run, demo_pipeline_output, steps, seed=steps)
    log = RunLog(str(run), steps_done=0, tensorboard=False)
    for s in range(4):
        log.write({"step": s, "epoch": 0, "loss": 1.0 / (1 + s), "lr": 1e-3})
    log.close()
    return run


@pytest.mark.slow
def test_nights_evaluate_new_checkpoints_once(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from eval.nightly import main

    first = main(["--run", str(tiny_run), "--latest", *FAST])
    assert [r["checkpoint"] for r in first["evaluated"]] == ["checkpoint-00000004"] and first["skipped"] == []
    second = main(["--run", str(tiny_run), *FAST])
    assert [r["checkpoint"] for r in second["evaluated"]] == ["checkpoint-00000002"]
    assert second["skipped"] == ["checkpoint-00000004"]
    # the same data and eval set: the second night read the reals' features back, decoded no clip
    assert (first["reals_from_cache"], second["reals_from_cache"]) == (False, True)
    cached = sorted(p.name.split("-")[0] for p in (tiny_run / "eval" / "cache").glob("*.json"))
    assert cached == ["data_card", "reals"]
    # ... and a night with nothing new reads no clip index at all: plan and data card come from the cache
    monkeypatch.setattr("eval.plan.choose_reals", lambda *a, **k: pytest.fail("the reals were chosen again"))
    monkeypatch.setattr("eval.nightly.data_card", lambda *a, **k: pytest.fail("the data card was computed again"))
    third = main(["--run", str(tiny_run), *FAST])
    monkeypatch.undo()
    assert third["evaluated"] == [] and third["skipped"] == ["checkpoint-00000002", "checkpoint-00000004"]
    assert third["eval_sha256"] == first["eval_sha256"] and third["reals_from_cache"] is None
    assert first["errors"] == second["errors"] == third["errors"] == []

    history = read_history(str(tiny_run))
    assert sorted(r["steps_done"] for r in history) == [2, 4]
    assert len({history_key(r) for r in history}) == 2
    for row in history:
        assert math.isfinite(row["fvd"]) and row["fvd"] > 0
        assert (row["n_real"], row["n_fake"], row["num_frames"]) == (3, 3, 17)
        assert 0 < row["clip_score_real"] < 100 and row["clip_score"] >= 0
        assert row["detector_sha256"] == CONVERTED_SHA256
        assert row["random_init"] is True and {"clip", "vae"} <= set(row["random_init_models"])
        assert row["reals_held_out"] is False and row["reals_split"] == "all"  # the demo holds out nothing
        assert set(row["fingerprints"]) >= {"checkpoint_weights_sha256", "data_sha256", "clip_weights_sha256",
                                            "vae_weights_sha256", "detector_sha256", "eval_sha256",
                                            "eval_code_version", "checkpoint_code_version"}
    assert history[0]["fvd"] != history[1]["fvd"]  # different weights, different samples

    # every generated video is a playable mp4 at its paired real clip's size, with its settings beside it
    samples = Path(history[0]["samples_uri"])
    plan = json.loads(next((tiny_run / "eval" / "sets").glob("*.json")).read_text())["plan"]
    for v in plan["videos"]:
        frames, _, _ = decode_mp4(samples / f"{v['index']:03d}-seed{v['seed']}.mp4")
        assert frames.shape == (17, v["height_px"], v["width_px"], 3)
        assert json.loads((samples / f"{v['index']:03d}-seed{v['seed']}.json").read_text())["prompt"] == v["prompt"]
    assert (samples / "strip.jpg").stat().st_size > 0

    report = (tiny_run / "eval" / "report.html").read_text()
    assert "checkpoint-00000002" in report and "checkpoint-00000004" in report
    assert "random-init" in report and "Reals are not held out" in report
    assert "steps logged" in report and "No training metrics" not in report  # the run log was read
    # What a reader's browser makes of it: no console errors, every image decodes, a screenshot kept.
    page = render(tiny_run / "eval" / "report.html", "nightly-report")
    assert page.console_errors == [] and page.broken_images == [], page
    assert page.images >= 4 and "DiTharos" in page.title and page.height_px > 900
    assert page.screenshot.stat().st_size > 10_000
    summary = json.loads((tiny_run / "eval" / "summary.json").read_text())
    assert summary["report"] == str(tiny_run / "eval" / "report.html") and summary["evaluated"] == []

    # deterministic: the same checkpoint in another run dir scores exactly the same, so the reals
    # read back from the cache (night 2, this checkpoint) equal reals decoded afresh (this run dir)
    other = tmp_path / "run"
    shutil.copytree(tiny_run / "checkpoint-00000002", other / "checkpoint-00000002")
    fresh = main(["--run", str(other), *FAST])
    again = fresh["evaluated"][0]
    ref = next(r for r in history if r["steps_done"] == 2)
    assert fresh["reals_from_cache"] is False
    assert (again["fvd"], again["clip_score"]) == (ref["fvd"], ref["clip_score"])



@pytest.mark.slow
def test_a_broken_checkpoint_is_reported_and_retried_next_night(tiny_run: Path, tmp_path: Path) -> None:
    from eval.nightly import main

    run = tmp_path / "run"
    for name in ("checkpoint-00000002", "checkpoint-00000004"):
        shutil.copytree(tiny_run / name, run / name)
    (run / "checkpoint-00000002" / "ema.safetensors").write_bytes(b"not safetensors")
    data = Path(json.loads((run / "checkpoint-00000004" / ckpt.STATE_FILE).read_text())["data_uri"])
    expert = make_checkpoint(run, data, 6, seed=6, t_range=(0.875, 1.0))  # one expert, its partner not named
    out = main(["--run", str(run), *FAST])
    assert [r["checkpoint"] for r in out["evaluated"]] == ["checkpoint-00000004"]
    errors = sorted(out["errors"])  # in the order the tasks finished
    assert len(errors) == 2 and "checkpoint-00000002" in errors[0]
    assert "checkpoint-00000006" in errors[1] and "one expert of a pair" in errors[1]
    assert [r["steps_done"] for r in read_history(str(run))] == [4]
    assert "checkpoint-00000002" in (run / "eval" / "report.html").read_text()  # the error is in the report
    _, skipped = pending_checkpoints(ckpt.list_checkpoints(str(run)), read_history(str(run)), out["eval_sha256"])
    assert [Path(uri).name for _, uri in skipped] == ["checkpoint-00000004"]  # the broken one stays pending
    # With sampling.other_expert the expert is evaluated with its partner (another night's settings).
    low = make_checkpoint(tmp_path / "low", data, 6, seed=7, t_range=(0.0, 0.875))
    paired = main(["--run", str(run), "--latest", *FAST, "--set", f"sampling.other_expert={low}",
                   "--set", "sampling.guidance_scale_low_noise=1.5"])
    assert [r["checkpoint"] for r in paired["evaluated"]] == [expert.name] and paired["errors"] == []
    assert math.isfinite(paired["evaluated"][0]["fvd"])
    row = next(r for r in read_history(str(run)) if r["steps_done"] == 6)
    written = json.loads(next(Path(row["samples_uri"]).glob("*-seed*.json")).read_text())
    assert written["experts"] == {"boundary": 0.875, "other_expert": str(low), "checkpoint_is": "high-noise",
                                  "low_noise_guidance": 1.5}
