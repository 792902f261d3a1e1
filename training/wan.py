"""Wan 2.1 / 2.2 text-to-video (diffusers' `WanTransformer3DModel`) on packed sequences.

The weights stay diffusers' own module — loaded with `from_pretrained` from a local folder, or
built from a config with random init for tests — so a fine-tuned model exports back unchanged.
Only the forward is ours, with the native DiT's signature (`model(x, t, batch, text_drop)` on a
`training.packing.PackedBatch`): diffusers runs a batch of equal-shaped clips against
equal-length text; here clips of different (T, H, W) share packs, and every clip

* attends only to its own tokens (self-attention) and its own text (cross-attention), zero-padded
  to 512 rows as Wan was trained (`WAN_TEXT_LEN`), through `training.attention` (varlen / flash /
  flex on the GPU, exact SDPA per segment on the CPU);
* gets RoPE from its own patch coordinates (`batch.positions`) in diffusers' rope tables;
* has its own timestep, so its own adaLN modulation (broadcast to its tokens, `model.per_token`).

Why not call diffusers' blocks on padded batches: padding a pack of mixed resolutions to the
largest clip wastes most of the attention FLOPs (NaViT's argument), and diffusers' processor
has no segment masks. The math per block is diffusers' (`WanTransformerBlock.forward`), kept
in the same fp32 islands (norms, modulation, gates), so a packed forward of several clips
equals diffusers' forward of each clip alone (tests/training/test_wan.py, fp32, with gradients).

Time: DiTharos's rectified flow (x_t = (1 − t)·x0 + t·noise, target noise − x0) is Wan's flow
matching with sigma = t, and diffusers' Wan takes timestep = 1000·sigma.

LoRA (`add_lora`): peft adapters through diffusers' own `add_adapter`, so the factors are
diffusers' LoRA layers and export as a WanPipeline LoRA file. Not covered yet (issue 15):
image-conditioned Wan (I2V, `added_kv_proj_dim`), Wan 2.2 TI2V's per-token timesteps.

The null text (a caption dropped for classifier-free guidance in training, the unconditional
branch in sampling) is the data's text encoder's encoding of "" — what WanPipeline's default
negative prompt gives: umT5's end token, then zero rows to 512. The pipeline stores it once per
output (`pipeline.text_encoder.read_null_text`); without it (`null_text=None`) a dropped caption
sees 512 zero rows. Training, sampling and eval: `model.kind: wan` (training/backbone.py);
export: training/export.py.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from training.attention import attention
from training.model import per_token, sample_onehot
from training.packing import PackedBatch, num_patches, text_layout

TIMESTEP_SCALE = 1000.0  # diffusers' Wan timestep for flow time t
# Wan attends to its text context zero-padded to 512 rows (the original code's text_len, WanPipeline's
# max_sequence_length): the zero rows are keys and values too (to_k / to_v biases), so a clip's text is
# padded the same here, else a pretrained Wan would see another context than the one it learned.
WAN_TEXT_LEN = 512

# diffusers' own test sizes for WanTransformer3DModel (its tests/models/transformers/test_models_transformer_wan.py);
# in_channels / out_channels / text_dim come from the shards.
WAN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-wan": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, freq_dim=256, ffn_dim=32,
                     num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
}


# LoRA targets (peft module-name suffixes): q, k, v, out of self- and cross-attention and both
# FFN matrices of every block — what Wan LoRA trainers (musubi-tuner, diffusers' scripts) adapt.
WAN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
LORA_BASE_SEED = 0  # a random-init preset's frozen base under LoRA is rebuilt from this seed (not saved)


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str]) -> None:
    """Freeze diffusers' Wan and add a trainable LoRA adapter (diffusers' `add_adapter`, i.e. peft)."""
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Interleaved-pair RoPE as diffusers' Wan processor: x (N, H, Dh), cos/sin (N, 1, Dh)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (N, H, Dh/2) each
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


class PackedWan(nn.Module):
    """diffusers' `WanTransformer3DModel` weights, run on a PackedBatch like `training.model.VideoDiT`."""

    def __init__(self, model: nn.Module, backend: str = "auto", null_text: Tensor | None = None,
                 text_len: int = WAN_TEXT_LEN) -> None:
        super().__init__()
        cfg = model.config
        if cfg.added_kv_proj_dim is not None or cfg.image_dim is not None:
            raise ValueError("image-conditioned Wan (I2V: added_kv_proj_dim / image_dim) is not supported; "
                             "use a text-to-video checkpoint")
        if any(b.attn1.fused_projections or b.attn2.fused_projections for b in model.blocks):
            raise ValueError("Wan attention with fused projections is not supported: call unfuse_qkv() first")
        self.model = model
        self.backend = backend
        self.patch = tuple(cfg.patch_size)
        self.heads = cfg.num_attention_heads
        self.checkpointing = False  # activation checkpointing per block (training.parallel)
        self._run_block = self._block  # torch.compile'd by `compile_blocks` (training.parallel.apply_compile)
        # fp32 copies of diffusers' rope tables, kept outside the module's buffers: DeepSpeed's bf16
        # mode casts every buffer, and cos/sin in bf16 would misplace positions (diffusers keeps rope fp32).
        self._rope_tables = (model.rope.freqs_cos.detach().float().clone(),
                             model.rope.freqs_sin.detach().float().clone())
        # Row 0: the zero row every clip's text is padded with; rows 1..: the encoded "" (none: the zero row).
        rows = [torch.zeros(1, cfg.text_dim)]
        if null_text is not None:
            if null_text.ndim != 2 or null_text.shape[1] != cfg.text_dim or not 0 < len(null_text) <= text_len:
                raise ValueError(f"null text of shape {tuple(null_text.shape)}: need (1..{text_len}, {cfg.text_dim})")
            rows.append(null_text.detach().float())
        self.register_buffer("null_text", torch.cat(rows), persistent=False)
        self.text_len = text_len  # each clip's text is zero-padded to this many rows, as Wan was trained

    def activation_floats_per_token(self) -> int:
        """Widths alive at once in one block (modulation 6·D + FFN hidden): the sampler's memory estimate."""
        c = self.model.config
        return 6 * c.num_attention_heads * c.attention_head_dim + c.ffn_dim

    def rope(self, batch: PackedBatch) -> tuple[Tensor, Tensor]:
        """Each token's (t, h, w) patch coordinates → (N, 1, Dh) cos and sin from diffusers' rope tables."""
        r = self.model.rope
        longest = max((max(num_patches(s, self.patch)) for s in batch.shapes), default=0)  # host side: no sync
        if longest > r.max_seq_len:
            raise ValueError(f"a clip is {longest} patches long on one axis; this Wan's rope_max_seq_len "
                             f"is {r.max_seq_len}")
        split = [r.t_dim, r.h_dim, r.w_dim]
        device = batch.positions.device
        if self._rope_tables[0].device != device:
            self._rope_tables = tuple(t.to(device) for t in self._rope_tables)

        def by_coordinate(table: Tensor) -> Tensor:  # (max_seq_len, Dh) -> (N, 1, Dh): t, h, w parts
            parts = table.split(split, dim=1)
            return torch.cat([part[batch.positions[:, i]] for i, part in enumerate(parts)], -1)[:, None]

        return by_coordinate(self._rope_tables[0]), by_coordinate(self._rope_tables[1])

    def _attend(self, attn: nn.Module, x: Tensor, ctx: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int,
                max_k: int, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        q = attn.norm_q(attn.to_q(x)).unflatten(-1, (self.heads, -1))  # (N, H, Dh)
        k = attn.norm_k(attn.to_k(ctx)).unflatten(-1, (self.heads, -1))  # (M, H, Dh)
        v = attn.to_v(ctx).unflatten(-1, (self.heads, -1))  # (M, H, Dh)
        if rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        # Under CUDA autocast RMSNorm runs in fp32 while v is bf16; attention kernels take one dtype
        # (diffusers' own call goes through autocast's SDPA, which casts all three to bf16).
        q, k = q.to(v.dtype), k.to(v.dtype)
        o = attention(q, k, v, cu_q, cu_k, max_q, max_k, backend=self.backend).flatten(1)  # (N, H·Dh)
        return attn.to_out[1](attn.to_out[0](o.type_as(q)))

    def compile_blocks(self, backend: str = "inductor") -> None:
        """torch.compile the packed block function with dynamic shapes: one graph serves every block
        (their parameters are graph inputs) and every pack (token counts are symbolic); the rope,
        text layout and segment bookkeeping stay eager outside it. Inside activation checkpointing
        the recomputation runs compiled too. Parameters and state-dict keys are untouched."""
        self._run_block = torch.compile(self._block, dynamic=True, backend=backend)

    def _block(self, block: nn.Module, h_x: Tensor, tproj: Tensor, onehot: Tensor, text: Tensor,
               rope: tuple[Tensor, Tensor], seg: tuple[Tensor, int, Tensor, int]) -> Tensor:
        """diffusers' WanTransformerBlock.forward on packed tokens h_x (N, D); text (M, D) in segment order."""
        cu_x, max_x, cu_text, max_text = seg
        # per token: its sample's six modulation vectors, (N, D) each, fp32 as in diffusers
        rows = (block.scale_shift_table.float() + tproj.float()).flatten(1)  # (B+1, 6·D)
        shift, scale, gate, c_shift, c_scale, c_gate = per_token(rows, onehot).unflatten(1, (6, -1)).unbind(1)
        h = (block.norm1(h_x.float()) * (1 + scale) + shift).type_as(h_x)
        a = self._attend(block.attn1, h, h, cu_x, cu_x, max_x, max_x, rope)
        h_x = (h_x.float() + a * gate).type_as(h_x)
        h = block.norm2(h_x.float()).type_as(h_x)
        h_x = h_x + self._attend(block.attn2, h, text, cu_x, cu_text, max_x, max_text, None)
        h = (block.norm3(h_x.float()) * (1 + c_scale) + c_shift).type_as(h_x)
        return (h_x.float() + block.ffn(h).float() * c_gate).type_as(h_x)  # (N, D)

    def forward(self, x: Tensor, t: Tensor, batch: PackedBatch, text_drop: Tensor | list[bool] | None = None) -> Tensor:
        """
        x: (N, pt·ph·pw·C) noisy tokens laid out like batch.tokens
        t: (B,) flow time of each sample, 1 = pure noise
        text_drop: (B,) bool, samples whose text is replaced by the null text (CFG)
        Returns the velocity (noise − x0) per token, (N, pt·ph·pw·C_out).
        """
        m = self.model
        emb = m.condition_embedder
        drop = None if text_drop is None else [bool(d) for d in text_drop]
        layout = text_layout(batch, drop, self.null_text.shape[0], pad_to=self.text_len)
        # Conv3d with kernel = stride = patch is a linear map of each patch; tokens are (pt ph pw c).
        w = m.patch_embedding.weight.permute(0, 2, 3, 4, 1).flatten(1)  # (D, pt·ph·pw·C)
        h_x = nn.functional.linear(x.to(w.dtype), w, m.patch_embedding.bias)  # (N, D)
        ts = emb.timesteps_proj(torch.cat([t.float() * TIMESTEP_SCALE, t.new_zeros(1, dtype=torch.float32)]))
        t_dtype = next(iter(emb.time_embedder.parameters())).dtype
        temb = emb.time_embedder(ts.to(t_dtype)).type_as(h_x)  # (B+1, D): row B conditions padding
        tproj = emb.time_proj(emb.act_fn(temb)).unflatten(1, (6, -1))  # (B+1, 6, D)
        text = torch.cat([batch.text.to(h_x.dtype), self.null_text.to(h_x.dtype)])[layout.index]  # (M, Dt)
        text = emb.text_embedder(text)  # (M, D)
        onehot = sample_onehot(batch, torch.float32)  # (N, B+1), see per_token
        rope = self.rope(batch)
        seg = (batch.cu_seqlens, batch.max_seqlen, layout.cu_seqlens, layout.max_seqlen)
        for block in m.blocks:
            if self.checkpointing and torch.is_grad_enabled():  # recompute the block's activations in backward
                h_x = checkpoint(self._run_block, block, h_x, tproj, onehot, text, rope, seg, use_reentrant=False)
            else:
                h_x = self._run_block(block, h_x, tproj, onehot, text, rope, seg)
        rows = (m.scale_shift_table.float() + temb.float()[:, None]).flatten(1)  # (B+1, 2·D), fp32 as in diffusers
        shift, scale = per_token(rows, onehot).chunk(2, dim=1)  # (N, D) each
        h_x = (m.norm_out(h_x.float()) * (1 + scale) + shift).type_as(h_x)
        return m.proj_out(h_x)  # (N, pt·ph·pw·C_out)
