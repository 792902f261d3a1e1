"""training/parallel.apply_compile: per-block torch.compile, one graph for packs of any length."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from training.model import DIT_MODELS
from training.packing import pack
from training.parallel import apply_activation_checkpointing, apply_compile


def packs() -> list:
    out = []
    for n in (2, 3, 5, 7):  # four token counts and segment layouts, padding included
        g = torch.Generator().manual_seed(n)
        out.append(pack([torch.randn(4, 1, 4, 2 * n, generator=g), torch.randn(4, 2, 2, 2, generator=g)],
                        [torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g)], (1, 2, 2), 64))
    return out


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = DIT_MODELS["DiT-tiny"](in_channels=4, text_dim=8, depth=1)
    with torch.no_grad():
        for p in m.parameters():  # away from adaLN-Zero's all-zero output
            p.normal_(0.0, 0.2)
    return m


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_match_eager_with_no_recompiles_after_warmup(checkpointing: bool) -> None:
    torch._dynamo.reset()
    eager, compiled = model(), apply_compile(apply_activation_checkpointing(model(), checkpointing))
    t = torch.tensor([0.3, 0.6])
    batches = packs()
    for i, batch in enumerate(batches):
        outs = []
        for m in (eager, compiled):
            m.zero_grad()
            # After the first pack compiled, a new graph for another length is an error.
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                out = m(batch.tokens, t, batch)
                out.square().mean().backward()
            outs.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
        (a, ga), (b, gb) = outs
        assert (a - b).abs().max() < 1e-5 * max(1.0, float(a.abs().max())), i
        assert all((x - y).abs().max() < 1e-4 * max(1.0, float(x.abs().max())) for x, y in zip(ga, gb)), i
    assert set(eager.state_dict()) == set(compiled.state_dict())  # checkpoints keep their keys


def test_compiled_blocks_with_flex_masks_do_not_recompile_per_pack() -> None:
    """The flex backend caches its block masks; the cache must stay out of the compiled graph (a dict
    argument keyed by pointers would be guarded on and recompile for every pack)."""
    torch._dynamo.reset()
    m = apply_compile(model(), backend="eager")
    m.cfg.attn_backend = "flex"
    t = torch.tensor([0.3, 0.6])
    with torch.no_grad():  # flex has no CPU backward
        for i, batch in enumerate(packs()):
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                try:
                    m(batch.tokens, t, batch)
                except NotImplementedError as e:  # noqa: PERF203 — availability probe
                    pytest.skip(f"FlexAttention does not run on CPU here: {e}")


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_wan_matches_eager_with_one_graph_for_all_blocks_and_packs(checkpointing: bool) -> None:
    """run.compile with model.kind wan: the packed block function compiles once (both blocks, three
    packs of other lengths and layouts, no recompiles), with eager-equal outputs and gradients."""
    from training.wan import PackedWan

    from .test_wan import samples, tiny_wan

    torch._dynamo.reset()
    eager, compiled = PackedWan(tiny_wan(), backend="sdpa_segments"), PackedWan(tiny_wan(), backend="sdpa_segments")
    apply_activation_checkpointing(compiled, checkpointing)
    apply_compile(compiled, backend="eager")
    latents, texts, t = samples()
    frames = torch._dynamo.utils.counters["frames"]
    frames.clear()
    for i, keep in enumerate(([0, 1], [2, 3, 1], [3, 0])):  # three packs: other token counts and layouts
        batch = pack([latents[k] for k in keep], [texts[k] for k in keep], eager.patch, 4096)
        outs = []
        for m in (eager, compiled):
            m.zero_grad()
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                out = m(batch.tokens, t[keep], batch)
                out.square().mean().backward()
            outs.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
        (a, ga), (b, gb) = outs
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert all(torch.allclose(y, x, rtol=1e-4, atol=1e-5) for x, y in zip(ga, gb)), i
    assert set(eager.state_dict()) == set(compiled.state_dict())
    # The blocks share the compiled frames: a one-block Wan compiles as many (graph breaks at the
    # CPU attention's per-segment loop make several frames per block call).
    two = frames["ok"]
    torch._dynamo.reset()
    frames.clear()
    from diffusers import WanTransformer3DModel

    from .test_wan import TINY
    assert TINY["num_layers"] == 2
    one = PackedWan(WanTransformer3DModel(**dict(TINY, num_layers=1)), backend="sdpa_segments")
    apply_activation_checkpointing(one, checkpointing)
    apply_compile(one, backend="eager")
    batch = pack([latents[0], latents[1]], [texts[0], texts[1]], one.patch, 4096)
    one(batch.tokens, t[:2], batch).square().mean().backward()
    assert 0 < frames["ok"] == two, (frames["ok"], two)
