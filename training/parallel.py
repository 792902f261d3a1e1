"""Training-time transforms applied to a VideoDiT from outside the model file.

`apply_activation_checkpointing(model)` recomputes each DiT block's activations in the
backward pass instead of storing them (torchtitan style: wrap blocks, keep the model
file architecture-only). State-dict keys are unchanged by the wrapping.
"""

from __future__ import annotations

from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper

from training.model import VideoDiT


def apply_activation_checkpointing(model: VideoDiT, enabled: bool = True) -> VideoDiT:
    """Wrap (or, with enabled=False, unwrap) every block in non-reentrant activation checkpointing."""
    for i, block in enumerate(model.blocks):
        inner = block._checkpoint_wrapped_module if isinstance(block, CheckpointWrapper) else block
        model.blocks[i] = checkpoint_wrapper(inner) if enabled else inner
    return model
