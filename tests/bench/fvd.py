"""Benchmark I3D feature extraction for FVD (the real Kinetics-400 weights); prints JSON.

    python tests/bench/fvd.py [--num-clips 4] [--batch-size 2] [--gpu-clips 2048] [--gpu-batch-size 32]

CPU: clips/s for `--num-clips` random 16-frame clips already at 224x224 (so only I3D is
timed, not the resize), after one warm-up batch. On CUDA only: the wall time of the full
FVD feature pass (upload + TF1 resize + I3D in fp32, TF32 off, as `eval.fvd` runs it) for
`--gpu-clips` 16-frame 256x256 uint8 clips, the size of a standard FVD-2048 evaluation.
Numbers are printed, never judged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from eval.fvd import i3d_features  # noqa: E402
from eval.weights import load_i3d  # noqa: E402

NUM_FRAMES = 16


def cpu_clips_per_s(num_clips: int, batch_size: int) -> dict:
    model, sha = load_i3d(device="cpu")
    x = torch.rand(batch_size, 3, NUM_FRAMES, 224, 224) * 2 - 1  # (B, 3, 16, 224, 224) in [-1, 1]
    with torch.inference_mode():
        model(x)  # warm-up: oneDNN picks its kernels on the first call
        start = time.perf_counter()
        done = 0
        while done < num_clips:
            model(x)
            done += batch_size
        elapsed = time.perf_counter() - start
    return {"clips": done, "batch_size": batch_size, "seconds": round(elapsed, 2),
            "clips_per_s": round(done / elapsed, 3), "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "detector_sha256": sha}


def gpu_feature_pass(num_clips: int, batch_size: int) -> dict:
    model, _ = load_i3d(device="cuda")
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (batch_size, NUM_FRAMES, 256, 256, 3), dtype=np.uint8)  # reused: time I3D, not RNG

    def clips() -> Iterator[np.ndarray]:
        for i in range(num_clips):
            yield pool[i % batch_size]

    i3d_features(pool[:batch_size], model, batch_size)  # warm-up (cuDNN autotune, allocator)
    torch.cuda.synchronize()
    start = time.perf_counter()
    feats = i3d_features(clips(), model, batch_size)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    return {"clips": len(feats.logits), "frames": NUM_FRAMES, "input_px": 256, "batch_size": batch_size,
            "seconds": round(elapsed, 2), "clips_per_s": round(len(feats.logits) / elapsed, 1),
            "peak_gib": round(peak_gib, 2), "device": torch.cuda.get_device_name()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-clips", type=int, default=4, help="CPU clips to time")
    p.add_argument("--batch-size", type=int, default=2, help="CPU batch size")
    p.add_argument("--gpu-clips", type=int, default=2048)
    p.add_argument("--gpu-batch-size", type=int, default=32)
    args = p.parse_args()
    report = {"i3d_cpu": cpu_clips_per_s(args.num_clips, args.batch_size)}
    if torch.cuda.is_available():
        report["i3d_gpu_fvd_pass"] = gpu_feature_pass(args.gpu_clips, args.gpu_batch_size)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
