"""VideoDiT: packed forward == per-sample forward, isolation, RoPE, zero init, registry, checkpointing."""

from __future__ import annotations

import pytest
import torch

from training.model import DIT_MODELS, DIT_SIZES, VideoDiT, apply_rope, dit_config, rope_angles, rope_split
from training.packing import pack, unpack
from training.parallel import apply_activation_checkpointing

from .conftest import EXACT_F64

PATCH = (1, 2, 2)
# A mix of bucket-like shapes: an image (T=1), landscape, portrait, square, a long narrow clip.
SHAPES = [(4, 3, 8, 8), (4, 1, 8, 12), (4, 2, 12, 4), (4, 1, 4, 4), (4, 5, 4, 8)]
TEXT_DIM = 16


def make_model(seed: int = 0, **overrides) -> VideoDiT:
    """The tiny DiT with every weight (zero-initialised ones too) randomised, so outputs are non-trivial."""
    torch.manual_seed(seed)
    model = DIT_MODELS["DiT-tiny"](in_channels=4, text_dim=TEXT_DIM, **overrides)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def make_inputs(shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = [torch.randn(s, generator=g) for s in shapes]
    text = [torch.randn(2 + 3 * i % 5, TEXT_DIM, generator=g) for i in range(len(shapes))]
    t = torch.rand(len(shapes), generator=g)
    drop = [i == 1 for i in range(len(shapes))]  # one sample sees the null caption
    return latents, text, t, drop


def packed_outputs(model, latents, text, t, drop, budget):
    batch = pack(latents, text, PATCH, budget)
    return unpack(model(batch.tokens, t, batch, drop), batch), batch


def single_outputs(model, latents, text, t, drop):
    outs = []
    for i, x in enumerate(latents):
        n = x.shape[1] * x.shape[2] * x.shape[3] // 4
        outs.append(packed_outputs(model, [x], [text[i]], t[i:i + 1], drop[i:i + 1], budget=n)[0][0])
    return outs


# ---------------------------------------------------------------------------
# Packing is invisible to the model
# ---------------------------------------------------------------------------


def test_packed_forward_equals_per_sample_forward(float64):
    model = make_model()
    latents, text, t, drop = make_inputs()
    packed, batch = packed_outputs(model, latents, text, t, drop, budget=72)
    assert batch.num_packs >= 2 and batch.num_real_tokens < batch.tokens.shape[0]  # several packs, padding
    single = single_outputs(model, latents, text, t, drop)
    for p, s in zip(packed, single):
        assert p.shape == s.shape
        assert s.abs().mean() > 0.1  # real values, not zeros
        assert (p - s).abs().max() < EXACT_F64


def test_packed_gradients_equal_per_sample_gradients(float64):
    latents, text, t, drop = make_inputs()
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(x.shape, generator=g) for x in latents]

    model = make_model()
    packed, _ = packed_outputs(model, latents, text, t, drop, budget=72)
    sum((o * w).sum() for o, w in zip(packed, weights)).backward()
    grads_packed = {n: p.grad.clone() for n, p in model.named_parameters()}

    model = make_model()
    for o, w in zip(single_outputs(model, latents, text, t, drop), weights):
        (o * w).sum().backward()  # gradients accumulate over samples
    for name, p in model.named_parameters():
        scale = max(1.0, p.grad.abs().max().item())
        assert (grads_packed[name] - p.grad).abs().max() < EXACT_F64 * scale, name
    assert grads_packed["null_text"].abs().max() > 0  # the dropped sample trains the null caption


def test_isolation_perturbing_one_sample_leaves_the_others_unchanged(float64):
    model = make_model()
    latents, text, t, drop = make_inputs()
    base, batch = packed_outputs(model, latents, text, t, drop, budget=72)
    j = 2
    assert len({batch.pack_of_sample[i] for i in range(len(latents))}) > 1
    same_pack = [i for i in range(len(latents)) if i != j and batch.pack_of_sample[i] == batch.pack_of_sample[j]]
    assert same_pack  # a neighbour in the same pack is the interesting case
    latents2 = [x.clone() for x in latents]
    latents2[j] += torch.randn(latents[j].shape, generator=torch.Generator().manual_seed(9))
    text2 = [x.clone() for x in text]
    text2[j] = text2[j] * -3.0
    t2 = t.clone()
    t2[j] = 0.99
    out = packed_outputs(model, latents2, text2, t2, drop, budget=72)[0]
    for i in range(len(latents)):
        diff = (out[i] - base[i]).abs().max()
        assert diff > 0.01 if i == j else diff < EXACT_F64, (i, diff)


# ---------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------


def test_rope_split():
    assert rope_split(64) == (24, 20, 20)
    assert rope_split(72) == (24, 24, 24)  # DiT-XL/2: 1152 / 16
    assert rope_split(16) == (8, 4, 4)  # DiT-tiny


def test_rope_is_relative_at_any_position():
    """⟨R(p)q, R(p′)k⟩ depends only on p − p′: a shift far past the training sizes changes nothing."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 5, 2, 24, generator=g)  # (N, H, Dh)
    pos_q = torch.tensor([[0, 0, 0], [1, 2, 3], [4, 0, 7], [2, 9, 1], [0, 5, 5]])
    pos_k = torch.tensor([[3, 1, 0], [0, 0, 0], [2, 2, 2], [8, 1, 6], [1, 1, 1]])

    def scores(shift):
        aq, ak = rope_angles(pos_q + shift, 24, 10000.0), rope_angles(pos_k + shift, 24, 10000.0)
        rq = apply_rope(q, aq.cos()[:, None], aq.sin()[:, None])
        rk = apply_rope(k, ak.cos()[:, None], ak.sin()[:, None])
        return torch.einsum("nhd,mhd->hnm", rq, rk)

    base = scores(torch.tensor([0, 0, 0]))
    assert not torch.allclose(base, torch.einsum("nhd,mhd->hnm", q, k))  # RoPE does something
    assert torch.allclose(scores(torch.tensor([33, 90, 160])), base, atol=1e-4)
    assert torch.allclose(apply_rope(q, *(f(rope_angles(pos_q, 24, 1e4))[:, None] for f in (torch.cos, torch.sin)))
                          .norm(dim=-1), q.norm(dim=-1), atol=1e-5)  # a rotation


def test_rope_handles_a_shape_larger_than_any_seen_and_packs_consistently(float64):
    model = make_model()
    latents, text, t, drop = make_inputs()
    big = torch.randn((4, 9, 44, 60), generator=torch.Generator().manual_seed(3))  # 5940 tokens, 9×22×30 grid
    shapes_seen = max(x.numel() for x in latents)
    assert big.numel() > 10 * shapes_seen
    lat = latents + [big]
    txt = text + [torch.randn(4, TEXT_DIM, generator=torch.Generator().manual_seed(4))]
    tt = torch.cat([t, torch.tensor([0.5])])
    packed, _ = packed_outputs(model, lat, txt, tt, drop + [False], budget=6000)
    alone = single_outputs(model, [big], txt[-1:], tt[-1:], [False])[0]
    assert torch.isfinite(packed[-1]).all() and packed[-1].abs().mean() > 0.1
    assert (packed[-1] - alone).abs().max() < EXACT_F64
    for p, s in zip(packed[:-1], single_outputs(model, latents, text, t, drop)):
        assert (p - s).abs().max() < EXACT_F64


# ---------------------------------------------------------------------------
# Init, registry, checkpointing
# ---------------------------------------------------------------------------


def test_zero_init_output_is_exactly_zero():
    torch.manual_seed(0)
    model = DIT_MODELS["DiT-tiny"](in_channels=4, text_dim=TEXT_DIM)
    latents, text, t, drop = make_inputs()
    batch = pack(latents, text, PATCH, 72)
    out = model(torch.randn(batch.tokens.shape), t, batch, drop)
    assert torch.equal(out, torch.zeros_like(out))
    for block in model.blocks:  # adaLN-Zero: every block starts as the identity
        assert torch.equal(block.adaLN_modulation[-1].weight, torch.zeros_like(block.adaLN_modulation[-1].weight))
        assert torch.equal(block.cross_attn.proj.weight, torch.zeros_like(block.cross_attn.proj.weight))
    assert model.x_embedder.weight.abs().max() > 0 and model.null_text.abs().max() > 0


def expected_params(depth: int, d: int, heads: int, patch_dim: int, text_dim: int, null_len: int = 1) -> int:
    """Parameter count of VideoDiT, term by term (DiT-XL/2 image model: 675M; ours adds cross-attention + text)."""
    block = (3 * d * d + 3 * d) + (d * d + d)  # self-attention qkv, proj
    block += (d * d + d) + (2 * d * d + 2 * d) + (d * d + d)  # cross-attention q, kv, proj
    block += 2 * 2 * (d // heads) + 2 * d  # q/k RMSNorm weights (self + cross), norm2 affine
    block += (4 * d * d + 4 * d) + (4 * d * d + d)  # MLP
    block += 6 * d * d + 6 * d  # adaLN modulation
    embed = (patch_dim * d + d) + (256 * d + d + d * d + d) + 2 * (text_dim * d + d + d * d + d) + null_len * text_dim
    final = (2 * d * d + 2 * d) + (d * patch_dim + patch_dim)
    return depth * block + embed + final


@pytest.mark.parametrize("name", list(DIT_SIZES))
def test_registry_sizes_build_on_meta(name):
    depth, hidden, heads = DIT_SIZES[name]
    with torch.device("meta"):
        model = DIT_MODELS[name]()  # no memory allocated, even for XL
    cfg = model.cfg
    assert (len(model.blocks), cfg.hidden, cfg.heads, cfg.patch) == (depth, hidden, heads, (1, 2, 2))
    n = sum(p.numel() for p in model.parameters())
    assert n == expected_params(depth, hidden, heads, cfg.patch_dim, cfg.text_dim)
    if name == "DiT-XL/2":
        assert (depth, hidden, heads) == (28, 1152, 16)
        assert 820e6 < n < 830e6  # 675M image DiT-XL/2 + 28 cross-attention layers + text embedders


def test_dit_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown model 'DiT-H/2'"):
        dit_config("DiT-H/2")
    with pytest.raises(ValueError, match="divisible by model.heads"):
        dit_config("DiT-tiny", heads=3)
    with pytest.raises(ValueError, match="attn_backend"):
        dit_config("DiT-tiny", attn_backend="xformers")


def test_activation_checkpointing_gives_identical_gradients():
    latents, text, t, drop = make_inputs()
    batch = pack(latents, text, PATCH, 72)
    w = torch.randn(batch.tokens.shape, generator=torch.Generator().manual_seed(5))
    grads = []
    for ckpt in (False, True):
        model = make_model()
        keys = list(model.state_dict())
        apply_activation_checkpointing(model, enabled=ckpt)
        assert list(model.state_dict()) == keys  # checkpoints stay loadable either way
        (model(batch.tokens, t, batch, drop) * w).sum().backward()
        grads.append({n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name
    apply_activation_checkpointing(model, enabled=False)
    assert type(model.blocks[0]).__name__ == "DiTBlock"


def test_flop_count_matches_torch_flop_counter():
    """flops.py counts exactly the matmul FLOPs torch's counter sees, attention included.

    FlopCounterMode only counts ops it has a formula for. On CPU, SDPA picks a fused kernel
    (`_scaled_dot_product_flash_attention_for_cpu` in torch 2.14) that has none, so the
    attention FLOPs silently vanish from the count, while older releases or other CPUs take
    the math path, whose q·kᵀ and weights·v bmm's are counted. Pinning SDPA to its math
    decomposition makes the counter see attention as plain bmm's whatever kernel this
    machine would pick, so the comparison is exact.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from training.flops import forward_flops

    model = make_model(hidden=48, heads=2, depth=3)
    latents, text, t, _ = make_inputs()
    total = sum(x.shape[1] * x.shape[2] * x.shape[3] // 4 for x in latents)
    batch = pack(latents, text, PATCH, budget=total)  # no padding: every computed token is real
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(batch.tokens, t, batch)
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    d, depth = model.cfg.hidden, model.cfg.depth
    attention = depth * sum(4 * n * n * d + 4 * n * m * d for n, m in zip(batch.lengths, batch.text_lengths))
    assert by_op.get("aten.bmm") == attention  # self + cross attention, every block, seen by the counter
    # The counter also sees the one-hot GEMMs that broadcast each sample's adaLN rows to its tokens
    # (model.per_token): data movement done on the matrix units, not model FLOPs, so MFU leaves them out.
    n, rows = len(batch.tokens), batch.num_samples + 1
    broadcast = depth * 2 * n * rows * 6 * d + 2 * n * rows * 2 * d
    assert forward_flops(model.cfg, batch.lengths, batch.text_lengths) + broadcast == counter.get_total_flops()


def test_attention_gets_one_dtype_under_bf16_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """RMSNorm is on autocast's fp32 list: q/k once reached attention as fp32 with bf16 v (flash/varlen crash,
    auto silently picked flex). Every call now gets equal dtypes, and mixed ones are refused."""
    import training.attention as attn
    import training.model as model_mod

    seen = []
    real = attn.attention

    def spy(q, k, v, *args, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, *args, **kw)

    monkeypatch.setattr(model_mod, "attention", spy)
    model = make_model()
    latents, text, t, drop = make_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = packed_outputs(model, latents, text, t, drop, budget=64)
    assert seen and all(d == (torch.bfloat16,) * 3 for d in seen)  # self- and cross-attention, every block
    assert all(torch.isfinite(o).all() for o in out)
    q = torch.randn(4, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(TypeError, match="one dtype for q, k, v; got torch.float32, torch.float32, torch.bfloat16"):
        real(q, q, q.bfloat16(), cu, cu, 4, 4)


def test_segment_mean_sums_in_fp32_for_bf16_rows() -> None:
    """The mean of 257 bf16 rows of 1.5 is 1.5; sums and counts held in bf16 (8 mantissa bits) round to
    386 and 256 and gave 1.5078 — and on CUDA index_add_ accumulates bf16 with atomics, losing more."""
    from training.model import segment_mean

    x = torch.full((257, 4), 1.5).bfloat16()  # (257, 4)
    out = segment_mean(x, torch.zeros(257, dtype=torch.long), 1)
    assert out.dtype == torch.bfloat16 and out.float().eq(1.5).all()


def test_head_dim_variants_of_xl_keep_its_parameters_and_flops() -> None:
    from training.flops import forward_flops
    from training.model import dit_config

    base = dit_config("DiT-XL/2")
    for name, head_dim in (("DiT-XL/2", 72), ("DiT-XL/2-hd64", 64), ("DiT-XL/2-hd128", 128)):
        cfg = dit_config(name)
        assert cfg.hidden // cfg.heads == head_dim and (cfg.depth, cfg.hidden) == (base.depth, base.hidden)
        assert forward_flops(cfg, [4096], [77]) == forward_flops(base, [4096], [77])  # heads do not change FLOPs
    small = {n: sum(p.numel() for p in DIT_MODELS[n](depth=1, text_dim=16).parameters())
             for n in ("DiT-XL/2", "DiT-XL/2-hd64", "DiT-XL/2-hd128")}
    # Only the per-head QK-RMSNorm scales differ (2 norms × head dim, self and cross).
    assert small["DiT-XL/2-hd128"] - small["DiT-XL/2"] == 4 * (128 - 72)
    assert small["DiT-XL/2-hd64"] - small["DiT-XL/2"] == 4 * (64 - 72)
