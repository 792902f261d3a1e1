"""training/sample.py: checkpoint → EMA DiT + the data's own CLIP/VAE → seeded videos → playable mp4.

The data dirs here are real pipeline manifests + configs written by the pipeline's own
functions (no shards: sampling needs none), and the checkpoints use training/checkpoint.py's
format with a seeded random DiT-tiny whose zero-initialised layers are perturbed, so text and
noise both reach the pixels. `make_data` / `make_checkpoint` are reused by tests/eval.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
import yaml

from pipeline.clip_model import load_clip
from pipeline.config import config_hash, dump_yaml, to_dict
from pipeline.manifest import build_manifest, read_manifest, write_manifest
from pipeline.settings import PipelineConfig, data_config
from pipeline.vae import VAEConfig, load_vae
from pipeline.version import code_version
from training import checkpoint as ckpt
from training.data import LoaderState
from training.model import VideoDiT, dit_config
from training.sample import SamplerError, encode_mp4, load_sampler, main
from training.settings import ModelConfig, TrainConfig

# ---------------------------------------------------------------------------
# Builders (also used by tests/eval/test_nightly.py)
# ---------------------------------------------------------------------------


def make_data(out: Path, vae: VAEConfig | None = None) -> Path:
    """A data dir holding what the sampler reads: manifest.json + config.yaml, from the pipeline's own code."""
    cfg = PipelineConfig()
    cfg.output.uri = str(out)
    if vae is not None:
        cfg.vae = vae
    models = {"clip": load_clip(cfg.caption.clip).fingerprint(), "vae": load_vae(cfg.vae).fingerprint()}
    fingerprint = {"config_sha256": config_hash(data_config(cfg)), "models": models,
                   "buckets": to_dict(cfg.buckets), "code_version": code_version()}
    manifest = build_manifest(digest="5a" * 32, totals={}, fingerprint=fingerprint, bucket_specs={},
                              bucket_shapes={}, shard_files={})
    write_manifest(str(out), manifest, dump_yaml(cfg))
    return out


def make_checkpoint(run_dir: Path, data: Path, steps_done: int, seed: int = 0,
                    t_range: tuple[float, float] = (0.0, 1.0)) -> Path:
    """A checkpoint in training's format: trainer_state.json, ema.safetensors, config.yaml
    (`t_range`: the noise levels it was trained on, flow.t_min / t_max)."""
    manifest = read_manifest(str(data))
    models = manifest["fingerprint"]["models"]
    vae_cfg = models["vae"]["config"]
    channels = vae_cfg.get("latent_channels") or vae_cfg["z_dim"]
    model_cfg = dit_config("DiT-tiny", in_channels=channels, text_dim=models["clip"]["text_width"])
    torch.manual_seed(seed)
    model = VideoDiT(model_cfg)
    with torch.no_grad():  # adaLN-Zero starts as the identity with zero output: make every layer count
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = run_dir / ckpt.checkpoint_name(steps_done)
    folder.mkdir(parents=True)
    ckpt.save_weights(str(folder / ckpt.EMA_FILE), model.state_dict())
    cfg = TrainConfig()
    cfg.data.uri, cfg.run.dir = str(data), str(run_dir)
    cfg.flow.t_min, cfg.flow.t_max = t_range
    (folder / "config.yaml").write_text(dump_yaml(cfg))
    state = ckpt.TrainerState(
        steps_done=steps_done, loader=LoaderState(step=steps_done),
        data_fingerprint=manifest["fingerprint"]["data_sha256"], data_uri=str(data), world_size=1, zero_stage=2,
        model=asdict(model_cfg), weights=ckpt.EMA_FILE, code_version=code_version())
    (folder / ckpt.STATE_FILE).write_text(state.to_json())
    return folder


def decode_mp4(path: Path) -> tuple[np.ndarray, str, float]:
    """(frames uint8 (T, H, W, 3), codec name, fps) of an mp4, read back with PyAV."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(stream)])
        return frames, stream.codec_context.name, float(stream.average_rate)


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    data = make_data(root / "data")
    return make_checkpoint(root / "run", data, steps_done=4)


@pytest.fixture(scope="module")
def sampler(image_run: Path):
    return load_sampler(str(image_run), "cpu")


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


def test_cli_writes_playable_mp4_of_a_non_bucket_size(image_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # 80x48 px and 5 frames: no demo bucket has this size (they are 96p/128p with 1, 9, 17 frames)
    summary = main(["--checkpoint", str(image_run.parent), "--prompt", "a dog on a beach", "--prompt", "a red car",
                    "--width", "80", "--height", "48", "--frames", "5", "--steps", "3", "--cfg", "4.0",
                    "--seed", "7", "--out", str(out), "--device", "cpu"])
    assert summary["checkpoint"] == str(image_run)  # the run dir resolved to its latest checkpoint
    assert sorted(p.name for p in out.iterdir()) == ["000-seed7.json", "000-seed7.mp4", "001-seed8.json",
                                                     "001-seed8.mp4", "summary.json"]
    frames, codec, fps = decode_mp4(out / "001-seed8.mp4")
    assert frames.shape == (5, 48, 80, 3)
    assert codec == "h264" and fps == 8.0  # the data's bucket fps
    assert frames.std() > 5  # a picture, not a flat frame
    meta = json.loads((out / "001-seed8.json").read_text())
    manifest = read_manifest(json.loads((image_run / ckpt.STATE_FILE).read_text())["data_uri"])
    assert meta["prompt"] == "a red car" and meta["seed"] == 8 and meta["steps_done"] == 4
    assert (meta["width_px"], meta["height_px"], meta["num_frames"], meta["steps"], meta["guidance_scale"]) == \
        (80, 48, 5, 3, 4.0)
    assert meta["checkpoint"] == str(image_run) and meta["weights"] == ckpt.EMA_FILE
    assert meta["shift"]["enabled"] is True and meta["num_tokens"] == 5 * 3 * 5  # (T', H'/2, W'/2) = (5, 3, 5)
    assert meta["model"]["hidden"] == 32 and meta["model"]["text_dim"] == 64
    assert meta["data_fingerprint"] == manifest["fingerprint"]["data_sha256"]
    assert meta["clip"]["weights_sha256"] == manifest["fingerprint"]["models"]["clip"]["weights_sha256"]
    assert meta["vae"]["weights_sha256"] == manifest["fingerprint"]["models"]["vae"]["weights_sha256"]
    assert meta["code_version"]["checkpoint"] and meta["code_version"]["sampler"]
    assert meta["random_init"] is True and meta["random_init_models"] == ["clip", "vae"]
    assert meta["video"]["codec"] == "libx264" and meta["video"]["pix_fmt"] == "yuv420p"


def test_same_seed_same_frames_and_videos_independent_of_batch(sampler) -> None:
    a = sampler.generate(["a dog", "a cat"], 64, 32, 3, steps=3, guidance_scale=3.0, seed=11)
    b = sampler.generate(["a dog", "a cat"], 64, 32, 3, steps=3, guidance_scale=3.0, seed=11)
    assert a.dtype == np.uint8 and a.shape == (2, 3, 32, 64, 3)
    np.testing.assert_array_equal(a, b)
    alone = sampler.generate(["a cat"], 64, 32, 3, steps=3, guidance_scale=3.0, seed=12)  # video 1 used seed 12
    np.testing.assert_array_equal(a[1], alone[0])
    other_seed = sampler.generate(["a dog"], 64, 32, 3, steps=3, guidance_scale=3.0, seed=12)
    other_prompt = sampler.generate(["a mountain at night"], 64, 32, 3, steps=3, guidance_scale=3.0, seed=11)
    assert np.abs(other_seed[0].astype(int) - a[0]).mean() > 1.0
    assert np.abs(other_prompt[0].astype(int) - a[0]).mean() > 0.1  # the text reaches the pixels


def test_text_is_encoded_like_the_shards(sampler) -> None:
    states, mask = sampler.encode_prompts(["a dog"])
    ref, ref_mask = sampler.clip.text_tokens(["a dog"])
    assert states[0].dtype == torch.float32 and states[0].shape == (77, 64)
    torch.testing.assert_close(states[0], ref[0].half().float(), rtol=0, atol=0)  # float16-rounded, as stored
    assert mask[0].dtype == torch.bool and mask[0].sum() == ref_mask[0].sum() == 4  # SOT a dog EOT
    _, longer = sampler.encode_prompts(["a much longer prompt about a dog"])
    assert longer[0].sum() == 9


def test_invalid_sizes_and_frames_are_refused(sampler, image_run: Path, tmp_path: Path) -> None:
    with pytest.raises(SamplerError, match=r"width 100 px: this model makes multiples of 16 px .* nearest: 96 or 112"):
        sampler.generate(["x"], 100, 32, 3)
    with pytest.raises(SamplerError, match="height 8 px"):
        sampler.generate(["x"], 32, 8, 3)
    with pytest.raises(SamplerError, match="0 frames"):
        sampler.generate(["x"], 32, 32, 0)
    with pytest.raises(SystemExit, match="width 72 px"):
        main(["--checkpoint", str(image_run), "--prompt", "x", "--width", "72", "--height", "32", "--frames", "1",
              "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no prompts"):
        main(["--checkpoint", str(image_run), "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_wan_vae_needs_4k_plus_1_frames(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", VAEConfig(kind="wan", preset="tiny-wan"))
    sampler = load_sampler(str(make_checkpoint(tmp_path / "run", data, 2)), "cpu")
    with pytest.raises(SamplerError, match=r"wan VAE needs 4k\+1 frames, got 8 \(nearest valid: 5 or 9\)"):
        sampler.generate(["x"], 32, 32, 8)
    video = sampler.generate(["x"], 32, 16, 5, steps=2)
    assert video.shape == (1, 5, 16, 32, 3)


def test_clip_or_vae_weights_unlike_the_manifest_are_refused(image_run: Path, tmp_path: Path) -> None:
    state = json.loads((image_run / ckpt.STATE_FILE).read_text())
    data = Path(state["data_uri"])
    moved = tmp_path / "data"
    moved.mkdir()
    for name in ("manifest.json",):
        (moved / name).write_bytes((data / name).read_bytes())
    cfg = yaml.safe_load((data / "config.yaml").read_text())
    cfg["caption"]["clip"]["seed"] = 1  # another random init: same arch, other weights
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SamplerError, match=r"refusing to sample: the CLIP .* weights sha256"):
        load_sampler(str(image_run), "cpu", data_uri=str(moved))
    cfg["caption"]["clip"]["seed"] = 0
    cfg["vae"]["seed"] = 3
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SamplerError, match="refusing to sample: the VAE"):
        load_sampler(str(image_run), "cpu", data_uri=str(moved))
    with pytest.raises(SystemExit, match="refusing to sample: the VAE"):
        main(["--checkpoint", str(image_run), "--prompt", "x", "--data", str(moved), "--out", str(tmp_path / "o")])


def test_checkpoint_on_other_data_is_refused(image_run: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "run" / image_run.name
    shutil.copytree(image_run, copy)
    state = json.loads((copy / ckpt.STATE_FILE).read_text())
    state["data_fingerprint"] = "0" * 64  # trained on other shards than the ones at data_uri
    (copy / ckpt.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(SamplerError, match="was trained on data 0000000000000000…"):
        load_sampler(str(copy), "cpu")
    with pytest.raises(SamplerError, match="does not exist"):
        load_sampler(str(tmp_path / "nope"), "cpu")


def test_encode_mp4_pads_odd_sizes_for_yuv420p() -> None:
    frames = np.random.default_rng(0).integers(0, 256, (4, 5, 7, 3), dtype=np.uint8)
    frames[:] = frames[0]  # a still: decodes close to the input
    data, info = encode_mp4(frames, 8.0)
    assert (info["width_px"], info["height_px"]) == (8, 6)
    with av.open(__import__("io").BytesIO(data)) as c:
        out = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert out.shape == (4, 6, 8, 3)
    with pytest.raises(ValueError, match="uint8"):
        encode_mp4(frames.astype(np.float32), 8.0)


def test_sizes_beyond_free_memory_and_zero_sizes_are_refused(sampler, image_run: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """--frames 10000 was OOM-killed with no message; 0 silently meant "default"."""
    import training.sample as sample_mod

    per_100 = sampler.memory_bytes(64, 32, 100)
    m = [sampler.memory_bytes(64, 32, f) for f in (100, 200, 300)]
    assert m[2] - m[1] == m[1] - m[0] > 0  # linear in frames
    monkeypatch.setattr(sample_mod, "free_memory_bytes", lambda device: per_100 + 1000)
    sampler.check_fits(64, 32, 100)  # fits exactly
    with pytest.raises(SamplerError, match=r"10000 frames at 64x32 px need ~\d+\.\d GB on cpu, \d+\.\d GB is free: "
                                           r"at most 100 frames fit at 64x32 px"):
        sampler.generate(["x"], 64, 32, 10000)
    with pytest.raises(SystemExit, match="10000 frames at 64x32 px need"):
        main(["--checkpoint", str(image_run), "--prompt", "x", "--width", "64", "--height", "32", "--frames", "10000",
              "--out", str(tmp_path)])
    monkeypatch.setattr(sample_mod, "free_memory_bytes", lambda device: 1)
    with pytest.raises(SamplerError, match="not even one frame fits"):
        sampler.check_fits(64, 32, 3)
    for flag in ("--frames", "--width", "--height"):
        with pytest.raises(SystemExit, match=rf"{flag} 0: must be >= 1"):
            main(["--checkpoint", str(image_run), "--prompt", "x", flag, "0", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())
    assert sample_mod.free_memory_bytes(torch.device("cpu")) > 0


def test_a_prompt_longer_than_the_text_encoder_reads_is_warned_about(sampler, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    assert sampler.truncated_prompts(["a dog", "word " * 1000]) == [1]
    with caplog.at_level(logging.WARNING, logger="training.sample"):
        sampler.generate(["a dog", "word " * 1000], 32, 32, 1, steps=1)
    assert "prompt 1 (5000 characters) is longer than the text encoder's 77 tokens" in caplog.text


def test_a_pair_of_experts_samples_together_and_one_alone_is_refused(sampler, image_run: Path, tmp_path: Path) -> None:
    """Wan 2.2 A14B style: one expert's checkpoint (flow.t_min = b: high noise, or flow.t_max = b:
    low noise) samples with --other-expert for the other side; alone, or with a partner whose range
    does not meet it, it is refused. Either side may be the --checkpoint: the same pair, the same video."""
    data = Path(json.loads((image_run / ckpt.STATE_FILE).read_text())["data_uri"])
    high = make_checkpoint(tmp_path / "high", data, 4, seed=0, t_range=(0.875, 1.0))  # image_run's weights
    low = make_checkpoint(tmp_path / "low", data, 4, seed=1, t_range=(0.0, 0.875))
    off = make_checkpoint(tmp_path / "off", data, 4, seed=1, t_range=(0.0, 0.9))
    middle = make_checkpoint(tmp_path / "middle", data, 4, seed=1, t_range=(0.2, 0.9))
    for alone in (high, low):
        with pytest.raises(SamplerError, match=r"one expert of a pair.*--other-expert"):
            load_sampler(str(alone), "cpu")
    with pytest.raises(SamplerError, match=r"not a pair of experts.*needs \[0.0, 0.875\]"):
        load_sampler(str(high), "cpu", other_expert=str(off))
    with pytest.raises(SamplerError, match=r"\[b, 1\] \(high noise\) or \[0, b\]"):
        load_sampler(str(middle), "cpu", other_expert=str(low))
    with pytest.raises(SamplerError, match="not a pair of experts"):
        load_sampler(str(high), "cpu", other_expert=str(high))
    out = tmp_path / "out"
    summary = main(["--checkpoint", str(high), "--other-expert", str(low), "--prompt", "a dog",
                    "--width", "32", "--height", "32", "--frames", "3", "--steps", "4", "--out", str(out),
                    "--device", "cpu"])
    meta = json.loads((out / "000-seed0.json").read_text())
    assert meta["experts"] == {"boundary": 0.875, "other_expert": str(low), "checkpoint_is": "high-noise",
                               "low_noise_guidance": 5.0}  # the checkpoint's flow.guidance_scale
    assert summary["other_expert"] == str(low) and summary["boundary"] == 0.875
    pair = load_sampler(str(high), "cpu", other_expert=str(low))
    got = pair.generate(["a dog"], 32, 32, 3, steps=4)
    assert got.shape == (1, 3, 32, 32, 3)
    # The high expert's weights are image_run's: below the boundary the low expert changes the video.
    only_high = sampler.generate(["a dog"], 32, 32, 3, steps=4)
    assert np.abs(got.astype(int) - only_high.astype(int)).max() > 5
    assert np.array_equal(got, pair.generate(["a dog"], 32, 32, 3, steps=4))  # seeded
    own = pair.generate(["a dog"], 32, 32, 3, steps=4, low_noise_guidance=1.0)  # the low expert unguided
    assert np.abs(own.astype(int) - got.astype(int)).max() > 5
    main(["--checkpoint", str(high), "--other-expert", str(low), "--cfg-low-noise", "1.0", "--prompt", "a dog",
          "--width", "32", "--height", "32", "--frames", "3", "--steps", "4", "--out", str(tmp_path / "own"),
          "--device", "cpu"])
    assert json.loads((tmp_path / "own" / "000-seed0.json").read_text())["experts"]["low_noise_guidance"] == 1.0
    with pytest.raises(SystemExit, match="--cfg-low-noise applies to a pair of experts"):
        main(["--checkpoint", str(image_run), "--cfg-low-noise", "1.0", "--prompt", "a dog", "--device", "cpu",
              "--out", str(tmp_path / "no")])
    reverse = load_sampler(str(low), "cpu", other_expert=str(high))  # the low expert's run, the same pair
    assert reverse.settings("a dog", 0, 32, 32, 3, 4, None)["experts"]["checkpoint_is"] == "low-noise"
    assert np.array_equal(got, reverse.generate(["a dog"], 32, 32, 3, steps=4))


def make_wan_checkpoint(run_dir: Path, data: Path, t_range: tuple[float, float], seed: int = 0) -> tuple[Path, Any]:
    """A fully fine-tuned tiny-Wan checkpoint in training's format (record and EMA as the loop writes
    them) and its diffusers module."""
    from training.backbone import build
    from training.ema import param_items

    manifest = read_manifest(str(data))
    models = manifest["fingerprint"]["models"]
    channels = models["vae"]["config"].get("latent_channels") or models["vae"]["config"]["z_dim"]
    torch.manual_seed(seed)
    backbone = build(ModelConfig(kind="wan", preset="tiny-wan"), channels, models["clip"]["text_width"])
    with torch.no_grad():  # Wan's output projection starts near zero: make every layer count
        for p in backbone.module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = run_dir / ckpt.checkpoint_name(4)
    folder.mkdir(parents=True)
    ckpt.save_weights(str(folder / ckpt.EMA_FILE), {n: p.detach() for n, p in param_items(backbone.module)})
    cfg = TrainConfig()
    cfg.data.uri, cfg.run.dir = str(data), str(run_dir)
    cfg.flow.t_min, cfg.flow.t_max = t_range
    (folder / "config.yaml").write_text(dump_yaml(cfg))
    state = ckpt.TrainerState(
        steps_done=4, loader=LoaderState(step=4), data_fingerprint=manifest["fingerprint"]["data_sha256"],
        data_uri=str(data), world_size=1, zero_stage=2, model=backbone.record, weights=ckpt.EMA_FILE,
        code_version=code_version())
    (folder / ckpt.STATE_FILE).write_text(state.to_json())
    return folder, backbone.module.model


def test_a_fine_tuned_expert_samples_with_the_pretrained_other_expert_folder(image_run: Path, tmp_path: Path) -> None:
    """The common Wan 2.2 fine-tune: one expert trained, the other the pretrained diffusers folder
    as it is. Paired with a folder holding its own weights, an expert samples exactly what the same
    weights trained on every noise level sample; with another folder, something else."""
    data = Path(json.loads((image_run / ckpt.STATE_FILE).read_text())["data_uri"])
    low, module = make_wan_checkpoint(tmp_path / "low", data, (0.0, 0.6))
    whole, _ = make_wan_checkpoint(tmp_path / "whole", data, (0.0, 1.0))  # the same seed: the same weights
    module.save_pretrained(str(tmp_path / "same" / "transformer"))  # a pipeline folder's layout
    _, other = make_wan_checkpoint(tmp_path / "x", data, (0.0, 1.0), seed=3)
    other.save_pretrained(str(tmp_path / "other"))
    ref = load_sampler(str(whole), "cpu").generate(["a dog"], 32, 32, 5, steps=4)
    paired = load_sampler(str(low), "cpu", other_expert=str(tmp_path / "same"))
    assert paired.boundary == 0.6 and paired.low_noise is not paired.model
    assert np.array_equal(paired.generate(["a dog"], 32, 32, 5, steps=4), ref)
    mixed = load_sampler(str(low), "cpu", other_expert=str(tmp_path / "other")).generate(["a dog"], 32, 32, 5, steps=4)
    assert np.abs(mixed.astype(int) - ref.astype(int)).max() > 5
    # A whole A14B-style pipeline folder: a low-noise checkpoint takes its transformer/ (high noise).
    pipe = tmp_path / "pipe"
    module.save_pretrained(str(pipe / "transformer"))
    other.save_pretrained(str(pipe / "transformer_2"))
    index = {"_class_name": "WanPipeline", "boundary_ratio": 0.6, "transformer": ["diffusers", "WanTransformer3DModel"],
             "transformer_2": ["diffusers", "WanTransformer3DModel"]}
    (pipe / "model_index.json").write_text(json.dumps(index))
    assert np.array_equal(load_sampler(str(low), "cpu", other_expert=str(pipe)).generate(["a dog"], 32, 32, 5, steps=4),
                          ref)
    (pipe / "model_index.json").write_text(json.dumps(dict(index, boundary_ratio=0.875)))
    with pytest.raises(SamplerError, match="splits its experts at t = 0.875"):
        load_sampler(str(low), "cpu", other_expert=str(pipe))
