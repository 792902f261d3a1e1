"""Where a DeepSpeed ZeRO engine keeps this rank's fp32 master weights (for `training.ema`).

The only module reading DeepSpeed's internals: `master_fragments(engine, stage3, rank)` lists,
for every parameter under its state-dict name, the piece of the flattened parameter this rank
owns and the fp32 optimizer tensor (a view, updated in place by every optimizer step) holding
it. Fetched once after `deepspeed.initialize` / `load_checkpoint`: ZeRO-3's per-parameter
lookup synchronises a CUDA stream, so it is not something to call every step.

* ZeRO-1/2: DeepSpeed links each parameter that overlaps this rank's flat partition to its
  fp32 fragment (`param._hp_mapping`, the mapping its universal checkpoints and
  `safe_get_full_fp32_param` use); a parameter outside the partition has none here.
* ZeRO-3: each parameter's partition is `ds_tensor` (equal slices, padded at the end of the
  last); its fp32 master is `safe_get_local_fp32_param`.
Optimizer offload to NVMe (swapped partitions) is not supported: the views would move.
"""

from __future__ import annotations

from typing import Any

import torch

from training.ema import Fragment, param_items


def master_fragments(engine: Any, stage3: bool, rank: int) -> tuple[list[Fragment], list[torch.Tensor]]:
    """(fragments, fp32 master views) of this rank for every parameter of `engine.module`."""
    if stage3:
        from deepspeed.utils import safe_get_local_fp32_param
    fragments: list[Fragment] = []
    masters: list[torch.Tensor] = []
    for name, p in param_items(engine.module):
        if stage3:
            part = p.ds_tensor.numel()  # padded slice size, the same on every rank
            start = rank * part
            numel = max(0, min(part, p.ds_numel - start))
            master = safe_get_local_fp32_param(p).detach().reshape(-1)[:numel]
            fragments.append(Fragment(name, tuple(p.ds_shape), min(start, p.ds_numel), numel))
            masters.append(master)
            continue
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:  # the parameter lies wholly in other ranks' partitions
            fragments.append(Fragment(name, tuple(p.shape), 0, 0))
            masters.append(torch.zeros(0, dtype=torch.float32, device=p.device))
            continue
        address = mapping.lp_fragment_address
        fragments.append(Fragment(name, tuple(p.shape), int(address.start), int(address.numel)))
        masters.append(mapping.get_hp_fragment().detach().reshape(-1))
    return fragments, masters
