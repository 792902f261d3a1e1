"""Benchmark the training run log (training/runlog.py) for an object-store run dir; prints JSON.

    python tests/bench/runlog.py [--steps 20000] [--checkpoint-every 500] [--clip-ids 128] [--no-tensorboard]

Rank 0 writes one metrics row per step and one clips row (the step's clip ids) and syncs the log
with every checkpoint, as training/loop.py does; then a resume at the last checkpoint opens the
log again, and the run summary reads it back. The run dir is a local folder treated as remote
(`storage.is_local` patched), so every upload and read goes through pipeline/storage's
write/put/read functions, which are wrapped to count bytes and calls. Reports bytes and calls
uploaded over the run and by its last sync (what each checkpoint costs at the end of a long
run), bytes read and written by the resume, the summary's bytes read and peak memory
(tracemalloc), and wall times. Nothing is enforced.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline import storage  # noqa: E402
from training import runlog  # noqa: E402


class Counted:
    """Wraps storage's write/put/read functions to count calls and bytes."""

    def __init__(self) -> None:
        self.reset()
        self._write, self._put, self._read = storage.write_bytes_atomic, storage.put_file_atomic, storage.read_bytes
        self._chunks = storage.iter_chunks

    def reset(self) -> None:
        self.put_calls = self.put_bytes = self.read_calls = self.read_bytes = 0

    def write(self, uri: str, data: bytes) -> None:
        self.put_calls += 1
        self.put_bytes += len(data)
        self._write(uri, data)

    def put(self, local_path: str, uri: str) -> None:
        self.put_calls += 1
        self.put_bytes += Path(local_path).stat().st_size
        self._put(local_path, uri)

    def read(self, uri: str, max_bytes: int | None = None) -> bytes:
        data = self._read(uri, max_bytes)
        self.read_calls += 1
        self.read_bytes += len(data)
        return data

    def chunks(self, uri: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        self.read_calls += 1
        for chunk in self._chunks(uri, *args, **kwargs):
            self.read_bytes += len(chunk)
            yield chunk

    def figures(self) -> dict:
        return {"put_calls": self.put_calls, "put_mb": round(self.put_bytes / 2**20, 2),
                "read_calls": self.read_calls, "read_mb": round(self.read_bytes / 2**20, 2)}


def row(step: int, rng: random.Random) -> dict:
    return {"step": step, "epoch": step // 5000, "loss": rng.random(), "lr": 1e-4, "grad_norm": rng.random(),
            "tokens": 65536, "samples": 256, "packs": 8, "skipped": 0, "step_s": 0.5 + rng.random(),
            "tokens_per_s": 1.2e5, "clips_per_s": 500.0, "mfu": 0.4, "data_wait_s": 0.01,
            "data_wait_fraction": 0.02, "peak_memory_gb": 61.2, "workers": 64}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--checkpoint-every", type=int, default=500)
    ap.add_argument("--clip-ids", type=int, default=128, help="clip ids per step (global batch)")
    ap.add_argument("--no-tensorboard", action="store_true")
    args = ap.parse_args()
    rng = random.Random(0)
    tensorboard = not args.no_tensorboard
    count = Counted()
    with tempfile.TemporaryDirectory() as tmp, \
            mock.patch.object(storage, "is_local", lambda uri: False), \
            mock.patch.object(storage, "write_bytes_atomic", count.write), \
            mock.patch.object(storage, "put_file_atomic", count.put), \
            mock.patch.object(storage, "read_bytes", count.read), \
            mock.patch.object(storage, "iter_chunks", count.chunks):
        run_uri = str(Path(tmp) / "run")
        t0 = time.perf_counter()
        log = runlog.RunLog(run_uri, 0, tensorboard)
        last_sync = {}
        for step in range(args.steps):
            ids = [f"{rng.getrandbits(64):016x}-{i:05d}" for i in range(args.clip_ids)]
            log.write(row(step, rng), ids)
            if (step + 1) % args.checkpoint_every == 0:
                before = count.figures()
                log.sync()
                after = count.figures()
                last_sync = {"put_calls": after["put_calls"] - before["put_calls"],
                             "put_mb": round(after["put_mb"] - before["put_mb"], 2)}
        log.close()
        run_s = time.perf_counter() - t0
        run = count.figures()
        stored_mb = sum(p.stat().st_size for p in Path(run_uri).rglob("*") if p.is_file()) / 2**20

        count.reset()
        resume_at = args.steps - args.steps % args.checkpoint_every - args.checkpoint_every // 2
        t0 = time.perf_counter()
        again = runlog.RunLog(run_uri, resume_at, tensorboard)
        resume_s = time.perf_counter() - t0
        again.close()
        resume = count.figures()

        count.reset()
        tracemalloc.start()
        t0 = time.perf_counter()
        summary = runlog.summarize(run_uri)  # what training/train.py's summary reads
        summary_s = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert summary["steps"] == resume_at, summary
    print(json.dumps({
        "steps": args.steps, "checkpoint_every": args.checkpoint_every, "clip_ids_per_step": args.clip_ids,
        "tensorboard": tensorboard, "stored_mb": round(stored_mb, 2),
        "run": {**run, "wall_s": round(run_s, 2)}, "last_sync": last_sync,
        "resume": {"at_step": resume_at, **resume, "wall_s": round(resume_s, 3)},
        "summary": {**count.figures(), "peak_mb": round(peak / 2**20, 2), "wall_s": round(summary_s, 3)},
    }, indent=2))


if __name__ == "__main__":
    main()
