"""Training on a real object store: pyarrow's S3 client against a local S3 server (moto).

The demo shards and the run dir both on `s3://`: train with checkpoints (the workers read each
clip by one ranged GET), relaunch to resume, sample from the run dir and run the nightly eval
on it — every write (Ray Train's checkpoint upload, the run log's segments, TensorBoard files,
summary.json, samples, eval history and report) and every read through `s3://`, the path a
cluster on AWS takes. Each job is launched as a user launches it (its own local Ray), with the
S3 settings in its environment so Ray's workers see them too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline import storage
from tests.conftest import s3fs
from training.runlog import CLIPS, iter_rows, read_metrics

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
RUN = "s3://train-runs/demo"
DATA = "s3://train-data/demo"


def job(env: dict[str, str], script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, **env, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"})


def train(env: dict[str, str], steps: int) -> subprocess.CompletedProcess:
    done = job(env, "training/train.py", "--config", "training/configs/demo.yaml", "--set", f"data.uri={DATA}",
               "--set", f"run.dir={RUN}", "--set", f"run.max_steps={steps}", "--set", "run.checkpoint_every=3",
               "--set", "optim.total_steps=10", "--set", "run.log_every=3")
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return done


def names(prefix: str) -> list[str]:
    infos = s3fs().get_file_info(pafs.FileSelector(prefix, recursive=True))
    return sorted(i.path[len(prefix) + 1:] for i in infos if i.type == pafs.FileType.File)


def test_train_resume_sample_and_evaluate_on_s3(s3_env: dict[str, str], demo_pipeline_output: Path) -> None:
    fs = s3fs()
    fs.create_dir("train-runs")
    fs.create_dir("train-data")
    pafs.copy_files(str(demo_pipeline_output), "train-data/demo", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    first = train(s3_env, 6)
    assert "clip reads:" in first.stdout + first.stderr  # remote data, read clip by clip
    second = train(s3_env, 9)
    assert f"resumed     {RUN}/checkpoint-00000006" in second.stdout

    metrics = read_metrics(RUN)
    assert [r["step"] for r in metrics] == list(range(9))  # each step once across the two launches
    assert [r["workers"] for r in metrics] == [2] * 9
    assert [r["step"] for r in iter_rows(RUN, CLIPS)] == list(range(9))
    stored = names("train-runs/demo")
    # One segment per checkpoint interval, uploaded whole; one TensorBoard file per sync.
    assert [n for n in stored if n.startswith(("metrics/", "clips/"))] == [
        "clips/00000000.jsonl", "clips/00000003.jsonl", "clips/00000006.jsonl",
        "metrics/00000000.jsonl", "metrics/00000003.jsonl", "metrics/00000006.jsonl"]
    assert len([n for n in stored if n.startswith("tensorboard/events.out.tfevents.")]) == 3
    assert {"checkpoint-00000009/trainer_state.json", "checkpoint-00000009/ema.safetensors",
            "config.yaml", "summary.json"} <= set(stored)
    summary = json.loads(storage.read_bytes(f"{RUN}/summary.json"))
    assert summary["steps"] == 9 and summary["resumed_from"] == f"{RUN}/checkpoint-00000006"
    assert summary["checkpoint"] == f"{RUN}/checkpoint-00000009" and summary["data"] == DATA

    sampled = job(s3_env, "training/sample.py", "--checkpoint", RUN, "--prompt", "a dog on a beach",
                  "--steps", "2", "--frames", "5")
    assert sampled.returncode == 0, sampled.stderr[-4000:]
    mp4 = storage.read_bytes(f"{RUN}/samples/checkpoint-00000009/000-seed0.mp4")
    assert mp4[4:8] == b"ftyp" and len(mp4) > 1000

    nightly = job(s3_env, "eval/nightly.py", "--run", RUN, "--latest", "--set", "sampling.steps=2",
                  "--set", "reals.max_clips=3", "--set", "report.strip_videos=2")
    assert nightly.returncode == 0, nightly.stderr[-4000:]
    history = [json.loads(line) for line in storage.read_bytes(f"{RUN}/eval/history.jsonl").splitlines()]
    assert [r["checkpoint"] for r in history] == ["checkpoint-00000009"] and history[0]["fvd"] > 0
    report = storage.read_bytes(f"{RUN}/eval/report.html").decode()
    assert "checkpoint-00000009" in report and "steps logged" in report
