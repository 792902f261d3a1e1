"""FLOPs of a VideoDiT step on a packed batch, for tokens/s → MFU in logs and benchmarks."""

from __future__ import annotations

from training.model import DiTConfig

# Dense (no sparsity) bf16 peak TFLOP/s per device, from NVIDIA's data sheets; the MFU denominator.
# Matched as substrings of torch.cuda.get_device_name, first match wins: the PCIe / NVL parts
# (lower clocks and power) come before the SXM names they contain.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0),
    ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by its CUDA name (e.g. "NVIDIA H100 80GB HBM3"), None when unknown."""
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


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
