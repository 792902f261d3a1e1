"""Training-time transforms applied to a VideoDiT from outside the model file.

`apply_activation_checkpointing(model)` recomputes each DiT block's activations in the
backward pass instead of storing them (torchtitan style: wrap blocks, keep the model
file architecture-only). State-dict keys are unchanged by the wrapping.

`apply_compile(model)` compiles each DiT block on its own with dynamic shapes (a PackedWan:
its packed block function, `PackedWan.compile_blocks`). Not the whole
model: its forward builds the text layout in a Python loop over segments, and every pack has
another token count and segment layout. Per block, token counts are symbolic (one graph for all
packs: no recompiles after the first), and the attention call's host-side integers stay
outside the graph (CPU's per-segment loop breaks it there; the fused CUDA kernels do not).
Inside a checkpoint wrapper the inner block is compiled, so the backward's recomputation runs
compiled too. State-dict keys are unchanged (`nn.Module.compile` compiles in place).
"""

from __future__ import annotations

from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper

from training.model import VideoDiT


def apply_compile(model: VideoDiT, backend: str = "inductor") -> VideoDiT:
    """torch.compile every block in place with dynamic shapes (`backend="eager"`: trace only)."""
    if hasattr(model, "compile_blocks"):  # PackedWan: diffusers' blocks run through its own function
        model.compile_blocks(backend)
        return model
    for block in model.blocks:
        inner = block._checkpoint_wrapped_module if isinstance(block, CheckpointWrapper) else block
        inner.compile(dynamic=True, backend=backend)
    return model


def apply_activation_checkpointing(model: VideoDiT, enabled: bool = True) -> VideoDiT:
    """Wrap (or, with enabled=False, unwrap) every block in non-reentrant activation checkpointing.
    A PackedWan (training/wan.py) runs diffusers' blocks through its own method: it checkpoints that."""
    if hasattr(model, "checkpointing"):
        model.checkpointing = enabled
        return model
    for i, block in enumerate(model.blocks):
        inner = block._checkpoint_wrapped_module if isinstance(block, CheckpointWrapper) else block
        model.blocks[i] = checkpoint_wrapper(inner) if enabled else inner
    return model
