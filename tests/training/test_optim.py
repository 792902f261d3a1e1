"""DeepSpeed config generation, LR schedule and EMA (pure pieces of the training job)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ConfigError, load_config
from training.optim import OptimConfig, deepspeed_config, lr_at


def test_lr_warmup_then_cosine_to_min() -> None:
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4)  # (0+1)/10 of lr
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg) == pytest.approx(1e-4) and lr_at(10_000, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay after warmup


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_config(stage: int) -> None:
    cfg = OptimConfig(zero_stage=stage, grad_clip=0.5)
    gpu = deepspeed_config(cfg, world_size=8, grad_accumulation=4, on_gpu=True)
    cpu = deepspeed_config(cfg, world_size=2, grad_accumulation=4, on_gpu=False)
    assert gpu["zero_optimization"]["stage"] == stage and gpu["bf16"]["enabled"] is True
    assert cpu["bf16"]["enabled"] is False
    assert gpu["train_batch_size"] == 32 and cpu["train_batch_size"] == 8
    assert gpu["gradient_accumulation_steps"] == 4 and gpu["gradient_clipping"] == 0.5
    assert "gradient_clipping" not in deepspeed_config(OptimConfig(grad_clip=0), 1, 1, False)
    with pytest.raises(ValueError, match="grad_accumulation"):
        deepspeed_config(cfg, world_size=2, grad_accumulation=0, on_gpu=False)


def test_optim_config_validation_and_keys() -> None:
    with pytest.raises(ValueError, match="min_lr"):
        OptimConfig(lr=1e-4, min_lr=1e-3).validate()
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config(OptimConfig, None, ["zero_stage=4"])
    with pytest.raises(ConfigError, match="valid keys"):
        load_config(OptimConfig, None, ["zero=2"])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gpu_config_accumulates_and_reduces_in_fp32_and_deepspeed_accepts_it(stage: int,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = deepspeed_config(OptimConfig(zero_stage=stage), world_size=1, grad_accumulation=4, on_gpu=True)
    parsed = DeepSpeedConfig(ds)  # DeepSpeed's own parser: a misspelt key or value fails here
    assert parsed.bfloat16_config.enabled and parsed.grad_accum_dtype == "fp32"
    assert parsed.communication_data_type == torch.float32
    assert parsed.zero_config.overlap_comm is True and parsed.zero_config.reduce_bucket_size == int(2e8)
    cpu = DeepSpeedConfig(deepspeed_config(OptimConfig(zero_stage=stage), 1, 4, on_gpu=False))
    assert not cpu.bfloat16_config.enabled and cpu.grad_accum_dtype is None
