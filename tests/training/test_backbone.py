"""training/backbone.py: `model.kind` picks the network; settings are refused with what would work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.backbone import BackboneError, build, patch_of, wan_forward_flops
from training.packing import pack
from training.settings import ModelConfig


def model_cfg(**kw) -> ModelConfig:
    cfg = ModelConfig(**kw)
    cfg.validate()
    return cfg


@pytest.mark.parametrize("kw, message", [
    (dict(kind="flux"), r"model.kind='flux' is not one of \['ditharos', 'wan'\]"),
    (dict(kind="wan"), "needs exactly one of model.path .* or model.preset"),
    (dict(kind="wan", path="/x", preset="tiny-wan"), "needs exactly one of"),
    (dict(kind="wan", preset="huge-wan"), r"model.preset='huge-wan' is not one of \['tiny-wan'\]"),
    (dict(kind="wan", preset="tiny-wan", overrides={"hidden": 64}), r"\['hidden'\] do not apply .*valid: \['attn_backend'\]"),
    (dict(preset="tiny-wan"), "are for model.kind: wan"),
    (dict(kind="wan", preset="tiny-wan", overrides={"attn_backend": "fast"}), r"attn_backend='fast' is not one of \["),
    (dict(lora_rank=8), "model.lora_rank is for model.kind: wan"),
    (dict(kind="wan", preset="tiny-wan", lora_rank=-1), "must be >= 0"),
    (dict(kind="wan", preset="tiny-wan", lora_rank=4, lora_targets=[]), r"model.lora_targets is empty; e.g. \['to_q'"),
])
def test_model_settings_that_cannot_work_are_refused_naming_the_valid_ones(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model_cfg(**kw)


def test_the_dit_backbone_is_the_registry_model_with_the_shards_widths() -> None:
    b = build(model_cfg(name="DiT-tiny"), in_channels=4, text_dim=16)
    assert b.patch == patch_of(model_cfg()) == (1, 2, 2)
    assert b.record["in_channels"] == 4 and b.record["text_dim"] == 16 and "kind" not in b.record  # old checkpoints' form


def test_a_wan_preset_is_built_for_the_shards_and_labelled_random_init() -> None:
    torch.manual_seed(0)
    b = build(model_cfg(kind="wan", preset="tiny-wan"), in_channels=4, text_dim=16)
    assert b.record["kind"] == "wan" and b.record["source"] == "random-init:tiny-wan"
    assert b.record["config"]["in_channels"] == 4 and b.record["config"]["text_dim"] == 16
    assert b.patch == patch_of(model_cfg(kind="wan", preset="tiny-wan")) == (1, 2, 2)
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(4, 2, 4, 6, generator=g), torch.randn(4, 1, 2, 2, generator=g)]
    texts = [torch.randn(3, 16, generator=g), torch.randn(5, 16, generator=g)]
    batch = pack(latents, texts, b.patch, budget=16)
    out = b.module(batch.tokens, torch.tensor([0.3, 0.9]), batch)
    assert out.shape == batch.tokens.shape and torch.isfinite(out).all()
    # FLOPs: 2 blocks of width 24 (2 heads × 12), FFN 32, samples of 12 and 1 tokens, text padded to 512 rows
    d, f = 24, 32
    per = lambda n, m: 2 * (6 * d * d + 2 * d * f) * n + 4 * d * d * m + 4 * n * n * d + 4 * n * m * d  # noqa: E731
    assert b.flops(batch.lengths, batch.text_lengths) == 2 * (per(12, 512) + per(1, 512))  # text padded as Wan's
    assert wan_forward_flops(d, f, 2, [12], [3]) == 2 * per(12, 3)


def test_a_wan_folder_is_loaded_and_must_match_the_shards(tmp_path: Path) -> None:
    from diffusers import WanTransformer3DModel

    from training.wan import WAN_PRESETS

    torch.manual_seed(0)
    saved = WanTransformer3DModel(**WAN_PRESETS["tiny-wan"], in_channels=4, out_channels=4, text_dim=16)
    saved.save_pretrained(tmp_path / "wan" / "transformer")  # a pipeline folder: the transformer/ inside is found
    cfg = model_cfg(kind="wan", path=str(tmp_path / "wan"))
    assert patch_of(cfg) == (1, 2, 2)
    b = build(cfg, in_channels=4, text_dim=16)
    assert b.record["source"] == str(tmp_path / "wan" / "transformer")
    for (name, p), q in zip(b.module.model.named_parameters(), saved.parameters()):
        assert torch.equal(p, q), name  # the pretrained weights, not a fresh init
    with pytest.raises(BackboneError, match=r"takes 4 latent channels .* 16-wide text, the shards hold 16 channels "
                                            r"and 4096-wide text"):
        build(cfg, in_channels=16, text_dim=4096)
    with pytest.raises(BackboneError, match="holds no diffusers config.json"):
        patch_of(model_cfg(kind="wan", path=str(tmp_path)))


def test_a_wan_folder_loads_in_the_working_dtype_and_a_record_rebuilds_without_weights(tmp_path: Path) -> None:
    """On a GPU worker the loop asks for bf16 (what DeepSpeed runs in): the weights are read into that
    dtype as they load — bitwise the folder's bf16 weights, diffusers' fp32-kept modules (norms,
    time embedding, modulation table) upcast exactly — never through an fp32 copy of the model.
    A fully fine-tuned Wan rebuilt from its checkpoint record has its parameters on the meta device
    until `load_trained` assigns the checkpoint's tensors."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    from training.backbone import from_record, load_trained, trained_names
    from training.wan import WAN_PRESETS

    torch.manual_seed(0)
    WanTransformer3DModel(**WAN_PRESETS["tiny-wan"], in_channels=4, out_channels=4, text_dim=16).to(
        torch.bfloat16).save_pretrained(tmp_path / "wan")
    stored = load_file(str(tmp_path / "wan" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.bfloat16}
    cfg = model_cfg(kind="wan", path=str(tmp_path / "wan"))
    half = build(cfg, in_channels=4, text_dim=16, device=torch.device("cpu"), dtype=torch.bfloat16).module.model
    kept = WanTransformer3DModel._keep_in_fp32_modules
    dtypes = {}
    for name, p in half.named_parameters():
        fp32 = any(f".{m}." in f".{name}" for m in kept)
        dtypes[fp32] = p.dtype
        assert torch.equal(p.float(), stored[name].float()), name  # the stored values, bit for bit
    assert dtypes == {True: torch.float32, False: torch.bfloat16}
    full = build(cfg, in_channels=4, text_dim=16).module.model  # the CPU default: fp32
    assert all(p.dtype == torch.float32 and torch.equal(p, stored[n].float()) for n, p in full.named_parameters())

    record = build(cfg, in_channels=4, text_dim=16).record
    rebuilt = from_record(record, in_channels=4, text_dim=16).module
    assert all(p.is_meta for p in rebuilt.parameters())
    tensors = {n: torch.full(p.shape, 0.5) for n, p in rebuilt.named_parameters()}
    load_trained(rebuilt, tensors, "ckpt")
    assert sorted(trained_names(rebuilt)) == sorted(tensors)
    assert all(not p.is_meta and torch.equal(p, tensors[n]) for n, p in rebuilt.named_parameters())
    g = torch.Generator().manual_seed(0)
    batch = pack([torch.randn(4, 2, 4, 6, generator=g)], [torch.randn(3, 16, generator=g)], (1, 2, 2), budget=16)
    with torch.no_grad():
        assert torch.isfinite(rebuilt(batch.tokens, torch.tensor([0.3]), batch)).all()  # the rope tables are real


def test_export_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    """A DiT checkpoint is not a diffusers model; a non-empty --out is never mixed into; a missing one is named."""
    from safetensors.torch import save_file

    from training import checkpoint as ckpt
    from training.data import LoaderState
    from training.export import ExportError, export, main

    dit = tmp_path / "run" / ckpt.checkpoint_name(2)
    dit.mkdir(parents=True)
    b = build(model_cfg(name="DiT-tiny"), in_channels=4, text_dim=16)
    state = ckpt.TrainerState(steps_done=2, loader=LoaderState(), data_fingerprint="f" * 64, data_uri="d", world_size=1,
                              zero_stage=2, model=b.record, weights=ckpt.EMA_FILE, code_version="test")
    save_file({k: v.contiguous() for k, v in b.module.state_dict().items()}, str(dit / ckpt.EMA_FILE))
    (dit / ckpt.STATE_FILE).write_text(state.to_json())
    with pytest.raises(ExportError, match="DiTharos DiT checkpoint: not a diffusers model"):
        export(str(tmp_path / "run"), tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="busy exists and is not an empty folder"):
        export(str(dit), tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    with pytest.raises(SystemExit, match="error: checkpoint .*nowhere' does not exist"):
        main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])


def test_the_driver_check_names_a_wan_folder_that_does_not_fit_the_shards(tmp_path: Path) -> None:
    """training/train.py runs backbone.check before any worker: config.json only, no weights read."""
    from diffusers import WanTransformer3DModel

    from training.backbone import check
    from training.wan import WAN_PRESETS

    WanTransformer3DModel(**WAN_PRESETS["tiny-wan"], in_channels=4, out_channels=4, text_dim=16).save_pretrained(
        tmp_path / "wan")
    manifest = {"buckets": {"a": {"latent_shape": [16, 5, 32, 32], "text_shape": [77, 4096]},
                            "b": {"latent_shape": [16, 1, 32, 56], "text_shape": [77, 4096]}}}
    with pytest.raises(BackboneError, match=r"takes 4 latent channels \(out 4\) and 16-wide text, the shards hold "
                                            r"16 channels and 4096-wide text"):
        check(model_cfg(kind="wan", path=str(tmp_path / "wan")), manifest)
    check(model_cfg(kind="wan", preset="tiny-wan"), manifest)  # a preset is built to the shards' widths
    check(model_cfg(), manifest)
    mixed = {"buckets": {**manifest["buckets"], "c": {"latent_shape": [4, 1, 8, 8], "text_shape": [77, 4096]}}}
    with pytest.raises(BackboneError, match=r"shards mix latent channels \[4, 16\]"):
        check(model_cfg(), mixed)


def test_wan_lora_trains_only_its_adapter_and_a_record_rebuilds_the_same_base() -> None:
    from training.backbone import from_record, load_trained, trained_names

    cfg = model_cfg(kind="wan", preset="tiny-wan", lora_rank=4)
    torch.manual_seed(123)  # the run seed: it must not change a LoRA run's base (rebuilt from LORA_BASE_SEED)
    b = build(cfg, in_channels=4, text_dim=16)
    names = trained_names(b.module)
    assert names and all(".lora_A.default." in n or ".lora_B.default." in n for n in names)
    # q, k, v, out of both attentions and both FFN matrices, in each of 2 blocks, A and B each
    assert len(names) == 2 * (2 * 4 + 2) * 2
    assert b.record["lora"] == {"rank": 4, "alpha": 4.0, "targets": list(cfg.lora_targets)}
    assert "LoRA rank 4" in b.description
    g = torch.Generator().manual_seed(0)
    batch = pack([torch.randn(4, 2, 4, 6, generator=g)], [torch.randn(3, 16, generator=g)], b.patch, budget=16)
    t = torch.tensor([0.3])
    plain = build(model_cfg(kind="wan", preset="tiny-wan"), in_channels=4, text_dim=16)  # run seed 123's init
    with torch.no_grad():
        out = b.module(batch.tokens, t, batch)
        b.module.model.disable_adapters()
        assert torch.equal(out, b.module(batch.tokens, t, batch))  # LoRA B starts at 0: the base's output
        b.module.model.enable_adapters()
        assert not torch.equal(out, plain.module(batch.tokens, t, batch))  # the base is not the run seed's init
        for n, p in b.module.named_parameters():
            if ".lora_B." in n:
                p.add_(0.1)
        trained = {n: p.detach().clone() for n, p in b.module.named_parameters() if n in names}
        moved = b.module(batch.tokens, t, batch)
    torch.manual_seed(7)
    again = from_record(b.record, in_channels=4, text_dim=16).module
    load_trained(again, trained, "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(again(batch.tokens, t, batch), moved, rtol=0, atol=0)
    with pytest.raises(BackboneError, match=r"ckpt: its weights do not fit .*missing \['model.blocks.0"):
        load_trained(again, {k: v for k, v in trained.items() if "blocks.0." not in k}, "ckpt")
    with pytest.raises(BackboneError, match=r"unexpected \['model.proj_out.weight'\]"):
        load_trained(again, dict(trained, **{"model.proj_out.weight": torch.zeros(1)}), "ckpt")


def test_a_lora_record_whose_base_folder_is_gone_is_named(tmp_path: Path) -> None:
    from training.backbone import from_record

    record = {"kind": "wan", "source": str(tmp_path / "gone"), "config": {}, "lora": {"rank": 4, "alpha": 4.0,
                                                                                      "targets": ["to_q"]}}
    with pytest.raises(BackboneError, match=r"gone is not a diffusers folder here \(a LoRA checkpoint holds only"):
        from_record(record, in_channels=4, text_dim=16)
