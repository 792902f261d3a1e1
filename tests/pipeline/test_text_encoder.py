"""pipeline/text_encoder.py: umT5 token states as WanPipeline makes them, from a folder or a seeded preset,
in the caption stage and the manifest's fingerprint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.settings import PipelineConfig
from pipeline.text_encoder import TextEncoderConfig, config_of, describe, load_umt5

CAPTIONS = ["a red car drives down a wet street at night", "waves", ""]


def test_states_are_wan_pipelines_prompt_embeds() -> None:
    from diffusers import WanPipeline

    enc = load_umt5(TextEncoderConfig(kind="umt5", max_tokens=40))
    states, mask = enc.text_tokens(CAPTIONS)  # (3, 40, 32), (3, 40)
    assert states.shape == (3, 40, 32) and mask.shape == (3, 40) and enc.text_width == 32
    assert mask.sum(1).tolist() == [40, 6, 1]  # cut at max_tokens; bytes + the end token; "" is the end token
    pipe = WanPipeline(tokenizer=enc.tokenizer, text_encoder=enc.model, transformer=None, vae=None, scheduler=None)
    theirs, _ = pipe.encode_prompt(CAPTIONS, do_classifier_free_guidance=False, max_sequence_length=40,
                                   device=torch.device("cpu"))
    torch.testing.assert_close(states, theirs.float(), rtol=0, atol=0)
    assert (states[1, 6:] == 0).all() and states[1, :6].abs().sum() > 0


def test_a_preset_is_seeded_and_a_saved_folder_loads_the_same(tmp_path: Path) -> None:
    a, b = load_umt5(TextEncoderConfig(kind="umt5")), load_umt5(TextEncoderConfig(kind="umt5"))
    assert torch.equal(a.text_tokens(CAPTIONS)[0], b.text_tokens(CAPTIONS)[0])
    assert a.fingerprint() == b.fingerprint() and a.fingerprint()["weights"] == "random-init"
    assert load_umt5(TextEncoderConfig(kind="umt5", seed=1)).fingerprint()["weights_sha256"] != a.fingerprint()[
        "weights_sha256"]
    # a Wan diffusers root: text_encoder/ + tokenizer/
    a.model.save_pretrained(tmp_path / "wan" / "text_encoder")
    a.tokenizer.save_pretrained(tmp_path / "wan" / "tokenizer")
    cfg = TextEncoderConfig(kind="umt5", path=str(tmp_path / "wan"))
    loaded = load_umt5(cfg)
    assert torch.equal(loaded.text_tokens(CAPTIONS)[0], a.text_tokens(CAPTIONS)[0])
    fp = loaded.fingerprint()
    assert fp["weights"] == str(tmp_path / "wan" / "text_encoder") and fp["seed"] is None
    assert describe(cfg, {}) == fp  # the driver's fingerprint, from the files without loading the model
    assert config_of(fp) == cfg.__class__(kind="umt5", path=fp["weights"], max_tokens=512)
    assert config_of(a.fingerprint()) == TextEncoderConfig(kind="umt5")
    with pytest.raises(ValueError, match="holds neither a umT5 config.json nor text_encoder/config.json"):
        load_umt5(TextEncoderConfig(kind="umt5", path=str(tmp_path)))


def test_settings_name_what_is_valid() -> None:
    with pytest.raises(ValueError, match=r"text_encoder.kind: 't5' is not one of \['clip', 'umt5'\]"):
        load_config(PipelineConfig, overrides=["text_encoder.kind=t5"])
    with pytest.raises(ValueError, match=r"text_encoder.preset='huge' is not one of \['tiny-umt5'\]"):
        load_config(PipelineConfig, overrides=["text_encoder.kind=umt5", "text_encoder.preset=huge"])
    clip_fp = {"weights_sha256": "x", "text_width": 64}
    assert describe(TextEncoderConfig(), clip_fp) == dict(clip_fp, kind="clip")  # the default: CLIP encodes


def test_the_caption_stage_stores_umt5_states_and_clip_still_ranks(sample_clips: dict[str, Path]) -> None:
    from pipeline.steps import CaptionStage, make_cut_fn
    from tests.pipeline.test_steps import as_batch, probed

    cfg = load_config(PipelineConfig, overrides=["text_encoder.kind=umt5", "text_encoder.max_tokens=64"])
    rows = [r for r in make_cut_fn(cfg)(probed(sample_clips["carphone_pristine"], cfg)) if r["kind"] == "clip"]
    out = CaptionStage(cfg)(as_batch(rows))
    plain = CaptionStage(PipelineConfig())(as_batch(rows))
    assert list(out["caption"]) == list(plain["caption"])  # CLIP chose the same captions
    np.testing.assert_array_equal(out["clip_score"], plain["clip_score"])
    enc = load_umt5(cfg.text_encoder)
    states, mask = enc.text_tokens([str(c) for c in out["caption"]])
    for i in range(len(rows)):
        assert out["text_embedding"][i].shape == (64, 32) and out["text_embedding"][i].dtype == np.float16
        np.testing.assert_array_equal(out["text_embedding"][i], states[i].numpy().astype(np.float16))
        np.testing.assert_array_equal(out["text_mask"][i], mask[i].numpy().astype(np.uint8))
    with pytest.raises(RuntimeError, match="umT5 text encoder weights on this worker .* differ from the driver's"):
        CaptionStage(cfg, encoder_sha256="0" * 64)


def test_the_manifest_records_the_encoder_and_the_sampler_rebuilds_it_checked() -> None:
    from pipeline.run import model_fingerprints
    from training.sample import SamplerError, load_text_encoder

    cfg = load_config(PipelineConfig, overrides=["text_encoder.kind=umt5", "text_encoder.max_tokens=48"])
    models = model_fingerprints(cfg)
    rec = models["text_encoder"]
    assert rec["kind"] == "umt5" and rec["weights"] == "random-init" and rec["context_length"] == 48
    manifest = {"fingerprint": {"models": models}}
    enc = load_text_encoder("data", manifest, clip=None)
    assert enc.fingerprint() == rec and enc.text_width == 32
    assert load_text_encoder("data", {"fingerprint": {"models": {}}}, clip="the clip") == "the clip"  # older data
    tampered = {"fingerprint": {"models": {"text_encoder": dict(rec, weights_sha256="0" * 64)}}}
    with pytest.raises(SamplerError, match="the umT5 text encoder loaded .* has weights sha256"):
        load_text_encoder("data", tampered, clip=None)
    assert model_fingerprints(PipelineConfig())["text_encoder"]["kind"] == "clip"


@pytest.mark.parametrize("kind", ["clip", "umt5"])
def test_the_caption_stage_stores_the_encoders_null_text_once(tmp_path: Path, kind: str) -> None:
    """The encoder's states of "" (real tokens only, float16) are written once per output and read back
    for the backbone; a second actor leaves the file alone; a damaged file is refused naming it."""
    from pipeline.run import model_fingerprints
    from pipeline.steps import CaptionStage
    from pipeline.text_encoder import null_text_uri, read_null_text

    cfg = load_config(PipelineConfig, overrides=[f"text_encoder.kind={kind}"])
    models = model_fingerprints(cfg)
    manifest = {"fingerprint": {"models": models}}
    assert read_null_text(str(tmp_path), manifest) is None  # data made without one
    uri = null_text_uri(str(tmp_path), models["text_encoder"]["weights_sha256"])
    stage = CaptionStage(cfg, null_text_uri=uri)
    got = read_null_text(str(tmp_path), manifest)
    states, mask = stage.encoder.text_tokens([""])
    want = states[0][mask[0].bool()].numpy().astype(np.float16)
    assert got.dtype == np.float16 and got.shape == want.shape == ((1, 32) if kind == "umt5" else (2, 64))
    np.testing.assert_array_equal(got, want)  # umT5: </s> alone; CLIP: start + end
    mtime = Path(uri).stat().st_mtime_ns
    CaptionStage(cfg, null_text_uri=uri)
    assert Path(uri).stat().st_mtime_ns == mtime  # written once
    Path(uri).write_bytes(Path(uri).read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"null_text/[0-9a-f]{16}\.npy: unreadable null text"):
        read_null_text(str(tmp_path), manifest)
