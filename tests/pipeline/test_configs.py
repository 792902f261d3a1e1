"""What the pipeline's shipped configs say (tests/test_configs.py: every config loads and round-trips)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config, to_dict
from pipeline.settings import PipelineConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "pipeline" / "configs").glob("*.yaml"))


def test_demo_yaml_equals_defaults() -> None:
    demo = [p for p in CONFIGS if p.name == "demo.yaml"][0]
    assert to_dict(load_config(PipelineConfig, demo)) == to_dict(PipelineConfig())


def test_production_uses_wan_frame_counts() -> None:
    prod = load_config(PipelineConfig, [p for p in CONFIGS if p.name == "production.yaml"][0])
    assert prod.vae.kind == "wan" and all((n - 1) % 4 == 0 for n in prod.buckets.num_frames)
    assert prod.text_encoder.kind == "umt5" and prod.text_encoder.max_tokens == 512  # what Wan conditions on


def test_wan_vae_requires_4k_plus_1_frames() -> None:
    with pytest.raises(ValueError, match="4k\\+1"):
        load_config(PipelineConfig, None, ["vae.kind=wan", "vae.preset=tiny-wan", "buckets.num_frames=[1, 16]"])


def test_bucket_sizes_must_be_multiples_of_the_vae_s_spatial_factor(tmp_path) -> None:
    """Wan 2.2's VAE compresses 16x: 8-px size steps would make latents it cannot produce."""
    with pytest.raises(ValueError, match="multiple of 16 \\(the VAE's spatial factor\\)"):
        load_config(PipelineConfig, None, ["vae.kind=wan", "vae.preset=tiny-wan2.2", "buckets.size_multiple_px=8"])
    assert load_config(PipelineConfig, None, ["vae.kind=wan", "vae.preset=tiny-wan2.2",
                                              "buckets.size_multiple_px=32"]).buckets.size_multiple_px == 32
    with pytest.raises(ValueError, match="multiple of 8"):
        load_config(PipelineConfig, None, ["buckets.size_multiple_px=12"])
    folder = tmp_path / "vae"  # a local folder: read from its config.json, no weights loaded
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "AutoencoderKLWan", "scale_factor_spatial": 16}')
    with pytest.raises(ValueError, match="multiple of 16"):
        load_config(PipelineConfig, None, ["vae.kind=wan", f"vae.path={folder}", "buckets.size_multiple_px=24"])
