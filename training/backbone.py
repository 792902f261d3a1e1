"""The network a run trains, chosen by `model.kind` in the training config.

* `ditharos` — `training.model.VideoDiT` at a registry size (`model.name`, e.g. DiT-XL/2).
* `wan` — diffusers' `WanTransformer3DModel` run on packed sequences (`training.wan.PackedWan`):
  pretrained weights from a local diffusers folder (`model.path`, the `transformer/` folder of a
  Wan 2.1 / 2.2 T2V checkpoint or the folder itself), or a random-init preset (`model.preset`,
  for tests and the demo: labelled `random-init` in checkpoints).

Both take `model(x, t, batch, text_drop)` on a `PackedBatch`, so the loop, DeepSpeed, the EMA and
the checkpoints treat them alike. Input widths come from the shards' manifest: a DiT is built to
match, a Wan folder must match (its latent channels and text width are the checkpoint's own).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from training.flops import forward_flops
from training.model import DiTConfig, VideoDiT, dit_config
from training.settings import MODEL_KINDS, ModelConfig
from training.wan import WAN_PRESETS, PackedWan


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


def build(cfg: ModelConfig, in_channels: int, text_dim: int) -> Backbone:
    """The run's network for shards of `in_channels` latent channels and `text_dim`-wide text states."""
    if cfg.kind == "ditharos":
        return _dit(dit_config(cfg.name, **cfg.overrides, in_channels=in_channels, text_dim=text_dim))
    return _build_wan(cfg, in_channels, text_dim)


def _dit(model_cfg: DiTConfig) -> Backbone:
    return Backbone(VideoDiT(model_cfg), model_cfg.patch, asdict(model_cfg),
                    lambda n, m: forward_flops(model_cfg, n, m), str(model_cfg))


def _build_wan(cfg: ModelConfig, in_channels: int, text_dim: int) -> Backbone:
    from diffusers import WanTransformer3DModel

    if cfg.preset:
        model = WanTransformer3DModel(**WAN_PRESETS[cfg.preset], in_channels=in_channels, out_channels=in_channels,
                                      text_dim=text_dim)
        source = f"random-init:{cfg.preset}"
    else:
        folder = wan_config_path(cfg.path).parent
        model = WanTransformer3DModel.from_pretrained(str(folder))
        source = str(folder)
    return _wan(model, source, cfg.overrides.get("attn_backend", "auto"), in_channels, text_dim)


def from_record(record: dict[str, Any], in_channels: int, text_dim: int) -> Backbone:
    """The module a checkpoint's model record describes, for data of these widths; its weights are a
    fresh init until the checkpoint's are loaded into it."""
    kind = record.get("kind", "ditharos")  # DiT records are DiTConfig's fields (checkpoints before kinds)
    if kind == "ditharos":
        model_cfg = DiTConfig(**dict(record, patch=tuple(record["patch"])))
        if (model_cfg.in_channels, model_cfg.text_dim) != (in_channels, text_dim):
            raise BackboneError(f"the DiT takes {model_cfg.in_channels} latent channels and {model_cfg.text_dim}-wide "
                                f"text; the data's VAE gives {in_channels} channels, its text encoder {text_dim}")
        return _dit(model_cfg)
    if kind == "wan":
        from diffusers import WanTransformer3DModel

        # from_config, not **config: keys of another diffusers version are ignored with a warning
        return _wan(WanTransformer3DModel.from_config(record["config"]), record["source"], "auto", in_channels,
                    text_dim)
    raise BackboneError(f"model kind {kind!r} is not one of {list(MODEL_KINDS)}")


def _wan(model: nn.Module, source: str, backend: str, in_channels: int, text_dim: int) -> Backbone:
    c = model.config
    _check_wan_widths(c.in_channels, c.out_channels, c.text_dim, source, in_channels, text_dim)
    module = PackedWan(model.float(), backend=backend)
    record = {"kind": "wan", "source": source, "config": {k: v for k, v in dict(c).items() if not k.startswith("_")}}
    d, heads = c.num_attention_heads * c.attention_head_dim, c.num_attention_heads

    def flops(lengths: list[int], text_lengths: list[int]) -> float:
        return wan_forward_flops(d, c.ffn_dim, c.num_layers, lengths, text_lengths)

    return Backbone(module, tuple(c.patch_size), record, flops,
                    f"Wan ({source}): {c.num_layers} blocks, width {d}, {heads} heads, ffn {c.ffn_dim}")


def wan_forward_flops(d: int, ffn: int, layers: int, lengths: list[int], text_lengths: list[int]) -> float:
    """Matmul + attention FLOPs (2 per multiply-add) of a Wan forward over samples of n tokens and m text
    tokens, per block: self-attention q, k, v, out 4·D²·n; cross-attention q, out 2·D²·n and k, v 2·D²·m;
    FFN 2·D·F·n; attention 2·2·n²·D (self) + 2·2·n·m·D (cross). Embeddings and the head are left out
    (< 0.1% at Wan's sizes); a training step is 3× this."""
    total = 0.0
    for n, m in zip(lengths, text_lengths):
        total += layers * (2 * (6 * d * d + 2 * d * ffn) * n + 2 * 2 * d * d * m + 4 * n * n * d + 4 * n * m * d)
    return total
