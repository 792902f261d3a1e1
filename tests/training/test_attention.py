"""Attention backends: every implementation computes the same segment-wise attention."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from training.attention import attention, choose_backend, pick_backend, segment_ids

CPU_BACKENDS = ["sdpa_masked", "sdpa_segments"]


def f32_tol(ref: torch.Tensor) -> float:
    """Float32 agreement bound between attention kernels: 64 ulps of the output's scale.

    Kernels differ in summation order and exp approximation (torch's CPU flash kernel uses a
    ~20-ulp exp; its blocking follows the SIMD width), so bit-level agreement is not a
    property; a segment leak or a wrong scale moves outputs by >= 1e-2.
    """
    return 64 * torch.finfo(torch.float32).eps * max(1.0, ref.abs().max().item())


def varlen_inputs(q_lens, k_lens, heads=3, head_dim=8, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=g)
    k = torch.randn(sum(k_lens), heads, head_dim, generator=g)
    v = torch.randn(sum(k_lens), heads, head_dim, generator=g)
    cu_q = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + k_lens).cumsum(0).to(torch.int32)
    to = dict(device=device, dtype=dtype)
    return q.to(**to), k.to(**to), v.to(**to), cu_q.to(device), cu_k.to(device), max(q_lens), max(k_lens)


def per_segment_reference(q, k, v, cu_q, cu_k):
    """Plain softmax attention, one segment at a time, in float64."""
    out = []
    for i in range(len(cu_q) - 1):
        qs = q[cu_q[i]:cu_q[i + 1]].double()  # (n, H, Dh)
        ks, vs = k[cu_k[i]:cu_k[i + 1]].double(), v[cu_k[i]:cu_k[i + 1]].double()
        w = torch.einsum("nhd,mhd->hnm", qs, ks) / q.shape[-1] ** 0.5
        out.append(torch.einsum("hnm,mhd->nhd", w.softmax(-1), vs))
    return torch.cat(out)


CASES = {
    "self": ([5, 17, 1, 9], [5, 17, 1, 9]),
    "cross": ([5, 17, 1, 9], [3, 1, 7, 2]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_backends_match_reference(case, backend):
    q, k, v, cu_q, cu_k, mq, mk = varlen_inputs(*CASES[case])
    out = attention(q, k, v, cu_q, cu_k, mq, mk, backend=backend)
    ref = per_segment_reference(q, k, v, cu_q, cu_k)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out.double() - ref).abs().max() < f32_tol(ref)


@pytest.mark.parametrize("case", list(CASES))
def test_cpu_backends_match_each_other(case):
    q, k, v, cu_q, cu_k, mq, mk = varlen_inputs(*CASES[case], seed=1)
    outs = [attention(q, k, v, cu_q, cu_k, mq, mk, backend=b) for b in CPU_BACKENDS]
    assert (outs[0] - outs[1]).abs().max() < f32_tol(outs[0])


def test_gradients_match_between_cpu_backends():
    grads = []
    for backend in CPU_BACKENDS:
        q, k, v, cu_q, cu_k, mq, mk = varlen_inputs(*CASES["cross"], seed=2)
        for x in (q, k, v):
            x.requires_grad_(True)
        w = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
        (attention(q, k, v, cu_q, cu_k, mq, mk, backend=backend) * w).sum().backward()
        grads.append([x.grad for x in (q, k, v)])
    for a, b in zip(*grads):
        assert (a - b).abs().max() < f32_tol(a)  # gradients reach ~5: relative


def test_segments_do_not_leak():
    q, k, v, cu_q, cu_k, mq, mk = varlen_inputs(*CASES["cross"])
    base = attention(q, k, v, cu_q, cu_k, mq, mk)
    k2, v2 = k.clone(), v.clone()
    k2[cu_k[1]:cu_k[2]] += 5.0  # keys of segment 1 only
    v2[cu_k[1]:cu_k[2]] -= 3.0
    out = attention(q, k2, v2, cu_q, cu_k, mq, mk)
    changed = (out - base).abs().amax(dim=(1, 2)) > 0  # (Nq,)
    assert changed.tolist() == [cu_q[1] <= i < cu_q[2] for i in range(q.shape[0])]


def test_single_segment_equals_plain_sdpa():
    q, k, v, cu_q, cu_k, mq, mk = varlen_inputs([12], [12])
    ref = F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (q, k, v))).transpose(0, 1)
    assert (attention(q, k, v, cu_q, cu_k, mq, mk) - ref).abs().max() < f32_tol(ref)


def test_flex_on_cpu_if_it_runs():
    q, k, v, cu_q, cu_k, mq, mk = varlen_inputs(*CASES["cross"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
            out = attention(q, k, v, cu_q, cu_k, mq, mk, backend="flex")
    except Exception as e:  # noqa: BLE001 — availability probe
        pytest.skip(f"FlexAttention does not run on CPU here: {type(e).__name__}: {e}")
    ref = attention(q, k, v, cu_q, cu_k, mq, mk, backend="sdpa_masked")
    assert (out - ref).abs().max() < f32_tol(ref)


def test_backend_order_prefers_torch_varlen_then_flash_attn_then_flex():
    bf16, f32 = torch.bfloat16, torch.float32
    assert choose_backend(True, bf16, torch_varlen=True, flash_attn=True) == "varlen"  # cuDNN: FA3 class on Hopper
    assert choose_backend(True, bf16, torch_varlen=False, flash_attn=True) == "flash"
    assert choose_backend(True, bf16, torch_varlen=False, flash_attn=False) == "flex"
    assert choose_backend(True, f32, torch_varlen=True, flash_attn=True) == "flex"  # fused kernels: 16-bit only
    assert choose_backend(False, bf16, torch_varlen=True, flash_attn=True) == "sdpa_segments"


def test_flex_masks_are_built_once_per_forward_not_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    from training import attention as attn
    from training.model import DIT_MODELS
    from training.packing import pack

    built = []
    real = attn.flex_block_mask
    monkeypatch.setattr(attn, "flex_block_mask", lambda *a: built.append(a[2:4]) or real(*a))
    torch.manual_seed(0)
    model = DIT_MODELS["DiT-tiny"](in_channels=4, text_dim=8, depth=3, attn_backend="flex")
    batch = pack([torch.randn(4, 1, 4, 6), torch.randn(4, 2, 2, 2)], [torch.randn(3, 8), torch.randn(5, 8)],
                 (1, 2, 2), 16)
    with torch.no_grad():
        for p in model.parameters():  # away from adaLN-Zero's all-zero output
            p.normal_(0.0, 0.2)
    t = torch.tensor([0.3, 0.8])
    try:
        with warnings.catch_warnings(), torch.no_grad():  # flex has no CPU backward
            warnings.simplefilter("ignore")
            out = model(batch.tokens, t, batch)
    except Exception as e:  # noqa: BLE001 — availability probe, as above
        pytest.skip(f"FlexAttention does not run on CPU here: {type(e).__name__}: {e}")
    assert len(built) == 2, built  # one self-attention and one cross-attention mask for 3 blocks
    model.cfg.attn_backend = "sdpa_segments"
    with torch.no_grad():
        ref = model(batch.tokens, t, batch)
    assert ref.abs().max() > 0.01 and (out - ref).abs().max() < 1e-4 * ref.abs().max()


def test_segment_ids_and_errors():
    assert segment_ids(torch.tensor([0, 2, 3, 6], dtype=torch.int32), 6).tolist() == [0, 0, 1, 2, 2, 2]
    q, k, v, cu_q, cu_k, mq, mk = varlen_inputs(*CASES["self"])
    assert pick_backend(q) == "sdpa_segments"
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        attention(q, k, v, cu_q, cu_k, mq, mk, backend="nope")
    with pytest.raises(ValueError, match="segment counts differ"):
        attention(q, k, v, cu_q, cu_k[:-1], mq, mk)


# Segments of every kind a real pack has: 1- and 17-token clips, clips over 128 tokens (cuDNN's
# varlen path needs max_q > 128 to run at all), and 128-token padding chunks; text keys of 1–77.
GPU_CASES = {
    "self": ([1, 17, 300, 2000, 128, 128], [1, 17, 300, 2000, 128, 128]),
    "cross": ([1, 17, 300, 2000, 128, 128], [5, 77, 1, 30, 1, 1]),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("head_dim", [64, 72, 128])
@pytest.mark.parametrize("backend", ["flash", "varlen", "flex", "sdpa_segments"])
def test_cuda_backends_match_reference_forward_and_backward(case, head_dim, backend):
    """bf16, strided q/k/v views (as the model's fused projections give them), forward and backward."""
    from training.attention import has_flash_attn, has_torch_varlen

    if backend == "flash" and not has_flash_attn():
        pytest.skip("flash-attn is not installed")
    if backend == "varlen" and not has_torch_varlen():
        pytest.skip("torch.nn.attention.varlen is not available")
    q_lens, k_lens = GPU_CASES[case]
    heads = 4
    g = torch.Generator(device="cuda").manual_seed(head_dim)
    qkv = torch.randn(sum(q_lens), 3, heads, head_dim, generator=g, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(sum(k_lens), 2, heads, head_dim, generator=g, device="cuda", dtype=torch.bfloat16)
    q = qkv[:, 0]  # (Nq, H, Dh) views with row stride 3·H·Dh
    k, v = (qkv[:, 1], qkv[:, 2]) if case == "self" else (kv[:, 0], kv[:, 1])
    cu_q = torch.tensor([0] + q_lens, device="cuda").cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + k_lens, device="cuda").cumsum(0).to(torch.int32)
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    refs = [x.detach().float().requires_grad_() for x in (q, k, v)]
    out = attention(*xs, cu_q, cu_k, max(q_lens), max(k_lens), backend=backend)
    ref = attention(*refs, cu_q, cu_k, max(q_lens), max(k_lens), backend="sdpa_segments")
    grad = torch.randn_like(ref)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)

    def rel(a, b):
        return float((a.float() - b).norm() / b.norm())

    assert rel(out, ref) < 2e-2  # bf16 inputs and outputs
    for x, r in zip(xs, refs):
        assert rel(x.grad, r.grad) < 3e-2
