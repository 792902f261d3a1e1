"""Per-step training metrics: metrics.jsonl, clips.jsonl and TensorBoard event files (rank 0 only).

Files live in a local folder. When the run dir is a local or NFS path that folder *is* the run
dir; for an object-store run dir (s3://, gs://) rank 0 writes a local staging copy and
`sync()` uploads it with every checkpoint and at the end, so the stored metrics always cover
at least the steps of the latest checkpoint. On resume, rows of steps that will be redone are
dropped (`training.checkpoint.keep_rows_before`), so each step appears once.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline import storage
from training.checkpoint import keep_rows_before
from training.flops import peak_bf16_tflops

METRICS_FILE = "metrics.jsonl"
CLIPS_FILE = "clips.jsonl"
TB_DIR = "tensorboard"
TB_SCALARS = ("loss", "grad_norm", "lr", "tokens_per_s", "clips_per_s", "mfu", "data_wait_fraction",
              "peak_memory_gb")


def peak_tflops(device: torch.device, configured: float) -> float | None:
    """Peak TFLOP/s of one device for MFU: the configured value, else a known GPU by name, else None."""
    if configured > 0:
        return configured
    if device.type == "cuda":  # other GPUs need run.peak_tflops
        return peak_bf16_tflops(torch.cuda.get_device_name(device))
    return None  # CPU: MFU is not meaningful


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated (GPU), or peak resident set size of this process (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if sys.platform == "darwin" else 1024) / 1e9  # macOS reports bytes, Linux KiB


def mfu(step_flops: float, step_s: float, world_size: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation of a global step over all devices."""
    if peak is None or step_s <= 0:
        return None
    return step_flops / step_s / (world_size * peak * 1e12)


class StepClock:
    """Time between the ends of consecutive steps as the device runs them, read without a stall.

    On CUDA `mark()` records an event on the current stream and `seconds(a, b)` waits for event
    b only — called a step later, when the next step's kernels are already queued. On the CPU
    work runs as it is issued: host time."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000.0


def read_later(x: torch.Tensor) -> torch.Tensor:
    """A host copy of device tensor `x` made without waiting (pinned memory, non-blocking): valid
    once a StepClock mark taken after this call has completed. A plain `.tolist()` would be a
    copy queued behind every kernel issued so far, including the next step's."""
    if x.device.type != "cuda":
        return x
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    return host


def _lines(run_uri: str, name: str) -> list[str]:
    uri = storage.join(run_uri, name)
    return storage.read_bytes(uri).decode().splitlines() if storage.exists(uri) else []


def read_metrics(run_uri: str) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (empty when there is none yet)."""
    return [json.loads(line) for line in _lines(run_uri, METRICS_FILE) if line.strip()]


class RunLog:
    """Rank 0's metrics.jsonl / clips.jsonl / TensorBoard writer for a (possibly remote) run dir."""

    def __init__(self, run_uri: str, steps_done: int, tensorboard: bool) -> None:
        self.run_uri = run_uri
        self.remote = not storage.is_local(run_uri)
        # Local/NFS: write in the run dir itself; object store: a local staging folder.
        local_dir = Path(tempfile.mkdtemp(prefix="ditharos-run-")) if self.remote else Path(storage.resolve(run_uri)[1])
        self.local_dir = local_dir
        local_dir.mkdir(parents=True, exist_ok=True)
        for name in (METRICS_FILE, CLIPS_FILE):  # keep the rows before the resumed step, drop the rest
            lines = self._existing(name)
            (local_dir / name).write_text("".join(line + "\n" for line in keep_rows_before(lines, steps_done)))
        self._metrics = (local_dir / METRICS_FILE).open("a")
        self._clips = (local_dir / CLIPS_FILE).open("a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # ships with ray[train]

            # purge_step hides events of steps ≥ steps_done that an interrupted run wrote.
            self._tb = SummaryWriter(str(local_dir / TB_DIR), purge_step=steps_done if steps_done else None)

    def _existing(self, name: str) -> list[str]:
        return _lines(self.run_uri, name)

    def write(self, row: dict[str, Any], clip_ids: list[str] | None = None) -> None:
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if clip_ids is not None:
            self._clips.write(json.dumps({"step": row["step"], "epoch": row["epoch"], "clip_ids": clip_ids}) + "\n")
            self._clips.flush()
        if self._tb is not None:
            for key in TB_SCALARS:
                value = row.get(key)
                if value is not None and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, row["step"])

    def sync(self) -> None:
        """Flush, and upload the files when the run dir is remote."""
        if self._tb is not None:
            self._tb.flush()
        if not self.remote:
            return
        for path in sorted(self.local_dir.rglob("*")):
            if path.is_file():
                rel = path.relative_to(self.local_dir).as_posix()
                storage.write_bytes_atomic(storage.join(self.run_uri, rel), path.read_bytes())

    def close(self) -> None:
        self._metrics.close()
        self._clips.close()
        if self._tb is not None:
            self._tb.close()
        self.sync()
