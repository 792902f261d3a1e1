"""`ray job submit` (the CLI, with cluster/runtime_env.yaml) of the demo pipeline, then training, to a started head.

The cluster is cluster/local.py's: a head that runs no tasks (like the cloud heads) and one CPU
worker, token auth on, dashboard on 127.0.0.1. The job ships the repo as its working_dir, so this
also checks that runtime_env.yaml leaves nothing out that the job needs.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import psutil
import pytest

from cluster.local import LocalCluster, running
from training.runlog import read_metrics

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.multinode]


def submit(cluster: LocalCluster, *entrypoint: str) -> tuple[subprocess.CompletedProcess, str]:
    done = subprocess.run(["ray", "job", "submit", "--runtime-env", "cluster/runtime_env.yaml", "--", *entrypoint],
                          cwd=ROOT, env=cluster.env(), capture_output=True, text=True, timeout=900)
    return done, re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)


def test_pipeline_and_training_via_ray_job_submit(tmp_path: Path) -> None:
    out, run_dir = tmp_path / "data", tmp_path / "train"
    # 2 CPUs on the worker: one cutting task plus the two 0.5-CPU model actors of the demo
    # config; later the two 1-CPU training workers.
    cluster = LocalCluster(tmp_path / "cluster", workers=1, cpus_per_worker=2, head_cpus=0)
    cluster.up()
    try:
        # Probe and cut tasks pinned to the harness' CPU node type and the writer placed there by
        # resources, as production.yaml does on a cloud cluster.
        pipeline, text = submit(cluster, "python", "pipeline/run.py", "--config", "pipeline/configs/demo.yaml",
                                "--output", str(out), "--set", "compute.cut_resources={cpu_node: 1}",
                                "--set", "compute.writer_resources={writer_slot: 1}")
        assert pipeline.returncode == 0, text[-6000:]
        training, train_text = submit(
            cluster, "python", "training/train.py", "--config", "training/configs/demo.yaml",
            "--set", f"data.uri={out}", "--set", f"run.dir={run_dir}", "--set", "run.max_steps=6",
            "--set", "run.checkpoint_every=3", "--set", "optim.total_steps=10")
        ours = [psutil.Process(p) for p in cluster.pids()]
    finally:
        cluster.down()
    assert re.search(r"Job '\S+' succeeded", text), text[-3000:]
    assert "=== DiTharos pipeline summary ===" in pipeline.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["sources_with_clips"] == 3 and manifest["totals"]["clips"] > 0
    assert manifest["random_init"] is True
    assert training.returncode == 0, train_text[-6000:]
    assert "=== DiTharos training summary ===" in training.stdout
    metrics = read_metrics(str(run_dir))
    assert [r["step"] for r in metrics] == list(range(6)) and all(r["workers"] == 2 for r in metrics)
    assert (run_dir / "checkpoint-00000006" / "trainer_state.json").is_file()
    assert not running(ours), "down() left processes of the cluster running"
