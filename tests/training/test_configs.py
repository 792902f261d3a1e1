"""The shipped training configs parse and validate against TrainConfig, and say what they claim."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import dump_yaml, load_config, to_dict
from training.model import dit_config
from training.settings import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "training" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_loads_and_round_trips(path: Path, tmp_path: Path) -> None:
    cfg = load_config(TrainConfig, path)
    again = tmp_path / "again.yaml"
    again.write_text(dump_yaml(cfg))
    assert to_dict(load_config(TrainConfig, again)) == to_dict(cfg)


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
