"""Optimisation pieces of the training job: DeepSpeed config, LR schedule.

Plain functions/classes that the Ray Train worker (issue 4's `training/train.py`) wires
together; no DeepSpeed or Ray imports here, so unit tests call them directly.
- `deepspeed_config(cfg, world_size, on_gpu)` turns our `OptimConfig` into DeepSpeed's JSON
  config: ZeRO stage, bf16 on GPU / fp32 on CPU, gradient accumulation, clipping.
- `lr_at(step, cfg)` is linear warmup then cosine decay to `min_lr`.
The EMA of the fp32 master weights is `training.ema`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal



@dataclass
class OptimConfig:
    """AdamW + warmup/cosine + ZeRO settings."""

    zero_stage: Literal[1, 2, 3] = 2
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 100
    total_steps: int = 10_000  # cosine reaches min_lr here and stays
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # global grad-norm clip; 0 disables
    ema_decay: float = 0.9999  # 0 disables the EMA copy

    def validate(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim: need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps < 0 or self.total_steps < 1 or self.warmup_steps > self.total_steps:
            raise ValueError(f"optim: need 0 <= warmup_steps <= total_steps, got {self.warmup_steps}, "
                             f"{self.total_steps}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(cfg: OptimConfig, world_size: int, grad_accumulation: int, on_gpu: bool) -> dict[str, Any]:
    """DeepSpeed's config dict for our settings (the optimizer itself is passed as a client AdamW).

    Micro-batch = one packed sequence per worker; DeepSpeed's batch bookkeeping counts packs, and
    `grad_accumulation` is the packs per worker per global step (packs_per_step / workers: not a
    setting of its own, so that resuming on another worker count needs no other change).
    bf16 only on GPU: CPU training (tests, DS_ACCELERATOR=cpu) runs in fp32. With bf16 the
    gradients are still accumulated over micro-batches and reduced across ranks in fp32
    (`grad_accum_dtype`, `communication_data_type`): summing G micro-batches and W ranks in bf16
    (8 mantissa bits) loses the small gradients; fp32 reduction doubles the gradient bytes on the
    wire (DiT-XL/2: 2.7 GB per step in all), which `overlap_comm` hides behind the backward.
    Buckets of 2e8 elements (fp32: 800 MB): with overlap two are in flight, and DeepSpeed's 5e8
    default would hold ~4 GB of buffers per GPU. overlap_comm needs CUDA streams: GPU only.
    Checkpoints are DeepSpeed's regular (per-rank) ones; resuming on another worker count goes
    through DeepSpeed's universal format (training.checkpoint.to_universal).
    """
    if grad_accumulation < 1:
        raise ValueError(f"grad_accumulation must be >= 1, got {grad_accumulation}")
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": grad_accumulation,
        "train_batch_size": grad_accumulation * world_size,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bool(on_gpu)},
        "steps_per_print": 10**9,  # our own progress line replaces DeepSpeed's
        "wall_clock_breakdown": False,
    }
    if on_gpu:
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
        ds["communication_data_type"] = "fp32"
        ds["zero_optimization"].update(overlap_comm=True, contiguous_gradients=True,
                                       reduce_bucket_size=int(2e8), allgather_bucket_size=int(2e8))
    if cfg.grad_clip > 0:
        ds["gradient_clipping"] = cfg.grad_clip
    return ds
