"""training/checkpoint.py and training/metrics.py: the plain pieces of checkpointing and metrics
(the run log: test_runlog.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.config import from_dict, to_dict
from training import checkpoint as ckpt
from training.data import LoaderState
from training.metrics import mfu, peak_memory_gb, peak_tflops
from training.settings import TrainConfig


def state(steps: int = 6) -> ckpt.TrainerState:
    return ckpt.TrainerState(steps_done=steps, loader=LoaderState(1, 4, steps), data_fingerprint="a" * 64,
                             data_uri="/data", world_size=2, zero_stage=2, model={"hidden": 32},
                             weights=ckpt.EMA_FILE, code_version="git:x")


def test_trainer_state_round_trip_and_missing_keys() -> None:
    s = state()
    assert ckpt.TrainerState.from_json(s.to_json()) == s
    d = json.loads(s.to_json())
    del d["data_fingerprint"]
    with pytest.raises(ValueError, match="data_fingerprint"):
        ckpt.TrainerState.from_json(json.dumps(d))


def test_list_checkpoints_ignores_incomplete_and_foreign_folders(tmp_path: Path) -> None:
    for steps in (3, 12, 6):
        d = tmp_path / ckpt.checkpoint_name(steps)
        d.mkdir()
        (d / ckpt.STATE_FILE).write_text(state(steps).to_json())
    (tmp_path / ckpt.checkpoint_name(15)).mkdir()  # an interrupted upload: no trainer state
    (tmp_path / "checkpoint-7").mkdir()  # not our name
    found = ckpt.list_checkpoints(str(tmp_path))
    assert [s for s, _ in found] == [3, 6, 12]
    assert ckpt.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-00000012")
    assert ckpt.read_state(found[-1][1]).steps_done == 12
    assert ckpt.latest_checkpoint(str(tmp_path / "missing")) is None
    with pytest.raises(FileNotFoundError, match="not a DiTharos checkpoint"):
        ckpt.read_state(str(tmp_path / ckpt.checkpoint_name(15)))


def test_resume_changes_split_fixed_from_free_keys() -> None:
    saved = to_dict(TrainConfig())
    now = to_dict(TrainConfig())
    assert ckpt.resume_changes(saved, now) == ([], [])
    now["scaling"]["num_workers"] = 1
    now["run"]["max_steps"] = 500
    now["model"]["overrides"] = {"attn_backend": "sdpa_masked", "depth": 3}
    now["data"]["seed"] = 3
    now["optim"]["zero_stage"] = 3
    refused, allowed = ckpt.resume_changes(saved, now)
    assert refused == ["data.seed", "model.overrides.depth", "optim.zero_stage"]
    # Another attention kernel over the same weights may resume; so may dropping an override of it.
    assert allowed == ["model.overrides.attn_backend", "run.max_steps", "scaling.num_workers"]
    assert ckpt.resume_changes(now, {**now, "model": {**now["model"], "overrides": {"depth": 3}}}) == (
        [], ["model.overrides.attn_backend"])
    assert ckpt.resume_changes(now, {**now, "model": {**now["model"], "overrides": {}}})[0] == [
        "model.overrides.depth"]


def test_a_run_saved_before_a_config_key_existed_still_resumes() -> None:
    """Runs saved before model.kind / path / preset existed: those keys are absent, not changed."""
    defaults = to_dict(TrainConfig())
    saved = to_dict(TrainConfig())
    for key in ("kind", "path", "preset"):
        del saved["model"][key]
    assert ckpt.resume_changes(saved, to_dict(TrainConfig()), defaults) == ([], [])
    wan = from_dict(TrainConfig, {"model": {"kind": "wan", "preset": "tiny-wan"}})
    refused, _ = ckpt.resume_changes(saved, to_dict(wan), defaults)
    assert refused == ["model.kind", "model.preset"]  # an old DiT run is not resumed as a Wan one
    assert ckpt.resume_changes(saved, to_dict(TrainConfig()))[0] == ["model.kind", "model.path", "model.preset"]


def test_weights_round_trip(tmp_path: Path) -> None:
    (tmp_path / ckpt.STATE_FILE).write_text(state().to_json())
    tensors = {"a.weight": torch.randn(3, 4, dtype=torch.float64), "b": torch.arange(5.0)}
    ckpt.save_weights(str(tmp_path / ckpt.EMA_FILE), tensors)
    s, loaded = ckpt.load_weights(str(tmp_path))
    assert s == state() and loaded["a.weight"].dtype == torch.float32
    assert torch.equal(loaded["a.weight"], tensors["a.weight"].float()) and torch.equal(loaded["b"], tensors["b"])


def test_mfu_and_peaks() -> None:
    assert mfu(1e12, 1.0, 2, 1.0) == pytest.approx(0.5)
    assert mfu(1e12, 1.0, 2, None) is None
    assert peak_tflops(torch.device("cpu"), 0.0) is None and peak_tflops(torch.device("cpu"), 50.0) == 50.0
    assert peak_memory_gb(torch.device("cpu")) > 0.05  # this process' RSS peak
    from training.flops import peak_bf16_tflops

    # CUDA device names: the PCIe / NVL parts are slower than the SXM part whose name they contain.
    assert [peak_bf16_tflops(n) for n in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL",
                                          "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA A100-SXM4-80GB",
                                          "NVIDIA GeForce RTX 4090")] == [989.0, 756.0, 835.0, 989.0, 835.0, 312.0, None]


@pytest.mark.parametrize("stage", [2, 3])
def test_is_complete_needs_every_ranks_part(tmp_path: Path, stage: int) -> None:
    def make(steps: int, ranks: int) -> Path:
        d = tmp_path / ckpt.checkpoint_name(steps)
        ds = d / ckpt.DEEPSPEED_DIR / ckpt.DEEPSPEED_TAG
        ds.mkdir(parents=True)
        s = ckpt.TrainerState(**{**state(steps).__dict__, "zero_stage": stage})
        (d / ckpt.STATE_FILE).write_text(s.to_json())
        (d / ckpt.EMA_FILE).write_bytes(b"x")
        for r in range(ranks):
            (ds / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x")
            if stage == 3:
                (ds / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").write_bytes(b"x")
        if stage != 3:
            (ds / "mp_rank_00_model_states.pt").write_bytes(b"x")
        return d

    assert ckpt.is_complete(str(make(4, ranks=2)))
    assert not ckpt.is_complete(str(make(8, ranks=1)))  # rank 1's part never arrived
    assert ckpt.latest_complete(str(tmp_path)) == (4, str(tmp_path / "checkpoint-00000004"))
    (tmp_path / "checkpoint-00000004" / ckpt.EMA_FILE).write_bytes(b"")  # an empty (cut-off) file
    assert ckpt.latest_complete(str(tmp_path)) is None
