"""The Ray Train worker: DeepSpeed ZeRO over the deterministic loader, one global step at a time.

`train_loop_per_worker(config)` is what `training/train.py` hands to `TorchTrainer`; the pieces
it uses are plain functions a unit test can call without Ray or DeepSpeed (`model_config_for`,
`step_generator`, `pack_loss_weight`, `filler_pack`, `MetricsWriter`).

Loss normalisation: every global step is one token-weighted mean over all its real tokens,
whatever the worker count. A pack's loss is its summed token error times W·G / N_step
(N_step = real tokens of the whole step, all-reduced; W workers; G micro-batches per worker):
DeepSpeed divides by G in `backward` and averages gradients over W, which cancels the factor.
On an epoch's short last step a worker may have fewer than G packs; it runs the missing
micro-batches on a filler pack with weight 0 so DeepSpeed's accumulation and ZeRO reductions
stay in lockstep across ranks.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.config import from_dict
from pipeline.logs import get_logger
from training.data import Loader, Prefetcher, ShardIndex
from training.model import DiTConfig, dit_config
from training.packing import PackedBatch, pack
from training.settings import TrainConfig

log = get_logger("training")


# ---------------------------------------------------------------------------
# Plain pieces
# ---------------------------------------------------------------------------


def model_config_for(cfg: TrainConfig, manifest: dict[str, Any]) -> DiTConfig:
    """The registry size with config overrides, input widths taken from the shards' manifest."""
    buckets = manifest["buckets"].values()
    channels = {b["latent_shape"][0] for b in buckets}
    text_dims = {b["text_shape"][-1] for b in buckets}
    if len(channels) != 1 or len(text_dims) != 1:
        raise ValueError(f"shards mix latent channels {sorted(channels)} or text widths {sorted(text_dims)}")
    return dit_config(cfg.model.name, **cfg.model.overrides, in_channels=channels.pop(), text_dim=text_dims.pop())


def step_generator(seed: int, step: int, pack_index: int) -> torch.Generator:
    """Times, noise and CFG drops of one pack: a function of (seed, step, the pack's index in the
    global step) only — so a run resumed on another number of workers draws the same numbers."""
    g = torch.Generator()
    g.manual_seed(hash((seed, step, pack_index)) & (2**63 - 1))  # hash of an int tuple is stable
    return g


def pack_loss_weight(step_tokens: int, world_size: int, grad_accumulation: int) -> float:
    """Factor turning a pack's summed token error into its share of the step's token mean (see module doc)."""
    return world_size * grad_accumulation / max(1, step_tokens)


def filler_pack(index: ShardIndex, token_budget: int) -> PackedBatch:
    """A one-clip pack (the index's smallest clip) for weight-0 micro-batches on short steps."""
    clip = min(index.clips, key=lambda c: (c.num_tokens, c.clip_id))
    latents, text, mask = index.load(clip)
    return pack([latents], [text], index.patch, token_budget, text_mask=[mask])


class MetricsWriter:
    """Appends one JSON line per step to `<run dir>/metrics.jsonl` (rank 0 only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("a")

    def write(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def progress_line(row: dict[str, Any], max_steps: int, elapsed_s: float) -> str:
    done = row["step"] + 1
    eta_s = elapsed_s / done * (max_steps - done)
    return (f"step {done}/{max_steps}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
            f"{row['tokens_per_s']:.0f} tok/s  data-wait {row['data_wait_s']:.2f} s  ETA {eta_s:.0f} s")


# ---------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker. `config` = {"cfg": TrainConfig as a dict, "run_dir": absolute path}."""
    cfg = from_dict(TrainConfig, config["cfg"])
    run_dir = Path(config["run_dir"])
    on_gpu = cfg.scaling.use_gpu
    if not on_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported: no CUDA probing
    import deepspeed
    import ray.train
    import torch.distributed as dist

    from training.flow import flow_loss
    from training.model import VideoDiT
    from training.optim import deepspeed_config, lr_at
    from training.parallel import apply_activation_checkpointing

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Ray Train's torch backend has already set up the process group (gloo on CPU, nccl on
    # GPU); with one initialised, DeepSpeed wraps it instead of creating another.
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")

    index = ShardIndex.open(cfg.data.uri, dit_config(cfg.model.name, **cfg.model.overrides).patch, cfg.data.split)
    model_cfg = model_config_for(cfg, index.manifest)
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
    model = VideoDiT(model_cfg)
    apply_activation_checkpointing(model, cfg.run.activation_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr_at(0, cfg.optim), betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg.optim, world, on_gpu))
    num_params = sum(p.numel() for p in model.parameters())

    loader = Loader(index, seed=cfg.data.seed, packs_per_step=cfg.data.packs_per_step,
                    token_budget=cfg.data.token_budget, rank=rank, world_size=world)
    steps = Prefetcher(iter(loader), depth=cfg.data.prefetch_depth)
    filler = filler_pack(index, cfg.data.token_budget)
    share = cfg.optim.grad_accumulation
    metrics = MetricsWriter(run_dir / "metrics.jsonl") if rank == 0 else None
    if rank == 0:
        log.info("%s: %.2fM parameters, %d clips, %d worker(s), ZeRO-%d, %s",
                 model_cfg, num_params / 1e6, len(index.clips), world, cfg.optim.zero_stage, device)
    t_start = time.perf_counter()
    try:
        for step in steps:
            if step.step >= cfg.run.max_steps:
                break
            t0 = time.perf_counter()
            lr = lr_at(step.step, cfg.optim)
            for group in optimizer.param_groups:
                group["lr"] = lr
            counts = torch.tensor([sum(sum(p.lengths) for p in step.packs), sum(p.num_samples for p in step.packs)],
                                  dtype=torch.float64, device=device)
            dist.all_reduce(counts)
            step_tokens, step_samples = int(counts[0]), int(counts[1])
            weight = pack_loss_weight(step_tokens, world, share)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed token error, this rank
            for micro in range(share):
                real = micro < len(step.packs)
                batch = (step.packs[micro] if real else filler).to(device)
                # Worker r holds packs [r·G, (r+1)·G) of the step (training.data.worker_packs).
                gen = step_generator(cfg.run.seed, step.step, rank * share + micro)
                mean, _ = flow_loss(engine, batch, cfg.flow, gen)
                total = mean * sum(batch.lengths)  # summed over this pack's real tokens
                engine.backward(total * (weight if real else 0.0))
                engine.step()  # DeepSpeed steps the optimizer on the last micro-batch only
                if real:
                    loss_sum += total.detach().double()
            dist.all_reduce(loss_sum)
            step_s = time.perf_counter() - t0
            row = {"step": step.step, "epoch": step.epoch, "loss": float(loss_sum) / max(1, step_tokens),
                   "lr": lr, "grad_norm": _grad_norm(engine), "tokens": step_tokens, "samples": step_samples,
                   "packs": step.num_packs, "skipped": step.num_skipped, "step_s": round(step_s, 4),
                   "tokens_per_s": step_tokens / step_s, "data_wait_s": round(steps.last_wait_s, 4)}
            if metrics is not None:
                metrics.write(row)
            if (step.step + 1) % cfg.run.log_every == 0 or step.step + 1 == cfg.run.max_steps:
                if rank == 0:
                    log.info(progress_line(row, cfg.run.max_steps, time.perf_counter() - t_start))
                # A barrier over all workers (each must call it equally often) costing ~1-2 s on
                # local Ray, hence only every log_every steps; metrics.jsonl has every step.
                ray.train.report({k: row[k] for k in ("step", "loss", "lr", "tokens_per_s")})
    finally:
        steps.close()
        if metrics is not None:
            metrics.close()


def _grad_norm(engine: Any) -> float | None:
    """The global grad norm DeepSpeed computed for clipping (None when it did not)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    norm = float(norm)
    return norm if math.isfinite(norm) else None
