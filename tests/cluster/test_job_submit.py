"""`ray job submit` (the CLI, with cluster/runtime_env.yaml) of the demo pipeline to a started head node.

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

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.multinode]


def test_pipeline_via_ray_job_submit(tmp_path: Path) -> None:
    out = tmp_path / "data"
    # 2 CPUs on the worker: one cutting task plus the two 0.5-CPU model actors of the demo config.
    cluster = LocalCluster(tmp_path / "cluster", workers=1, cpus_per_worker=2, head_cpus=0)
    cluster.up()
    try:
        submit = subprocess.run(
            ["ray", "job", "submit", "--runtime-env", "cluster/runtime_env.yaml", "--",
             "python", "pipeline/run.py", "--config", "pipeline/configs/demo.yaml", "--output", str(out)],
            cwd=ROOT, env=cluster.env(), capture_output=True, text=True, timeout=900,
        )
        ours = [psutil.Process(p) for p in cluster.pids()]
    finally:
        cluster.down()
    text = re.sub(r"\x1b\[[0-9;]*m", "", submit.stdout + submit.stderr)
    assert submit.returncode == 0, text[-6000:]
    assert re.search(r"Job '\S+' succeeded", text), text[-3000:]
    assert "=== DiTharos pipeline summary ===" in submit.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["sources_with_clips"] == 3 and manifest["totals"]["clips"] > 0
    assert manifest["random_init"] is True
    assert not running(ours), "down() left processes of the cluster running"
