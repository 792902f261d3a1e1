"""training/wan.py: diffusers' Wan transformer on packed sequences equals its own dense forward per clip."""

from __future__ import annotations

import pytest
import torch

from training.packing import pack, unpack
from training.wan import TIMESTEP_SCALE, WAN_PRESETS, WAN_TEXT_LEN, PackedWan

TINY = dict(WAN_PRESETS["tiny-wan"], in_channels=4, out_channels=4, text_dim=16)


def tiny_wan(seed: int = 0) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**TINY).float()
    with torch.no_grad():  # the tables start small: make every path count
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def samples(seed: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 1, 4, 6), (4, 3, 8, 4), (4, 2, 6, 6), (4, 1, 2, 2)]  # an image, videos, a 1-token clip
    latents = [torch.randn(s, generator=g) for s in shapes]
    texts = [torch.randn(n, 16, generator=g) for n in (5, 7, 3, 2)]
    return latents, texts, torch.tensor([0.999, 0.5, 0.017, 0.3])


def dense(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """diffusers' own forward of one clip alone: (C, T, H, W), its text zero-padded to 512 rows as
    WanPipeline.encode_prompt pads it."""
    padded = torch.cat([text, text.new_zeros(WAN_TEXT_LEN - len(text), text.shape[1])])
    return model(x[None], (t * TIMESTEP_SCALE)[None], padded[None], return_dict=False)[0][0]


def test_packed_forward_and_gradients_equal_diffusers_per_clip() -> None:
    model = tiny_wan()
    latents, texts, t = samples()
    packed = PackedWan(model, backend="sdpa_segments")
    batch = pack(latents, texts, packed.patch, budget=32)  # 6 + 24 + 18 + 1 tokens: two packs, padding
    assert batch.num_packs == 2 and -1 in batch.segment_samples
    drop = [False, False, False, True]  # the last sample's caption dropped (CFG): it sees the null text
    out = unpack(packed(batch.tokens, t, batch, drop), batch)
    weights = [torch.randn_like(x) for x in latents]
    (sum((o * w).sum() for o, w in zip(out, weights))).backward()
    grads = {n: q.grad.clone() for n, q in model.named_parameters()}
    model.zero_grad()

    ref_loss = 0.0
    for x, text, ti, d, o, w in zip(latents, texts, t, drop, out, weights):
        ref = dense(model, x, ti, torch.zeros(1, 16) if d else text)
        assert ref.shape == o.shape == x.shape
        torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
        ref_loss = ref_loss + (ref * w).sum()
    ref_loss.backward()
    for n, q in model.named_parameters():
        torch.testing.assert_close(grads[n], q.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "attn2" in n)  # cross-attention is exercised


def test_each_clip_sees_only_its_own_tokens_and_text() -> None:
    packed = PackedWan(tiny_wan().eval(), backend="sdpa_masked")
    latents, texts, t = samples()
    with torch.no_grad():
        batch = pack(latents, texts, packed.patch, budget=64)  # one pack: all four share it
        assert batch.num_packs == 1
        base = unpack(packed(batch.tokens, t, batch), batch)
        other = pack([latents[0], latents[1] + 1.0, latents[2], latents[3]],
                     [texts[0], texts[1] * 2.0, texts[2], texts[3]], packed.patch, budget=64)
        moved = unpack(packed(other.tokens, t, other), other)
    for i in (0, 2, 3):
        torch.testing.assert_close(moved[i], base[i], rtol=0, atol=0)
    assert (moved[1] - base[1]).abs().max() > 1e-3


def test_unsupported_checkpoints_and_clips_are_refused() -> None:
    from diffusers import WanTransformer3DModel

    i2v = WanTransformer3DModel(**dict(TINY, image_dim=8, added_kv_proj_dim=24))
    with pytest.raises(ValueError, match="I2V"):
        PackedWan(i2v)
    packed = PackedWan(tiny_wan())
    long = [torch.randn(4, 40, 2, 2)]  # 40 latent frames > rope_max_seq_len 32
    batch = pack(long, [torch.randn(2, 16)], packed.patch, budget=64)
    with pytest.raises(ValueError, match="rope_max_seq_len is 32"):
        packed(batch.tokens, torch.tensor([0.5]), batch)


def test_the_platform_flow_loss_trains_packed_wan() -> None:
    """training.flow's rectified-flow loss drives the packed Wan like the native DiT: a fixed batch is learned."""
    from training.flow import FlowConfig, flow_loss

    packed = PackedWan(tiny_wan(), backend="sdpa_segments")
    latents, texts, _ = samples()
    batch = pack(latents, texts, packed.patch, budget=32)
    cfg = FlowConfig(cfg_drop_p=0.25)
    opt = torch.optim.AdamW(packed.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):  # the same times, noise and drops every step: one fixed regression problem
        loss, per_sample = flow_loss(packed, batch, cfg, torch.Generator().manual_seed(0))
        assert per_sample.shape == (4,) and torch.isfinite(per_sample).all()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses  # measured 2.52 -> 1.25


def test_attention_gets_one_dtype_when_autocast_keeps_rmsnorm_in_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA, autocast runs RMSNorm in fp32 while v comes out of a bf16 linear: q and k reached
    attention as fp32 with bf16 v, which the fused kernels refuse. CPU autocast keeps RMSNorm in bf16,
    so the CUDA behaviour is imitated here by norms that return fp32."""
    import training.wan as wan_module

    model = tiny_wan()
    for block in model.blocks:
        for attn in (block.attn1, block.attn2):
            for norm in (attn.norm_q, attn.norm_k):
                monkeypatch.setattr(norm, "forward", lambda x, f=norm.forward: f(x).float())
    seen = []
    real = wan_module.attention

    def spy(q, k, v, *args, **kw):  # noqa: ANN001, ANN002, ANN003
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, *args, **kw)

    monkeypatch.setattr(wan_module, "attention", spy)
    latents, texts, t = samples()
    packed = PackedWan(model, backend="sdpa_segments")
    batch = pack(latents, texts, packed.patch, budget=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = packed(batch.tokens, t, batch)
    assert len(seen) == 4 and all(d == (torch.bfloat16,) * 3 for d in seen)  # self + cross, 2 blocks
    assert torch.isfinite(out).all()


def test_rope_stays_fp32_when_the_module_is_cast_to_bf16() -> None:
    """DeepSpeed's bf16 mode casts every buffer, diffusers' rope tables too; positions far along an
    axis then rotate by visibly wrong angles. PackedWan keeps its own fp32 tables."""
    model = tiny_wan()
    packed = PackedWan(model, backend="sdpa_segments")
    latents, texts, _ = samples()
    batch = pack(latents, texts, packed.patch, budget=64)
    before = packed.rope(batch)
    packed.bfloat16()
    after = packed.rope(batch)
    assert model.rope.freqs_cos.dtype == torch.bfloat16  # what the cast did to diffusers' buffers
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(after, before))
