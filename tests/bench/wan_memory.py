"""Memory per GPU of fine-tuning Wan 2.1 1.3B / 14B with DiTharos (issue 15's memory table), computed.

    python tests/bench/wan_memory.py [--gpus 8] [--tokens 16384,32768,65536]

Prints JSON: for each model, mode (full / LoRA r=16), ZeRO stage (2 / 3), activation checkpointing
(off / on) and tokens per pack, the GB each GPU holds and whether that fits an 80 GB (H100) and a
141 GB (H200) GPU with 10% kept free for the allocator and NCCL.

How each part is counted (P = parameters, exact from the model built on the meta device; N = GPUs):
* full fine-tuning with DeepSpeed as `training/optim.py` configures it (bf16 weights, fp32
  master + Adam moments, gradients accumulated in fp32): bf16 weights 2P (ZeRO-3: 2P/N plus one
  gathered block), fp32 master + m + v 12P/N, fp32 gradient partition 4P/N, plus the bf16
  gradient buckets (2 × 2e8 elements · 2 B);
* LoRA (r=16 on q, k, v, out of both attentions and both FFN matrices): the frozen base in bf16
  2P on every GPU, the LoRA factors with their fp32 master, moments and gradients (16 B each);
* activations: the bytes autograd saves per token per block, counted exactly with saved-tensor
  hooks over one real Wan block of the model's width under bf16 autocast (on the CPU; the CUDA
  attention kernels save q, k, v, out and log-sum-exp, all O(tokens), like the CPU path), times
  the blocks; with checkpointing, each block's input (2·D bytes per token) for every block plus
  one block's saved tensors during its recomputation.
Not counted: the CUDA context and allocator fragmentation (the 10% margin), the text encoder and
VAE (the shards hold their outputs). `make gpu-check`'s `wan` check measures the 1.3B and 14B
LoRA cases on a lent GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.gpu_check import WAN_COMMON, WAN_SIZES  # noqa: E402
from training.wan import WAN_LORA_TARGETS  # noqa: E402
from training.packing import pack  # noqa: E402
from training.attention import attention as _REAL_ATTENTION  # noqa: E402
from training.wan import PackedWan  # noqa: E402

GB = 1e9
BUCKET_BYTES = 2 * 2e8 * 2  # DeepSpeed's reduce + allgather buckets (2e8 elements, bf16)
GPU_GB = {"H100 80GB": 80, "H200 141GB": 141}


def wan(size: str, layers: int | None = None, device: str = "meta") -> torch.nn.Module:
    from diffusers import WanTransformer3DModel
    from diffusers.utils import logging

    logging.set_verbosity_error()  # its note on casting fp32-kept modules: counting bytes here, not training

    cfg = dict(WAN_COMMON, **WAN_SIZES[size])
    if layers is not None:
        cfg["num_layers"] = layers
    with torch.device(device):
        return WanTransformer3DModel(**cfg)


def lora_params(model: torch.nn.Module, rank: int = 16) -> int:
    """Parameters of LoRA factors (A: r×in, B: out×r) on every targeted Linear."""
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.endswith(WAN_LORA_TARGETS))


class _FlashLike(torch.autograd.Function):
    """Attention that saves what the CUDA flash / cuDNN kernels save (q, k, v, out, fp32 log-sum-exp)
    rather than what the CPU path would (its per-segment math may keep n² weights)."""

    @staticmethod
    def forward(ctx, q, k, v, *rest):  # noqa: ANN001, ANN002, ANN205
        with torch.no_grad():
            out = _REAL_ATTENTION(q, k, v, *rest)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32))
        return out


def _flash_like(q, k, v, *rest, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
    return _FlashLike.apply(q, k, v, *rest, *kw.values())


def saved_bytes_per_token_block(size: str, tokens: int = 256) -> float:
    """Bytes autograd keeps per token for one Wan block of this width (bf16 autocast), by hook count.

    Two pack sizes difference out what does not scale with tokens (autocast's weight copies, the
    text); one block is the difference of a 2-block and a 1-block model."""
    import training.wan as wan_module

    def count(layers: int, side: int) -> tuple[int, int]:
        torch.manual_seed(0)
        model = PackedWan(wan(size, layers, "cpu").to(torch.bfloat16), backend="sdpa_segments")
        batch = pack([torch.randn(16, 1, 2 * side, 2 * side)], [torch.randn(20, 4096)], (1, 2, 2), side * side)
        total = 0

        def keep(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        wan_module.attention = _flash_like
        try:
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
                    torch.autocast("cpu", dtype=torch.bfloat16):
                model(batch.tokens, torch.tensor([0.5]), batch).float().sum()
        finally:
            wan_module.attention = _REAL_ATTENTION
        return total, sum(batch.lengths)

    small, large = int(tokens ** 0.5), 2 * int(tokens ** 0.5)
    (a2, n_small), (a1, _) = count(2, small), count(1, small)
    (b2, n_large), (b1, _) = count(2, large), count(1, large)
    return ((b2 - b1) - (a2 - a1)) / (n_large - n_small)


def table(gpus: int, token_budgets: list[int]) -> dict:
    out: dict = {"gpus": gpus, "margin": 0.1, "rows": []}
    for size in WAN_SIZES:
        model = wan(size)
        p = sum(t.numel() for t in model.parameters())
        layers = model.config.num_layers
        d = model.config.num_attention_heads * model.config.attention_head_dim
        block_p = sum(t.numel() for t in model.blocks[0].parameters())
        lp = lora_params(model)
        act = saved_bytes_per_token_block(size)
        out[size] = {"params_b": round(p / 1e9, 3), "lora_params_m": round(lp / 1e6, 1),
                     "saved_bytes_per_token_per_block": round(act)}
        for mode in ("full", "lora"):
            for stage in (2, 3):
                if mode == "lora" and stage == 3:
                    continue  # the frozen base is 2P either way in DiTharos today (no sharding of frozen weights)
                if mode == "full":
                    weights = 2 * p if stage == 2 else 2 * p / gpus + 2 * 2 * block_p  # + a gathered block (prefetch)
                    static = weights + (12 * p + 4 * p) / gpus + BUCKET_BYTES
                else:
                    static = 2 * p + 16 * lp
                for ckpt in (False, True):
                    for n in token_budgets:
                        acts = n * (layers * 2 * d + act) if ckpt else n * layers * act
                        total = (static + acts) / GB
                        row = {"model": size, "mode": mode, "zero": stage, "checkpointing": ckpt, "tokens": n,
                               "static_gb": round(static / GB, 1), "activations_gb": round(acts / GB, 1),
                               "total_gb": round(total, 1)}
                        row.update({f"fits_{k.split()[0]}": total <= v * (1 - out["margin"]) for k, v in GPU_GB.items()})
                        out["rows"].append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=8, help="GPUs sharing ZeRO's partitions")
    ap.add_argument("--tokens", default="16384,32768,65536", help="tokens per pack (micro-batch)")
    args = ap.parse_args()
    print(json.dumps(table(args.gpus, [int(t) for t in args.tokens.split(",")]), indent=1))


if __name__ == "__main__":
    main()
