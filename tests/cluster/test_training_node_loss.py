"""A worker *node* lost mid-training: Ray Train restores the group from the last checkpoint on a replacement node.

cluster/local.py's harness: a head that runs no tasks and two 1-CPU worker nodes, so each
of the 2 training workers sits on its own node. The training driver runs on the head via
`ray job submit`; the test SIGKILLs every process of one worker node (a machine lost), adds a
replacement node as an autoscaler would, and checks the job finishes with every step trained
exactly once in the run's metrics log.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from cluster.local import LocalCluster
from training.runlog import read_metrics

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.multinode]


@pytest.fixture(scope="module")
def demo_data(demo_pipeline_output: Path) -> Path:
    return demo_pipeline_output


def test_training_survives_a_lost_worker_node(demo_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "train"
    steps = 40
    # Fast health checks so the lost node is noticed within seconds, not the default ~30 s.
    cluster = LocalCluster(tmp_path / "cluster", workers=2, cpus_per_worker=1, head_cpus=0,
                           node_env={"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"})
    cluster.up()
    log_path = tmp_path / "job.log"
    try:
        with log_path.open("w") as log:
            job = subprocess.Popen(
                ["ray", "job", "submit", "--runtime-env", "cluster/runtime_env.yaml", "--",
                 "python", "training/train.py", "--config", "training/configs/demo.yaml",
                 "--set", f"data.uri={demo_data}", "--set", f"run.dir={run_dir}", "--set", f"run.max_steps={steps}",
                 "--set", "run.checkpoint_every=4", "--set", f"optim.total_steps={steps}",
                 "--set", "run.max_failures=3"],
                cwd=ROOT, env=cluster.env(), stdout=log, stderr=subprocess.STDOUT)
        killed_at = None
        deadline = time.monotonic() + 600
        while killed_at is None and job.poll() is None and time.monotonic() < deadline:
            done = len(read_metrics(str(run_dir)))
            if done >= 6:  # past the step-4 checkpoint
                killed_at = done
                cluster.kill_worker("worker-2")
            time.sleep(0.05)
        assert killed_at is not None and killed_at < steps, "training ended before the node could be killed"
        cluster.wait_for_nodes(2)  # head + worker-1: the loss is noticed
        cluster.add_worker()  # worker-3 replaces it
        assert job.wait(timeout=600) == 0, log_path.read_text()[-6000:]
    finally:
        if job.poll() is None:
            job.kill()
        cluster.down()
    text = re.sub(r"\x1b\[[0-9;]*m", "", log_path.read_text())
    assert "=== DiTharos training summary ===" in text
    assert "resumed from" in text, text[-4000:]
    metrics = read_metrics(str(run_dir))
    assert [r["step"] for r in metrics] == list(range(steps))  # each step once: none lost, none twice
    assert all(r["workers"] == 2 for r in metrics)
    assert (run_dir / f"checkpoint-{steps:08d}" / "trainer_state.json").is_file()
