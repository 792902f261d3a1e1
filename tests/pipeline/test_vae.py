"""VideoVAE on real tiny random-init diffusers VAEs: shapes, normalisation, determinism, save/load."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from pipeline.config import load_config
from pipeline.vae import PRESETS, VAEConfig, VideoVAE, build_preset, load_vae

REPO = Path(__file__).resolve().parents[2]


def make_video(b: int, t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 (B, T, H, W, 3): moving colour gradients plus noise, so frames and clips differ."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for i in range(b * t):
        phase = rng.uniform(0, 2 * np.pi, size=3)
        rgb = [np.sin(xx / 9.0 + yy / 13.0 + i * 0.3 + p) for p in phase]
        frames.append(np.stack(rgb, -1) * 100 + 128 + rng.normal(0, 10, (h, w, 3)))
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8).reshape(b, t, h, w, 3)


@pytest.fixture(scope="module")
def image_vae() -> VideoVAE:
    return load_vae(VAEConfig(kind="image", preset="tiny-image", batch_frames=4))


@pytest.fixture(scope="module")
def wan_vae() -> VideoVAE:
    return load_vae(VAEConfig(kind="wan", preset="tiny-wan"))


# ---------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------


def test_factors(image_vae: VideoVAE, wan_vae: VideoVAE) -> None:
    assert (image_vae.spatial_factor, image_vae.temporal_factor, image_vae.latent_channels) == (8, 1, 4)
    assert (wan_vae.spatial_factor, wan_vae.temporal_factor, wan_vae.latent_channels) == (8, 4, 4)


def test_image_latent_shape_matches_encode(image_vae: VideoVAE) -> None:
    video = make_video(2, 17, 32, 48)
    z = image_vae.encode(video)
    assert image_vae.latent_shape(17, 32, 48) == (4, 17, 4, 6)
    assert tuple(z.shape) == (2, *image_vae.latent_shape(17, 32, 48))
    assert z.dtype == torch.float32


def test_wan_latent_shape_matches_encode(wan_vae: VideoVAE) -> None:
    video = make_video(1, 17, 32, 48)
    z = wan_vae.encode(video)
    assert wan_vae.latent_shape(17, 32, 48) == (4, 5, 4, 6)
    assert tuple(z.shape) == (1, *wan_vae.latent_shape(17, 32, 48))
    assert wan_vae.latent_shape(1, 8, 8) == (4, 1, 1, 1)


def test_wan22_vae_is_16x_spatial_and_round_trips() -> None:
    """Wan 2.2's VAE (TI2V-5B): patchified residual encoder, 16x spatial, 4x temporal, its own
    per-channel normalisation; the same interface, so the same pipeline and sampler."""
    vae = load_vae(VAEConfig(kind="wan", preset="tiny-wan2.2"))
    assert (vae.spatial_factor, vae.temporal_factor, vae.latent_channels) == (16, 4, 6)
    video = make_video(1, 9, 32, 48, seed=4)
    z = vae.encode(video)
    assert vae.latent_shape(9, 32, 48) == (6, 3, 2, 3) == tuple(z.shape[1:])
    with pytest.raises(ValueError, match="multiples of 16"):
        vae.latent_shape(9, 24, 48)
    raw = vae.model.encode(torch.from_numpy(video).permute(0, 4, 1, 2, 3).float() / 127.5 - 1).latent_dist.mode()
    mean = torch.tensor(PRESETS["tiny-wan2.2"][2]["latents_mean"]).view(1, -1, 1, 1, 1)
    std = torch.tensor(PRESETS["tiny-wan2.2"][2]["latents_std"]).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(z, (raw - mean) / std, rtol=1e-5, atol=1e-5)
    out = vae.decode(z)
    assert out.shape == video.shape and out.dtype == np.uint8


def test_image_encode_is_framewise_and_batch_order_preserved(image_vae: VideoVAE) -> None:
    # batch_frames=4 splits 2x7 frames across chunks; each latent frame must come from its own frame
    video = make_video(2, 7, 32, 32, seed=1)
    z = image_vae.encode(video)
    z_clip1 = image_vae.encode(video[1:2])
    z_frame = image_vae.encode(video[1:2, 5:6])
    torch.testing.assert_close(z[1:2], z_clip1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z[1:2, :, 5:6], z_frame, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(z[0], z[1])


def test_wan_batch_matches_single_clips(wan_vae: VideoVAE) -> None:
    video = make_video(2, 5, 16, 16, seed=2)
    z = wan_vae.encode(video)
    torch.testing.assert_close(z[1:2], wan_vae.encode(video[1:2]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Values: determinism, normalisation, decode
# ---------------------------------------------------------------------------


def test_encode_is_deterministic(image_vae: VideoVAE, wan_vae: VideoVAE) -> None:
    video = make_video(1, 5, 16, 16)
    for vae in (image_vae, wan_vae):
        assert torch.equal(vae.encode(video), vae.encode(video))


def test_image_normalisation_is_shift_then_scale(image_vae: VideoVAE) -> None:
    video = make_video(1, 3, 32, 32, seed=3)
    x = torch.from_numpy(video[0]).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (T, 3, H, W)
    with torch.no_grad():
        raw = image_vae.model.encode(x).latent_dist.mode()  # (T, C, H', W')
    expected = (raw - 0.1) * 0.5  # tiny-image: shift_factor 0.1, scaling_factor 0.5
    torch.testing.assert_close(image_vae.encode(video)[0].permute(1, 0, 2, 3), expected, rtol=1e-5, atol=1e-6)


def test_wan_normalisation_is_per_channel(wan_vae: VideoVAE) -> None:
    video = make_video(1, 5, 16, 16, seed=4)
    x = torch.from_numpy(video).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0  # (B, 3, T, H, W)
    with torch.no_grad():
        raw = wan_vae.model.encode(x).latent_dist.mode()  # (B, C, T', H', W')
    mean = torch.tensor(PRESETS["tiny-wan"][2]["latents_mean"]).view(1, -1, 1, 1, 1)
    std = torch.tensor(PRESETS["tiny-wan"][2]["latents_std"]).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(wan_vae.encode(video), (raw - mean) / std, rtol=1e-5, atol=1e-6)


def test_autoencoderkl_per_channel_stats_are_used() -> None:
    # configs like Playground v2.5 carry latents_mean/std: (z - mean) * scaling / std
    kwargs = dict(PRESETS["tiny-image"][2], shift_factor=None, latents_mean=[0.1, 0.2, -0.3, 0.4],
                  latents_std=[2.0, 0.5, 1.0, 4.0])
    torch.manual_seed(0)
    vae = VideoVAE(AutoencoderKL(**kwargs), VAEConfig(), "random-init")
    video = make_video(1, 2, 16, 16, seed=5)
    x = torch.from_numpy(video[0]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        raw = vae.model.encode(x).latent_dist.mode().permute(1, 0, 2, 3)[None]  # (1, C, T, H', W')
    mean = torch.tensor(kwargs["latents_mean"]).view(1, -1, 1, 1, 1)
    std = torch.tensor(kwargs["latents_std"]).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(vae.encode(video), (raw - mean) * 0.5 / std, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["image", "wan"])
def test_decode_undoes_normalisation(kind: str, image_vae: VideoVAE, wan_vae: VideoVAE) -> None:
    vae = image_vae if kind == "image" else wan_vae
    video = make_video(1, 5, 16, 24, seed=6)
    z = vae.encode(video)
    out = vae.decode(z)
    assert out.shape == video.shape and out.dtype == np.uint8
    raw = z * vae._std + vae._mean  # back to the model's own latent space
    with torch.no_grad():
        if kind == "image":
            x = vae.model.decode(raw[0].permute(1, 0, 2, 3)).sample.permute(0, 2, 3, 1)[None]  # (1, T, H, W, 3)
        else:
            x = vae.model.decode(raw).sample.permute(0, 2, 3, 4, 1)  # (1, T, H, W, 3)
    expected = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1  # float ulp at .5 rounding


# ---------------------------------------------------------------------------
# Identity: seeds, fingerprints, save/load
# ---------------------------------------------------------------------------


def test_same_seed_same_weights_other_seed_differs() -> None:
    for preset in PRESETS:
        kind = PRESETS[preset][0]
        a = load_vae(VAEConfig(kind=kind, preset=preset, seed=0)).fingerprint()
        b = load_vae(VAEConfig(kind=kind, preset=preset, seed=0)).fingerprint()
        c = load_vae(VAEConfig(kind=kind, preset=preset, seed=1)).fingerprint()
        assert a["weights_sha256"] == b["weights_sha256"] != c["weights_sha256"]
        assert a["weights"] == "random-init" and a["preset"] == preset and a["seed"] == 0


def test_seeded_weights_identical_across_processes(image_vae: VideoVAE, wan_vae: VideoVAE) -> None:
    code = (
        "from pipeline.vae import VAEConfig, load_vae\n"
        "for k in ('image', 'wan'):\n"
        "    print(load_vae(VAEConfig(kind=k, preset='tiny-' + k)).fingerprint()['weights_sha256'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [image_vae.fingerprint()["weights_sha256"], wan_vae.fingerprint()["weights_sha256"]]


def test_build_preset_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_preset("tiny-image", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_fingerprint_is_json_safe(wan_vae: VideoVAE) -> None:
    fp = wan_vae.fingerprint()
    assert json.loads(json.dumps(fp)) == fp
    assert fp["class"] == "AutoencoderKLWan" and fp["kind"] == "wan"
    assert fp["config"]["latents_std"] == [0.5, 1.5, 2.0, 0.8]


@pytest.mark.parametrize("kind", ["image", "wan"])
def test_save_load_round_trip(kind: str, tmp_path: Path, image_vae: VideoVAE, wan_vae: VideoVAE) -> None:
    vae = image_vae if kind == "image" else wan_vae
    vae.save(tmp_path / "vae")
    # same batch_frames: a different chunking changes conv results by float ulps
    loaded = load_vae(dataclasses.replace(vae.cfg, path=str(tmp_path / "vae")))
    fp, fp_loaded = vae.fingerprint(), loaded.fingerprint()
    assert fp_loaded["weights_sha256"] == fp["weights_sha256"]
    assert fp_loaded["config"] == fp["config"]
    assert fp_loaded["weights"] == str((tmp_path / "vae").resolve()) and fp_loaded["preset"] is None
    video = make_video(1, 5, 16, 16, seed=7)
    assert torch.equal(loaded.encode(video), vae.encode(video))


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_invalid_sizes_raise_helpful_errors(image_vae: VideoVAE, wan_vae: VideoVAE) -> None:
    with pytest.raises(ValueError, match=r"4k\+1 frames, got 16 \(nearest valid: 13 or 17\)"):
        wan_vae.latent_shape(16, 32, 32)
    with pytest.raises(ValueError, match="multiples of 8, got 30x32px"):
        image_vae.latent_shape(4, 30, 32)
    with pytest.raises(ValueError, match="4k\\+1"):
        wan_vae.encode(make_video(1, 4, 16, 16))


def test_bad_input_raises(image_vae: VideoVAE) -> None:
    with pytest.raises(ValueError, match="uint8"):
        image_vae.encode(make_video(1, 2, 16, 16).astype(np.float32))
    with pytest.raises(ValueError, match=r"\(B, T, H, W, 3\)"):
        image_vae.encode(make_video(1, 2, 16, 16)[0])
    with pytest.raises(ValueError, match="latents must be"):
        image_vae.decode(torch.zeros(1, 3, 2, 2, 2))


def test_bad_config_and_paths_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pick a 'wan' preset"):
        load_config(VAEConfig, overrides=["kind=wan"])
    assert load_config(VAEConfig, overrides=["kind=wan", "preset=tiny-wan"]).kind == "wan"
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_vae(VAEConfig(path=str(tmp_path / "missing")))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="supported: \\['AutoencoderKL', 'AutoencoderKLWan'\\]"):
        load_vae(VAEConfig(path=str(tmp_path / "unet")))
    build_preset("tiny-wan", 0).save_pretrained(str(tmp_path / "wan"))
    with pytest.raises(ValueError, match="but vae.kind is 'image'"):
        load_vae(VAEConfig(kind="image", path=str(tmp_path / "wan")))


def test_bfloat16_compute_returns_float32_close_to_float32(image_vae: VideoVAE) -> None:
    vae = load_vae(VAEConfig(dtype="bfloat16", batch_frames=4))
    assert vae.model.dtype == torch.bfloat16
    assert vae.fingerprint()["weights_sha256"] != image_vae.fingerprint()["weights_sha256"]  # hashes what runs
    video = make_video(1, 3, 16, 16, seed=8)
    z = vae.encode(video)
    assert z.dtype == torch.float32
    ref = image_vae.encode(video)
    # bf16 keeps 8 significant bits (relative step 2⁻⁸); a few roundings per layer, relative to
    # the latents' scale: AVX2 emulates bf16 and AMX runs it natively, so only a bound holds.
    torch.testing.assert_close(z, ref, rtol=0, atol=4 * 2**-8 * ref.abs().max().item())
