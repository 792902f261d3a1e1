"""Every shipped example config of the three jobs parses, validates and survives a dump → load round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval.settings import NightlyConfig
from pipeline.config import dump_yaml, load_config, to_dict
from pipeline.settings import PipelineConfig
from training.settings import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
JOBS = {"pipeline": PipelineConfig, "training": TrainConfig, "eval": NightlyConfig}
CONFIGS = [(job, path) for job in JOBS for path in sorted((ROOT / job / "configs").glob("*.yaml"))]


@pytest.mark.parametrize(("job", "path"), CONFIGS, ids=[f"{job}/{p.name}" for job, p in CONFIGS])
def test_example_config_loads_and_round_trips(job: str, path: Path, tmp_path: Path) -> None:
    cfg = load_config(JOBS[job], path)
    again = tmp_path / "again.yaml"
    again.write_text(dump_yaml(cfg))
    assert to_dict(load_config(JOBS[job], again)) == to_dict(cfg)


def test_every_job_ships_a_demo_and_a_production_config() -> None:
    assert {(job, p.name) for job, p in CONFIGS} >= {(j, n) for j in JOBS for n in ("demo.yaml", "production.yaml")}
