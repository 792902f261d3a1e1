"""Benchmark NaViT packing for the video DiT on a realistic bucket mix; prints JSON.

    python tests/bench/packing.py [--num-clips 4000] [--budget 16384] [--window 256]

Mix: the production pipeline's buckets (pipeline/configs/production.yaml: 144p–720p ×
9:16…2.39:1 × {1, 17, 33, 65, 129} frames) as Wan-VAE latents (16 channels, 4× time,
8× space → latent T ∈ {1, 5, 9, 17, 33}), patch 1×2×2, drawn with the weights in
MIX_WEIGHTS (toward short, low-resolution clips). Clips over the token budget (long
high-resolution ones need sequence parallelism) are redrawn; their share is reported.

1. Real-token fraction: FFD packs of `--budget` tokens over loader windows of
   `--window` clips, vs padding every clip to the largest clip shape in the mix (and,
   more charitably, to the largest in its window).
2. CPU step time (loss + backward, `--cpu-model`, clips of the same mix that fit
   `--cpu-budget` tokens): one packed step ÷ the sum of per-clip steps; goal ≤ 1.1.
3. On CUDA only: DiT-XL/2 in bf16 on packed `--budget`-token sequences, tokens/s and MFU
   (matmul + attention FLOPs of forward ×3 for training, real tokens only), with a fused AdamW
   step per pack. The packs are drawn at random from FFD's plans of loader-sized windows of
   the mix — FFD's first packs hold the largest clips, whose long sequences flatter MFU.
   No gradient communication (one device): `make gpu-check` runs single-rank ZeRO.
Goals are printed, never enforced.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.buckets import bucket_size, parse_aspect  # noqa: E402
from training.attention import pick_backend  # noqa: E402
from training.flops import peak_bf16_tflops, train_step_flops  # noqa: E402
from training.flow import FlowConfig, flow_loss  # noqa: E402
from training.model import DIT_MODELS, VideoDiT  # noqa: E402
from training.packing import PackedBatch, pack, plan_packs  # noqa: E402
from training.parallel import apply_activation_checkpointing  # noqa: E402

PATCH = (1, 2, 2)
LATENT_CHANNELS = 16  # Wan 2.1 VAE
TEXT_TOKENS, TEXT_DIM = 77, 768  # CLIP ViT-L/14 token states; real captions use ~20 of 77
MIX_WEIGHTS = {
    "resolution_px": {144: 0.35, 240: 0.25, 360: 0.2, 480: 0.12, 720: 0.08},
    "num_frames": {1: 0.2, 17: 0.3, 33: 0.25, 65: 0.15, 129: 0.1},
    "aspect": {"9:16": 0.12, "3:4": 0.06, "1:1": 0.1, "4:3": 0.1, "16:9": 0.52, "2.39:1": 0.1},
}


# ---------------------------------------------------------------------------
# The mix
# ---------------------------------------------------------------------------


def latent_shape(resolution_px: int, aspect: str, num_frames: int) -> tuple[int, int, int, int]:
    h, w = bucket_size(resolution_px, parse_aspect(aspect), 16)
    return (LATENT_CHANNELS, (num_frames - 1) // 4 + 1, h // 8, w // 8)


def tokens_of(shape: tuple[int, ...]) -> int:
    return math.prod(s // p for s, p in zip(shape[1:], PATCH))


def draw_mix(n: int, budget: int, seed: int) -> tuple[list[tuple[int, int, int, int]], float]:
    """n latent shapes from MIX_WEIGHTS that fit `budget` tokens, and the share of draws that did not."""
    rng = np.random.default_rng(seed)
    axes = {k: (list(v), np.array(list(v.values())) / sum(v.values())) for k, v in MIX_WEIGHTS.items()}
    shapes, rejected = [], 0
    while len(shapes) < n:
        pick = {k: vals[rng.choice(len(vals), p=p)] for k, (vals, p) in axes.items()}
        shape = latent_shape(pick["resolution_px"], pick["aspect"], pick["num_frames"])
        if tokens_of(shape) > budget:
            rejected += 1
            continue
        shapes.append(shape)
    return shapes, rejected / (n + rejected)


# ---------------------------------------------------------------------------
# 1. Packing efficiency
# ---------------------------------------------------------------------------


def packing_efficiency(shapes: list[tuple[int, ...]], budget: int, window: int) -> dict:
    counts = [tokens_of(s) for s in shapes]
    real = sum(counts)
    packs = sum(len(plan_packs(counts[i:i + window], budget)) for i in range(0, len(counts), window))
    padded_window = sum(len(counts[i:i + window]) * max(counts[i:i + window]) for i in range(0, len(counts), window))
    return {
        "packed_real_token_fraction": round(real / (packs * budget), 4),
        "packed_real_token_fraction_all_at_once": round(real / (len(plan_packs(counts, budget)) * budget), 4),
        "padded_real_token_fraction": round(real / (len(counts) * max(counts)), 4),
        "padded_per_window_real_token_fraction": round(real / padded_window, 4),
        "num_packs": packs,
        "tokens_per_clip_mean": round(real / len(counts), 1),
        "tokens_per_clip_max": max(counts),
    }


# ---------------------------------------------------------------------------
# 2. CPU: packed step vs per-clip steps
# ---------------------------------------------------------------------------


def make_batch(shapes: list[tuple[int, ...]], budget: int, seed: int, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> PackedBatch:
    g = torch.Generator().manual_seed(seed)
    latents = [torch.randn(s, generator=g) for s in shapes]
    lengths = torch.randint(8, 30, (len(shapes),), generator=g).tolist()  # real caption tokens
    text = [torch.randn(n, TEXT_DIM, generator=g) for n in lengths]
    batch = pack(latents, text, PATCH, budget)
    batch.tokens, batch.text = batch.tokens.to(dtype), batch.text.to(dtype)
    return batch.to(device)


def train_step(model: VideoDiT, batch: PackedBatch, seed: int) -> None:
    loss, _ = flow_loss(model, batch, FlowConfig(), torch.Generator().manual_seed(seed))
    loss.backward()


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def cpu_timing(model_name: str, num_clips: int, budget: int, repeats: int, seed: int) -> dict:
    shapes, _ = draw_mix(num_clips, budget, seed + 1)
    torch.manual_seed(0)
    model = DIT_MODELS[model_name](in_channels=LATENT_CHANNELS, text_dim=TEXT_DIM)
    packed = make_batch(shapes, budget, seed)
    singles = [make_batch([s], tokens_of(s), seed) for s in shapes]
    train_step(model, packed, 0)  # warm-up
    t_packed = timed(lambda: train_step(model, packed, 0), repeats)
    t_single = sum(timed(lambda b=b: train_step(model, b, 0), repeats) for b in singles)
    return {
        "cpu_model": model_name,
        "cpu_budget_tokens": budget,
        "cpu_clips": num_clips,
        "cpu_packs": packed.num_packs,
        "cpu_real_tokens": packed.num_real_tokens,
        "cpu_threads": torch.get_num_threads(),
        "packed_step_s": round(t_packed, 3),
        "per_sample_steps_sum_s": round(t_single, 3),
        "packed_over_per_sample_time": round(t_packed / t_single, 3),
        "cpu_packed_real_tokens_per_s": round(packed.num_real_tokens / t_packed, 1),
    }


# ---------------------------------------------------------------------------
# 3. GPU: DiT-XL/2 bf16 throughput and MFU
# ---------------------------------------------------------------------------


def gpu_throughput(budget: int, steps: int, seed: int, checkpoint: bool, model_name: str = "DiT-XL/2",
                   device: str = "cuda") -> dict:
    """Train steps (loss + backward + fused AdamW) of a bf16 model on one pack each, packs drawn
    at random from FFD plans of 256-clip windows of the mix."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = DIT_MODELS[model_name](in_channels=LATENT_CHANNELS, text_dim=TEXT_DIM).to(device, torch.bfloat16)
    if checkpoint:
        apply_activation_checkpointing(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    shapes, _ = draw_mix(4000, budget, seed)
    counts = [tokens_of(s) for s in shapes]
    plans = []
    for w in range(0, len(shapes), 256):  # the loader packs windows of clips, not the whole mix
        plans += [[w + i for i in p] for p in plan_packs(counts[w:w + 256], budget)]
    pick = np.random.default_rng(seed).choice(len(plans), size=min(len(plans), steps + 2), replace=False)
    batches = [make_batch([shapes[i] for i in plans[p]], budget, seed + j, device, torch.bfloat16)
               for j, p in enumerate(pick)]

    def step(b: PackedBatch) -> None:
        train_step(model, b, 0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in batches[:2]:  # warm-up: kernels, allocator
        step(b)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for b in batches[2:]:
        step(b)
    sync()
    elapsed = time.perf_counter() - start
    measured = batches[2:]
    peak = peak_bf16_tflops(torch.cuda.get_device_name() if device == "cuda" else "H100 SXM")
    flops = sum(train_step_flops(model.cfg, b.lengths, b.text_lengths) for b in measured)
    real = sum(b.num_real_tokens for b in measured)
    return {
        "gpu": torch.cuda.get_device_name() if device == "cuda" else device,
        "gpu_model": f"{model_name} bf16",
        "gpu_activation_checkpointing": checkpoint,
        "gpu_budget_tokens": budget,
        "gpu_steps": len(measured),
        "gpu_step_s": round(elapsed / len(measured), 4),
        "gpu_real_tokens_per_s": round(real / elapsed, 1),
        "gpu_tflops_per_s": round(flops / elapsed / 1e12, 1),
        "gpu_mfu": None if peak is None else round(flops / elapsed / (peak * 1e12), 4),
        "gpu_peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None,
        "gpu_attention_backend": pick_backend(batches[0].tokens),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-clips", type=int, default=4000)
    ap.add_argument("--budget", type=int, default=16384)
    ap.add_argument("--window", type=int, default=256, help="clips the loader packs at a time")
    ap.add_argument("--cpu-model", default="DiT-S/2")
    ap.add_argument("--cpu-clips", type=int, default=8)
    ap.add_argument("--cpu-budget", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gpu-steps", type=int, default=10)
    ap.add_argument("--gpu-checkpoint", action="store_true", help="activation checkpointing on the GPU run")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    shapes, rejected = draw_mix(args.num_clips, args.budget, args.seed)
    result = {
        "mix": {"latent": f"Wan VAE: {LATENT_CHANNELS} ch, 4x time, 8x space; patch {PATCH}",
                "weights": {k: {str(kk): vv for kk, vv in v.items()} for k, v in MIX_WEIGHTS.items()},
                "num_clips": args.num_clips, "over_budget_redrawn_fraction": round(rejected, 4),
                "window_clips": args.window},
        "budget_tokens": args.budget,
        **packing_efficiency(shapes, args.budget, args.window),
        **cpu_timing(args.cpu_model, args.cpu_clips, args.cpu_budget, args.repeats, args.seed),
    }
    if torch.cuda.is_available():
        result.update(gpu_throughput(args.budget, args.gpu_steps, args.seed, args.gpu_checkpoint))
    else:
        result.update({"gpu_real_tokens_per_s": "not measured (no CUDA device)",
                       "gpu_mfu": "not measured (no CUDA device)"})
    result["goals"] = {"packed_real_token_fraction": ">= 0.98", "packed_over_per_sample_time": "<= 1.1",
                       "gpu_mfu": ">= 0.5"}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
