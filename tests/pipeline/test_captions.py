"""Captioning: keyframe choice, ranking logic, and ClipRankCaptioner on the tiny random-init CLIP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.captions import (
    CaptionConfig,
    ClipRankCaptioner,
    clip_image_embedding,
    keyframe_indices,
    make_captioner,
    rank_candidates,
)
from pipeline.clip_model import ClipConfig, ClipModel, load_clip
from pipeline.config import ConfigError, load_config

SMALL = dict(templates=["a video of {}", "footage of {}"], vocabulary=["a forest", "a city street", "a cartoon rabbit"])


def keyframes(k: int, h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (k, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def clip() -> ClipModel:
    return load_clip(ClipConfig())


@pytest.fixture(scope="module")
def captioner(clip: ClipModel) -> ClipRankCaptioner:
    return ClipRankCaptioner(clip, CaptionConfig(**SMALL))


# ---------------------------------------------------------------------------
# keyframe_indices
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames", [1, 2, 3, 7, 16, 17, 100, 1001])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 16])
def test_keyframe_indices_properties(num_frames: int, k: int) -> None:
    idx = keyframe_indices(num_frames, k)
    assert len(idx) == min(k, num_frames)
    assert idx == sorted(set(idx))  # distinct, increasing
    assert all(0 <= i < num_frames for i in idx)
    # centred: symmetric about the clip's middle, to within one frame of integer rounding
    assert all(abs((a + b) - (num_frames - 1)) <= 1 for a, b in zip(idx, reversed(idx)))


def test_keyframe_indices_values() -> None:
    assert keyframe_indices(17, 1) == [8]
    assert keyframe_indices(30, 3) == [5, 15, 25]
    assert keyframe_indices(4, 9) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        keyframe_indices(0, 3)
    with pytest.raises(ValueError):
        keyframe_indices(10, 0)


# ---------------------------------------------------------------------------
# Ranking logic on hand-made embeddings
# ---------------------------------------------------------------------------


def test_rank_picks_the_constructed_match() -> None:
    image = torch.nn.functional.normalize(torch.tensor([3.0, 4.0, 0.0]), dim=0)
    texts = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    best, score = rank_candidates(image, texts)
    assert best == 1 and score == pytest.approx(100.0)
    best, score = rank_candidates(image, texts[[0, 2, 3]])
    assert best == 2 and score == pytest.approx(80.0)


def test_rank_ties_go_to_the_first_candidate() -> None:
    image = torch.tensor([1.0, 0.0])
    best, _ = rank_candidates(image, torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]))
    assert best == 1
    # last-bit differences (the same text in another row of a BLAS product) still tie ...
    best, _ = rank_candidates(image, torch.tensor([[1.0 - 1e-7, 0.0], [1.0, 0.0]]))
    assert best == 0
    # ... a real difference in score does not
    best, _ = rank_candidates(image, torch.tensor([[1.0 - 1e-5, 0.0], [1.0, 0.0]]))
    assert best == 1


def test_clip_image_embedding_is_normalised_mean() -> None:
    frames = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    torch.testing.assert_close(clip_image_embedding(frames), torch.tensor([0.5**0.5, 0.5**0.5]))


# ---------------------------------------------------------------------------
# ClipRankCaptioner end to end
# ---------------------------------------------------------------------------


def test_caption_is_best_candidate_with_true_score(clip: ClipModel, captioner: ClipRankCaptioner) -> None:
    frames = [keyframes(3, 48, 64, seed=0), keyframes(2, 80, 40, seed=1)]  # clips of different sizes
    sidecars = [[], ["a sidecar about a boat"]]
    results = captioner.caption(frames, sidecars)
    for res, kf, sidecar in zip(results, frames, sidecars):
        image = clip_image_embedding(clip.embed_images(kf))
        np.testing.assert_allclose(res.image_embedding, image.numpy(), rtol=1e-5, atol=1e-6)
        assert res.image_embedding.dtype == np.float32 and res.image_embedding.shape == (64,)
        # the score is 100 * cosine with the chosen caption, recomputed independently
        assert res.score == pytest.approx(100 * float(clip.embed_texts([res.caption])[0] @ image), abs=1e-3)
        scores = 100 * (clip.embed_texts(captioner.template_texts + sidecar) @ image)  # this clip's candidates
        assert res.score == pytest.approx(float(scores.max()), abs=1e-3)
    assert results[0].source == "template" and results[0].caption in captioner.template_texts


def test_sidecar_matching_best_template_wins_tie(captioner: ClipRankCaptioner) -> None:
    kf = keyframes(3, 64, 64, seed=2)
    best = captioner.caption([kf], [[]])[0]
    worst_text = captioner.template_texts[
        int(torch.argmin(captioner.template_embeddings @ torch.from_numpy(best.image_embedding)))
    ]
    won = captioner.caption([kf], [["  ", worst_text, f" {best.caption}\n"]])[0]  # blanks dropped, stripped
    assert (won.caption, won.source) == (best.caption, "sidecar")
    assert won.score == pytest.approx(best.score, abs=1e-4)
    lost = captioner.caption([kf], [[worst_text]])[0]
    assert (lost.caption, lost.source) == (best.caption, "template")


def test_use_sidecar_false_ignores_sidecars(clip: ClipModel, captioner: ClipRankCaptioner) -> None:
    kf = keyframes(2, 32, 32, seed=3)
    best = captioner.caption([kf], [[]])[0]
    no_sidecar = make_captioner(CaptionConfig(**SMALL, use_sidecar=False), clip)
    res = no_sidecar.caption([kf], [[best.caption]])[0]
    assert res.source == "template"


def test_caption_input_errors(captioner: ClipRankCaptioner) -> None:
    with pytest.raises(ValueError, match="1 clips of keyframes but 2 sidecar lists"):
        captioner.caption([keyframes(1, 32, 32, 0)], [[], []])
    with pytest.raises(ValueError, match="K>=1"):
        captioner.caption([np.zeros((0, 32, 32, 3), np.uint8)], [[]])


def test_caption_config_validation() -> None:
    cfg = load_config(CaptionConfig, overrides=["num_keyframes=5", "clip.seed=3"])
    assert cfg.num_keyframes == 5 and cfg.clip.seed == 3 and len(cfg.vocabulary) >= 40
    with pytest.raises(ValueError, match="exactly one"):
        load_config(CaptionConfig, overrides=["templates=[no placeholder]"])
    with pytest.raises(ConfigError, match="not one of"):
        load_config(CaptionConfig, overrides=["captioner=vlm"])
