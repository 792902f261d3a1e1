"""open_clip wrapper shared by the pipeline (captions, text conditioning) and eval (CLIP score).

`load_clip(ClipConfig)` gives a `ClipModel` with batched torch-only image preprocessing,
L2-normalised image/text embeddings, and per-token text states + padding mask for the
DiT's cross-attention. Weights are a local checkpoint file or seeded random init
("random-init"); hub tags are refused so nothing is ever downloaded. The "tiny" arch is a
2-layer, width-64 CLIP registered with open_clip's model-config registry at import time.
"""

from __future__ import annotations

import difflib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from einops import rearrange
from open_clip.transformer import TextTransformer

from pipeline.vae import state_dict_sha256

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # open_clip's names
IMAGE_BATCH = 256  # images per visual-tower call: bounds activation memory for long clips

# ---------------------------------------------------------------------------
# The tiny arch, registered under a name unlikely to clash with open_clip's own
# ---------------------------------------------------------------------------

TINY_ARCH = "ditharos-tiny"
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    # the standard 49408 vocab + 77 context so open_clip's bundled SimpleTokenizer applies
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _register_tiny() -> None:
    if TINY_ARCH in open_clip.list_models():
        return
    # add_model_config takes a path (it rescans files), so the config goes through a temp JSON;
    # the registry keeps what it read, and later rescans skip a path that is gone, so the folder
    # is removed at once (every importing process used to leave one behind).
    with tempfile.TemporaryDirectory(prefix="ditharos-clip-") as tmp:
        path = Path(tmp) / f"{TINY_ARCH}.json"
        path.write_text(json.dumps(TINY_CONFIG))
        open_clip.add_model_config(path)


_register_tiny()


@dataclass
class ClipConfig:
    """Which CLIP to load: open_clip arch name (or "tiny") + local weights or random init."""

    arch: str = "tiny"  # open_clip model name ("ViT-B-32", "ViT-L-14", ...) or "tiny"
    weights: str = "random-init"  # or a local checkpoint file (never a hub tag)
    seed: int = 0  # random-init seed: same (arch, seed) -> bit-identical weights in every process
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def validate(self) -> None:
        name = TINY_ARCH if self.arch == "tiny" else self.arch
        if name not in open_clip.list_models():
            close = difflib.get_close_matches(self.arch, open_clip.list_models(), n=5)
            raise ValueError(
                f"clip.arch {self.arch!r} is not an open_clip model; 'tiny' or e.g. {close or ['ViT-B-32']}"
            )


class ClipModel:
    """An open_clip CLIP with batched preprocessing and per-token text outputs."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, cfg: ClipConfig, weights: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.weights = weights
        self.device = next(model.parameters()).device
        self.input_dtype = DTYPES[cfg.dtype]
        # CLIP keeps the text tower on the model itself; CustomTextCLIP nests it in .text
        self.text_tower = model.text if isinstance(getattr(model, "text", None), TextTransformer) else model
        if not hasattr(self.text_tower, "token_embedding") or getattr(self.text_tower, "cls_emb", None) is not None:
            raise ValueError(f"clip.arch {cfg.arch!r}: only the standard CLIP text transformer is supported")
        self.pad_id = int(getattr(self.text_tower, "pad_id", 0))  # SimpleTokenizer pads with 0
        pp = open_clip.get_model_preprocess_cfg(model)
        size = pp["size"]
        if isinstance(size, (tuple, list)):
            if size[0] != size[1]:
                raise ValueError(f"clip.arch {cfg.arch!r}: non-square input size {size} is not supported")
            size = size[0]
        if pp.get("resize_mode", "shortest") not in ("shortest", "squash"):
            raise ValueError(f"clip.arch {cfg.arch!r}: resize_mode {pp['resize_mode']!r} is not supported")
        self.resize_mode = pp.get("resize_mode", "shortest")
        self.interpolation = "bilinear" if pp.get("interpolation") == "bilinear" else "bicubic"
        self.image_size = int(size)
        self.mean = torch.tensor(pp["mean"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(pp["std"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.context_length = int(self.text_tower.context_length)
        self.text_width = int(self.text_tower.transformer.width)
        self.embed_dim = int(self.embed_texts(["a"]).shape[-1])  # robust to towers without output_dim
        self._sha: str | None = None

    # --- images ---------------------------------------------------------------

    def preprocess(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> normalised float32 (N, 3, S, S), as open_clip's eval transform does."""
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(np.ascontiguousarray(frames))
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 (N, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
        x = rearrange(frames.to(self.device), "n h w c -> n c h w").float() / 255.0  # (N, 3, H, W) in [0, 1]
        h, w = x.shape[-2:]
        s = self.image_size
        if self.resize_mode == "squash":
            size = (s, s)
        else:  # shortest side -> s, long side truncated like torchvision's Resize(int)
            size = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode=self.interpolation, antialias=True, align_corners=False)
            x = x.clamp(0.0, 1.0)  # bicubic overshoots; PIL's uint8 output is clipped the same way
        top, left = round((x.shape[-2] - s) / 2.0), round((x.shape[-1] - s) / 2.0)  # torchvision's crop offsets
        x = x[:, :, top : top + s, left : left + s]  # (N, 3, S, S)
        return (x - self.mean) / self.std

    # no_grad, not inference_mode: callers (e.g. training's text conditioning) feed these
    # outputs into autograd graphs, which refuse inference tensors
    @torch.no_grad()
    def embed_images(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3), any H and W -> L2-normalised float32 (N, embed_dim)."""
        frames = torch.as_tensor(frames)
        if frames.ndim == 4 and frames.shape[0] == 0:
            return torch.zeros(0, self.embed_dim, device=self.device)
        out = []
        for chunk in frames.split(IMAGE_BATCH):
            x = self.preprocess(chunk).to(self.input_dtype)  # (n, 3, S, S)
            out.append(self.model.encode_image(x).float())  # (n, D)
        return F.normalize(torch.cat(out), dim=-1)

    # --- texts ----------------------------------------------------------------

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids (N, context_length), SOT ... EOT then pad_id."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of strings")
        return self.tokenizer(list(texts)).to(self.device)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """(N,) strings -> L2-normalised float32 (N, embed_dim)."""
        return F.normalize(self.model.encode_text(self.tokenize(texts)).float(), dim=-1)

    @torch.no_grad()
    def _token_states(self, tokens: torch.Tensor) -> torch.Tensor:
        # the first half of open_clip's CLIP.encode_text, stopping before pooling/projection
        t = self.text_tower
        cast_dtype = t.transformer.get_cast_dtype()
        x = t.token_embedding(tokens).to(cast_dtype)  # (N, L, W)
        x = x + t.positional_embedding.to(cast_dtype)  # (N, L, W)
        x = t.transformer(x, attn_mask=t.attn_mask)  # (N, L, W), causal: real tokens never see padding
        return t.ln_final(x)  # (N, L, W)

    def text_tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token final text states (N, L, text_width) float32 and mask (N, L), True = real token."""
        tokens = self.tokenize(texts)  # (N, L)
        return self._token_states(tokens).float(), tokens != self.pad_id

    # --- provenance -----------------------------------------------------------

    def fingerprint(self) -> dict[str, Any]:
        """What produced the embeddings: arch, weights source + hash, text sizes."""
        if self._sha is None:
            self._sha = state_dict_sha256(self.model)
        return {
            "arch": self.cfg.arch,
            "weights": self.weights,
            "seed": self.cfg.seed if self.weights == "random-init" else None,
            "dtype": self.cfg.dtype,
            "weights_sha256": self._sha,
            "context_length": self.context_length,
            "text_width": self.text_width,
            "embed_dim": self.embed_dim,
        }


def load_clip(cfg: ClipConfig, device: str | torch.device = "cpu") -> ClipModel:
    """Build the ClipModel that `cfg` names, on `device`, in eval mode."""
    cfg.validate()
    name = TINY_ARCH if cfg.arch == "tiny" else cfg.arch
    kwargs: dict[str, Any] = dict(precision=PRECISION[cfg.dtype], device=device, pretrained_text=False)
    if cfg.weights == "random-init":
        # open_clip initialises weights in its constructors from the global RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = open_clip.create_model(name, pretrained=None, **kwargs)
        weights = "random-init"
    else:
        path = Path(cfg.weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"clip.weights {cfg.weights!r} is not a file; give a local open_clip checkpoint "
                f"(hub tags are not downloaded) or 'random-init'"
            )
        # an absolute path can never be mistaken for a pretrained tag (which would download)
        weights = str(path.resolve())
        model = open_clip.create_model(name, pretrained=weights, **kwargs)
    return ClipModel(model, open_clip.get_tokenizer(name), cfg, weights)


__all__ = ["ClipConfig", "ClipModel", "TINY_ARCH", "TINY_CONFIG", "load_clip"]
