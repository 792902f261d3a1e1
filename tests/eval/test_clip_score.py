"""CLIP-score: the formula on hand-made embeddings, and end to end with the tiny random-init CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.clip_score import clip_score, clip_score_from_embeddings, main
from pipeline.clip_model import ClipConfig, ClipModel, load_clip
from tests import media

E1, E2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])


def unit(angle_cos: float) -> torch.Tensor:
    """A 2-D unit vector whose cosine with E1 is `angle_cos`."""
    return torch.tensor([angle_cos, (1 - angle_cos**2) ** 0.5])


@pytest.fixture(scope="module")
def tiny_clip() -> ClipModel:
    return load_clip(ClipConfig(arch="tiny", seed=0))


def test_per_frame_cosine_times_100_averaged_over_frames_then_videos() -> None:
    frames = [torch.stack([E1, E1]), torch.stack([E1, E2])]  # video 0: cos 1, 1; video 1: cos 0, 1
    result = clip_score_from_embeddings(frames, torch.stack([E1, E2]))
    assert result.per_video == pytest.approx([100.0, 50.0]) and result.clip_score == pytest.approx(75.0)
    scaled = clip_score_from_embeddings([3 * f for f in frames], torch.stack([5 * E1, 0.1 * E2]))
    assert scaled.clip_score == pytest.approx(75.0)  # embeddings are normalised first


def test_videos_weigh_equally_whatever_their_length() -> None:
    frames = [E1[None], torch.stack([E2, E2, E2])]  # 1 frame at cos 1, 3 frames at cos 0
    assert clip_score_from_embeddings(frames, torch.stack([E1, E1])).clip_score == pytest.approx(50.0)  # not 25


def test_clamp_at_zero_comes_after_averaging() -> None:
    text = torch.stack([E1, E1])
    negative = clip_score_from_embeddings([unit(0.3)[None], unit(-0.5)[None]], text)
    assert negative.per_video == pytest.approx([30.0, -50.0])  # per-video scores are not clamped
    assert negative.clip_score == 0.0  # mean -10 -> 0
    mixed = clip_score_from_embeddings([unit(0.3)[None], unit(-0.1)[None]], text)
    assert mixed.clip_score == pytest.approx(10.0)  # clamping per video first would give 15


def test_prompt_count_must_match() -> None:
    with pytest.raises(ValueError, match="2 videos but 1 prompts"):
        clip_score_from_embeddings([E1[None], E1[None]], E1[None])


def test_matches_clip_embeddings_directly(tiny_clip: ClipModel) -> None:
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 256, (t, 40, 56, 3), dtype=np.uint8) for t in (3, 5)]
    prompts = ["a red car", "a person riding a bike"]
    result = clip_score(tiny_clip, videos, prompts)
    text = tiny_clip.embed_texts(prompts)
    expected = [float(100 * (tiny_clip.embed_images(v) @ text[i]).mean()) for i, v in enumerate(videos)]
    assert result.per_video == pytest.approx(expected, abs=1e-4)
    assert result.clip_score == pytest.approx(max(np.mean(expected), 0.0), abs=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        clip_score(tiny_clip, [videos[0].astype(np.float32)], prompts[:1])


def test_cli_npy_with_prompts_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "v.npy", np.random.default_rng(1).integers(0, 256, (2, 4, 32, 32, 3), dtype=np.uint8))
    (tmp_path / "prompts.txt").write_text("a dog\na cat\n")
    main([str(tmp_path / "v.npy"), "--prompts", str(tmp_path / "prompts.txt"), "--set", "clip.seed=3"])
    report = json.loads(capsys.readouterr().out)
    assert report["n_videos"] == 2 and [v["prompt"] for v in report["per_video"]] == ["a dog", "a cat"]
    assert report["clip"]["arch"] == "tiny" and report["clip"]["seed"] == 3
    assert report["clip_score"] == max(np.mean([v["score"] for v in report["per_video"]]), 0.0)
    (tmp_path / "one.txt").write_text("only one\n")
    with pytest.raises(SystemExit, match="1 prompts for 2 videos"):
        main([str(tmp_path / "v.npy"), "--prompts", str(tmp_path / "one.txt")])


def test_cli_folder_uses_sidecar_captions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i, caption in enumerate(["waves on a beach", "a busy street"]):  # 6 and 9 frames: lengths may differ
        media.write_video(tmp_path / f"v{i}.mp4", media.scene_frames(64, 48, 6 + 3 * i, 3, seed=i), codec="libx264",
                          fps=24)
        (tmp_path / f"v{i}.txt").write_text(caption + "\n")
    main([str(tmp_path)])
    report = json.loads(capsys.readouterr().out)
    assert [v["prompt"] for v in report["per_video"]] == ["waves on a beach", "a busy street"]
    main([str(tmp_path), "--num-frames", "4"])
    assert json.loads(capsys.readouterr().out)["n_videos"] == 2
    (tmp_path / "v1.txt").unlink()
    with pytest.raises(SystemExit, match="no prompt for .*v1.mp4"):
        main([str(tmp_path)])
