"""`make gpu-check`'s dry mode: every check's code path runs on the CPU, CUDA-only parts say skipped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_exercises_every_check(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "tests/bench/gpu_check.py", "--dry", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["dry"] is True and (tmp_path / "gpu-check.log").stat().st_size > 0
    checks = report["checks"]
    assert list(checks) == ["env", "attention", "dtype_chain", "ema", "attention_bench", "modulation_bench",
                            "train_step", "compile", "zero", "pytest_gpu", "fvd_features", "sampler", "wan"]
    skipped = {name for name, c in checks.items() if c["status"] == "skipped"}
    assert skipped == {"pytest_gpu"}, {n: checks[n] for n in skipped}  # only what needs a GPU to mean anything
    assert all(c["status"] == "ok" for name, c in checks.items() if name not in skipped)
    attn = checks["attention"]["results"]
    assert attn["varlen/hd72"] == "skipped: needs CUDA" and attn["sdpa_segments/hd128"]["ok"] is True
    assert checks["compile"]["new_graphs_after_first_pack"] == 0
    assert checks["dtype_chain"]["dtypes"] == [["torch.bfloat16"] * 3]
    assert all(checks["zero"][f"zero{s}"]["ema_on_master_device"] is True for s in (1, 2, 3))
    assert checks["train_step"]["plain"]["tokens_per_s"] > 0 and set(checks["train_step"]["plain"]["time_split"]) == {
        "gemm", "attention", "other"}
    assert checks["train_step"]["plain"]["top_kernels"] and checks["compile"]["top_kernels"]
    assert checks["train_step"]["hd128"]["tokens_per_s"] > 0
    # the one-hot broadcast's gradient equals the exact per-row sums (fp32 on the CPU)
    assert checks["modulation_bench"]["onehot_gemm_grad_rel_err"] < 1e-6
    # other attention kernels are timed or reported unavailable, never a crash
    assert set(checks["attention_bench"]["hd72"]) >= {"ms", "sdpa_cudnn", "sdpa_flash", "flex", "cudnn_varlen"}
    assert "unavailable" in checks["attention_bench"]["hd72"]["sdpa_cudnn"]
    # Wan full fine-tuning steps ran with checkpointing off and on (LoRA needs peft, absent from the lock)
    assert checks["wan"]["tiny_full"]["ms_per_step"] > 0 and checks["wan"]["tiny_full_ckpt"]["ms_per_step"] > 0
    # Unknown check names are refused with the valid ones.
    bad = subprocess.run([sys.executable, "tests/bench/gpu_check.py", "--only", "nope", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown checks ['nope']" in bad.stderr and "'attention'" in bad.stderr
