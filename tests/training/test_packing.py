"""Packing: first-fit-decreasing plans, pack → unpack round trips, positions, token dropping."""

from __future__ import annotations

import random

import pytest
import torch
from einops import rearrange

from training.packing import num_patches, pack, plan_packs, text_layout, unpack

PATCH = (1, 2, 2)
SHAPES = [(4, 3, 8, 8), (4, 1, 8, 12), (4, 2, 4, 4), (4, 1, 12, 8), (4, 5, 4, 8), (4, 1, 2, 2)]


def make_samples(shapes=SHAPES, seed=0, text_dim=8):
    g = torch.Generator().manual_seed(seed)
    latents = [torch.randn(s, generator=g) for s in shapes]
    text = [torch.randn(3 + i % 4, text_dim, generator=g) for i in range(len(shapes))]
    return latents, text


# ---------------------------------------------------------------------------
# plan_packs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_plan_places_every_sample_once_within_budget(seed):
    rng = random.Random(seed)
    budget = rng.choice([16, 100, 1000])
    counts = [rng.randint(1, budget) for _ in range(rng.randint(1, 60))]
    packs = plan_packs(counts, budget)
    placed = sorted(i for p in packs for i in p)
    assert placed == list(range(len(counts)))
    assert all(sum(counts[i] for i in p) <= budget for p in packs)
    # First fit: the first sample of a later pack did not fit an earlier one, so no two packs could merge.
    loads = sorted(sum(counts[i] for i in p) for p in packs)
    assert len(loads) < 2 or loads[0] + loads[1] > budget


def test_plan_fills_well_with_many_small_items():
    rng = random.Random(0)
    counts = [rng.choice([16, 48, 144, 400, 720]) for _ in range(500)]
    packs = plan_packs(counts, 4096)
    lower = -(-sum(counts) // 4096)
    assert len(packs) == lower == 33  # optimal: real-token fraction 131168 / (33·4096) = 0.970
    assert all(sum(counts[i] for i in p) == 4096 for p in packs[:-1])  # every pack but the last is full


def test_plan_is_first_fit_decreasing():
    assert plan_packs([3, 7, 5, 5, 2], 10) == [[1, 0], [2, 3], [4]]  # 7+3, 5+5, 2


def test_plan_rejects_oversized_sample_by_index():
    with pytest.raises(ValueError, match=r"sample 2 has 11 tokens, more than the pack budget of 10"):
        plan_packs([3, 4, 11], 10)
    with pytest.raises(ValueError, match="sample 0 has 0 tokens"):
        plan_packs([0], 10)


# ---------------------------------------------------------------------------
# pack / unpack
# ---------------------------------------------------------------------------


def test_pack_unpack_round_trip_is_exact():
    latents, text = make_samples()
    batch = pack(latents, text, PATCH, budget=96)
    back = unpack(batch.tokens, batch)
    assert [tuple(b.shape) for b in back] == [tuple(x.shape) for x in latents]
    for x, y in zip(latents, back):
        assert torch.equal(x, y)


def test_pack_layout_segments_and_padding():
    latents, text = make_samples()
    budget = 96
    batch = pack(latents, text, PATCH, budget)
    counts = [48, 24, 8, 24, 40, 1]
    assert batch.lengths == counts
    assert batch.tokens.shape == (batch.num_packs * budget, 16)
    assert batch.num_packs == len(plan_packs(counts, budget)) == 2
    cu = batch.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == batch.num_packs * budget and batch.cu_seqlens.dtype == torch.int32
    seqlens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    assert batch.max_seqlen == max(seqlens)
    # Each segment is one sample's tokens or one pack's padding; no segment crosses a pack boundary.
    for (a, b), s in zip(zip(cu[:-1], cu[1:]), batch.segment_samples):
        assert a // budget == (b - 1) // budget
        assert (batch.sample_ids[a:b] == s).all()
        if s >= 0:
            assert b - a == counts[s] and batch.offsets[s] == a
            assert batch.pack_of_sample[s] == a // budget
    # Padding: ids −1, zero tokens, excluded from real tokens.
    pad = batch.sample_ids == -1
    assert int(pad.sum()) == batch.num_packs * budget - sum(counts)
    assert (batch.tokens[pad] == 0).all()
    assert sorted(batch.real_index().tolist()) == torch.nonzero(~pad).flatten().tolist()


def test_positions_are_patch_coordinates():
    latents, text = make_samples()
    batch = pack(latents, text, PATCH, budget=96)
    i = 4  # shape (4, 5, 4, 8): grid (5, 2, 4)
    pos = batch.positions[batch.offsets[i]:batch.offsets[i] + batch.lengths[i]]
    assert pos[0].tolist() == [0, 0, 0] and pos[1].tolist() == [0, 0, 1] and pos[4].tolist() == [0, 1, 0]
    assert pos[-1].tolist() == [4, 1, 3]
    # Token j holds exactly the latent patch at its position.
    x = latents[i]
    for j in (0, 7, 19, 39):
        t, h, w = pos[j].tolist()
        patch = x[:, t, 2 * h:2 * h + 2, 2 * w:2 * w + 2]  # (C, 2, 2)
        assert torch.equal(batch.tokens[batch.offsets[i] + j], rearrange(patch, "c ph pw -> (ph pw c)"))


def test_temporal_patch():
    latents, text = make_samples([(2, 4, 4, 4), (2, 2, 2, 6)])
    batch = pack(latents, text, (2, 2, 2), budget=16)
    assert batch.tokens.shape[1] == 2 * 8 and batch.lengths == [8, 3]
    assert batch.positions[batch.offsets[0] + 7].tolist() == [1, 1, 1]
    assert all(torch.equal(a, b) for a, b in zip(latents, unpack(batch.tokens, batch)))


def test_token_dropping_keeps_the_right_tokens():
    latents, text = make_samples()
    g = torch.Generator().manual_seed(0)
    batch = pack(latents, text, PATCH, budget=64, drop_rate=0.5, generator=g)
    assert batch.lengths == [24, 12, 4, 12, 20, 1]  # round(n / 2), at least one
    assert batch.full_lengths == [48, 24, 8, 24, 40, 1]
    back = unpack(batch.tokens, batch, fill=float("nan"))
    for x, y, kept in zip(latents, back, batch.kept):
        tok_x = rearrange(x, "c (t pt) (h ph) (w pw) -> (t h w) (pt ph pw c)", pt=1, ph=2, pw=2)
        tok_y = rearrange(y, "c (t pt) (h ph) (w pw) -> (t h w) (pt ph pw c)", pt=1, ph=2, pw=2)
        mask = torch.zeros(len(tok_x), dtype=torch.bool)
        mask[kept] = True
        assert torch.equal(tok_y[mask], tok_x[mask])  # kept tokens come back exactly
        assert tok_y[~mask].isnan().all()  # dropped ones are filled
    again = pack(latents, text, PATCH, budget=64, drop_rate=0.5, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batch.kept, again.kept))  # seeded


def test_text_packing_and_mask():
    latents, text = make_samples()
    masks = [torch.tensor([1] * len(t[:-1]) + [0], dtype=torch.uint8) for t in text]  # last token is padding
    batch = pack(latents, text, PATCH, budget=96, text_mask=masks)
    assert batch.text_lengths == [len(t) - 1 for t in text]
    for i, t in enumerate(text):
        o = batch.text_offsets[i]
        assert torch.equal(batch.text[o:o + batch.text_lengths[i]], t[:-1])
    with pytest.raises(ValueError, match="sample 1 has no real text tokens"):
        pack(latents[:2], text[:2], PATCH, 96, text_mask=[masks[0], torch.zeros(len(text[1]))])


def test_text_layout_aligns_with_segments():
    latents, text = make_samples()
    batch = pack(latents, text, PATCH, budget=96)
    m = batch.text.shape[0]
    layout = text_layout(batch, [False, True, False, False, False, False], null_len=2)
    cu = layout.cu_seqlens.tolist()
    assert len(cu) == len(batch.cu_seqlens)
    for s, (a, b) in zip(batch.segment_samples, zip(cu[:-1], cu[1:])):
        rows = layout.index[a:b].tolist()
        if s in (-1, 1):  # padding and the dropped sample see the null text
            assert rows == [m, m + 1]
        else:
            o = batch.text_offsets[s]
            assert rows == list(range(o, o + batch.text_lengths[s]))
        assert (layout.sample_ids[a:b] == (s if s >= 0 else batch.num_samples)).all()


def test_pack_errors_name_the_problem():
    latents, text = make_samples()
    with pytest.raises(ValueError, match=r"sample 0 has 48 tokens, more than the pack budget of 40"):
        pack(latents, text, PATCH, budget=40)
    with pytest.raises(ValueError, match=r"not divisible by patch"):
        num_patches((4, 1, 5, 4), PATCH)


def test_padding_attention_cost_is_linear_in_the_padding() -> None:
    """An almost empty pack (one small clip in 16k tokens, the epoch-end case) must not pay padding²."""
    from training.packing import PAD_SEGMENT

    budget = 16384
    batch = pack([torch.randn(4, 1, 4, 4)], [torch.randn(2, 8)], (1, 2, 2), budget)  # 4 real tokens
    cu = batch.cu_seqlens.tolist()
    sizes = [b - a for a, b in zip(cu[:-1], cu[1:])]
    pad = [n for n, s in zip(sizes, batch.segment_samples) if s < 0]
    assert sum(pad) == budget - 4 and max(pad) <= PAD_SEGMENT
    assert sum(n * n for n in pad) <= PAD_SEGMENT * sum(pad)  # was (budget − 4)² ≈ 2.7e8 score entries per head
    assert batch.max_seqlen == PAD_SEGMENT
    # The padding segments see the null text (no empty key segment) and own no sample's tokens.
    layout = text_layout(batch, None, null_len=1)
    assert len(layout.cu_seqlens) == len(cu) and int((batch.sample_ids >= 0).sum()) == 4
