"""One attention function over packed variable-length segments, with interchangeable backends.

`attention(q, k, v, cu_q, cu_k, max_q, max_k)` takes flat q (Nq, H, Dh) and k/v
(Nk, H, Dh); segment i of the queries (`cu_q[i]:cu_q[i+1]`) attends only to segment i
of the keys. Self-attention passes the same boundaries twice; cross-attention passes
the text boundaries as `cu_k`. Every key segment must be non-empty.

Backends (all compute the same function):
- `varlen`: PyTorch's `torch.nn.attention.varlen.varlen_attn` (CUDA, fp16/bf16): cuDNN's fused
  kernel, FlashAttention-3 class on Hopper with cuDNN ≥ 9.18 — preferred where torch has it.
- `flash`: flash-attn's `flash_attn_varlen_func` (CUDA, fp16/bf16; FlashAttention-2 on Hopper).
- `flex`: FlexAttention with a document block mask (CUDA; runs unfused on CPU). The mask is
  built once per segment layout — per forward, not per layer — and kept beside the boundary
  tensors it was built from (`_FLEX_MASKS`), outside any compiled graph.
- `sdpa_masked`: SDPA with a dense block-diagonal mask over all tokens (the CPU reference).
- `sdpa_segments`: SDPA per segment in a loop: exact and O(Σ n²), the CPU default.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

BACKENDS = ("auto", "flash", "varlen", "flex", "sdpa_masked", "sdpa_segments")


# ---------------------------------------------------------------------------
# Backend choice
# ---------------------------------------------------------------------------


@functools.cache
def has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def has_torch_varlen() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def pick_backend(q: torch.Tensor) -> str:
    """varlen → flash → flex on CUDA (fused kernels want fp16/bf16), sdpa_segments on CPU."""
    return choose_backend(q.is_cuda, q.dtype, has_torch_varlen(), has_flash_attn())


def choose_backend(cuda: bool, dtype: torch.dtype, torch_varlen: bool, flash_attn: bool) -> str:
    if not cuda:
        return "sdpa_segments"
    if dtype in (torch.float16, torch.bfloat16):
        if torch_varlen:
            return "varlen"
        if flash_attn:
            return "flash"
    return "flex"


def segment_ids(cu: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) index of the segment each position belongs to, from boundaries cu (S+1,)."""
    return torch.searchsorted(cu[1:].long(), torch.arange(n, device=cu.device), right=True)


# ---------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------


def _flash(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int) -> Tensor:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k)


def _varlen(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int) -> Tensor:
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k)


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def flex_block_mask(cu_q: Tensor, cu_k: Tensor, nq: int, nk: int, device: torch.device) -> object:
    """FlexAttention's block mask letting query segment i see key segment i only."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg_q = segment_ids(cu_q, nq)  # (Nq,)
    seg_k = segment_ids(cu_k, nk)  # (Nk,)

    def same_segment(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        return seg_q[qi] == seg_k[ki]

    return create_block_mask(same_segment, None, None, nq, nk, device=device)


# Block masks by query-boundary tensor: every layer of one forward (and its recomputation under
# activation checkpointing) passes the same boundary tensors, so each layout's mask is built once
# (one for self-, one for cross-attention) instead of once per layer; an entry goes when the
# forward's boundary tensor is freed. Kept here, not in the model's arguments, so a compiled
# block never sees (and guards on) it.
_FLEX_MASKS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # cu_q → {(id(cu_k), Nq, Nk): mask}


def _flex(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    masks = _FLEX_MASKS.setdefault(cu_q, {})
    key = (id(cu_k), q.shape[0], k.shape[0])  # cu_k lives as long as cu_q: the same forward's segments
    mask = masks.get(key)
    if mask is None:
        mask = masks[key] = flex_block_mask(cu_q, cu_k, q.shape[0], k.shape[0], q.device)
    fn = _compiled_flex() if q.is_cuda else flex_attention  # eager flex is an unfused reference on CPU
    q, k, v = (rearrange(x, "n h d -> 1 h n d") for x in (q, k, v))
    out = fn(q, k, v, block_mask=mask)  # (1, H, Nq, Dh)
    return rearrange(out, "1 h n d -> n h d")


def _sdpa_masked(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int) -> Tensor:
    mask = segment_ids(cu_q, q.shape[0])[:, None] == segment_ids(cu_k, k.shape[0])[None, :]  # (Nq, Nk)
    q, k, v = (rearrange(x, "n h d -> 1 h n d") for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (1, H, Nq, Dh)
    return rearrange(out, "1 h n d -> n h d")


def _sdpa_segments(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int) -> Tensor:
    bq, bk = cu_q.tolist(), cu_k.tolist()
    out = []
    for q0, q1, k0, k1 in zip(bq[:-1], bq[1:], bk[:-1], bk[1:]):
        qs, ks, vs = (rearrange(x, "n h d -> h n d") for x in (q[q0:q1], k[k0:k1], v[k0:k1]))
        out.append(rearrange(F.scaled_dot_product_attention(qs, ks, vs), "h n d -> n h d"))  # (n, H, Dh)
    return torch.cat(out)


_IMPLS = {"flash": _flash, "varlen": _varlen, "flex": _flex,
          "sdpa_masked": _sdpa_masked, "sdpa_segments": _sdpa_segments}


# Not traced by torch.compile (training.parallel.apply_compile): the kernels are fused already,
# and their host-side arguments (segment maxima, the CPU loop's boundaries) would otherwise be
# guarded on and recompile for every pack. The compiled block breaks its graph around this call.
@torch.compiler.disable
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    backend: str = "auto",
) -> torch.Tensor:
    """Segment-wise softmax(q kᵀ / √Dh) v: (Nq, H, Dh) queries, (Nk, H, Dh) keys/values → (Nq, H, Dh)."""
    if not q.dtype == k.dtype == v.dtype:  # a kernel would reject it, or auto would silently pick flex
        raise TypeError(f"attention needs one dtype for q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}")
    if backend == "auto":
        backend = pick_backend(q)
    if backend not in _IMPLS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {list(BACKENDS)}")
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"query and key segment counts differ: cu_q {tuple(cu_q.shape)} vs cu_k {tuple(cu_k.shape)}")
    return _IMPLS[backend](q, k, v, cu_q, cu_k, max_q, max_k)
