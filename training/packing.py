"""NaViT "Patch n' Pack": variable-shaped latent clips → fixed-size packed token sequences.

`plan_packs` places samples into packs of at most `budget` tokens (first-fit-decreasing);
`pack` patchifies each clip `(C, T, H, W)` into tokens `(T/pt·H/ph·W/pw, pt·ph·pw·C)`,
optionally drops a share of each clip's tokens (NaViT token dropping), lays samples back
to back inside each pack and pads every pack to `budget`. Every sample is its own attention
segment (`cu_seqlens`), so attention never crosses samples; a pack's padding is cut into
segments of ≤ PAD_SEGMENT tokens, so its attention costs O(padding · PAD_SEGMENT), not
O(padding²) (an almost empty 16k-token pack: 2M score entries per head instead of 268M).
`unpack` is the inverse. `text_layout` builds the cross-attention keys: each segment sees
only its own sample's text (or the null text when dropped for classifier-free guidance).

All functions here are pure: plain tensors in, plain tensors out, no model state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange

Patch = tuple[int, int, int]
PAD_SEGMENT = 128  # longest padding segment: one attention tile, so padding never costs a quadratic term


# ---------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------


def plan_packs(token_counts: list[int], budget: int) -> list[list[int]]:
    """First-fit-decreasing bin packing: sample indices per pack, each pack's total ≤ budget.

    Samples are visited from largest to smallest (ties by index, so the plan is
    deterministic) and go into the first pack with room; FFD uses at most 11/9·OPT + 6/9
    packs. Within a pack, indices keep the order they were placed in.
    """
    if budget <= 0:
        raise ValueError(f"token budget must be positive, got {budget}")
    for i, n in enumerate(token_counts):
        if n <= 0:
            raise ValueError(f"sample {i} has {n} tokens; every sample needs at least one")
        if n > budget:
            raise ValueError(f"sample {i} has {n} tokens, more than the pack budget of {budget} tokens; "
                             "raise the budget, drop tokens, or filter the sample out")
    packs: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(token_counts)), key=lambda j: (-token_counts[j], j)):
        n = token_counts[i]
        for p, free in enumerate(room):
            if n <= free:
                packs[p].append(i)
                room[p] -= n
                break
        else:
            packs.append([i])
            room.append(budget - n)
    return packs


def num_patches(shape: tuple[int, ...], patch: Patch) -> tuple[int, int, int]:
    """Patch grid (t, h, w) of a latent of shape (C, T, H, W); raises if not divisible."""
    _, t, h, w = shape
    pt, ph, pw = patch
    if t % pt or h % ph or w % pw:
        raise ValueError(f"latent shape {tuple(shape)} is not divisible by patch {tuple(patch)} in (T, H, W)")
    return t // pt, h // ph, w // pw


# ---------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------


@dataclass
class PackedBatch:
    """Samples packed into `num_packs` sequences of `budget` tokens each, flat over packs."""

    tokens: torch.Tensor  # (N, pt·ph·pw·C) N = num_packs·budget; padding rows are zero
    sample_ids: torch.Tensor  # (N,) int64 sample index, -1 for padding
    positions: torch.Tensor  # (N, 3) int64 patch coordinates (t, h, w); zero for padding
    cu_seqlens: torch.Tensor  # (S+1,) int32 attention segment boundaries (samples and pack padding)
    max_seqlen: int  # longest segment
    segment_samples: list[int]  # (S,) sample index of each segment, -1 for a padding segment
    shapes: list[tuple[int, int, int, int]]  # (C, T, H, W) of each sample
    kept: list[torch.Tensor]  # per sample: kept token indices in its (t h w) grid, sorted
    offsets: list[int]  # per sample: index in `tokens` of its first token (its tokens are contiguous)
    pack_of_sample: list[int]  # per sample: which pack holds it
    num_packs: int
    budget: int
    patch: Patch
    text: torch.Tensor  # (M, D) every sample's real text tokens, sample after sample
    text_offsets: list[int]  # per sample: first row of its text in `text`
    text_lengths: list[int]  # per sample: number of real text tokens (≥ 1)

    @property
    def num_samples(self) -> int:
        return len(self.shapes)

    @property
    def lengths(self) -> list[int]:
        """Tokens of each sample in the batch (after dropping)."""
        return [len(k) for k in self.kept]

    @property
    def full_lengths(self) -> list[int]:
        """Tokens of each sample's whole patch grid (before dropping): what sets its timestep shift."""
        return [math.prod(num_patches(s, self.patch)) for s in self.shapes]

    @property
    def num_real_tokens(self) -> int:
        return sum(self.lengths)

    def real_index(self) -> torch.Tensor:
        """(R,) flat index of every real token, sample 0's tokens first, then sample 1's, …"""
        idx = [torch.arange(o, o + n) for o, n in zip(self.offsets, self.lengths)]
        return to_device(torch.cat(idx), self.tokens.device)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """The same batch with its tensors on `device` (lists stay on the host). From pinned
        memory (`pin_memory`) with non_blocking=True the copies do not stall the host."""
        moved = {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
                 for k, v in vars(self).items()}
        moved["kept"] = self.kept  # host-side bookkeeping for unpack
        return PackedBatch(**moved)

    def pin_memory(self) -> PackedBatch:
        """The same batch in page-locked host memory (needs CUDA): what non-blocking copies read."""
        pinned = {k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        pinned["kept"] = self.kept
        return PackedBatch(**pinned)


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A small host tensor on `device` without stalling the host: through pinned memory with a
    non-blocking copy on CUDA (a pageable copy waits for every kernel queued before it)."""
    device = torch.device(device)
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def _real_text(text: torch.Tensor, mask: torch.Tensor | None, i: int) -> torch.Tensor:
    if mask is not None:
        text = text[mask.bool()]
    if text.shape[0] == 0:
        raise ValueError(f"sample {i} has no real text tokens; give it the null caption's tokens instead")
    return text


def pack(
    latents: list[torch.Tensor],
    text: list[torch.Tensor],
    patch: Patch,
    budget: int,
    *,
    text_mask: list[torch.Tensor] | None = None,
    drop_rate: float = 0.0,
    generator: torch.Generator | None = None,
) -> PackedBatch:
    """Patchify latents (C, T, H, W) and pack them with their text (L, D) into sequences of `budget` tokens.

    `text_mask` (L,) selects each sample's real text tokens (all when None). With
    `drop_rate` > 0 each sample keeps a random round((1 − drop_rate)·n) ≥ 1 of its n tokens
    (NaViT token dropping; seeded by `generator`).
    """
    if len(text) != len(latents) or (text_mask is not None and len(text_mask) != len(latents)):
        raise ValueError(f"got {len(latents)} latents but {len(text)} texts"
                         + ("" if text_mask is None else f" and {len(text_mask)} text masks"))
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    pt, ph, pw = patch
    grids, kept = [], []
    for i, x in enumerate(latents):
        if x.ndim != 4:
            raise ValueError(f"sample {i}: latents must be (C, T, H, W), got shape {tuple(x.shape)}")
        grids.append(num_patches(x.shape, patch))
        n = math.prod(grids[-1])
        if drop_rate > 0:
            k = max(1, round((1.0 - drop_rate) * n))
            kept.append(torch.randperm(n, generator=generator)[:k].sort().values)
        else:
            kept.append(torch.arange(n))
    plan = plan_packs([len(k) for k in kept], budget)

    ref = latents[0]
    dim = latents[0].shape[0] * pt * ph * pw
    tokens = ref.new_zeros(len(plan) * budget, dim)  # (N, P)
    sample_ids = torch.full((len(plan) * budget,), -1, dtype=torch.long)  # (N,)
    positions = torch.zeros(len(plan) * budget, 3, dtype=torch.long)  # (N, 3)
    seqlens, segment_samples = [], []
    offsets, pack_of_sample = [0] * len(latents), [0] * len(latents)
    for p, members in enumerate(plan):
        start = p * budget
        for i in members:
            t, h, w = grids[i]
            x = rearrange(latents[i], "c (t pt) (h ph) (w pw) -> (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)
            grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1)
            n = len(kept[i])
            tokens[start:start + n] = x[kept[i]]
            positions[start:start + n] = rearrange(grid, "t h w three -> (t h w) three")[kept[i]]
            sample_ids[start:start + n] = i
            offsets[i], pack_of_sample[i] = start, p
            seqlens.append(n)
            segment_samples.append(i)
            start += n
        pad = (p + 1) * budget - start
        while pad > 0:  # the pack's padding: segments of its own, each ≤ PAD_SEGMENT tokens
            seqlens.append(min(pad, PAD_SEGMENT))
            segment_samples.append(-1)
            pad -= seqlens[-1]

    texts = [_real_text(t, None if text_mask is None else text_mask[i], i) for i, t in enumerate(text)]
    text_lengths = [t.shape[0] for t in texts]
    text_offsets = [sum(text_lengths[:i]) for i in range(len(texts))]
    cu = torch.tensor([0] + seqlens, dtype=torch.int64).cumsum(0).to(torch.int32)
    return PackedBatch(
        tokens=tokens.to(ref.device), sample_ids=sample_ids.to(ref.device), positions=positions.to(ref.device),
        cu_seqlens=cu.to(ref.device), max_seqlen=max(seqlens), segment_samples=segment_samples,
        shapes=[tuple(x.shape) for x in latents], kept=kept, offsets=offsets, pack_of_sample=pack_of_sample,
        num_packs=len(plan), budget=budget, patch=tuple(patch), text=torch.cat(texts),
        text_offsets=text_offsets, text_lengths=text_lengths,
    )


def unpack(pred_tokens: torch.Tensor, batch: PackedBatch, fill: float = 0.0) -> list[torch.Tensor]:
    """Inverse of `pack`: (N, pt·ph·pw·C) tokens → one (C, T, H, W) tensor per sample.

    Tokens dropped by `pack` are set to `fill`.
    """
    pt, ph, pw = batch.patch
    out = []
    for shape, kept, offset in zip(batch.shapes, batch.kept, batch.offsets):
        t, h, w = num_patches(shape, batch.patch)
        flat = pred_tokens.new_full((t * h * w, pred_tokens.shape[1]), fill)  # (t·h·w, P)
        flat[kept.to(flat.device)] = pred_tokens[offset:offset + len(kept)]
        out.append(rearrange(flat, "(t h w) (pt ph pw c) -> c (t pt) (h ph) (w pw)",
                             t=t, h=h, w=w, pt=pt, ph=ph, pw=pw))
    return out


# ---------------------------------------------------------------------------
# Cross-attention layout
# ---------------------------------------------------------------------------


@dataclass
class TextLayout:
    """Cross-attention keys aligned with the self-attention segments of a PackedBatch."""

    index: torch.Tensor  # (M',) rows of cat([batch.text, null_text]) in key order
    sample_ids: torch.Tensor  # (M',) owning sample; num_samples for rows that belong to padding segments
    cu_seqlens: torch.Tensor  # (S+1,) int32, segment s of the keys ↔ segment s of batch.cu_seqlens
    max_seqlen: int


def text_layout(batch: PackedBatch, drop: list[bool] | None, null_len: int, pad_to: int = 0) -> TextLayout:
    """For each attention segment, the text rows its queries attend to.

    A sample's segment sees its own real text tokens, or the `null_len` null-text rows
    (appended after `batch.text`) when `drop[i]` is set (classifier-free guidance). A
    padding segment sees the null text too, so no key segment is ever empty. With `pad_to`,
    every segment's rows are followed by the first null row repeated up to `pad_to` rows (a
    zero row, for a model trained on zero-padded text: Wan), and the null caption is the null
    rows after it (the zero row alone when there are none).
    """
    num_text = batch.text.shape[0]
    skip = 1 if pad_to and null_len > 1 else 0  # row num_text pads; the null caption follows it
    null = list(range(num_text + skip, num_text + null_len))
    b = batch.num_samples
    index: list[int] = []
    owners: list[int] = []
    seqlens: list[int] = []
    for s in batch.segment_samples:
        if s < 0 or (drop is not None and drop[s]):
            rows = null
        else:
            rows = range(batch.text_offsets[s], batch.text_offsets[s] + batch.text_lengths[s])
        if pad_to > len(rows):
            rows = list(rows) + [num_text] * (pad_to - len(rows))
        index.extend(rows)
        owners.extend([s if s >= 0 else b] * len(rows))
        seqlens.append(len(rows))
    device = batch.tokens.device
    cu = torch.tensor([0] + seqlens, dtype=torch.int64).cumsum(0).to(torch.int32)
    return TextLayout(
        index=to_device(torch.tensor(index, dtype=torch.long), device),
        sample_ids=to_device(torch.tensor(owners, dtype=torch.long), device),
        cu_seqlens=to_device(cu, device),
        max_seqlen=max(seqlens),
    )
