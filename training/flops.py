"""FLOPs of a VideoDiT step on a packed batch, for tokens/s → MFU in logs and benchmarks."""

from __future__ import annotations

from training.model import DiTConfig

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16, SXM


def forward_flops(cfg: DiTConfig, lengths: list[int], text_lengths: list[int]) -> float:
    """Matmul + attention FLOPs (2 per multiply-add) of one forward over samples of these token counts.

    Count real tokens only (padding is waste, not work). Per block, with width D, a sample of
    n tokens and m text tokens:
      self-attention qkv + out 4·D², cross-attention q + out 2·D², MLP 8·D²  → 2·14·D²·n
      cross-attention k, v on the text                                      → 2·2·D²·m
      attention q·kᵀ and weights·v: self 2·2·n²·D, cross 2·2·n·m·D
      adaLN modulation 2·6·D² per sample
    plus patch embedding and final linear 2·2·P·D·n, final adaLN 2·2·D² and timestep MLP
    2·(256·D + D²) per sample, and the text embedders 2·2·(Dt·D + D²)·m.
    A training step is 3× this (backward = 2× forward); activation checkpointing recomputes
    one more forward, which MFU by convention does not count.
    """
    d, p, dt = cfg.hidden, cfg.patch_dim, cfg.text_dim
    flops = 0.0
    for n, m in zip(lengths, text_lengths):
        block = 2 * 14 * d * d * n + 2 * 2 * d * d * m + 4 * n * n * d + 4 * n * m * d + 2 * 6 * d * d
        flops += cfg.depth * block
        flops += 2 * 2 * p * d * n + 2 * 2 * d * d + 2 * (256 * d + d * d) + 2 * 2 * (dt * d + d * d) * m
    return flops


def train_step_flops(cfg: DiTConfig, lengths: list[int], text_lengths: list[int]) -> float:
    return 3.0 * forward_flops(cfg, lengths, text_lengths)
