"""The one prepared GPU check (`make gpu-check`): every GPU-only path of DiTharos in one run.

    python tests/bench/gpu_check.py [--out DIR] [--dry] [--only NAME,...]

On a CUDA device it runs at production sizes (DiT-XL/2, 16k-token packs; under ~8 minutes on
one H200); without one — or with `--dry` — the same code paths run at tiny sizes on the CPU and
the CUDA-only parts are reported `skipped`, so the script is known to work before a GPU is lent
(`tests/test_gpu_check.py` runs the dry mode in `make test`). It needs torch, einops and
numpy only; checks whose extra package (deepspeed, pytest, av) is missing say so and are skipped.

Writes DIR/gpu-check.json (also printed last) and DIR/gpu-check.log:
    {"device": ..., "dry": bool, "checks": {name: {"status": "ok"|"skipped"|"failed", ...figures}}}
A failed check never stops the others; the exit code is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repo root, when run as a file
# DeepSpeed / pytest wheels installed by `make gpu-check` on machines without them: after the
# machine's own site-packages, so its torch, numpy and friends are the ones imported.
GPU_SITE = ROOT / ".gpu-site"
if GPU_SITE.is_dir():
    sys.path.append(str(GPU_SITE))

from training.attention import attention, choose_backend, has_flash_attn, has_torch_varlen  # noqa: E402
from training.flops import forward_flops, peak_bf16_tflops, train_step_flops  # noqa: E402
from training.model import DiTConfig, VideoDiT, dit_config  # noqa: E402
from training.packing import PAD_SEGMENT, pack  # noqa: E402

log = logging.getLogger("gpu-check")


class Skip(Exception):
    """A check that cannot run here: reported as skipped with the reason."""


# ---------------------------------------------------------------------------
# Sizes: production on CUDA, tiny in the dry run
# ---------------------------------------------------------------------------


class Sizes:
    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.device = torch.device("cuda" if cuda else "cpu")
        self.dtype = torch.bfloat16 if cuda else torch.float32
        self.tokens = 16384 if cuda else 512  # one pack
        self.model = "DiT-XL/2" if cuda else "DiT-tiny"
        self.bench_iters = 10 if cuda else 1
        self.fvd_clips = 256 if cuda else 2
        self.fvd_frames = 16 if cuda else 10  # FVD's minimum is 10 frames
        self.fvd_px = 224 if cuda else 64


def production_mix(budget: int, rng: torch.Generator) -> list[tuple[int, int, int, int]]:
    """Latent shapes (C, T, H, W) of a pack's clips drawn from a typical bucket mix (Wan VAE: 16
    channels, 4× time, 8× space): 256–720 px, 1–49 frames, landscape, square and portrait.

    Not tests/bench/packing.py's `draw_mix` (the production config's weighted mix): that imports
    pipeline.buckets and with it OpenCV, which the GPU machines do not have."""
    buckets = [(1, 32, 32), (5, 32, 32), (9, 32, 56), (13, 32, 32), (5, 60, 90), (13, 40, 40), (9, 56, 32)]
    shapes, used = [], 0
    while True:
        t, h, w = buckets[int(torch.randint(len(buckets), (1,), generator=rng))]
        n = t * (h // 2) * (w // 2)
        if used + n > budget:
            return shapes or [(16, 1, 32, 32)]
        shapes.append((16, t, h, w))
        used += n


def tiny_mix(budget: int) -> list[tuple[int, int, int, int]]:
    return [(4, 1, 4, 4), (4, 2, 8, 8), (4, 3, 8, 12)][: 3 if budget >= 128 else 1]


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------


def check_env(z: Sizes) -> dict[str, Any]:
    out: dict[str, Any] = {"status": "ok", "torch": torch.__version__, "python": sys.version.split()[0],
                           "cuda": torch.version.cuda, "flash_attn": has_flash_attn(),
                           "torch_varlen": has_torch_varlen(),
                           "auto_backend_bf16": choose_backend(z.cuda, torch.bfloat16, has_torch_varlen(),
                                                               has_flash_attn())}
    if z.cuda:
        out.update(device=torch.cuda.get_device_name(), cudnn=torch.backends.cudnn.version(),
                   capability=list(torch.cuda.get_device_capability()),
                   memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1),
                   peak_bf16_tflops=peak_bf16_tflops(torch.cuda.get_device_name()))
    if has_torch_varlen():
        # Newer torch (the locked 2.14.1; not the GPU machines' 2.11) runs varlen_attn on cuDNN (FA3 class on Hopper) for
        # bf16 with cuDNN >= 9.18 and max_q > 128; older releases always run FlashAttention-2
        # (`pytorch_flash::` kernels: 1.6-2x slower on the H200, attention_bench's sdpa_cudnn rows).
        import torch.nn.attention.varlen as varlen
        out["varlen_kernels"] = "cudnn (max_q > 128)" if hasattr(varlen, "_can_use_cudnn") else "flash-attention-2"
    for name in ("deepspeed", "flash_attn", "pytest", "av", "transformers", "peft"):
        out[f"has_{name}"] = importlib.util.find_spec(name) is not None
    return out


def packed_qkv(z: Sizes, head_dim: int, heads: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Strided q, k, v views of one (N, 3·H·Dh) projection, as the model makes them, over segments of
    every kind: 1-token and 17-token clips, big clips (> 128 tokens: cuDNN's path), padding chunks."""
    n = z.tokens
    big = (n - 2 * PAD_SEGMENT - 1 - 17) // 2
    lengths = [1, 17, big, n - 2 * PAD_SEGMENT - 1 - 17 - big, PAD_SEGMENT, PAD_SEGMENT]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(z.device)
    g = torch.Generator(device=z.device).manual_seed(seed)
    qkv = torch.randn(n, 3 * heads * head_dim, generator=g, device=z.device, dtype=z.dtype)
    q, k, v = qkv.view(n, 3, heads, head_dim).unbind(1)  # (N, H, Dh) each, non-contiguous
    return q, k, v, cu, max(lengths)


def check_attention(z: Sizes) -> dict[str, Any]:
    """Forward + backward of every backend vs an fp32 reference, head dims 64 / 72 / 128."""
    results: dict[str, Any] = {}
    failed = False
    for backend in ("varlen", "flash", "flex", "sdpa_segments"):
        for head_dim in (64, 72, 128):
            key = f"{backend}/hd{head_dim}"
            if backend in ("varlen", "flash") and not z.cuda:
                results[key] = "skipped: needs CUDA"
                continue
            if (backend == "varlen" and not has_torch_varlen()) or (backend == "flash" and not has_flash_attn()):
                results[key] = "skipped: not installed"
                continue
            q, k, v, cu, mx = packed_qkv(z, head_dim, 4 if z.cuda else 2, seed=head_dim)
            ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
            ref = attention(*ref_in, cu, cu, mx, mx, "sdpa_segments")
            grad = torch.randn_like(ref)
            ref.backward(grad)
            xs = [x.detach().requires_grad_() for x in (q, k, v)]  # still the strided views of qkv
            try:
                out = attention(*xs, cu, cu, mx, mx, backend)
                out.backward(grad.to(out.dtype))
            except Exception as e:  # noqa: BLE001 — one backend's failure is a result, not the end
                if backend == "flex" and not z.cuda:
                    results[key] = f"skipped: {type(e).__name__} on CPU"
                    continue
                results[key] = f"failed: {type(e).__name__}: {e}"[:300]
                failed = True
                continue
            errs = [rel_err(out, ref)] + [rel_err(a.grad, b.grad) for a, b in zip(xs, ref_in)]
            tol = 3e-2 if z.dtype == torch.bfloat16 else 1e-4
            results[key] = {"out_rel_err": errs[0], "grad_rel_err": max(errs[1:]), "ok": max(errs) < tol}
            failed |= max(errs) >= tol
    return {"status": "failed" if failed else "ok", "tokens": z.tokens, "results": results}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)), 6)


def check_dtype_chain(z: Sizes) -> dict[str, Any]:
    """A bf16 DiT (as DeepSpeed runs it): every attention call gets one dtype and the expected backend."""
    import training.model as model_module

    seen: list[tuple[str, ...]] = []
    real = model_module.attention

    def spy(q, k, v, *rest, **kw):  # noqa: ANN001, ANN002, ANN003
        seen.append((str(q.dtype), str(k.dtype), str(v.dtype)))
        return real(q, k, v, *rest, **kw)

    model = VideoDiT(dit_config(z.model, in_channels=16, text_dim=64)).to(z.device, torch.bfloat16)
    batch = packed_batch(z, model.cfg, seed=0)
    model_module.attention = spy
    try:
        with torch.autocast(z.device.type, dtype=torch.bfloat16):
            out = model(batch.tokens.bfloat16(), torch.rand(batch.num_samples, device=z.device), batch)
    finally:
        model_module.attention = real
    mixed = [s for s in seen if len(set(s)) > 1]
    return {"status": "failed" if mixed else "ok", "attention_calls": len(seen), "dtypes": sorted(set(seen)),
            "output_dtype": str(out.dtype), "backend": choose_backend(z.cuda, torch.bfloat16, has_torch_varlen(),
                                                                      has_flash_attn())}


def packed_batch(z: Sizes, cfg: DiTConfig, seed: int, budget: int | None = None) -> Any:
    budget = budget or z.tokens
    rng = torch.Generator().manual_seed(seed)
    shapes = production_mix(budget, rng) if z.cuda else tiny_mix(budget)
    shapes = [(cfg.in_channels,) + s[1:] for s in shapes]
    latents = [torch.randn(s, generator=rng) for s in shapes]
    text = [torch.randn(int(torch.randint(5, 77, (1,), generator=rng)), cfg.text_dim, generator=rng) for _ in shapes]
    return pack(latents, text, cfg.patch, budget).to(z.device)


def check_ema(z: Sizes) -> dict[str, Any]:
    from training.ema import EMA, gather, whole_fragments

    model = VideoDiT(dit_config(z.model, in_channels=16, text_dim=64)).to(z.device)
    fragments, masters = whole_fragments(model)
    ema = EMA(fragments, masters, decay=0.999)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    sync(z)
    t0 = time.perf_counter()
    for _ in range(z.bench_iters):
        ema.update(masters)
    sync(z)
    ms = (time.perf_counter() - t0) / z.bench_iters * 1e3
    full = gather(fragments, ema.shadow, z.device)
    name = fragments[0].name
    want = 1 - 0.999 ** z.bench_iters  # each update moves (1 − decay) of the remaining gap of 1.0
    moved = float((full[name] - masters[0].view(fragments[0].shape).cpu() + 1.0).mean())
    ok = all(s.device == m.device for s, m in zip(ema.shadow, masters)) and abs(moved - want) < 1e-3
    return {"status": "ok" if ok else "failed", "update_ms": round(ms, 3), "params_m": round(
        sum(m.numel() for m in masters) / 1e6, 1), "moved": round(moved, 6), "expected": round(want, 6)}


def sync(z: Sizes) -> None:
    if z.cuda:
        torch.cuda.synchronize()


def timed(z: Sizes, fn: Callable[[], Any], iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(z)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(z)
    return (time.perf_counter() - t0) / iters


def check_attention_bench(z: Sizes) -> dict[str, Any]:
    """fwd+bwd TFLOP/s of the auto backend on a 16k pack of 4 clips, XL width, head dim 72 vs 128."""
    out: dict[str, Any] = {"status": "ok"}
    backend = choose_backend(z.cuda, z.dtype, has_torch_varlen(), has_flash_attn())
    for head_dim, heads in ((72, 16), (128, 9), (64, 18)):
        n = z.tokens
        lengths = [n // 4] * 4
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(z.device)
        q, k, v = (torch.randn(n, heads, head_dim, device=z.device, dtype=z.dtype, requires_grad=True)
                   for _ in range(3))

        def step() -> None:
            o = attention(q, k, v, cu, cu, max(lengths), max(lengths), backend)
            o.sum().backward()

        s = timed(z, step, z.bench_iters)
        flops = 3.5 * 4 * sum(m * m for m in lengths) * heads * head_dim  # fwd 4·n²·d; bwd ≈ 2.5× fwd
        row = out[f"hd{head_dim}"] = {"ms": round(s * 1e3, 3), "tflops": round(flops / s / 1e12, 2)}
        # The same math through other kernels, for choosing the backend: equal segments make a dense
        # (4, H, L, Dh) batch, so torch SDPA's cuDNN (FlashAttention-3 class on Hopper), flash and
        # memory-efficient kernels run it without padding; flex is DiTharos's own backend.
        for name, fn in alternative_attention(q, k, v, cu, lengths).items():
            try:
                t = timed(z, fn, z.bench_iters)
                row[name] = {"ms": round(t * 1e3, 3), "tflops": round(flops / t / 1e12, 2)}
            except Exception as e:  # noqa: BLE001 — a kernel refusing these shapes is a finding
                row[name] = f"unavailable: {type(e).__name__}: {e}"[:200]
    out["backend"] = backend
    return out


def alternative_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                          lengths: list[int]) -> dict[str, Callable[[], None]]:
    """fwd+bwd closures of the same equal-length segments through other kernels (on the CPU the
    CUDA-only ones report unavailable)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def dense(x: torch.Tensor) -> torch.Tensor:  # (N, H, Dh) -> (S, H, L, Dh)
        return x.view(len(lengths), lengths[0], *x.shape[1:]).transpose(1, 2)

    def sdpa(kernel: SDPBackend) -> Callable[[], None]:
        def run() -> None:
            with sdpa_kernel([kernel]):
                F.scaled_dot_product_attention(dense(q), dense(k), dense(v)).sum().backward()
        return run

    def flex() -> None:
        attention(q, k, v, cu, cu, max(lengths), max(lengths), "flex").sum().backward()

    def cudnn_varlen() -> None:
        """The packed (cumulative-lengths) cuDNN kernels that newer torch's varlen_attn calls, called
        directly: measures them under a torch whose varlen_attn still runs FlashAttention-2."""
        n = max(lengths)
        fwd = torch.ops.aten._cudnn_attention_forward(q.detach(), k.detach(), v.detach(), None, cu, cu, n, n, True)
        out, lse, seed = fwd[0], fwd[1], fwd[6]
        torch.ops.aten._cudnn_attention_backward(torch.ones_like(out), q.detach(), k.detach(), v.detach(), out, lse,
                                                 seed, seed, None, cu, cu, n, n, 0.0, False)

    return {"sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
            "sdpa_efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION), "flex": flex, "cudnn_varlen": cudnn_varlen}


def check_modulation_bench(z: Sizes) -> dict[str, Any]:
    """Per-sample adaLN rows (B+1, 6D) broadcast to a pack's tokens, forward + backward: the gather
    `rows[token_sample]` (backward: sort-based index_put with thousands of duplicates per row)
    against `training.model.per_token`'s one-hot GEMM (backward: a GEMM reduction)."""
    from training.model import per_token

    n, width, b = z.tokens, 6 * (1152 if z.cuda else 32), 8
    ids = torch.sort(torch.randint(0, b + 1, (n,), generator=torch.Generator().manual_seed(0))).values.to(z.device)
    onehot = (ids[:, None] == torch.arange(b + 1, device=z.device)).to(z.dtype)
    rows = torch.randn(b + 1, width, device=z.device, dtype=z.dtype, requires_grad=True)
    grad = torch.randn(n, width, device=z.device, dtype=z.dtype)
    ways = {"gather": lambda: rows[ids], "onehot_gemm": lambda: per_token(rows, onehot)}
    out: dict[str, Any] = {"status": "ok", "tokens": n, "width": width, "samples": b + 1}
    # fp64 reference of the backward: each row's sum of its tokens' gradients
    exact = torch.zeros(b + 1, width, dtype=torch.float64, device=z.device).index_add_(0, ids, grad.double())
    for name, fn in ways.items():
        def step() -> None:
            rows.grad = None
            fn().backward(grad)  # noqa: B023

        out[f"{name}_ms"] = round(timed(z, step, z.bench_iters) * 1e3, 3)
        # the gather's backward sums ~1,800 duplicates per row in bf16 (on the H200: 5% off)
        out[f"{name}_grad_rel_err"] = rel_err(rows.grad, exact)
    out["speedup"] = round(out["gather_ms"] / out["onehot_gemm_ms"], 2)
    if out["onehot_gemm_grad_rel_err"] > (1e-2 if z.cuda else 1e-6):
        out["status"] = "failed"
    return out


def check_train_step(z: Sizes) -> dict[str, Any]:
    """DiT training steps (bf16 autocast, fused AdamW) on packs from the production mix."""
    from torch.profiler import ProfilerActivity, profile

    from training.flow import FlowConfig, flow_loss
    from training.parallel import apply_activation_checkpointing

    out: dict[str, Any] = {"status": "ok", "model": z.model}
    # The paper's XL (head dim 72), with activation checkpointing, and the head-dim-128 variant.
    variants = (("plain", z.model, False), ("activation_checkpointing", z.model, True),
                ("hd128", z.model + "-hd128" if z.cuda else z.model, False))
    for key, model_name, ckpt in variants:
        torch.manual_seed(0)
        cfg = dit_config(model_name, in_channels=16, text_dim=64)
        model = apply_activation_checkpointing(VideoDiT(cfg).to(z.device), ckpt)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=z.cuda)
        packs = [packed_batch(z, cfg, seed=i) for i in range(3)]
        state = {"i": 0}

        def step() -> None:
            batch = packs[state["i"] % len(packs)]
            state["i"] += 1
            with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=z.cuda):
                loss, _ = flow_loss(model, batch, FlowConfig(), torch.Generator().manual_seed(state["i"]))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if z.cuda:
            torch.cuda.reset_peak_memory_stats()
        s = timed(z, step, z.bench_iters, warmup=2)
        tokens = sum(sum(p.lengths) for p in packs) / len(packs)
        flops = sum(train_step_flops(cfg, p.lengths, p.text_lengths) for p in packs) / len(packs)
        peak = peak_bf16_tflops(torch.cuda.get_device_name()) if z.cuda else None
        row = {"ms_per_step": round(s * 1e3, 2), "tokens_per_s": round(tokens / s), "real_tokens": round(tokens),
               "mfu": None if peak is None else round(flops / s / (peak * 1e12), 4),
               "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if z.cuda else None}
        if key == "plain":
            with profile(activities=[ProfilerActivity.CUDA if z.cuda else ProfilerActivity.CPU]) as prof:
                step()
                sync(z)
            row["time_split"], row["top_kernels"] = time_split(prof, z.cuda)
        out[key] = row
        model = opt = None  # free before the next variant is built
    return out


def time_split(prof: Any, cuda: bool, top: int = 25) -> tuple[dict[str, float], list[list[Any]]]:
    """Share of kernel (CUDA) or op (CPU) self time by kind (GEMM, attention, everything else),
    and the `top` kernels by self time as [name (cut to 100 chars), calls, ms, share]."""
    kinds = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    rows = []
    for e in prof.key_averages():
        t = e.self_device_time_total if cuda else e.self_cpu_time_total
        name = e.key.lower()
        if name.startswith(("profilerstep", "[memory]")) or t <= 0:
            continue
        rows.append((t, e.key, e.count))
        # attention first: cuDNN's and FlashAttention's kernel names also hold "gemm"-like words
        if any(s in name for s in ("flash", "fmha", "attention", "sdpa", "attn")):
            kinds["attention"] += t
        elif any(s in name for s in ("gemm", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "cutlass", "xmma",
                                     "nvjet", "cublas")):
            kinds["gemm"] += t
        else:
            kinds["other"] += t
    total = sum(kinds.values()) or 1.0
    rows.sort(reverse=True)
    table = [[k[:100], n, round(t / 1e3, 3), round(t / total, 4)] for t, k, n in rows[:top]]
    return {k: round(v / total, 3) for k, v in kinds.items()}, table


def check_compile(z: Sizes) -> dict[str, Any]:
    """Per-block torch.compile (training.parallel.apply_compile): step time vs eager, and new graphs
    compiled for packs of other lengths after the first (should be 0), outputs equal to eager."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile

    from training.flow import FlowConfig, flow_loss
    from training.parallel import apply_compile

    cfg = dit_config(z.model, in_channels=16, text_dim=64)
    packs = [packed_batch(z, cfg, seed=i) for i in range(4)]
    out: dict[str, Any] = {"status": "ok", "model": z.model}
    models = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        models[name] = VideoDiT(cfg).to(z.device)
        with torch.no_grad():
            for p in models[name].parameters():
                p.normal_(0.0, 0.02)
    torch._dynamo.reset()
    apply_compile(models["compiled"])
    results = {}
    for name, model in models.items():
        state = {"i": 0}

        def step() -> None:
            batch = packs[state["i"] % len(packs)]
            state["i"] += 1
            with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=z.cuda):
                loss, _ = flow_loss(model, batch, FlowConfig(), torch.Generator().manual_seed(1))  # noqa: B023
            loss.backward()

        t0 = time.perf_counter()
        step()  # the first pack: compiles
        sync(z)
        if name == "compiled":
            out["first_step_s"] = round(time.perf_counter() - t0, 1)
        graphs = counters["stats"]["unique_graphs"]
        results[name] = timed(z, step, max(3, z.bench_iters), warmup=0)
        if name == "compiled":
            out["new_graphs_after_first_pack"] = counters["stats"]["unique_graphs"] - graphs
            with profile(activities=[ProfilerActivity.CUDA if z.cuda else ProfilerActivity.CPU]) as prof:
                step()
                sync(z)
            out["time_split"], out["top_kernels"] = time_split(prof, z.cuda, top=15)
    with torch.no_grad(), torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=z.cuda):
        b = packs[1]
        t = torch.full((b.num_samples,), 0.5, device=z.device)
        err = rel_err(models["compiled"](b.tokens, t, b), models["eager"](b.tokens, t, b))
    peak = peak_bf16_tflops(torch.cuda.get_device_name()) if z.cuda else None
    flops = sum(3.0 * forward_flops(cfg, p.lengths, p.text_lengths) for p in packs) / len(packs)
    if peak:  # forward + backward, no optimizer step (train_step's MFU includes AdamW)
        out["compiled_mfu"] = round(flops / results["compiled"] / (peak * 1e12), 4)
    out.update(eager_ms=round(results["eager"] * 1e3, 2), compiled_ms=round(results["compiled"] * 1e3, 2),
               speedup=round(results["eager"] / results["compiled"], 3), output_rel_err=err)
    if out["new_graphs_after_first_pack"] or err > (3e-2 if z.cuda else 1e-4):
        out["status"] = "failed"
    return out


def check_zero(z: Sizes) -> dict[str, Any]:
    """Single-rank DeepSpeed ZeRO-2 and ZeRO-3 (NCCL on CUDA, gloo on CPU), client AdamW, accumulation."""
    if importlib.util.find_spec("deepspeed") is None:
        raise Skip("deepspeed is not installed here (make gpu-wheels, then carry .gpu-wheels)")
    if not z.cuda:
        os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29611"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    try:
        import deepspeed
    except ImportError as e:  # e.g. .gpu-wheels built for another Python version
        raise Skip(f"deepspeed does not import here: {e}") from None

    from training.ema import EMA
    from training.flow import FlowConfig, flow_loss
    from training.optim import OptimConfig, deepspeed_config
    from training.zero import master_fragments

    deepspeed.init_distributed(dist_backend="nccl" if z.cuda else "gloo")
    out: dict[str, Any] = {"status": "ok"}
    for stage in (1, 2, 3):  # ZeRO-1 with bf16 + fp32 accumulation is DeepSpeed's BF16_Optimizer
        torch.manual_seed(0)
        cfg = dit_config(z.model if not z.cuda else "DiT-B/2", in_channels=16, text_dim=64)
        model = VideoDiT(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(
            OptimConfig(zero_stage=stage), 1, 2, on_gpu=z.cuda))
        fragments, masters = master_fragments(engine, stage == 3, 0)
        ema = EMA(fragments, masters, 0.99)
        losses = []
        t0 = time.perf_counter()
        for i in range(6):
            batch = packed_batch(z, cfg, seed=i, budget=z.tokens // 4)
            loss, _ = flow_loss(engine, batch, FlowConfig(), torch.Generator().manual_seed(i))
            engine.backward(loss)
            engine.step()
            if i % 2:
                ema.update(masters)
            losses.append(float(loss))
        sync(z)
        out[f"zero{stage}"] = {"s_per_micro_batch": round((time.perf_counter() - t0) / 6, 3),
                               "losses_finite": all(math.isfinite(x) for x in losses),
                               "ema_on_master_device": all(s.device == m.device for s, m in zip(ema.shadow, masters))}
        if not all(out[f"zero{stage}"].values()):
            out["status"] = "failed"
        engine.destroy()
    return out


def check_pytest_gpu(z: Sizes) -> dict[str, Any]:
    if not z.cuda:
        raise Skip("no CUDA device: the gpu tests would all skip")
    if importlib.util.find_spec("pytest") is None:
        raise Skip("pytest is not installed here")
    import subprocess

    code = (f"import sys; sys.path.append({str(GPU_SITE)!r}); import pytest; "
            "sys.exit(pytest.main(['-q', '-m', 'gpu', '-p', 'no:cacheprovider', '--noconftest', "  # conftest needs av
            "'tests/training/test_attention.py']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    tail = proc.stdout.strip().splitlines()[-1:] or [proc.stderr[-300:]]
    return {"status": "ok" if proc.returncode == 0 else "failed", "summary": tail[0]}


def check_fvd_features(z: Sizes) -> dict[str, Any]:
    """I3D features (random-init weights: speed only) for N clips, extrapolated to FVD's 2,048."""
    try:
        from eval.fvd import i3d_features
        from eval.i3d import InceptionI3d
    except ImportError as e:
        raise Skip(f"eval.fvd needs {e.name}, not installed here") from None
    model = InceptionI3d().to(z.device).eval()
    g = torch.Generator().manual_seed(0)
    clip = torch.randint(0, 256, (z.fvd_frames, z.fvd_px, z.fvd_px, 3), generator=g, dtype=torch.uint8)
    videos = [clip] * z.fvd_clips
    i3d_features(videos[:2], model, batch_size=2)  # warm-up
    sync(z)
    t0 = time.perf_counter()
    feats = i3d_features(videos, model, batch_size=16)
    sync(z)
    s = time.perf_counter() - t0
    ok = feats.logits.shape == (z.fvd_clips, 400)
    return {"status": "ok" if ok else "failed", "weights": "random-init", "clips": z.fvd_clips,
            "seconds": round(s, 2), "seconds_for_2048": round(s / z.fvd_clips * 2048, 1)}


# diffusers' configs of the released Wan 2.1 T2V transformers (transformer/config.json); random-init here.
WAN_SIZES: dict[str, dict[str, Any]] = {
    "1.3B": dict(num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "14B": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40),
}
WAN_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                  freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def check_wan(z: Sizes) -> dict[str, Any]:
    """Wan on packed sequences (training/wan.py): full fine-tuning steps of Wan 2.1 1.3B (bf16 autocast,
    fp32 weights, fused AdamW; activation checkpointing off and on) and LoRA steps of the 14B (bf16
    weights, peft LoRA r=16 on the attention and FFN projections, checkpointing on): ms/step, MFU,
    peak memory — the figures behind the README's Wan memory table. Random-init weights (speed only)."""
    if importlib.util.find_spec("diffusers") is None:
        raise Skip("diffusers is not installed here (make gpu-wheels carries it)")
    from diffusers import WanTransformer3DModel

    from training.backbone import wan_forward_flops
    from training.flow import FlowConfig, flow_loss
    from training.wan import WAN_LORA_TARGETS, WAN_PRESETS, PackedWan

    out: dict[str, Any] = {"status": "ok", "weights": "random-init", "tokens_per_pack": z.tokens}
    peak = peak_bf16_tflops(torch.cuda.get_device_name()) if z.cuda else None
    runs = [("1.3B", "full", False), ("1.3B", "full", True), ("14B", "lora", True)] if z.cuda else \
        [("tiny", "full", False), ("tiny", "full", True), ("tiny", "lora", True)]
    for size, mode, ckpt in runs:
        key = f"{size}_{mode}" + ("_ckpt" if ckpt else "")
        if mode == "lora" and importlib.util.find_spec("peft") is None:
            out[key] = "skipped: peft is not installed here"
            continue
        torch.manual_seed(0)
        sizes = dict(WAN_COMMON, **WAN_SIZES[size]) if z.cuda else dict(
            WAN_PRESETS["tiny-wan"], in_channels=16, out_channels=16, text_dim=64)
        if z.cuda:
            torch.cuda.empty_cache()
        with torch.device(z.device):  # built where it runs: a 14B fp32 init on the host would take minutes
            model = WanTransformer3DModel(**sizes)
        if mode == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            model = model.to(torch.bfloat16 if z.cuda else torch.float32).requires_grad_(False)
            inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=list(WAN_LORA_TARGETS)), model)
            for p in model.parameters():  # LoRA factors in fp32 (the optimizer's), the base frozen in bf16
                if p.requires_grad:
                    p.data = p.data.float()
        packed = PackedWan(model, backend="auto")
        packed.checkpointing = ckpt
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=z.cuda)
        c = model.config
        shape_cfg = DiTConfig(in_channels=c.in_channels, text_dim=c.text_dim, patch=tuple(c.patch_size))
        packs = [packed_batch(z, shape_cfg, seed=i) for i in range(2)]
        state = {"i": 0}
        if z.cuda:  # from here: weights, optimizer state and the steps (not the 14B's fp32 init before its cast)
            torch.cuda.reset_peak_memory_stats()

        def step() -> None:
            batch = packs[state["i"] % len(packs)]
            state["i"] += 1
            with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=z.cuda):
                loss, _ = flow_loss(packed, batch, FlowConfig(), torch.Generator().manual_seed(state["i"]))  # noqa: B023
            loss.backward()
            opt.step()  # noqa: B023
            opt.zero_grad(set_to_none=True)  # noqa: B023

        s = timed(z, step, 3 if z.cuda else 1, warmup=1)
        d = c.num_attention_heads * c.attention_head_dim
        flops = sum(3.0 * wan_forward_flops(d, c.ffn_dim, c.num_layers, p.lengths,
                                            [max(m, packed.text_len) for m in p.text_lengths])  # text padded
                    for p in packs) / len(packs)
        out[key] = {"ms_per_step": round(s * 1e3, 1), "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                    "trainable_m": round(sum(p.numel() for p in params) / 1e6, 2),
                    "real_tokens": round(sum(sum(p.lengths) for p in packs) / len(packs)),
                    "mfu": None if peak is None else round(flops / s / (peak * 1e12), 4),
                    "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if z.cuda else None}
        log.info("wan %s: %s", key, json.dumps(out[key]))  # in the log even if a later size is cut off
        model = packed = opt = params = None  # free before the next size is built
    return out


def check_sampler(z: Sizes) -> dict[str, Any]:
    """Euler + CFG steps of a random-init DiT on one video's latent (bf16 autocast on CUDA)."""
    from training.flow import FlowConfig, sample

    cfg = dit_config(z.model, in_channels=16, text_dim=64)
    model = VideoDiT(cfg).to(z.device)
    shape = (16, 13, 60, 104) if z.cuda else (16, 2, 8, 8)  # 49 frames of 480×832 px through the Wan VAE
    text = [torch.randn(20, 64)]
    steps = 4 if z.cuda else 1
    run = lambda: sample(model, [shape], text, FlowConfig(), torch.Generator().manual_seed(0),  # noqa: E731
                         steps=steps, device=z.device)
    s = timed(z, run, 1)
    out = run()[0]
    tokens = math.prod(shape[1:]) // 4
    return {"status": "ok" if bool(torch.isfinite(out).all()) else "failed", "tokens": tokens,
            "s_per_step": round(s / steps, 3), "s_per_50_step_video": round(s / steps * 50, 1),
            "weights": "random-init"}


CHECKS: dict[str, Callable[[Sizes], dict[str, Any]]] = {
    "env": check_env, "attention": check_attention, "dtype_chain": check_dtype_chain, "ema": check_ema,
    "attention_bench": check_attention_bench, "modulation_bench": check_modulation_bench,
    "train_step": check_train_step, "compile": check_compile,
    "zero": check_zero, "pytest_gpu": check_pytest_gpu, "fvd_features": check_fvd_features,
    "sampler": check_sampler, "wan": check_wan,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/gpu-check", help="folder for gpu-check.json and gpu-check.log")
    ap.add_argument("--dry", action="store_true", help="tiny sizes on the CPU even where CUDA is present")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {list(CHECKS)}")
    args = ap.parse_args(argv)
    only = [c for c in args.only.split(",") if c]
    unknown = sorted(set(only) - set(CHECKS))
    if unknown:
        ap.error(f"unknown checks {unknown}; valid: {list(CHECKS)}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stderr), logging.FileHandler(out_dir / "gpu-check.log")])
    z = Sizes(cuda=torch.cuda.is_available() and not args.dry)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if z.cuda else "cpu (dry run)",
                              "dry": not z.cuda, "checks": {}}
    text = json.dumps(report, indent=1)
    for name, fn in CHECKS.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            result = fn(z)
        except Skip as e:
            result = {"status": "skipped", "reason": str(e)}
        except Exception as e:  # noqa: BLE001 — one check's failure must not hide the others' figures
            log.error("%s failed:\n%s", name, traceback.format_exc())
            result = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:500]}
        result["wall_s"] = round(time.perf_counter() - t0, 2)
        report["checks"][name] = result
        log.info("%s: %s", name, json.dumps(result))
        # Written after every check, so a run cut off by the lease's time limit keeps what it measured.
        text = json.dumps(report, indent=1)
        (out_dir / "gpu-check.json").write_text(text)
        if z.cuda:
            torch.cuda.empty_cache()
    print(text)
    return 1 if any(c["status"] == "failed" for c in report["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
