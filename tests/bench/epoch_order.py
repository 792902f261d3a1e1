"""What a training worker's data order costs at corpus scale, per epoch-order format; prints JSON.

    python tests/bench/epoch_order.py [--clips 10000000] [--files 10000] [--window 64]
                                      [--image-fraction 0.2] [--packs 128] [--budget 16384]

A synthetic index of `--clips` clips over `--files` shard files (12 bucket sizes from 256 to
12,288 tokens, 10% one-frame clips) is written as .npy files and memory-mapped, as the node's
shared index is (training/indexfile.py). Then, in a fresh process per format and order kind:

  * `before`: what every worker held before format 2 — the token counts as a Python list and
    the epoch's permutation of every clip (`training.data.epoch_order`); not planned (that
    planner is gone; tests/bench/plan_step.py has its times);
  * `format_1`: how a run begun before resumes now — the permutation, the mapped counts;
  * `format_2`: `training.order.ShuffledOrder`, computed a block at a time.

`private_mb`: the worker's memory growth no other process shares, after starting the epoch
and planning `--steps` steps; `peak_mb`: its peak growth; `epoch_start_s`: building the order
(at every epoch start); `plan_step_s`: mean planning time per step (`--packs` packs of
`--budget` tokens). Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

TOKENS = np.array([256 * (k + 1) for k in range(12)], np.int64)


def private_mb() -> float:
    """Private (unshared) resident memory of this process."""
    total = 0
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1])
    return total / 1024


def write_index(folder: Path, num_clips: int, num_files: int) -> None:
    from training.index import group_by_file
    rng = np.random.default_rng(0)
    file_of = rng.integers(0, num_files, num_clips).astype(np.int32)
    num_frames = np.where(rng.random(num_clips) < 0.1, 1, 33).astype(np.int64)
    by_file, videos, images = group_by_file(file_of, num_frames, num_files)
    arrays = {"num_tokens": TOKENS[rng.integers(0, 12, num_clips)], "file_of": file_of, "num_frames": num_frames,
              "by_file": by_file, "file_videos": videos, "file_images": images}
    for name, a in arrays.items():
        np.save(folder / f"{name}.npy", a)


def measure(folder: Path, fmt: int, window: int, image_fraction: float | None, packs: int, budget: int,
            steps: int) -> dict:
    from training.data import LoaderState, epoch_order, plan_step
    from training.order import ShuffledOrder
    x = {p.stem: np.load(p, mmap_mode="r") for p in folder.glob("*.npy")}
    for a in x.values():  # the shared mapped index is resident on a warm node: touch it, count it shared
        a.sum()
    base_private = private_mb()
    base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    base_rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    t = time.perf_counter()
    if fmt <= 1:
        counts = x["num_tokens"].tolist() if fmt == 0 else x["num_tokens"]
        order = epoch_order(len(counts), 7, 0, x["file_of"], window, x["num_frames"] == 1, image_fraction)
    else:
        counts = x["num_tokens"]
        order = ShuffledOrder(x["by_file"], x["file_videos"], x["file_images"], 7, 0, window, image_fraction)
    start_s = time.perf_counter() - t
    state, t = LoaderState(order=max(fmt, 1)), time.perf_counter()
    clips = 0
    for _ in range(steps if fmt else 0):
        planned, _, pos = plan_step(counts, order, state, packs, budget)
        clips += sum(map(len, planned))
        state = LoaderState(0, pos, 0, fmt)
    plan_s = (time.perf_counter() - t) / steps if fmt else None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"format": ["before", "format_1", "format_2"][fmt], "epoch_start_s": round(start_s, 2),
            "plan_step_s": plan_s and round(plan_s, 4), "clips_per_step": round(clips / steps) if fmt else None, "private_mb": round(private_mb() - base_private, 1),
            "peak_mb": round(max(0.0, peak - max(base_peak, base_rss)), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=10_000_000)
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--window", type=int, default=64, help="shuffle window in shard files (0: uniform)")
    p.add_argument("--image-fraction", type=float, default=0.2)
    p.add_argument("--packs", type=int, default=128)
    p.add_argument("--budget", type=int, default=16384)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)  # folder format(0-2) window image_fraction
    args = p.parse_args()
    if args.child:
        folder, fmt, window, fraction = args.child
        print(json.dumps(measure(Path(folder), int(fmt), int(window), None if fraction == "none" else float(fraction),
                                 args.packs, args.budget, args.steps)))
        return
    out = {"clips": args.clips, "files": args.files, "packs_per_step": args.packs, "budget": args.budget, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        write_index(Path(tmp), args.clips, args.files)
        kinds = [(0, None), (args.window, None), (args.window, args.image_fraction)]
        for window, fraction in kinds:
            for fmt in (0, 1, 2):
                r = subprocess.run([sys.executable, __file__, "--packs", str(args.packs), "--budget", str(args.budget),
                                    "--steps", str(args.steps), "--child", tmp, str(fmt), str(window),
                                    "none" if fraction is None else str(fraction)],
                                   capture_output=True, text=True, check=False)
                run = json.loads(r.stdout) if not r.returncode else {"format": fmt, "error": r.stderr[-2000:]}
                out["runs"].append({"window_shards": window, "image_fraction": fraction, **run})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
