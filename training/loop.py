"""The Ray Train worker: DeepSpeed ZeRO over the deterministic loader, one global step at a time.

`train_loop_per_worker(config)` is what `training/train.py` hands to `TorchTrainer`; the pieces
it uses are plain functions a unit test can call without Ray or DeepSpeed (`step_generator`,
`pack_loss_weight`, `filler_pack`, `progress_line`).

Checkpoints (training/checkpoint.py) are saved after every `run.checkpoint_every` steps and
the last one: DeepSpeed `save_checkpoint` on every rank into a temp folder, rank 0 adds the
trainer state, EMA weights and config, and every rank reports its folder to Ray Train, which
merges them into `<run dir>/checkpoint-NNNNNNNN`. A worker started by a relaunch or by Ray
Train's failure handling loads `ray.train.get_checkpoint()` and continues at the saved step
and loader state; Ray Train keeps the last `run.keep_checkpoints`.

Loss normalisation: every global step is one token-weighted mean over all its real tokens,
whatever the worker count. A pack's loss is its summed token error times W·G / N_step
(N_step = real tokens of the whole step, all-reduced; W workers; G micro-batches per worker):
DeepSpeed divides by G in `backward` and averages gradients over W, which cancels the factor.
On an epoch's short last step a worker may have fewer than G packs; it runs the missing
micro-batches on a filler pack with weight 0 so DeepSpeed's accumulation and ZeRO reductions
stay in lockstep across ranks.
"""

from __future__ import annotations

import collections
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline import storage
from pipeline.config import dump_yaml, from_dict
from pipeline.logs import get_logger
from pipeline.version import code_version
from training import checkpoint as ckpt
from training.cache import ShardCache
from training.clipreads import ClipReads
from training.data import Loader, LoaderState, Prefetcher, Step, check_fingerprint
from training.ema import EMA, gather
from training.index import DATA_ERRORS, DataError, ShardIndex
from training.metrics import StepClock, mfu, peak_memory_gb, peak_tflops, read_later
from training.packing import PackedBatch, pack, to_device
from training.runlog import RunLog
from training.settings import TrainConfig

log = get_logger("training")


# ---------------------------------------------------------------------------
# Plain pieces
# ---------------------------------------------------------------------------


def step_generator(seed: int, step: int, pack_index: int) -> torch.Generator:
    """Times, noise and CFG drops of one pack: a function of (seed, step, the pack's index in the
    global step) only — so a run resumed on another number of workers draws the same numbers."""
    g = torch.Generator()
    g.manual_seed(hash((seed, step, pack_index)) & (2**63 - 1))  # hash of an int tuple is stable
    return g


def pack_loss_weight(step_tokens: int, world_size: int, grad_accumulation: int) -> float:
    """Factor turning a pack's summed token error into its share of the step's token mean (see module doc)."""
    return world_size * grad_accumulation / max(1, step_tokens)


def usable(index: ShardIndex, token_budget: int) -> None:
    """DataError unless some clip of the index fits a pack (a data error: not retried)."""
    if not len(index.clips):
        raise DataError(f"{index.data_uri}: no clips to train on in this split")
    if int(index.num_tokens.min()) > token_budget:
        raise DataError(f"no clip of {index.data_uri} fits a pack of {token_budget} tokens (smallest has "
                        f"{int(index.num_tokens.min())}); raise data.token_budget")


def filler_pack(index: ShardIndex) -> PackedBatch:
    """A one-clip pack (the index's smallest clip) without padding, for weight-0 micro-batches on
    short steps: it only keeps DeepSpeed's accumulation in lockstep, so it should cost nothing."""
    clip = index.smallest_clip()
    latents, text, mask = index.load(clip)
    return pack([latents], [text], index.patch, clip.num_tokens, text_mask=[mask])


def progress_line(row: dict[str, Any], max_steps: int, elapsed_s: float, steps_this_session: int) -> str:
    """One log line; the ETA extrapolates this session's (not the resumed run's) pace."""
    done = row["step"] + 1
    eta_s = elapsed_s / max(1, steps_this_session) * (max_steps - done)
    mfu = f"  MFU {row['mfu']:.1%}" if row.get("mfu") is not None else ""
    return (f"step {done}/{max_steps}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
            f"{row['tokens_per_s']:.0f} tok/s  {row['clips_per_s']:.1f} clips/s{mfu}  "
            f"data-wait {row['data_wait_fraction']:.1%}  mem {row['peak_memory_gb']:.2f} GB  ETA {eta_s:.0f} s")




def pack_flops(flops: Callable[[list[int], list[int]], float], packs: list[PackedBatch]) -> float:
    """Training FLOPs (3× the backbone's forward) of these packs' real tokens (MFU numerator)."""
    return sum(3.0 * flops(p.lengths, p.text_lengths) for p in packs)


# ---------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------


def data_error_uri(run_uri: str, launch_id: str) -> str:
    """Where a worker leaves the data error that stopped it (training/train.py watches for it)."""
    return storage.join(run_uri, "_errors", f"data-{launch_id}.txt")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker. `config` = {"cfg": TrainConfig as a dict, "run_uri": run dir path or URI,
    "launch_id": this launch}.

    Damaged or unusable data (training.index.DATA_ERRORS) fails the same way on every retry:
    the error is left in the run dir for the launcher, which stops the run with that one line
    instead of letting Ray Train restart the workers `run.max_failures` times.
    """
    try:
        _train(config)
    except DATA_ERRORS as e:
        storage.write_bytes_atomic(data_error_uri(config["run_uri"], config.get("launch_id", "")), str(e).encode())
        raise


def _train(config: dict[str, Any]) -> None:
    cfg = from_dict(TrainConfig, config["cfg"])
    run_uri = config["run_uri"]
    on_gpu = cfg.scaling.use_gpu
    if not on_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported: no CUDA probing
    import deepspeed
    import ray.train
    import torch.distributed as dist

    from training.backbone import build, input_widths, null_text_of, patch_of
    from training.flow import flow_loss
    from training.optim import deepspeed_config, lr_at
    from training.parallel import apply_activation_checkpointing, apply_compile
    from training.zero import master_fragments

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Ray Train's torch backend has already set up the process group (gloo on CPU, nccl on
    # GPU); with one initialised, DeepSpeed wraps it instead of creating another.
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    stage3 = cfg.optim.zero_stage == 3

    node_dir = Path(cfg.data.cache_dir or Path(tempfile.gettempdir()) / "ditharos-shard-cache")
    # One memory-mapped copy of the clip index per node, not one per worker (training/indexfile.py).
    index = ShardIndex.open(cfg.data.uri, patch_of(cfg.model), cfg.data.split,
                            cfg.data.max_open_shards, int(cfg.data.max_open_mb * 2**20), cfg.data.verify,
                            shared_dir=str(node_dir / "index"))
    if not storage.is_local(cfg.data.uri):
        index.use_cache(ShardCache(str(node_dir), int(cfg.data.cache_mb * 2**20), cfg.data.fetch_threads))
        if cfg.data.reads_clips():
            index.use_clip_reads(ClipReads(int(cfg.data.clip_reads_mb * 2**20), cfg.data.fetch_threads,
                                           max_open=cfg.data.max_open_shards))
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
    # The data's encoding of "": a pretrained Wan's null caption (the DiT learns its own).
    null_text = null_text_of(index.data_uri, index.manifest) if cfg.model.kind == "wan" else None
    # A pretrained Wan loads straight onto this worker's GPU in bf16 (DeepSpeed's working dtype there)
    # rather than as an fp32 copy in host memory (training/backbone.py, `_wan_base`).
    backbone = build(cfg.model, *input_widths(index.manifest), null_text=null_text,
                     device=device, dtype=torch.bfloat16 if on_gpu else None)
    model = backbone.module
    apply_activation_checkpointing(model, cfg.run.activation_checkpointing)
    if cfg.run.compile:
        apply_compile(model)
    # ---- resume (a relaunch, or Ray Train restarting the group after a failure) ----
    # Always the newest *intact* checkpoint on storage (what the launcher announced): Ray Train's
    # registered one may be older (a worker died after reporting, before Ray Train polled it)
    # or damaged (a file lost since), and loading a damaged one fails on every retry.
    registered = ray.train.get_checkpoint()
    registered = None if registered is None else storage.to_uri(registered.filesystem, registered.path)
    on_disk = ckpt.latest_complete(run_uri)
    source = None if on_disk is None else on_disk[1]
    if rank == 0 and registered is not None and registered != source:
        log.warning("Ray Train's checkpoint %s is not the newest intact one; resuming from %s", registered,
                    source or "step 0 (no intact checkpoint)")
    ds_dir, ds_tag, universal = None, ckpt.DEEPSPEED_TAG, False
    restored, saved, ema_file = None, None, None
    if source is not None:
        fs, path = storage.resolve(source)
        restored, saved = ray.train.Checkpoint(path=path, filesystem=fs), ckpt.read_state(source)
    if restored is not None:
        d = _checkpoint_dir(restored)
        check_fingerprint(saved.data_fingerprint, index.manifest, cfg.data.allow_fingerprint_mismatch)
        ds_dir = str(Path(d) / ckpt.DEEPSPEED_DIR)
        if saved.world_size != world:
            # Another worker count: load through DeepSpeed's universal format, converted once
            # per node by its first worker into node-local temp space.
            universal = True
            out = Path(tempfile.gettempdir()) / "ditharos-universal" / _digest(f"{source}:{world}")
            if ctx.get_local_rank() == 0:
                ckpt.to_universal(ds_dir, str(out))
            dist.barrier()
            ds_dir, ds_tag = str(out), ckpt.UNIVERSAL_TAG
        if cfg.optim.ema_decay > 0 and saved.weights != ckpt.EMA_FILE:
            raise RuntimeError(f"{d} was saved without an EMA (optim.ema_decay was 0); keep it 0 to resume")
        ema_file = str(Path(d) / ckpt.EMA_FILE)

    lora = bool(backbone.record.get("lora"))  # only the adapter trains, is optimised and is checkpointed
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr_at(0, cfg.optim),
                                  betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    ds_config = deepspeed_config(cfg.optim, world, cfg.micro_batches, on_gpu)
    if universal:
        ds_config["checkpoint"] = {"load_universal": True}
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    num_params = sum(p.ds_numel if stage3 else p.numel() for p in model.parameters())

    state, steps_done = LoaderState(), 0
    if saved is not None:
        path, _ = engine.load_checkpoint(ds_dir, tag=ds_tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=False, load_module_strict=not lora)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint {ds_tag} in {ds_dir}")
        state, steps_done = saved.loader, saved.steps_done
        if rank == 0:
            log.info("resumed from %s: step %d, epoch %d, position %d (saved by %d worker(s), now %d%s)",
                     source, steps_done, state.epoch, state.position, saved.world_size, world,
                     "; universal checkpoint" if universal else "")

    # This rank's fp32 master fragments (views DeepSpeed's optimizer updates in place) and their
    # EMA, on the same device; every rank keeps the EMA of its own fragments (training/ema.py).
    fragments, masters = master_fragments(engine, stage3, rank)
    ema = EMA(fragments, masters, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    if ema is not None and ema_file is not None:
        ema.load(ema_file)

    loader = Loader(index, seed=cfg.data.seed, packs_per_step=cfg.data.packs_per_step,
                    token_budget=cfg.data.token_budget, rank=rank, world_size=world, state=state,
                    fetch_ahead=cfg.data.fetch_ahead_steps, window_shards=cfg.data.shuffle_window_shards,
                    image_fraction=cfg.data.image_fraction,
                    pin_memory=on_gpu, all_clip_ids=rank == 0 and cfg.run.log_clip_ids)
    usable(index, cfg.data.token_budget)  # before the prefetch thread: its error would surface later
    steps = Prefetcher(iter(loader), depth=cfg.data.prefetch_depth)
    filler = filler_pack(index)
    filler = filler.pin_memory() if on_gpu else filler
    share = cfg.micro_batches
    peak = peak_tflops(device, cfg.run.peak_tflops)
    runlog = None
    if rank == 0:
        runlog = RunLog(run_uri, steps_done, cfg.run.tensorboard)
        log.info("%s: %.2fM parameters, %d clips, %d worker(s), ZeRO-%d, %s, from step %d",
                 backbone.description, num_params / 1e6, len(index.clips), world, cfg.optim.zero_stage, device, steps_done)

    def save_checkpoint(step: Step, metrics: dict[str, Any]) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="ditharos-ckpt-", dir=os.environ.get("DITHAROS_TMP")))
        try:
            engine.save_checkpoint(str(tmp / ckpt.DEEPSPEED_DIR), tag=ckpt.DEEPSPEED_TAG,
                                   exclude_frozen_parameters=lora)
            # Whole fp32 weights on rank 0: the EMA, or without one the master weights (a collective).
            weights = gather(fragments, ema.shadow if ema is not None else masters, device, dist)
            if rank == 0:
                name = ckpt.EMA_FILE if ema is not None else ckpt.MODEL_FILE
                ckpt.save_weights(str(tmp / name), weights)
                (tmp / "config.yaml").write_text(dump_yaml(cfg))
                saved = ckpt.TrainerState(
                    steps_done=step.step + 1, loader=step.state, data_fingerprint=index.fingerprint,
                    data_uri=index.data_uri, world_size=world, zero_stage=cfg.optim.zero_stage,
                    model=backbone.record, weights=name, code_version=code_version())
                (tmp / ckpt.STATE_FILE).write_text(saved.to_json())  # last: marks the part complete
                runlog.sync()
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                             checkpoint_dir_name=ckpt.checkpoint_name(step.step + 1))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    t_start = time.perf_counter()
    clock = StepClock(device)
    queued: collections.deque[_Queued] = collections.deque()  # steps whose figures are still on the device
    last = clock.mark()

    def emit(q: _Queued) -> dict[str, Any]:
        """A step's metrics row: waits for that step's end mark only, then reads its host copy."""
        step_s = max(clock.seconds(q.start, q.end), 1e-9)  # end of the previous step → end of this one
        loss_sum, step_flops, memory, norm = q.figures.tolist()
        step = q.step
        row = {"step": step.step, "epoch": step.epoch, "loss": loss_sum / max(1, step.num_tokens),
               "lr": q.lr, "grad_norm": norm if math.isfinite(norm) else None, "tokens": step.num_tokens,
               "samples": step.num_samples, "packs": step.num_packs, "skipped": step.num_skipped,
               "step_s": round(step_s, 4), "tokens_per_s": step.num_tokens / step_s,
               "clips_per_s": step.num_samples / step_s, "mfu": mfu(step_flops, step_s, world, peak),
               "data_wait_s": round(q.wait_s, 4), "data_wait_fraction": min(1.0, q.wait_s / step_s),
               "peak_memory_gb": round(memory, 3), "workers": world}
        if runlog is not None:
            runlog.write(row, step.all_clip_ids)
        return row

    try:
        for step in steps:
            if step.step >= cfg.run.max_steps:
                break
            lr = lr_at(step.step, cfg.optim)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # The step's real tokens come with its plan (every worker plans the whole step): no collective.
            weight = pack_loss_weight(step.num_tokens, world, share)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed token error, this rank
            for micro in range(share):
                real = micro < len(step.packs)
                batch = (step.packs[micro] if real else filler).to(device, non_blocking=on_gpu)  # pinned on GPU
                # Worker r holds packs [r·G, (r+1)·G) of the step (training.data.worker_packs).
                gen = step_generator(cfg.run.seed, step.step, rank * share + micro)
                mean, _ = flow_loss(engine, batch, cfg.flow, gen)
                total = mean * sum(batch.lengths)  # summed over this pack's real tokens
                engine.backward(total * (weight if real else 0.0))
                engine.step()  # DeepSpeed steps the optimizer on the last micro-batch only
                if real:
                    loss_sum += total.detach().double()
            if ema is not None:
                ema.update(masters)
            # Loss and FLOPs in one SUM, memory in one MAX, copied to pinned host memory without
            # waiting and read a step later (emit), after this step's end mark: the host queues the
            # next step's kernels instead of waiting for this one's.
            flops = to_device(torch.tensor(pack_flops(backbone.flops, step.packs), dtype=torch.float64), device)
            sums = torch.stack([loss_sum, flops])
            dist.all_reduce(sums)
            memory = to_device(torch.tensor([peak_memory_gb(device)], dtype=torch.float64), device)
            dist.all_reduce(memory, op=dist.ReduceOp.MAX)
            figures = read_later(torch.cat([sums, memory, _norm_tensor(engine.get_global_grad_norm(), device)]))
            end = clock.mark()
            queued.append(_Queued(step, lr, figures, last, end, steps.last_wait_s))
            last = end
            done = step.step + 1
            flush = cfg.is_checkpoint_step(step.step) or done % cfg.run.log_every == 0 or done == cfg.run.max_steps
            while len(queued) > (0 if flush else 1):
                row = emit(queued.popleft())
            if not flush:
                continue
            report = {k: row[k] for k in ("step", "loss", "lr", "tokens_per_s")}
            if cfg.is_checkpoint_step(step.step):
                save_checkpoint(step, report)
            elif done % cfg.run.log_every == 0:
                # A barrier over all workers (each must call it equally often) costing ~1-2 s on
                # local Ray, hence only every log_every steps; the run log has every step.
                ray.train.report(report)
            if rank == 0 and (done % cfg.run.log_every == 0 or done == cfg.run.max_steps):
                log.info(progress_line(row, cfg.run.max_steps, time.perf_counter() - t_start, done - steps_done))
            last = clock.mark()  # the checkpoint / report is not the next step's time
    finally:
        steps.close()
        if index.cache is not None:
            index.cache.close()
            log.info("rank %d shard cache: %d download(s), %.1f MB, %d hit(s), %.2f s waited", rank,
                     index.cache.downloads, index.cache.downloaded_bytes / 2**20, index.cache.hits, index.cache.wait_s)
        if index.clip_reads is not None:
            index.clip_reads.close()
            log.info("rank %d clip reads: %d clip(s), %d request(s), %.1f MB, %.2f s waited", rank,
                     index.clip_reads.fetched, index.clip_reads.requests, index.clip_reads.downloaded_bytes / 2**20,
                     index.clip_reads.wait_s)
        if runlog is not None:
            runlog.close()


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _checkpoint_dir(checkpoint: Any) -> str:
    """A local folder with the checkpoint: itself on local/NFS storage, else a download."""
    import pyarrow.fs as pafs

    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        return checkpoint.path
    return checkpoint.to_directory(tempfile.mkdtemp(prefix="ditharos-ckpt-load-", dir=os.environ.get("DITHAROS_TMP")))


@dataclass
class _Queued:
    """A trained step whose figures are still on the device (read by `emit` a step later)."""

    step: Step
    lr: float
    figures: torch.Tensor  # (4,) float64 host copy: token error, FLOPs (sums over ranks), peak memory GB
    # (max over ranks), global grad norm (nan without clipping) — valid once `end` has completed
    start: Any  # StepClock marks: end of the previous step, end of this one
    end: Any
    wait_s: float  # the host's wait for this step's data


def _norm_tensor(norm: Any, device: torch.device) -> torch.Tensor:
    """(1,) float64 on `device`: DeepSpeed's global grad norm (a tensor or a float), nan when None."""
    if isinstance(norm, torch.Tensor):
        return norm.detach().reshape(1).to(device=device, dtype=torch.float64)
    return to_device(torch.tensor([math.nan if norm is None else float(norm)], dtype=torch.float64), device)
