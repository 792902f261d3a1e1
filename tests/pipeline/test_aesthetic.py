"""pipeline/aesthetic.py: the LAION head loads the published key layout, and the caption stage filters on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.aesthetic import Aesthetic, AestheticConfig, AestheticHead
from pipeline.config import load_config
from pipeline.settings import PipelineConfig
from pipeline.steps import CaptionStage, VAEStage, make_cut_fn, side_row
from tests.pipeline.test_steps import as_batch, probed

# The state-dict keys of LAION's published improved-aesthetic-predictor checkpoints.
LAION_KEYS = [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]


def embeddings(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def test_the_head_has_laions_layout_and_random_init_is_reproducible() -> None:
    assert sorted(AestheticHead(768).state_dict()) == sorted(LAION_KEYS)
    a, b = Aesthetic(AestheticConfig(), 64), Aesthetic(AestheticConfig(), 64)
    x = embeddings(5)
    assert a.score(x).shape == (5,) and np.array_equal(a.score(x), b.score(x))
    assert a.fingerprint()["weights"] == "random-init" and a.fingerprint() == b.fingerprint()
    assert Aesthetic(AestheticConfig(seed=1), 64).fingerprint()["weights_sha256"] != a.fingerprint()["weights_sha256"]
    # the input is renormalised: the scale of an embedding does not change its score
    assert np.allclose(a.score(3 * x), a.score(x), atol=1e-6)
    assert a.score(np.zeros((0, 64))).shape == (0,)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_load_from_a_local_file_and_a_wrong_width_is_named(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(3)
    head = AestheticHead(64)
    path = tmp_path / f"aesthetic{suffix}"
    state = {k: v.contiguous() for k, v in head.state_dict().items()}
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    loaded = Aesthetic(AestheticConfig(weights=str(path)), 64)
    x = embeddings(4)
    expected = head.eval()(torch.nn.functional.normalize(torch.from_numpy(x), dim=-1)).detach().numpy()
    assert np.allclose(loaded.score(x), expected, atol=1e-6)
    assert loaded.fingerprint()["weights"] == str(path) and loaded.fingerprint()["seed"] is None
    with pytest.raises(ValueError, match="expects 64-d embeddings; the caption CLIP gives 768-d"):
        Aesthetic(AestheticConfig(weights=str(path)), 768)
    with pytest.raises(ValueError, match="aesthetic.weights .* is not a local file"):
        load_config(PipelineConfig, overrides=[f"caption.aesthetic.weights={tmp_path / 'missing.pth'}"])


def test_the_caption_stage_scores_and_filters_on_aesthetic(sample_clips: dict[str, Path]) -> None:
    cfg = PipelineConfig()
    rows = [r for r in make_cut_fn(cfg)(probed(sample_clips["carphone_pristine"], cfg)) if r["kind"] == "clip"]
    side = side_row({"kind": "reject", "source_id": "s", "source_uri": "u", "stage": "scene", "reason": "short"})
    out = CaptionStage(cfg)(as_batch(rows + [side]))
    scores = [float(out["aesthetic"][i]) for i, k in enumerate(out["kind"]) if k == "clip"]
    assert len(scores) == len(rows) and all(np.isfinite(scores)) and len(set(scores)) > 1  # no filter by default

    cut_at = float(np.median(scores))
    strict = load_config(PipelineConfig, overrides=[f"filter.aesthetic.min={cut_at}", "filter.example_fraction=1"])
    out = CaptionStage(strict)(as_batch(rows + [side]))
    kinds = list(out["kind"])
    assert kinds.count("clip") == sum(s >= cut_at for s in scores) and kinds[-1] == "reject"
    filtered = [json.loads(out["record_json"][i]) for i, k in enumerate(kinds[:-1]) if k == "reject"]
    assert filtered and len(filtered) == sum(s < cut_at for s in scores)
    for rec in filtered:
        assert rec["stage"] == "filter" and rec["score"] == "aesthetic" and rec["value"] < cut_at
        assert rec["aesthetic"] == rec["value"] and rec["sharpness"] > 0  # frame scores ride along
        assert rec["keyframe_jpeg"] and rec["clip_id"] in {r["clip_id"] for r in rows}
    after = VAEStage(strict)(out)  # the VAE skips what the caption stage filtered
    assert sum(lat.size > 0 for lat in after["latents"]) == kinds.count("clip")
