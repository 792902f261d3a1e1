"""Benchmark the training loader against the model's consumption; prints JSON.

    python tests/bench/loader.py [--num-clips 240] [--budget 16384] [--workers 8] [--steps 30]
                                 [--model DiT-S/2] [--train-steps 40]

1. Loader rate per worker: shards of the production mix (tests/bench/packing.py: Wan latents,
   144p–720p, 1–129 frames, CLIP ViT-L text states) written with the real shard writer and
   manifest; one worker's `Loader` (rank 0 of `--workers`, one pack of `--budget` tokens per
   worker per step) builds `--steps` steps: memory-mapped reads + packing, clips/s and
   packed tokens/s.
2. The model's consumption on this machine: a training step (loss, backward, AdamW) of
   `--model` on one such pack, tokens/s (CPU here; the same pack shape on CUDA when present).
   `loader_over_consumption` = loader tokens/s ÷ model tokens/s (goal ≥ 5). On a CPU that
   ratio is huge and says little, so `loader_over_gpu_estimate` also divides by an *estimate*
   (not a measurement) of DiT-XL/2 on one H100 at 50% MFU, from training/flops.py's count
   on the same packs.
3. `data_wait_fraction` during a real run: training/train.py (Ray Train + DeepSpeed ZeRO-2, 2
   CPU workers, DiT-tiny) on the demo shards for `--train-steps` steps; the share of step time
   workers spent blocked on the prefetcher (goal < 0.01). Skipped with --train-steps 0.
Goals are printed, never enforced.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tests.bench.packing import TEXT_DIM, TEXT_TOKENS, draw_mix  # noqa: E402
from tests.datasets import write_dataset  # noqa: E402
from tests.pipeline.test_shards import make_columns  # noqa: E402
from training.data import Loader  # noqa: E402
from training.index import ShardIndex  # noqa: E402
from training.flops import peak_bf16_tflops, train_step_flops  # noqa: E402
from training.flow import FlowConfig, flow_loss  # noqa: E402
from training.model import DIT_MODELS, dit_config  # noqa: E402
from training.runlog import read_metrics  # noqa: E402

PATCH = (1, 2, 2)


def write_mix(out: Path, num_clips: int, budget: int, seed: int) -> dict:
    """Shards + manifest for `num_clips` clips of the production mix, one bucket per latent shape."""
    shapes, _ = draw_mix(num_clips, budget, seed)
    by_shape: dict[tuple[int, ...], int] = {}
    for s in shapes:
        by_shape[s] = by_shape.get(s, 0) + 1
    parts = []
    for k, (shape, n) in enumerate(sorted(by_shape.items())):
        bucket = f"b{k:03d}_{'x'.join(map(str, shape))}"
        cols = make_columns(n, bucket=bucket, seed=seed + k)
        rng = np.random.default_rng(seed + k)
        cols["latents"] = rng.standard_normal((n, *shape)).astype(np.float16)
        cols["text_embedding"] = rng.standard_normal((n, TEXT_TOKENS, TEXT_DIM)).astype(np.float16)
        cols["image_embedding"] = rng.standard_normal((n, TEXT_DIM)).astype(np.float16)
        cols["split"] = ["train"] * n
        cols["clip_id"] = [f"{bucket}-{i:05d}" for i in range(n)]
        parts.append(cols)
    fingerprint = {"code_version": "bench", "config_sha256": "0" * 64, "models": {}}
    return write_dataset(out, parts, fingerprint)


def loader_rate(data: Path, budget: int, workers: int, steps: int, seed: int) -> dict:
    """One worker's loader (no prefetch thread): steps built per second, cold then warm page cache."""
    index = ShardIndex.open(str(data), PATCH)
    out = {}
    for label in ("cold", "warm"):
        loader = Loader(index, seed=seed, packs_per_step=workers, token_budget=budget, rank=0, world_size=workers)
        clips = tokens = 0
        start = time.perf_counter()
        for i, step in enumerate(loader):
            if i == steps:
                break
            clips += sum(p.num_samples for p in step.packs)
            tokens += sum(sum(p.lengths) for p in step.packs)
        seconds = time.perf_counter() - start
        out[label] = {"steps": steps, "clips": clips, "tokens": tokens, "seconds": round(seconds, 3),
                      "clips_per_s": clips / seconds, "tokens_per_s": tokens / seconds}
    return out


def model_rate(data: Path, model_name: str, budget: int, repeats: int, seed: int) -> dict:
    """Training-step tokens/s of the model on the loader's own packs (CUDA bf16 if present, else CPU fp32)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    index = ShardIndex.open(str(data), PATCH)
    loader = Loader(index, seed=seed, packs_per_step=1, token_budget=budget)
    torch.manual_seed(seed)
    model = DIT_MODELS[model_name](in_channels=16, text_dim=TEXT_DIM).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times, tokens = [], []
    for i, step in enumerate(loader):
        if i == repeats + 1:
            break
        batch = step.packs[0].to(device)
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss, _ = flow_loss(model, batch, FlowConfig(), torch.Generator().manual_seed(i))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
            tokens.append(sum(batch.lengths))
    return {"device": device, "model": model_name, "steps": repeats, "tokens_per_s": sum(tokens) / sum(times),
            "step_s": sum(times) / len(times)}


def gpu_estimate(data: Path, budget: int, seed: int, mfu: float = 0.5) -> dict:
    """DiT-XL/2 training tokens/s on one H100 at `mfu`, from the FLOP count of the loader's own packs."""
    index = ShardIndex.open(str(data), PATCH)
    cfg = dit_config("DiT-XL/2", in_channels=16, text_dim=TEXT_DIM)
    flops = tokens = 0
    for i, step in enumerate(Loader(index, seed=seed, packs_per_step=1, token_budget=budget)):
        if i == 10:
            break
        p = step.packs[0]
        flops += train_step_flops(cfg, p.lengths, p.text_lengths)
        tokens += sum(p.lengths)
    per_s = peak_bf16_tflops("H100 SXM") * 1e12 * mfu / (flops / tokens)
    return {"model": "DiT-XL/2", "device": f"H100 bf16 at {mfu:.0%} MFU (estimate, not measured)",
            "tokens_per_s": per_s}


def training_wait(steps: int) -> dict:
    """data_wait_fraction of a real Ray Train + DeepSpeed run on the demo shards."""
    from pipeline.run import main as pipeline_main
    from training.train import main as train_main

    with tempfile.TemporaryDirectory(prefix="ditharos-bench-") as tmp:
        data = Path(tmp) / "data"
        pipeline_main(["--output", str(data)])
        summary = train_main(["--config", str(ROOT / "training/configs/demo.yaml"), "--set", f"data.uri={data}",
                              "--set", f"run.dir={tmp}/train", "--set", f"run.max_steps={steps}",
                              "--set", f"optim.total_steps={steps}", "--set", "run.checkpoint_every=0"])
        rows = read_metrics(f"{tmp}/train")
    waits = [r["data_wait_fraction"] for r in rows[1:]]  # step 0 waits for the first build by design
    return {"steps": steps, "data_wait_fraction": summary["data_wait_fraction"],
            "data_wait_fraction_after_first_step": float(np.mean(waits)),
            "max_step_wait_fraction": float(max(waits)), "tokens_per_s": summary["tokens_per_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-clips", type=int, default=240)
    p.add_argument("--budget", type=int, default=16384)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--model-steps", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    result: dict = {"budget": args.budget, "workers": args.workers, "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="ditharos-bench-") as tmp:
        data = Path(tmp)
        start = time.perf_counter()
        manifest = write_mix(data, args.num_clips, args.budget, args.seed)
        result["dataset"] = {"clips": manifest["totals"]["clips"], "buckets": len(manifest["buckets"]),
                             "bytes": sum(b["bytes"] for b in manifest["buckets"].values()),
                             "write_s": round(time.perf_counter() - start, 2)}
        result["loader_per_worker"] = loader_rate(data, args.budget, args.workers, args.steps, args.seed)
        result["model"] = model_rate(data, args.model, args.budget, args.model_steps, args.seed)
        result["model_gpu_estimate"] = gpu_estimate(data, args.budget, args.seed)
    loader_tps = result["loader_per_worker"]["warm"]["tokens_per_s"]
    result["loader_over_consumption"] = loader_tps / result["model"]["tokens_per_s"]
    result["loader_over_gpu_estimate"] = loader_tps / result["model_gpu_estimate"]["tokens_per_s"]
    if args.train_steps:
        result["training_run"] = training_wait(args.train_steps)
        result["data_wait_fraction"] = result["training_run"]["data_wait_fraction"]
    result["goals"] = {"loader_over_consumption": ">= 5", "data_wait_fraction": "< 0.01"}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
