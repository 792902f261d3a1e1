"""Per-step training figures: peak TFLOP/s and MFU, peak memory, device step times read without a
stall. Rows are written by training/runlog.py."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import torch

from training.flops import peak_bf16_tflops


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
