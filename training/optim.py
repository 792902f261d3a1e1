"""Optimisation pieces of the training job: DeepSpeed config, LR schedule, EMA.

Plain functions/classes that the Ray Train worker (issue 4's `training/train.py`) wires
together; no DeepSpeed or Ray imports here, so unit tests call them directly.
- `deepspeed_config(cfg, world_size, on_gpu)` turns our `OptimConfig` into DeepSpeed's JSON
  config: ZeRO stage, bf16 on GPU / fp32 on CPU, gradient accumulation, clipping.
- `lr_at(step, cfg)` is linear warmup then cosine decay to `min_lr`.
- `EMA` keeps an fp32 shadow of the weights (saved with checkpoints).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn


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
    bf16 only on GPU: CPU training (tests, DS_ACCELERATOR=cpu) runs in fp32.
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
    if cfg.grad_clip > 0:
        ds["gradient_clipping"] = cfg.grad_clip
    return ds


def param_items(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """named_parameters under state-dict names (activation-checkpoint wrappers add a prefix)."""
    for n, p in model.named_parameters():
        yield n.replace("._checkpoint_wrapped_module", ""), p


class EMA:
    """Exponential moving average of a model's parameters, kept in fp32 under state-dict names."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in param_items(model)}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.update_from(dict(param_items(model)))

    @torch.no_grad()
    def update_from(self, params: dict[str, torch.Tensor]) -> None:
        """One EMA step from full (unpartitioned) weights under state-dict names."""
        for n, p in params.items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the EMA weights into `model` (e.g. for sampling)."""
        for n, p in param_items(model):
            p.copy_(self.shadow[n].to(p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state does not match the model; differing parameters: {sorted(missing)[:5]}")
        self.decay = float(state["decay"])
        self.shadow = {n: t.float().clone() for n, t in state["shadow"].items()}
