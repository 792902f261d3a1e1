"""The text encoder whose per-token states condition the DiT, chosen apart from the captioner.

* `clip` — the caption stage's own CLIP text tower (pipeline/clip_model.py): one model ranks
  captions and encodes them (77 tokens, the CLIP text width).
* `umt5` — transformers' `UMT5EncoderModel` and its tokenizer, what Wan conditions on
  (umT5-XXL: 4,096 wide, up to 512 tokens), from a local folder (`path`: a Wan diffusers
  checkpoint's root holding `text_encoder/` + `tokenizer/`, or one folder holding both), or the
  random-init preset `tiny-umt5` for tests and the demo (a 2-layer umT5 with byte-level
  ByT5 tokenisation, which needs no vocabulary file). CLIP still ranks and scores captions.

States are what diffusers' `WanPipeline` feeds its transformer: the encoder's last hidden
states of the real tokens, zero beyond each caption's length, padded to `max_tokens`; the mask
marks the real ones. Nothing is downloaded: folders are read with `local_files_only`.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline import storage
from pipeline.vae import state_dict_sha256

KINDS = ("clip", "umt5")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# diffusers-test-sized umT5 (its tiny Wan pipeline tests use a 32-wide T5 encoder); vocab = ByT5's 384
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-umt5": dict(vocab_size=384, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gelu_new"),
}


@dataclass
class TextEncoderConfig:
    """Which model's token states the shards carry for the DiT (`text_embedding`, `text_mask`)."""

    kind: Literal["clip", "umt5"] = "clip"
    path: str = ""  # kind umt5: a local folder; "" -> the random-init `preset`
    preset: str = "tiny-umt5"
    seed: int = 0  # random-init seed
    max_tokens: int = 512  # kind umt5: tokens kept (Wan: 512); longer captions are cut
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"text_encoder.kind={self.kind!r} is not one of {list(KINDS)}")
        if self.kind == "umt5" and not self.path and self.preset not in PRESETS:
            raise ValueError(f"text_encoder.preset={self.preset!r} is not one of {list(PRESETS)}")
        if self.max_tokens < 1:
            raise ValueError(f"text_encoder.max_tokens must be >= 1, got {self.max_tokens}")


class UMT5Text:
    """umT5 encoder + tokenizer: captions -> per-token states (N, max_tokens, D) and masks."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, cfg: TextEncoderConfig, weights: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.weights = weights  # "random-init" or the local folder
        self.device = next(model.parameters()).device
        self.context_length = cfg.max_tokens
        self.text_width = int(model.config.d_model)
        self._sha: str | None = None

    def token_count(self, text: str) -> int:
        """Tokens of `text` with the end token, before cutting to max_tokens."""
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    @torch.no_grad()
    def text_tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token final states (N, max_tokens, D) float32, zero past each text's tokens, and mask (N, max_tokens)."""
        enc = self.tokenizer(list(texts), padding="max_length", max_length=self.cfg.max_tokens, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)  # (N, L)
        states = self.model(ids, attention_mask=mask).last_hidden_state.float()  # (N, L, D)
        return states * mask[..., None], mask.bool()  # as WanPipeline: states of the real tokens, zeros after

    def fingerprint(self) -> dict[str, Any]:
        if self._sha is None:
            self._sha = state_dict_sha256(self.model) if self.weights == "random-init" else files_sha256(self.weights)
        return _fingerprint(self.cfg, self.weights, self._sha, self.text_width)


def _fingerprint(cfg: TextEncoderConfig, weights: str, sha: str, width: int) -> dict[str, Any]:
    init = weights == "random-init"
    return {"kind": "umt5", "weights": weights, "preset": cfg.preset if init else None,
            "seed": cfg.seed if init else None, "dtype": cfg.dtype, "weights_sha256": sha,
            "context_length": cfg.max_tokens, "text_width": width}


def files_sha256(folder: str | Path) -> str:
    """sha256 over a model folder's weight files (name + bytes, sorted): a 4.7B umT5-XXL is hashed
    from disk (~11 GB read) instead of being loaded on the driver just to fingerprint it."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise ValueError(f"{folder}: no *.safetensors / *.bin weight files")
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(8 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def describe(cfg: TextEncoderConfig, clip_fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The text encoder's fingerprint for the manifest, without loading a large model (the driver's):
    kind clip is the captioner's CLIP; a umT5 folder is hashed from its files; a preset is built."""
    cfg.validate()
    if cfg.kind == "clip":
        return dict(clip_fingerprint, kind="clip")
    if not cfg.path:
        return load_umt5(cfg).fingerprint()
    model_dir, _ = _folders(cfg.path)
    width = int(json.loads((model_dir / "config.json").read_text())["d_model"])
    return _fingerprint(cfg, str(model_dir), files_sha256(model_dir), width)


def config_of(fingerprint: dict[str, Any]) -> TextEncoderConfig:
    """The TextEncoderConfig that rebuilds a recorded umT5 (sampling reads it from the manifest)."""
    init = fingerprint["weights"] == "random-init"
    return TextEncoderConfig(kind="umt5", path="" if init else fingerprint["weights"],
                             preset=fingerprint.get("preset") or "tiny-umt5", seed=fingerprint.get("seed") or 0,
                             max_tokens=int(fingerprint["context_length"]), dtype=fingerprint.get("dtype", "float32"))


def _folders(path: str) -> tuple[Path, Path]:
    """(encoder folder, tokenizer folder) of a Wan diffusers root, or one folder holding both."""
    root = Path(path)
    if (root / "text_encoder" / "config.json").is_file():
        return root / "text_encoder", root / "tokenizer"
    if (root / "config.json").is_file():
        return root, root
    raise ValueError(f"text_encoder.path={path!r} holds neither a umT5 config.json nor text_encoder/config.json")


def load_umt5(cfg: TextEncoderConfig, device: str | torch.device = "cpu") -> UMT5Text:
    """The umT5 that `cfg` names (kind umt5), on `device`, in eval mode."""
    from transformers import AutoTokenizer, ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    cfg.validate()
    if cfg.path:
        model_dir, tok_dir = _folders(cfg.path)
        model = UMT5EncoderModel.from_pretrained(str(model_dir), local_files_only=True, torch_dtype=DTYPES[cfg.dtype])
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        weights = str(model_dir)
    else:
        with torch.random.fork_rng(devices=[]):  # seeded init without moving the caller's RNG stream
            torch.manual_seed(cfg.seed)
            model = UMT5EncoderModel(UMT5Config(**PRESETS[cfg.preset])).to(DTYPES[cfg.dtype])
        tokenizer = ByT5Tokenizer()
        weights = "random-init"
    return UMT5Text(model.to(device), tokenizer, cfg, weights)


# ---------------------------------------------------------------------------
# The null text: the encoder's states of "" (a pretrained backbone's unconditional text)
# ---------------------------------------------------------------------------

NULL_TEXT_DIR = "_state/null_text"


def null_text_uri(out_uri: str, weights_sha256: str) -> str:
    """Where an output keeps its text encoder's states of "" (one small file per encoder)."""
    return storage.join(out_uri, NULL_TEXT_DIR, f"{weights_sha256[:16]}.npy")


def write_null_text(uri: str, encoder: Any) -> None:
    """Store `encoder`'s states of "" at `uri` once: its real tokens (n, D) float16, as the shards
    store captions (umT5: the end token, 8 KiB; CLIP: start + end). Every caption actor may race
    to write it; each writes the same bytes atomically, so any one of them wins."""
    if storage.exists(uri):
        return
    states, mask = encoder.text_tokens([""])  # (1, L, D), (1, L)
    tokens = states[0][mask[0].bool()].float().cpu().numpy().astype(np.float16)  # (n, D)
    buf = io.BytesIO()
    np.save(buf, tokens, allow_pickle=False)
    storage.write_bytes_atomic(uri, buf.getvalue())


def read_null_text(data_uri: str, manifest: dict[str, Any]) -> np.ndarray | None:
    """The data's text encoder's states of "" (n, D) float16, or None when the output has none."""
    sha = manifest["fingerprint"]["models"].get("text_encoder", {}).get("weights_sha256")
    uri = null_text_uri(data_uri, sha) if sha else None
    if uri is None or not storage.exists(uri):
        return None
    try:
        tokens = np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{uri}: unreadable null text ({e}); delete it and re-run the pipeline") from None
    width = manifest["fingerprint"]["models"]["text_encoder"].get("text_width")
    if tokens.ndim != 2 or not len(tokens) or (width and tokens.shape[1] != width):
        raise ValueError(f"{uri}: null text of shape {tokens.shape}, expected (n >= 1, {width}); "
                         "delete it and re-run the pipeline")
    return tokens
