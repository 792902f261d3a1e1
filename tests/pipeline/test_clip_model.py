"""ClipModel on the tiny random-init open_clip CLIP: preprocessing, embeddings, per-token text path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import pipeline.clip_model as clip_model
from pipeline.clip_model import TINY_ARCH, ClipConfig, ClipModel, load_clip

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["a dog", "people riding bikes on a city street at night", ""]


def smooth_frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 (N, H, W, 3) low-frequency images: resampling differences stay small on them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = [np.stack([np.sin(xx / (7 + 5 * c) + yy / 11 + rng.uniform(0, 6)) for c in range(3)], -1) for _ in range(n)]
    return (np.stack(out) * 110 + 128).astype(np.uint8)


@pytest.fixture(scope="module")
def clip() -> ClipModel:
    return load_clip(ClipConfig())


def test_tiny_sizes(clip: ClipModel) -> None:
    assert (clip.image_size, clip.embed_dim, clip.text_width, clip.context_length) == (64, 64, 64, 77)
    assert TINY_ARCH in open_clip.list_models()


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------


def test_embed_images_normalised_any_size(clip: ClipModel) -> None:
    for h, w in [(64, 64), (90, 160), (200, 50), (17, 23)]:
        emb = clip.embed_images(smooth_frames(3, h, w))
        assert emb.shape == (3, 64) and emb.dtype == torch.float32
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert clip.embed_images(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, 64)


def test_preprocess_matches_open_clip_pil_transform(clip: ClipModel) -> None:
    # open_clip's own eval transform (PIL resize shortest side + center crop + normalise) is the reference
    _, _, pil_transform = open_clip.create_model_and_transforms(TINY_ARCH)
    std = clip.std.view(3, 1, 1)
    for h, w in [(90, 160), (160, 90), (64, 64), (33, 200)]:
        frames = smooth_frames(2, h, w, seed=h)
        ref = torch.stack([pil_transform(Image.fromarray(f)) for f in frames])
        diff = ((clip.preprocess(frames) - ref) * std).abs()  # in [0, 1] pixel units
        assert diff.mean() < 2e-3 and diff.max() < 0.01, (h, w, diff.mean(), diff.max())  # 1px shift: > 0.01 mean


def test_embed_images_chunking_is_invisible(clip: ClipModel, monkeypatch: pytest.MonkeyPatch) -> None:
    frames = smooth_frames(5, 40, 70)
    full = clip.embed_images(frames)
    monkeypatch.setattr(clip_model, "IMAGE_BATCH", 2)
    torch.testing.assert_close(clip.embed_images(frames), full, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(full[0], full[1])


def test_bad_frames_raise(clip: ClipModel) -> None:
    with pytest.raises(ValueError, match="uint8"):
        clip.embed_images(smooth_frames(1, 32, 32).astype(np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        clip.embed_images(smooth_frames(1, 32, 32)[0])


# ---------------------------------------------------------------------------
# Texts
# ---------------------------------------------------------------------------


def test_embed_texts_normalised_and_distinct(clip: ClipModel) -> None:
    emb = clip.embed_texts(TEXTS)
    assert emb.shape == (3, 64)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert (emb @ emb.T - torch.eye(3)).abs().max() < 0.999  # no two texts collapse together


def test_text_tokens_pool_to_encode_text(clip: ClipModel) -> None:
    states, mask = clip.text_tokens(TEXTS)
    assert states.shape == (3, 77, 64) and states.dtype == torch.float32
    tokens = clip.tokenize(TEXTS)
    eot = tokens.argmax(dim=-1)  # the EOT id (49407) is the largest in the vocab
    pooled = states[torch.arange(3), eot] @ clip.model.text_projection  # (3, embed_dim)
    torch.testing.assert_close(pooled, clip.model.encode_text(tokens), rtol=1e-5, atol=1e-5)


def test_text_mask_matches_tokenizer_padding(clip: ClipModel) -> None:
    _, mask = clip.text_tokens(TEXTS)
    tokens = open_clip.get_tokenizer(TINY_ARCH)(TEXTS)
    assert torch.equal(mask, tokens != 0)
    assert mask.dtype == torch.bool
    assert mask[2].sum() == 2  # "" -> SOT, EOT
    assert mask[0].tolist() == [True] * 4 + [False] * 73  # SOT a dog EOT, then padding
    assert tokens[0, 0] == 49406 and tokens[0, 3] == 49407


def test_text_states_usable_in_autograd(clip: ClipModel) -> None:
    # the DiT's cross-attention trains on these; inference-mode tensors would fail in backward
    states, _ = clip.text_tokens(TEXTS)
    proj = torch.nn.Linear(64, 8)
    proj(states).sum().backward()
    assert proj.weight.grad is not None and not states.requires_grad


def test_real_token_states_ignore_batch_padding(clip: ClipModel) -> None:
    # causal attention: a short text's real tokens must not change when batched with a long one
    alone, _ = clip.text_tokens(["a dog"])
    batched, _ = clip.text_tokens(["a dog", TEXTS[1]])
    torch.testing.assert_close(batched[0, :4], alone[0, :4], rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_returns_float32(clip: ClipModel) -> None:
    low = load_clip(ClipConfig(dtype="bfloat16"))
    frames = smooth_frames(2, 48, 64)
    emb = low.embed_images(frames)
    states, _ = low.text_tokens(TEXTS)
    assert emb.dtype == states.dtype == torch.float32
    torch.testing.assert_close(emb, clip.embed_images(frames), rtol=0, atol=0.02)
    torch.testing.assert_close(low.embed_texts(TEXTS), clip.embed_texts(TEXTS), rtol=0, atol=0.02)


# ---------------------------------------------------------------------------
# Identity and weights
# ---------------------------------------------------------------------------


def test_seeded_init_is_deterministic(clip: ClipModel) -> None:
    again = load_clip(ClipConfig(seed=0)).fingerprint()
    other = load_clip(ClipConfig(seed=1)).fingerprint()
    fp = clip.fingerprint()
    assert fp["weights_sha256"] == again["weights_sha256"] != other["weights_sha256"]
    assert fp == {**fp, "arch": "tiny", "weights": "random-init", "seed": 0, "context_length": 77,
                  "text_width": 64, "embed_dim": 64}


def test_seeded_init_identical_across_processes(clip: ClipModel) -> None:
    code = (
        "from pipeline.clip_model import ClipConfig, load_clip\n"
        "print(load_clip(ClipConfig()).fingerprint()['weights_sha256'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == clip.fingerprint()["weights_sha256"]


def test_local_checkpoint_round_trip(clip: ClipModel, tmp_path: Path) -> None:
    path = tmp_path / "clip.pt"
    torch.save(clip.model.state_dict(), path)
    loaded = load_clip(ClipConfig(weights=str(path), seed=5))  # seed is irrelevant with a checkpoint
    fp = loaded.fingerprint()
    assert fp["weights_sha256"] == clip.fingerprint()["weights_sha256"]
    assert fp["weights"] == str(path.resolve()) and fp["seed"] is None
    torch.testing.assert_close(loaded.embed_texts(TEXTS), clip.embed_texts(TEXTS))


def test_missing_weights_and_hub_tags_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_clip(ClipConfig(weights=str(tmp_path / "nope.pt")))
    # a pretrained tag must never trigger a download
    with pytest.raises(FileNotFoundError, match="hub tags are not downloaded"):
        load_clip(ClipConfig(arch="ViT-B-32", weights="openai"))
    with pytest.raises(ValueError, match="not an open_clip model"):
        load_clip(ClipConfig(arch="ViT-Nope"))


def test_importing_leaves_no_temp_folder_and_the_tiny_arch_stays_registered(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    code = ("import open_clip, pipeline.clip_model as m; open_clip.add_model_config(m.Path('/nonexistent'));"
            "assert m.TINY_ARCH in open_clip.list_models()")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).resolve().parents[2])
    assert list(tmp_path.iterdir()) == []
