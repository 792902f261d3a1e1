"""Plain pieces of the training worker loop (no Ray, no DeepSpeed)."""

from __future__ import annotations

import torch

from training.data import worker_packs
from training.loop import pack_loss_weight, step_generator


def test_draws_depend_on_the_global_pack_not_the_worker_layout() -> None:
    # Pack 3 of step 7 is rank 1's 2nd micro-batch with 2 workers × 2, and rank 3's 1st with 4 × 1.
    packs_per_step = 4
    for world, rank, micro in [(2, 1, 1), (4, 3, 0), (1, 0, 3)]:
        share = worker_packs(packs_per_step, rank, world)
        index = share.start + micro
        assert index == 3
        draws = torch.randn(8, generator=step_generator(0, 7, index))
        assert torch.equal(draws, torch.randn(8, generator=step_generator(0, 7, 3)))
    assert not torch.equal(torch.randn(8, generator=step_generator(0, 7, 2)),
                           torch.randn(8, generator=step_generator(0, 7, 3)))
    assert not torch.equal(torch.randn(8, generator=step_generator(0, 8, 3)),
                           torch.randn(8, generator=step_generator(0, 7, 3)))


def test_pack_loss_weight_makes_the_step_a_token_mean() -> None:
    # DeepSpeed divides each micro-batch loss by G and averages gradients over W workers;
    # the weight W·G/N undoes both, so summed token errors become a mean over the step's N tokens.
    world, accumulation, tokens = 2, 3, 1200
    w = pack_loss_weight(tokens, world, accumulation)
    assert w == world * accumulation / tokens
    summed_errors = [100.0, 250.0, 50.0, 300.0, 200.0, 300.0]  # 6 packs = 2 workers × 3
    ds_mean = sum(e * w / accumulation for e in summed_errors) / world
    assert abs(ds_mean - sum(summed_errors) / tokens) < 1e-12
