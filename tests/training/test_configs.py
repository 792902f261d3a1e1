"""What the shipped training configs say (tests/test_configs.py: every config loads and round-trips)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import load_config
from training.model import dit_config
from training.settings import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "training" / "configs").glob("*.yaml"))


def test_production_config() -> None:
    prod = load_config(TrainConfig, next(p for p in CONFIGS if p.name == "production.yaml"))
    model = dit_config(prod.model.name)
    assert model.hidden // model.heads == 128 and (model.depth, model.hidden) == (28, 1152)  # XL, kernel-friendly heads
    assert prod.scaling.use_gpu and prod.run.compile and prod.optim.ema_decay > 0
    # The batch is fixed for the run; it must split over 64 workers and over one 8-GPU node (the RayJob).
    assert prod.data.packs_per_step % 64 == 0 and prod.data.packs_per_step % 8 == 0
    assert prod.data.uri.startswith("s3://") and prod.run.dir.startswith("s3://")
    assert prod.optim.warmup_steps < prod.optim.total_steps == prod.run.max_steps
    assert prod.run.max_steps % prod.run.checkpoint_every == 0
