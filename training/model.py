"""Video DiT over NaViT-packed variable-resolution token sequences.

DiT (Peebles & Xie) with adaLN-Zero blocks, extended for video and text: tokens are
spatio-temporal patches of latent clips packed by `training.packing`, positions enter
through 3D rotary embeddings (so any duration / resolution works), each block adds
cross-attention to the clip's own text tokens, and timestep + pooled text condition
every block through adaLN. Architecture only: activation checkpointing, compile and
sharding are applied from outside (`training.parallel`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from einops import rearrange

from training.attention import BACKENDS, attention
from training.packing import PackedBatch, text_layout


@dataclass
class DiTConfig:
    """Architecture of a VideoDiT; sizes come from the registry (`dit_config`)."""

    in_channels: int = 16  # latent channels (16 for the Wan VAE)
    patch: tuple[int, int, int] = (1, 2, 2)  # (pt, ph, pw) in latent frames / pixels
    hidden: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    text_dim: int = 768  # width of the text encoder's token states (CLIP ViT-L/14: 768)
    null_text_len: int = 1  # tokens of the learned null caption used for classifier-free guidance
    rope_theta: float = 10000.0
    qk_norm: bool = True  # RMSNorm on q and k: keeps attention logits bounded in bf16
    attn_backend: str = "auto"  # see training.attention.BACKENDS

    def validate(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"model.hidden={self.hidden} must be divisible by model.heads={self.heads}")
        head_dim = self.hidden // self.heads
        if head_dim % 2 or head_dim < 6:
            raise ValueError(f"head dim {head_dim} must be even and >= 6 to split RoPE across t, h, w")
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise ValueError(f"model.patch must be three positive ints (pt, ph, pw), got {self.patch}")
        if self.null_text_len < 1:
            raise ValueError("model.null_text_len must be >= 1 (an empty key segment has no softmax)")
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"model.attn_backend={self.attn_backend!r} is not one of {list(BACKENDS)}")

    @property
    def patch_dim(self) -> int:
        return self.in_channels * math.prod(self.patch)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def per_token(rows: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Per-sample rows (B+1, K) broadcast to the tokens of each sample: (N, K) = onehot (N, B+1) @ rows.

    Not `rows[token_sample]`: the backward of that gather sums each row's thousands of duplicate
    indices with CUDA's sort-based index_put(accumulate=True), which walks a row's duplicates
    serially (and in bf16 sums them ~5% off: tests/bench/gpu_check.py's modulation_bench, 5.5×
    slower on an H200); the GEMM's backward (onehotᵀ @ grad) reduces them at matrix-unit rate,
    in fp32 accumulators, deterministically. Runs in the rows' own dtype, autocast or not, so
    forward values are exact (one 1 per row of onehot) as long as fp32 matmuls are not allowed
    TF32 (torch's default; DiTharos never enables it). Costs 2·N·(B+1)·K FLOPs: small against the
    block's GEMMs even for a pack of a hundred images (B+1 ≈ 100 vs 14·D)."""
    with torch.autocast(rows.device.type, enabled=False):
        return onehot.to(rows.dtype) @ rows


def sample_onehot(batch: PackedBatch, dtype: torch.dtype) -> torch.Tensor:
    """(N, B+1) one-hot of each token's sample for `per_token`; padding tokens pick row B."""
    b = batch.num_samples
    token_sample = torch.where(batch.sample_ids < 0, b, batch.sample_ids)  # (N,)
    return (token_sample[:, None] == torch.arange(b + 1, device=token_sample.device)).to(dtype)  # (N, B+1)


def segment_mean(x: torch.Tensor, ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Mean of the rows of x (M, D) per id in [0, num_segments); rows with other ids are ignored.

    Sums in fp32 at least: in bf16 (8 mantissa bits) a sum of hundreds of rows loses the small
    ones, and on CUDA index_add_ accumulates with atomics in the tensor's own dtype."""
    acc = torch.promote_types(x.dtype, torch.float32)
    keep = ids < num_segments
    ids = torch.where(keep, ids, num_segments)
    sums = torch.zeros(num_segments + 1, x.shape[1], dtype=acc, device=x.device).index_add_(0, ids, x.to(acc))  # (B+1, D)
    counts = torch.zeros(num_segments + 1, dtype=acc, device=x.device).index_add_(
        0, ids, torch.ones_like(ids, dtype=acc))  # (B+1,)
    return (sums[:num_segments] / counts[:num_segments, None].clamp(min=1)).to(x.dtype)  # (B, D)


#################################################################################
#               Embedding Layers for Timesteps, Text and Positions              #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Embeds flow times t ∈ [0, 1] (scaled ×1000) into vectors: sinusoids + MLP."""

    def __init__(self, hidden: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden, bias=True),
            nn.SiLU(),
            nn.Linear(hidden, hidden, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * 1000.0 * freqs[None]  # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (B, 256)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (B, D)


class TextEmbedder(nn.Module):
    """Projects text token states to the model width (cross-attention keys) and pools them (adaLN)."""

    def __init__(self, text_dim: int, hidden: int) -> None:
        super().__init__()
        self.context = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(approximate="tanh"),
                                     nn.Linear(hidden, hidden))
        self.pooled = nn.Sequential(nn.Linear(text_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, text: torch.Tensor, sample_ids: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = segment_mean(text, sample_ids, num_samples)  # (B, Dt) mean of each sample's text rows
        return self.context(text), self.pooled(pooled)  # (M, D), (B, D)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Head dims for (t, h, w): h and w get 2·⌊Dh/6⌋ each, t the (even) rest. 64 → (24, 20, 20)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Rotation angles (N, Dh/2) from integer patch coordinates (N, 3): t, h, w each own a slice of Dh."""
    angles = []
    for axis, dim in enumerate(rope_split(head_dim)):
        inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
        angles.append(positions[:, axis, None].double() * inv_freq[None])  # (N, dim/2)
    return torch.cat(angles, dim=1).float()  # (N, Dh/2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x (N, H, Dh) by per-token angles given as cos/sin (N, 1, Dh/2)."""
    x1, x2 = rearrange(x.float(), "n h (d two) -> two n h d", two=2)  # (N, H, Dh/2) each
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (N, H, Dh/2, 2)
    return rearrange(out, "n h d two -> n h (d two)").to(x.dtype)  # (N, H, Dh)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################


@dataclass
class Segments:
    """Attention segment boundaries of one packed forward (shared by every block)."""

    cu: torch.Tensor  # (S+1,) tokens
    max_len: int
    cu_text: torch.Tensor  # (S+1,) text keys, segment s ↔ segment s of the tokens
    max_text: int
    backend: str


class SelfAttention(nn.Module):
    """Multi-head self-attention within each packed segment, with 3D RoPE and QK-RMSNorm."""

    def __init__(self, hidden: int, heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.q_norm = nn.RMSNorm(hidden // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(hidden // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], seg: Segments) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "n (three h d) -> three n h d", three=3, h=self.heads)  # (N, H, Dh) each
        # Under autocast RMSNorm runs in fp32 while v stays bf16: attention kernels need one dtype.
        q = apply_rope(self.q_norm(q), *rope).to(v.dtype)  # (N, H, Dh)
        k = apply_rope(self.k_norm(k), *rope).to(v.dtype)  # (N, H, Dh)
        out = attention(q, k, v, seg.cu, seg.cu, seg.max_len, seg.max_len, seg.backend)  # (N, H, Dh)
        return self.proj(rearrange(out, "n h d -> n (h d)"))  # (N, D)


class CrossAttention(nn.Module):
    """Multi-head cross-attention from each segment's tokens to its own text tokens."""

    def __init__(self, hidden: int, heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.q_norm = nn.RMSNorm(hidden // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(hidden // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, context: torch.Tensor, seg: Segments) -> torch.Tensor:
        k, v = rearrange(self.kv(context), "m (two h d) -> two m h d", two=2, h=self.heads)  # (M, H, Dh) each
        q = self.q_norm(rearrange(self.q(x), "n (h d) -> n h d", h=self.heads)).to(v.dtype)  # (N, H, Dh)
        k = self.k_norm(k).to(v.dtype)  # (M, H, Dh)
        out = attention(q, k, v, seg.cu, seg.cu_text, seg.max_len, seg.max_text, seg.backend)  # (N, H, Dh)
        return self.proj(rearrange(out, "n h d -> n (h d)"))  # (N, D)


class Mlp(nn.Module):
    """Two-layer GELU MLP."""

    def __init__(self, hidden: int, mlp_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning, plus cross-attention to the clip's text."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, qk_norm: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden, heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=True, eps=1e-6)
        self.cross_attn = CrossAttention(hidden, heads, qk_norm)
        self.norm3 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor, onehot: torch.Tensor, context: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], seg: Segments) -> torch.Tensor:
        mod = per_token(self.adaLN_modulation(c), onehot)  # (N, 6D): per-sample modulation broadcast to its tokens
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)  # (N, D) each
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope, seg)  # (N, D)
        x = x + self.cross_attn(self.norm2(x), context, seg)  # (N, D)
        x = x + gate_mlp * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))  # (N, D)
        return x


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN then a linear map back to patch values."""

    def __init__(self, hidden: int, patch_dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        shift, scale = per_token(self.adaLN_modulation(c), onehot).chunk(2, dim=1)  # (N, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, pt·ph·pw·C)


class VideoDiT(nn.Module):
    """Diffusion transformer over packed spatio-temporal latent patches, conditioned on text."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.x_embedder = nn.Linear(cfg.patch_dim, cfg.hidden)
        self.t_embedder = TimestepEmbedder(cfg.hidden)
        self.y_embedder = TextEmbedder(cfg.text_dim, cfg.hidden)
        self.null_text = nn.Parameter(torch.zeros(cfg.null_text_len, cfg.text_dim))
        self.blocks = nn.ModuleList(
            [DiTBlock(cfg.hidden, cfg.heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg.hidden, cfg.patch_dim)
        self.initialize_weights()

    @property
    def patch(self) -> tuple[int, int, int]:
        return self.cfg.patch

    def activation_floats_per_token(self) -> int:
        """Widths alive at once in one block (modulation 6·D + MLP hidden): the sampler's memory estimate."""
        return 6 * self.cfg.hidden + int(self.cfg.hidden * self.cfg.mlp_ratio)

    def initialize_weights(self) -> None:
        # Initialize transformer layers:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)

        # Initialize patch_embed like nn.Conv3d with kernel = stride = patch (a linear map of each patch):
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.bias, 0)

        # Initialize timestep and text embedding MLPs, and the null caption:
        for mlp in (self.t_embedder.mlp, self.y_embedder.context, self.y_embedder.pooled):
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        nn.init.normal_(self.null_text, std=0.02)

        # Zero-out adaLN modulation layers and cross-attention outputs: every block starts as the identity.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
            nn.init.constant_(block.cross_attn.proj.weight, 0)
            nn.init.constant_(block.cross_attn.proj.bias, 0)

        # Zero-out output layers: the initial prediction is exactly zero.
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def forward(self, x: torch.Tensor, t: torch.Tensor, batch: PackedBatch,
                text_drop: torch.Tensor | list[bool] | None = None) -> torch.Tensor:
        """
        Forward pass of the video DiT on one packed batch.
        x: (N, pt·ph·pw·C) noisy tokens laid out like batch.tokens
        t: (B,) flow time of each sample, 1 = pure noise
        batch: the PackedBatch (segments, positions, text)
        text_drop: (B,) bool, samples whose text is replaced by the null caption (CFG)
        """
        b = batch.num_samples
        drop = None if text_drop is None else [bool(d) for d in text_drop]
        layout = text_layout(batch, drop, self.cfg.null_text_len)
        seg = Segments(batch.cu_seqlens, batch.max_seqlen, layout.cu_seqlens, layout.max_seqlen,
                       self.cfg.attn_backend)
        dtype = self.x_embedder.weight.dtype
        text = torch.cat([batch.text.to(dtype), self.null_text.to(dtype)])[layout.index]  # (M, Dt) keys in segment order
        context, pooled = self.y_embedder(text, layout.sample_ids, b)  # (M, D), (B, D)
        c = self.t_embedder(t) + pooled  # (B, D)
        c = torch.cat([c, c.new_zeros(1, c.shape[1])])  # (B+1, D): row B conditions padding tokens
        onehot = sample_onehot(batch, c.dtype)  # (N, B+1)
        angles = rope_angles(batch.positions, self.cfg.hidden // self.cfg.heads, self.cfg.rope_theta)  # (N, Dh/2)
        rope = (angles.cos()[:, None], angles.sin()[:, None])  # (N, 1, Dh/2) each
        h = self.x_embedder(x.to(dtype))  # (N, D)
        for block in self.blocks:
            h = block(h, c, onehot, context, rope, seg)  # (N, D)
        return self.final_layer(h, c, onehot)  # (N, pt·ph·pw·C)


#################################################################################
#                                   DiT Configs                                 #
#################################################################################

# name → (depth, hidden, heads); "/2" = patch (1, 2, 2). S/B/L/XL as in the DiT paper (Table 1).
# The paper's XL has head dim 72, which fused attention kernels pad to 96 or 128 (25–44% of the
# attention math wasted): the -hd64 / -hd128 variants keep XL's depth and width (same parameter
# count and GEMM FLOPs) with 18 or 9 heads. S, B and L already have head dim 64.
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "DiT-S/2": (12, 384, 6),
    "DiT-B/2": (12, 768, 12),
    "DiT-L/2": (24, 1024, 16),
    "DiT-XL/2": (28, 1152, 16),
    "DiT-XL/2-hd64": (28, 1152, 18),
    "DiT-XL/2-hd128": (28, 1152, 9),
    "DiT-tiny": (2, 32, 2),  # for tests
}


def dit_config(name: str, **overrides) -> DiTConfig:
    """The registry's DiTConfig for `name`, with any field overridden (e.g. in_channels, text_dim)."""
    if name not in DIT_SIZES:
        raise ValueError(f"unknown model {name!r}; choose one of {list(DIT_SIZES)}")
    depth, hidden, heads = DIT_SIZES[name]
    cfg = replace(DiTConfig(depth=depth, hidden=hidden, heads=heads, patch=(1, 2, 2)), **overrides)
    cfg.validate()
    return cfg


def dit_model(name: str, **overrides) -> VideoDiT:
    return VideoDiT(dit_config(name, **overrides))


DIT_MODELS = {name: functools.partial(dit_model, name) for name in DIT_SIZES}  # the CLI's choices
