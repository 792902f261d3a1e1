"""The network a run trains, chosen by `model.kind` in the training config.

* `ditharos` — `training.model.VideoDiT` at a registry size (`model.name`, e.g. DiT-XL/2).
* `wan` — diffusers' `WanTransformer3DModel` run on packed sequences (`training.wan.PackedWan`):
  pretrained weights from a local diffusers folder (`model.path`, the `transformer/` folder of a
  Wan 2.1 / 2.2 T2V checkpoint or the folder itself), or a random-init preset (`model.preset`,
  for tests and the demo: labelled `random-init` in checkpoints); fully, or as LoRA
  (`model.lora_rank` > 0: only the adapter trains and is checkpointed, `load_trained`).

Both take `model(x, t, batch, text_drop)` on a `PackedBatch`, so the loop, DeepSpeed, the EMA and
the checkpoints treat them alike. Input widths come from the shards' manifest: a DiT is built to
match, a Wan folder must match (its latent channels and text width are the checkpoint's own).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from training.ema import param_items
from training.flops import forward_flops
from training.model import DiTConfig, VideoDiT, dit_config
from training.settings import MODEL_KINDS, ModelConfig
from training.wan import LORA_BASE_SEED, WAN_PRESETS, PackedWan, add_lora


class BackboneError(ValueError):
    """A model setting that cannot work with this data (named, with what would)."""


@dataclass
class Backbone:
    module: nn.Module  # module(x (N, P), t (B,), batch, text_drop) -> (N, P)
    patch: tuple[int, int, int]
    record: dict[str, Any]  # what checkpoints store as their model (rebuilds the module without config)
    flops: Callable[[list[int], list[int]], float]  # forward FLOPs of samples with these token / text counts
    description: str


def wan_config_path(path: str) -> Path:
    """config.json of a diffusers Wan transformer folder: `path` itself or its `transformer/`."""
    for folder in (Path(path), Path(path) / "transformer"):
        if (folder / "config.json").is_file():
            return folder / "config.json"
    raise BackboneError(f"model.path={path!r} holds no diffusers config.json (nor transformer/config.json)")


def patch_of(cfg: ModelConfig) -> tuple[int, int, int]:
    """The (pt, ph, pw) patch, known before the model is built (the clip index needs it)."""
    if cfg.kind == "ditharos":
        return dit_config(cfg.name, **cfg.overrides).patch
    if cfg.preset:
        return tuple(WAN_PRESETS[cfg.preset]["patch_size"])
    return tuple(json.loads(wan_config_path(cfg.path).read_text())["patch_size"])


def input_widths(manifest: dict[str, Any]) -> tuple[int, int]:
    """(latent channels, text width) of the shards, from their manifest: the model is built to match."""
    buckets = manifest["buckets"].values()
    channels = {b["latent_shape"][0] for b in buckets}
    text_dims = {b["text_shape"][-1] for b in buckets}
    if len(channels) != 1 or len(text_dims) != 1:
        raise BackboneError(f"shards mix latent channels {sorted(channels)} or text widths {sorted(text_dims)}")
    return channels.pop(), text_dims.pop()


def null_text_of(data_uri: str, manifest: dict[str, Any]) -> torch.Tensor | None:
    """The data's text encoder's states of "" (n, D) float32, stored by the pipeline; None for data
    without one (then a pretrained backbone's null caption is zero rows)."""
    from pipeline.text_encoder import read_null_text

    tokens = read_null_text(data_uri, manifest)
    return None if tokens is None else torch.from_numpy(tokens.astype("float32"))


def check(cfg: ModelConfig, manifest: dict[str, Any]) -> None:
    """On the driver, before any worker starts: BackboneError when this model cannot train on these
    shards (a Wan folder without a config, or whose widths differ). Reads config.json only."""
    channels, text_dim = input_widths(manifest)
    patch_of(cfg)
    if cfg.kind == "wan" and cfg.path:
        c = json.loads(wan_config_path(cfg.path).read_text())
        _check_wan_widths(c["in_channels"], c.get("out_channels") or c["in_channels"], c["text_dim"], cfg.path,
                          channels, text_dim)


def _check_wan_widths(c_in: int, c_out: int, c_text: int, source: str, in_channels: int, text_dim: int) -> None:
    if (c_in, c_out, c_text) != (in_channels, in_channels, text_dim):
        raise BackboneError(f"{source}: the Wan transformer takes {c_in} latent channels (out {c_out}) and "
                            f"{c_text}-wide text, the shards hold {in_channels} channels and {text_dim}-wide "
                            f"text: encode the data with this model's VAE and text encoder")


def build(cfg: ModelConfig, in_channels: int, text_dim: int, null_text: torch.Tensor | None = None,
          device: torch.device | None = None, dtype: torch.dtype | None = None) -> Backbone:
    """The run's network for shards of `in_channels` latent channels and `text_dim`-wide text states.

    `null_text` (n, text_dim): the data's encoding of "" (pipeline.text_encoder.read_null_text),
    a pretrained backbone's unconditional text; the native DiT learns its own and ignores it.
    `device` / `dtype`: where and in what a pretrained Wan's weights are loaded (`_wan_base`; the
    loop passes the worker's GPU and bf16, what DeepSpeed would turn them into); the DiT is built
    on the CPU in fp32 and left to DeepSpeed."""
    if cfg.kind == "ditharos":
        return _dit(dit_config(cfg.name, **cfg.overrides, in_channels=in_channels, text_dim=text_dim))
    return _build_wan(cfg, in_channels, text_dim, null_text, device, dtype)


def _dit(model_cfg: DiTConfig) -> Backbone:
    return Backbone(VideoDiT(model_cfg), model_cfg.patch, asdict(model_cfg),
                    lambda n, m: forward_flops(model_cfg, n, m), str(model_cfg))


def _build_wan(cfg: ModelConfig, in_channels: int, text_dim: int, null_text: torch.Tensor | None,
               device: torch.device | None, dtype: torch.dtype | None) -> Backbone:
    lora = ({"rank": cfg.lora_rank, "alpha": cfg.lora_alpha or float(cfg.lora_rank), "targets": list(cfg.lora_targets)}
            if cfg.lora_rank else None)
    source = f"random-init:{cfg.preset}" if cfg.preset else str(wan_config_path(cfg.path).parent)
    model = _wan_base(source, in_channels, text_dim, seeded=lora is not None, device=device, dtype=dtype)
    return _wan(model, source, cfg.overrides.get("attn_backend", "auto"), in_channels, text_dim, lora, null_text)


def _wan_base(source: str, in_channels: int, text_dim: int, seeded: bool, device: torch.device | None = None,
              dtype: torch.dtype | None = None) -> nn.Module:
    """diffusers' Wan from a local folder, or a preset's random init (from LORA_BASE_SEED when
    `seeded`: a LoRA run saves no base weights, so its base must be rebuilt the same), on `device`
    (default CPU) in `dtype` (default fp32).

    A folder is read tensor by tensor into a module built on the meta device, each tensor cast
    and placed as it is read (diffusers' `from_pretrained` with a `device_map`, through
    accelerate): host memory stays about one tensor, not the model. Wan 14B built in fp32 on the
    host, as before, took 57 GB of RAM per worker (456 GB on an 8-GPU node) before DeepSpeed cast
    it to bf16 on the GPU anyway; now each worker's GPU receives the 28 GB of bf16 weights
    directly. A preset (tiny, tests and the demo) is built on the CPU in fp32 whatever the
    device, so its seeded init is the same bits everywhere, then moved."""
    from diffusers import WanTransformer3DModel

    dtype = dtype or torch.float32
    if not source.startswith("random-init:"):
        if not (Path(source) / "config.json").is_file():
            raise BackboneError(f"the Wan base {source} is not a diffusers folder here (a LoRA checkpoint holds "
                                "only its adapter: the base folder must be where the run found it)")
        return WanTransformer3DModel.from_pretrained(source, torch_dtype=dtype,
                                                     device_map={"": torch.device(device or "cpu")})
    preset = source.removeprefix("random-init:")
    with torch.random.fork_rng(devices=[]):
        if seeded:
            torch.manual_seed(LORA_BASE_SEED)
        model = WanTransformer3DModel(**WAN_PRESETS[preset], in_channels=in_channels, out_channels=in_channels,
                                      text_dim=text_dim)
    return model.to(device=device or "cpu", dtype=dtype)


def from_record(record: dict[str, Any], in_channels: int, text_dim: int,
                null_text: torch.Tensor | None = None) -> Backbone:
    """The module a checkpoint's model record describes, for data of these widths (and null text,
    see `build`); its trained weights are a fresh init (a DiT) or on the meta device (a fully
    fine-tuned Wan) until `load_trained` puts the checkpoint's in."""
    kind = record.get("kind", "ditharos")  # DiT records are DiTConfig's fields (checkpoints before kinds)
    if kind == "ditharos":
        model_cfg = DiTConfig(**dict(record, patch=tuple(record["patch"])))
        if (model_cfg.in_channels, model_cfg.text_dim) != (in_channels, text_dim):
            raise BackboneError(f"the DiT takes {model_cfg.in_channels} latent channels and {model_cfg.text_dim}-wide "
                                f"text; the data's VAE gives {in_channels} channels, its text encoder {text_dim}")
        return _dit(model_cfg)
    if kind == "wan":
        from diffusers import WanTransformer3DModel

        if record.get("lora"):  # the checkpoint holds the adapter only: the base comes from where it came from
            return _wan(_wan_base(record["source"], in_channels, text_dim, seeded=True), record["source"], "auto",
                        in_channels, text_dim, record["lora"], null_text)
        # from_config, not **config: keys of another diffusers version are ignored with a warning.
        # Parameters on the meta device (buffers real): the checkpoint holds every one of them and
        # `load_trained` assigns its tensors, so a 14B sampler holds the weights once, not twice.
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = WanTransformer3DModel.from_config(record["config"])
        return _wan(model, record["source"], "auto", in_channels, text_dim, None, null_text)
    raise BackboneError(f"model kind {kind!r} is not one of {list(MODEL_KINDS)}")


def _wan(model: nn.Module, source: str, backend: str, in_channels: int, text_dim: int,
         lora: dict[str, Any] | None = None, null_text: torch.Tensor | None = None) -> Backbone:
    c = model.config
    _check_wan_widths(c.in_channels, c.out_channels, c.text_dim, source, in_channels, text_dim)
    if lora:
        add_lora(model, lora["rank"], lora["alpha"], lora["targets"])
    module = PackedWan(model, backend=backend, null_text=null_text)
    record = {"kind": "wan", "source": source, "config": {k: v for k, v in dict(c).items() if not k.startswith("_")}}
    if lora:
        record["lora"] = dict(lora)
    d, heads = c.num_attention_heads * c.attention_head_dim, c.num_attention_heads

    def flops(lengths: list[int], text_lengths: list[int]) -> float:  # the text is padded to WAN_TEXT_LEN rows
        return wan_forward_flops(d, c.ffn_dim, c.num_layers, lengths, [max(m, module.text_len) for m in text_lengths])

    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return Backbone(module, tuple(c.patch_size), record, flops,
                    f"Wan ({source}): {c.num_layers} blocks, width {d}, {heads} heads, ffn {c.ffn_dim}"
                    + (f"; LoRA rank {lora['rank']} (alpha {lora['alpha']:g}) on {lora['targets']}: "
                       f"{trained / 1e6:.2f}M trained parameters" if lora else ""))


def trained_names(module: nn.Module) -> list[str]:
    """State-dict names of the parameters a run trains (all of them, or LoRA's factors only)."""
    return [n for n, _ in param_items(module)]


def load_trained(module: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """A checkpoint's weights into the module its model record rebuilt: exactly its trained parameters
    (under LoRA, the frozen base is the module's own and the checkpoint holds the adapter only)."""
    want = set(trained_names(module))
    missing, unexpected = sorted(want - tensors.keys()), sorted(tensors.keys() - want)
    if missing or unexpected:
        raise BackboneError(f"{where}: its weights do not fit the model its record describes: missing "
                            f"{missing[:4]}{'…' if len(missing) > 4 else ''}, unexpected "
                            f"{unexpected[:4]}{'…' if len(unexpected) > 4 else ''}")
    module.load_state_dict(tensors, strict=False, assign=True)  # assign: meta parameters take the tensors


def wan_forward_flops(d: int, ffn: int, layers: int, lengths: list[int], text_lengths: list[int]) -> float:
    """Matmul + attention FLOPs (2 per multiply-add) of a Wan forward over samples of n tokens and m text
    tokens, per block: self-attention q, k, v, out 4·D²·n; cross-attention q, out 2·D²·n and k, v 2·D²·m;
    FFN 2·D·F·n; attention 2·2·n²·D (self) + 2·2·n·m·D (cross). Embeddings and the head are left out
    (< 0.1% at Wan's sizes); a training step is 3× this."""
    total = 0.0
    for n, m in zip(lengths, text_lengths):
        total += layers * (2 * (6 * d * d + 2 * d * ffn) * n + 2 * 2 * d * d * m + 4 * n * n * d + 4 * n * m * d)
    return total
