"""A worker node lost mid-run: the job still completes with the same clip ids, no duplicates."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.multinode]


def _clip_ids(out: Path) -> list[str]:
    ids = []
    for f in sorted(out.glob("shards/*/*.arrow")):
        ids += pa.ipc.open_file(pa.memory_map(str(f))).read_all().column("clip_id").to_pylist()
    return ids


def _wait(proc: subprocess.Popen, timeout_s: float) -> str:
    """Wait for a pipeline run; on timeout, kill it and fail with the end of its log."""
    try:
        return proc.communicate(timeout=timeout_s)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"pipeline run did not finish in {timeout_s} s:\n{proc.communicate()[0][-8000:]}")


def _launch(address: str, src: Path, out: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "pipeline/run.py", "--input", str(src), "--output", str(out),
         "--set", "compute.model_actor_cpus=0.25",
         # Each source finishes in seconds; a batch silent for 60 s is stuck, not slow.
         "--set", "compute.stall_timeout_s=60", "--set", "compute.commit_retries=3"],
        cwd=ROOT, env=dict(env, RAY_ADDRESS=address), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_worker_node_killed_mid_run(tmp_path: Path, odd_videos: dict[str, Path]) -> None:
    from ray.cluster_utils import Cluster

    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    src = tmp_path / "raw"
    src.mkdir()
    for p in odd_videos.values():
        shutil.copy(p, src / p.name)
    old_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=1, resources={f"worker{i}": 1}) for i in range(2)]
        cluster.wait_for_nodes()

        ref = _launch(cluster.address, src, tmp_path / "ref", env)
        log = _wait(ref, 600)
        assert ref.returncode == 0, log[-4000:]
        expected = _clip_ids(tmp_path / "ref")
        assert expected and len(expected) == len(set(expected))

        out = tmp_path / "killed"
        job = _launch(cluster.address, src, out, env)
        deadline = time.time() + 300
        # Wait until cutting is under way (a source finished), then take a worker node away.
        while not list(out.glob("_staging/*/sources/*.json")):
            assert job.poll() is None, job.communicate()[0][-4000:]
            assert time.time() < deadline, "the pipeline never started cutting"
            time.sleep(0.2)
        assert job.poll() is None, "the run ended before the node could be killed"
        cluster.remove_node(workers[0], allow_graceful=False)
        # As a cluster autoscaler would, bring a replacement node up after the loss.
        cluster.add_node(num_cpus=1, resources={"replacement": 1})
        log = _wait(job, 600)
        assert job.returncode == 0, log[-4000:]
        got = _clip_ids(out)
        assert len(got) == len(set(got)), "duplicate clips after node loss"
        assert sorted(got) == sorted(expected)
    finally:
        cluster.shutdown()
        if old_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = old_mode
