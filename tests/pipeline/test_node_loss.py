"""A worker node lost mid-run: the job still completes with the same clip ids, no duplicates."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.local import LocalCluster

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


def _launch(src: Path, out: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "pipeline/run.py", "--input", str(src), "--output", str(out),
         "--set", "compute.model_actor_cpus=0.25",
         # Tiny shards: commits (records) appear while the run goes on, so the test can see progress.
         "--set", "output.shard_target_mb=0.02",
         # Each source finishes in seconds; a run silent for 60 s is stuck, not slow.
         "--set", "compute.stall_timeout_s=60"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_worker_node_killed_mid_run(tmp_path: Path, odd_videos: dict[str, Path]) -> None:
    src = tmp_path / "raw"
    src.mkdir()
    for p in odd_videos.values():
        shutil.copy(p, src / p.name)
    # A head with one CPU and two 1-CPU worker nodes, each its own `ray start` (cluster/local.py).
    with LocalCluster(tmp_path / "cluster", workers=2, cpus_per_worker=1, head_cpus=1) as cluster:
        env = cluster.env()  # drivers join this cluster (RAY_ADDRESS + its auth token)
        ref = _launch(src, tmp_path / "ref", env)
        log = _wait(ref, 600)
        assert ref.returncode == 0, log[-4000:]
        expected = _clip_ids(tmp_path / "ref")
        assert expected and len(expected) == len(set(expected))

        out = tmp_path / "killed"
        job = _launch(src, out, env)
        deadline = time.time() + 300
        # Wait until the first commit, then take a worker node away mid-run.
        while not list(out.glob("_state/records/*.parquet")):
            assert job.poll() is None, job.communicate()[0][-4000:]
            assert time.time() < deadline, "the pipeline never started cutting"
            time.sleep(0.2)
        assert job.poll() is None, "the run ended before the node could be killed"
        cluster.kill_worker("worker-1")  # SIGKILL every process of the node at once
        # As a cluster autoscaler would, bring a replacement node up after the loss.
        cluster.add_worker(resources={"replacement": 1})
        log = _wait(job, 600)
        assert job.returncode == 0, log[-4000:]
        got = _clip_ids(out)
        assert len(got) == len(set(got)), "duplicate clips after node loss"
        assert sorted(got) == sorted(expected)
        # The index is the shards less the near-duplicates, decided alike for both runs (the
        # generated scenes' smooth gradients give some clips of different videos near hashes).
        def index_of(d: Path) -> list[str]:
            return sorted(pq.read_table(d / json.loads((d / "manifest.json").read_text())["files"]["index"])
                          ["clip_id"].to_pylist())

        assert index_of(out) == index_of(tmp_path / "ref") and set(index_of(out)) <= set(expected)
        assert len(index_of(out)) >= len(expected) - 2
