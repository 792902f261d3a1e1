"""pipeline/filters.py through the probe and cut steps: generated footage for every filter, bars cropped."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.filters import FilterConfig, Range, check, crop_px
from pipeline.settings import PipelineConfig
from pipeline.steps import make_cut_fn
from tests.media import write_video
from tests.pipeline.test_steps import probed

FPS = 24
W, H = 320, 240


def texture(h: int, w: int, seed: int = 0, sigma: float = 2.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), sigma)


def pan(num_frames: int = 3 * FPS, px_per_frame: float = 1.5, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """An ordinary moving shot: a camera pan over a detailed scene. (T, h, w, 3) uint8."""
    wide = texture(h, w + int(px_per_frame * num_frames) + 2, seed)
    return np.stack([wide[:, int(i * px_per_frame):int(i * px_per_frame) + w] for i in range(num_frames)])


def video(tmp_path: Path, name: str, frames: np.ndarray) -> Path:
    return write_video(tmp_path / f"{name}.mp4", list(frames), codec="libx264", fps=FPS,
                       options={"crf": "18", "preset": "veryfast"})


def cut(path: Path, cfg: PipelineConfig) -> tuple[list[dict], list[dict]]:
    """(clip rows, reject records) of one source through the probe and cut steps."""
    out = list(make_cut_fn(cfg)(probed(path, cfg)))
    clips = [r for r in out if r["kind"] == "clip"]
    rejects = [json.loads(r["record_json"]) for r in out if r["kind"] == "reject"]
    source = json.loads(out[-1]["record_json"])
    assert source["kind"] == "source"
    filtered = [r for r in rejects if r["stage"] == "filter"]
    assert source["num_clips"] == len(clips) + len(filtered)  # a filtered clip is accounted for by its reject
    return clips, rejects


def the_filter(rejects: list[dict]) -> set[str]:
    return {r["score"] for r in rejects if r["stage"] == "filter"}


# -- each filter on footage made for it ------------------------------------------------------


def test_ordinary_moving_scenes_pass_every_default(tmp_path: Path) -> None:
    clips, rejects = cut(video(tmp_path, "pan", pan()), PipelineConfig())
    assert clips and not the_filter(rejects), rejects
    assert any(c["num_frames"] > 1 for c in clips)
    assert len({c["phash"] for c in clips}) > 1  # each clip's middle frame hashed (int64, differs along a pan)
    for c in clips:
        assert c["sharpness"] > 15 and c["black_fraction"] == 0.0 and list(c["crop_px"]) == [0, 0, 0, 0]
        assert c["num_frames"] == 1 or c["motion"] > 0.003


def test_the_sample_clips_pass_every_default(sample_clips: dict[str, Path]) -> None:
    cfg = PipelineConfig()
    for name, path in sample_clips.items():
        clips, rejects = cut(path, cfg)
        assert clips and not the_filter(rejects), (name, rejects)


@pytest.mark.parametrize("kind, score", [
    ("frozen", "max_frame_diff"), ("black", "black_fraction"), ("blurred", "sharpness"),
    ("blown_out", "bright_fraction"), ("static_flicker", "motion"),
])
def test_each_filter_drops_the_footage_it_is_for(tmp_path: Path, kind: str, score: str) -> None:
    moving = pan()
    frames = {
        "frozen": np.repeat(moving[:1], len(moving), axis=0),  # one frame held for 3 s
        "black": np.full_like(moving, 6),  # a black slate
        "blurred": np.stack([cv2.GaussianBlur(f, (0, 0), 4.0) for f in moving]),  # out of focus
        "blown_out": np.where(np.arange(W)[None, None, :, None] < 0.6 * W, 255, moving).astype(np.uint8),
        # a still scene under flickering light: frames differ (not frozen) but nothing moves
        "static_flicker": np.clip(moving[:1].astype(np.float32) + 6 * np.sin(0.7 * np.arange(len(moving)))[
            :, None, None, None], 0, 255).astype(np.uint8),
    }[kind]
    clips, rejects = cut(video(tmp_path, kind, frames), PipelineConfig())
    multi = [c for c in clips if c["num_frames"] > 1]
    assert not multi, [(c["num_frames"], {k: c[k] for k in ("motion", "max_frame_diff", "sharpness")}) for c in multi]
    filtered = [r for r in rejects if r["stage"] == "filter"]
    assert filtered and {r["score"] for r in filtered} == {score}, filtered
    for r in filtered:  # the reject names the score, its value, and carries every score for the data card
        assert r["value"] == r[score] and f"{score} " in r["reason"] and r["clip_id"]
        rng = getattr(FilterConfig(), score)
        assert (rng.min is not None and r["value"] < rng.min) or (rng.max is not None and r["value"] > rng.max)


def test_thresholds_come_from_config_and_a_disabled_filter_keeps_everything(tmp_path: Path) -> None:
    path = video(tmp_path, "pan", pan(px_per_frame=3.0))
    fast = load_config(PipelineConfig, overrides=["filter.motion.max=0.1"])
    clips, rejects = cut(path, fast)  # 3 px/frame over 320 px at 24 fps = 0.225 widths/s
    assert the_filter(rejects) == {"motion"} and all(c["num_frames"] == 1 for c in clips)
    assert all(r["value"] == pytest.approx(0.225, rel=0.25) for r in rejects if r["stage"] == "filter")
    off = load_config(PipelineConfig, overrides=["filter.motion.max=0.1", "filter.enabled=false"])
    clips, rejects = cut(path, off)
    assert not the_filter(rejects) and any(c["num_frames"] > 1 for c in clips)
    with pytest.raises(ConfigError, match="valid keys.*sharpness"):
        load_config(PipelineConfig, overrides=["filter.blur.min=3"])
    with pytest.raises(ValueError, match="min 2.0 > max 1.0"):
        load_config(PipelineConfig, overrides=["filter.motion.min=2", "filter.motion.max=1"])


def test_check_order_and_one_frame_clips() -> None:
    cfg = FilterConfig()
    frozen_black = {"motion": 0.0, "max_frame_diff": 0.0, "sharpness": 0.0, "black_fraction": 1.0,
                    "bright_fraction": 0.0}
    assert check(frozen_black, cfg, 17).score == "black_fraction"  # filed under the first failure
    still = dict(frozen_black, black_fraction=0.0, sharpness=100.0)
    assert check(still, cfg, 17).score == "max_frame_diff"
    assert check(still, cfg, 1) is None  # a 1-frame clip has no motion to measure
    assert Range(min=1.0).failure(0.5) == "< min 1" and Range(max=1.0).failure(2.0) == "> max 1"


# -- black borders ------------------------------------------------------------------------


def test_crop_px_scales_up_and_keeps_even_sizes() -> None:
    assert crop_px((27, 27, 0, 0), (192, 256), (480, 640)) == (68, 68, 0, 0)  # 27 × 2.5 = 67.5 → 68
    assert crop_px((0, 0, 3, 5), (144, 256), (720, 1280)) == (0, 0, 16, 26)  # 15 → 16, 25 → 26
    assert crop_px((0, 0, 0, 0), (144, 256), (720, 1280)) == (0, 0, 0, 0)


def test_a_letterboxed_film_is_cropped_and_bucketed_at_its_own_aspect(tmp_path: Path) -> None:
    # A 2.39:1 picture inside a 4:3 frame (640×480: 268 rows of picture, 106-row bars).
    film = pan(h=268, w=640, px_per_frame=2.0)
    frames = np.zeros((len(film), 480, 640, 3), np.uint8)
    frames[:, 106:374] = film
    path = video(tmp_path, "letterboxed", frames)
    cfg = PipelineConfig()
    row = probed(path, cfg)
    crop = json.loads(row["info"])["crop_px"]
    assert crop[2:] == [0, 0] and 104 <= crop[0] <= 110 and 104 <= crop[1] <= 110, crop
    clips, _ = cut(path, cfg)
    assert clips and all("2_39x1" in c["bucket"] for c in clips), [c["bucket"] for c in clips]
    for c in clips:
        edges = c["frames"][:, [0, -1]].astype(np.float32)  # (T, 2, W, 3): first and last row
        assert edges.mean() > 40, "a black bar was left in the clip"
        assert list(c["crop_px"]) == crop
    uncropped = load_config(PipelineConfig, overrides=["filter.crop_borders=false"])
    clips, _ = cut(path, uncropped)
    assert clips and all("4x3" in c["bucket"] for c in clips)  # without cropping: 4:3 with its bars
