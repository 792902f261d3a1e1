"""training/ema.py + training/zero.py: the EMA follows DeepSpeed's fp32 master fragments, where they live."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

from training.ema import EMA, Fragment, gather, read_fragments, whole_fragments
from training.model import DIT_MODELS
from training.parallel import apply_activation_checkpointing


def split(fragments: list[Fragment], values: list[torch.Tensor], ranks: int) -> list[tuple[list[Fragment], list]]:
    """ZeRO-1/2's layout: all parameters flattened end to end, cut into `ranks` equal partitions."""
    flat = torch.cat([v.reshape(-1) for v in values])
    part = -(-flat.numel() // ranks)
    out = []
    for r in range(ranks):
        lo, hi, at = r * part, min((r + 1) * part, flat.numel()), 0
        frs, vals = [], []
        for fr in fragments:
            a, b = max(lo, at), min(hi, at + fr.numel)
            frs.append(Fragment(fr.name, fr.shape, max(0, a - at) if a < b else 0, max(0, b - a)))
            vals.append(flat[a:b].clone() if a < b else torch.zeros(0))
            at += fr.numel
        out.append((frs, vals))
    return out


def test_fragments_average_gather_and_reload_under_any_split(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = apply_activation_checkpointing(DIT_MODELS["DiT-tiny"](in_channels=4, text_dim=16), True)
    fragments, values = whole_fragments(model)
    assert [f.name for f in fragments] == list(model.state_dict())  # state-dict names, wrapper prefix gone
    full = gather(fragments, values, torch.device("cpu"))
    assert all(torch.equal(full[k], v.float()) for k, v in model.state_dict().items())

    step = [torch.randn_like(v) for v in values]
    want = [v.float().lerp(v + s, 0.25) for v, s in zip(values, step)]
    for ranks in (1, 3, 7):  # pieces start and end mid-row of 2-D weights
        total = {k: torch.zeros_like(v) for k, v in full.items()}
        for (frs, vals), (_, steps) in zip(split(fragments, values, ranks), split(fragments, step, ranks)):
            ema = EMA(frs, vals, decay=0.75)
            ema.update([v + s for v, s in zip(vals, steps)])
            part = gather(frs, ema.shadow, torch.device("cpu"))  # one rank alone: zeros outside its pieces
            for k in total:
                total[k] += part[k]
        for fr, w in zip(fragments, want):
            assert torch.allclose(total[fr.name].reshape(-1), w, atol=1e-6), (ranks, fr.name)

    path = str(tmp_path / "ema.safetensors")
    save_file({k: v.contiguous() for k, v in full.items()}, path)
    for frs, vals in split(fragments, values, 5):  # each rank reads just its pieces of a whole-weights file
        ema = EMA(frs, [torch.zeros_like(v) for v in vals], decay=0.9)
        ema.load(path)
        assert all(torch.equal(s, v.float()) for s, v in zip(ema.shadow, vals))
    with pytest.raises(KeyError, match="differing parameters"):
        read_fragments(path, fragments[1:])
    wrong = [Fragment(f.name, (3, 3) if i == 0 else f.shape, 0, 1) for i, f in enumerate(fragments)]
    with pytest.raises(ValueError, match="has shape"):
        read_fragments(path, wrong)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, stage: int, out_dir: str) -> None:
    """One DeepSpeed rank (gloo, CPU, bf16 module weights): EMA from master fragments vs full fp32 masters."""
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from training.ema import param_items
    from training.optim import OptimConfig, deepspeed_config
    from training.zero import master_fragments

    deepspeed.init_distributed(dist_backend="gloo")
    import torch.distributed as dist

    torch.manual_seed(0)  # odd widths: ZeRO-1/2 partitions cut parameters in two
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.GELU(), torch.nn.Linear(13, 5))
    config = deepspeed_config(OptimConfig(zero_stage=stage), world, 1, on_gpu=False)
    config.update(bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})  # the GPU dtypes
    # An lr below one bf16 step of these weights: the module's bf16 copy hardly moves, the fp32 masters do.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    fragments, masters = master_fragments(engine, stage == 3, rank)

    # The masters are views of the fp32 partitions the wrapped optimizer steps (ZeRO-3 hands them
    # to it one sub-group at a time, so its param_groups are empty between steps).
    flat = (engine.optimizer.fp32_partitioned_groups_flat if stage == 3
            else [p for g in engine.optimizer.optimizer.param_groups for p in g["params"]])
    stepped = {p.untyped_storage().data_ptr() for p in flat}
    assert stepped
    assert all(m.untyped_storage().data_ptr() in stepped for m in masters if m.numel())
    assert all(m.dtype == torch.float32 for m in masters)
    assert 0 < sum(f.numel for f in fragments) < sum(math.prod(f.shape) for f in fragments)  # a real share

    ema = EMA(fragments, masters, decay=0.5)
    assert all(s.device == m.device and s.dtype == torch.float32 for s, m in zip(ema.shadow, masters))
    names = [n for n, _ in param_items(engine.module)]
    want = {n: safe_get_full_fp32_param(p).clone() for n, p in param_items(engine.module)}  # collective
    start = {n: t.clone() for n, t in want.items()}
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        loss = engine(torch.randn(4, 7, generator=g).to(torch.bfloat16)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        ema.update(masters)
        for n, p in param_items(engine.module):
            want[n].lerp_(safe_get_full_fp32_param(p), 0.5)

    got = gather(fragments, ema.shadow, torch.device("cpu"), dist, chunk_numel=50)  # several chunks
    ones = gather(fragments, [torch.ones_like(m) for m in masters], torch.device("cpu"), dist)
    if rank == 0:
        assert list(got) == names
        for n in names:
            assert torch.equal(got[n], want[n]), n  # the same lerps of the same fp32 values: bit-equal
            assert torch.equal(ones[n], torch.ones_like(ones[n])), n  # every element owned by exactly one rank
        moved = max(float((got[n] - start[n]).abs().max()) for n in names)
        assert 0 < moved < 1e-4, moved
        save_file(got, str(Path(out_dir) / "ema.safetensors"))
    else:
        assert got is None
    dist.barrier()
    again = EMA(fragments, masters, decay=0.5)
    again.load(str(Path(out_dir) / "ema.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(again.shadow, ema.shadow))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_ema_follows_deepspeed_fp32_master_fragments(stage: int, tmp_path: Path) -> None:
    mp.spawn(_rank, args=(2, _free_port(), stage, str(tmp_path)), nprocs=2, join=True)
