"""Aesthetic score: a LAION-style MLP head on the CLIP image embeddings the caption stage computes.

The head is the LAION "improved aesthetic predictor" architecture (Linear 768→1024→128→64→16→1
with dropout between the first layers), scoring an L2-normalised CLIP image embedding on a
~1–10 scale; its `nn.Sequential` keys (`layers.0`, `layers.2`, `layers.4`, `layers.6`,
`layers.7`) match the published `.pth` state dicts, so `aesthetic.weights` can name the
real file (e.g. `sac+logos+ava1-l14-linearMSE.pth` for ViT-L-14) on local disk. The input
width must equal the CLIP's embedding width. Without weights the head is seeded random init,
labelled `random-init` in the manifest: its numbers mean nothing, so no threshold is set on
it by default (`filter.aesthetic`; Open-Sora-Plan keeps LAION scores >= 4.75).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from pipeline.vae import state_dict_sha256


@dataclass
class AestheticConfig:
    """Which aesthetic head to load; `enabled: false` stores 0 and skips the head."""

    enabled: bool = True
    weights: str = "random-init"  # or a local .pth / .safetensors state dict of the LAION MLP
    seed: int = 0

    def validate(self) -> None:
        if self.weights != "random-init" and not Path(self.weights).is_file():
            raise ValueError(f"aesthetic.weights {self.weights!r} is not a local file (or 'random-init')")


class AestheticHead(torch.nn.Module):
    """LAION's aesthetic MLP: (N, D) normalised CLIP image embeddings → (N,) scores."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_dim, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)  # (N, D) -> (N,)


class Aesthetic:
    """A loaded head with its fingerprint."""

    def __init__(self, cfg: AestheticConfig, input_dim: int, device: str = "cpu") -> None:
        self.cfg = cfg
        if cfg.weights == "random-init":
            torch.manual_seed(cfg.seed)  # same (dim, seed) → the same head in every worker
            head = AestheticHead(input_dim)
        else:
            state = (load_file(cfg.weights) if cfg.weights.endswith(".safetensors")
                     else torch.load(cfg.weights, map_location="cpu", weights_only=True))
            width = state["layers.0.weight"].shape[1] if "layers.0.weight" in state else None
            if width != input_dim:
                raise ValueError(f"aesthetic.weights {cfg.weights!r} expects {width}-d embeddings; "
                                 f"the caption CLIP gives {input_dim}-d (the head must match the CLIP arch)")
            head = AestheticHead(input_dim)
            head.load_state_dict(state)
        self.head = head.eval().requires_grad_(False).to(device)
        self.device = device
        self._sha: str | None = None

    @torch.no_grad()
    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, D) image embeddings (renormalised here) → (N,) float32 scores."""
        x = torch.as_tensor(np.asarray(embeddings, np.float32), device=self.device)
        if not len(x):
            return np.zeros(0, np.float32)
        return self.head(torch.nn.functional.normalize(x, dim=-1)).float().cpu().numpy()

    def fingerprint(self) -> dict[str, Any]:
        if self._sha is None:
            self._sha = state_dict_sha256(self.head)
        random_init = self.cfg.weights == "random-init"
        return {"class": "LAION aesthetic MLP", "weights": self.cfg.weights, "seed": self.cfg.seed if random_init
                else None, "weights_sha256": self._sha}
