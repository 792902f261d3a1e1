"""Pluggable clip captioning: pick the caption whose CLIP text embedding best matches the clip.

`make_captioner(CaptionConfig, ClipModel)` returns a `Captioner`. The one built-in,
`ClipRankCaptioner`, ranks candidates = the clip's sidecar captions (if any) + every
template x vocabulary phrase, by 100 * cosine between the text embedding and the clip's
mean keyframe embedding. A VLM captioner can slot in later behind the same Protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch

from pipeline.aesthetic import AestheticConfig
from pipeline.clip_model import ClipConfig, ClipModel

DEFAULT_TEMPLATES = [
    "a video of {}",
    "footage of {}",
    "a clip showing {}",
    "a shot of {}",
]
DEFAULT_VOCABULARY = [
    "people riding bikes", "people walking", "a crowd of people", "a person talking", "a person dancing",
    "children playing", "a man cooking", "a woman running", "a cartoon rabbit", "a cartoon character",
    "an animated scene", "a dog", "a cat", "birds flying", "fish swimming", "horses running",
    "a city street", "traffic on a highway", "a car interior", "a train", "an airplane", "a boat on water",
    "a forest", "a mountain landscape", "a beach with waves", "the ocean", "a river", "a waterfall",
    "a desert", "snow falling", "clouds in the sky", "a sunset", "a night sky", "a field of grass",
    "flowers", "a kitchen", "an office", "a living room", "a sports game", "a concert",
    "text on a screen", "a video game",
]


@dataclass
class CaptionConfig:
    """How clips get captions."""

    captioner: Literal["clip_rank"] = "clip_rank"  # the interface allows a VLM captioner later
    clip: ClipConfig = field(default_factory=ClipConfig)
    num_keyframes: int = 3  # frames per clip whose mean CLIP embedding stands for the clip
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))  # each has one "{}"
    vocabulary: list[str] = field(default_factory=lambda: list(DEFAULT_VOCABULARY))
    use_sidecar: bool = True  # rank captions from each video's sidecar file alongside the templates
    # the aesthetic head scores the same mean image embedding (pipeline/aesthetic.py)
    aesthetic: AestheticConfig = field(default_factory=AestheticConfig)

    def validate(self) -> None:
        if self.num_keyframes < 1:
            raise ValueError(f"captions.num_keyframes must be >= 1, got {self.num_keyframes}")
        bad = [t for t in self.templates if t.count("{}") != 1]
        if bad:
            raise ValueError(f"captions.templates must each contain exactly one '{{}}', bad: {bad}")
        if not self.templates or not self.vocabulary:
            raise ValueError("captions.templates and captions.vocabulary must be non-empty")


@dataclass
class CaptionResult:
    """One clip's chosen caption and the evidence for it."""

    caption: str
    score: float  # 100 * cosine(clip's mean image embedding, caption's text embedding)
    source: str  # "sidecar" or "template"
    image_embedding: np.ndarray  # (embed_dim,) float32, mean of keyframe embeddings, re-normalised


class Captioner(Protocol):
    """Anything that turns clips' keyframes (+ sidecar candidates) into captions."""

    def caption(self, keyframes: list[np.ndarray], sidecars: list[list[str]]) -> list[CaptionResult]: ...


# ---------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------


def keyframe_indices(num_frames: int, k: int) -> list[int]:
    """k evenly spaced, centred, distinct frame indices in [0, num_frames); all frames if k >= num_frames."""
    if num_frames < 1 or k < 1:
        raise ValueError(f"need num_frames >= 1 and k >= 1, got num_frames={num_frames}, k={k}")
    if k >= num_frames:
        return list(range(num_frames))
    # centre of each of k equal segments; segments are >= 1 frame wide so indices are distinct
    return [int((i + 0.5) * num_frames / k) for i in range(k)]


def clip_image_embedding(frame_embeddings: torch.Tensor) -> torch.Tensor:
    """(K, D) normalised keyframe embeddings -> (D,) normalised mean."""
    return torch.nn.functional.normalize(frame_embeddings.float().mean(0), dim=-1)


TIE_TOLERANCE = 1e-4  # in score units (100 · cosine); float32 rounding of a 100·cos is ~1e-5


def rank_candidates(image_embedding: torch.Tensor, text_embeddings: torch.Tensor) -> tuple[int, float]:
    """Index and score (100 * cosine) of the best of (M, D) normalised text embeddings.

    Ties go to the lowest index, so callers list preferred candidates (sidecars) first. Scores
    within TIE_TOLERANCE of the best count as tied: the same text scored in another row of the
    product can differ in its last bits (BLAS blocking depends on the row, the CPU and threads).
    """
    scores = 100.0 * (text_embeddings.float() @ image_embedding.float())  # (M,)
    best = int(torch.nonzero(scores >= scores.max() - TIE_TOLERANCE)[0])  # first of the (near-)maxima
    return best, float(scores[best])


# ---------------------------------------------------------------------------
# CLIP ranking captioner
# ---------------------------------------------------------------------------


class ClipRankCaptioner:
    """Chooses, per clip, the best-scoring of its sidecar captions and all template phrases."""

    def __init__(self, clip: ClipModel, cfg: CaptionConfig) -> None:
        cfg.validate()
        self.clip = clip
        self.cfg = cfg
        self.template_texts = [t.format(v) for t in cfg.templates for v in cfg.vocabulary]
        # the template set is the same for every clip: embed it once per worker
        self.template_embeddings = clip.embed_texts(self.template_texts)  # (P, D)
        self.template_by_text = dict(zip(self.template_texts, self.template_embeddings))

    def caption(self, keyframes: list[np.ndarray], sidecars: list[list[str]]) -> list[CaptionResult]:
        """keyframes[i]: uint8 (K, H, W, 3) of clip i; sidecars[i]: its sidecar captions (maybe empty)."""
        if len(keyframes) != len(sidecars):
            raise ValueError(f"got {len(keyframes)} clips of keyframes but {len(sidecars)} sidecar lists")
        for i, frames in enumerate(keyframes):
            if frames.ndim != 4 or frames.shape[0] == 0:
                raise ValueError(f"clip {i}: keyframes must be (K>=1, H, W, 3), got {frames.shape}")
        # blank sidecar lines are not captions; duplicates would only repeat work
        sidecars = [list(dict.fromkeys(t.strip() for t in texts if t.strip())) for texts in sidecars]
        if not self.cfg.use_sidecar:
            sidecars = [[] for _ in keyframes]
        # embed every distinct sidecar caption of the batch in one text-tower call
        # (a sidecar that repeats a template phrase reuses its embedding: same text, same bits)
        unique = sorted({s for texts in sidecars for s in texts} - self.template_by_text.keys())
        sidecar_emb = dict(zip(unique, self.clip.embed_texts(unique))) if unique else {}
        sidecar_emb.update(self.template_by_text)
        results = []
        for frames, texts in zip(keyframes, sidecars):
            # frames of one clip share a size; different clips may not, so embed clip by clip
            image = clip_image_embedding(self.clip.embed_images(frames))  # (D,)
            candidates = [sidecar_emb[t] for t in texts]
            text_emb = self.template_embeddings  # (P, D)
            if candidates:
                text_emb = torch.cat([torch.stack(candidates), text_emb])  # (S + P, D)
            best, score = rank_candidates(image, text_emb)  # sidecars first: they win ties
            is_sidecar = best < len(texts)
            results.append(
                CaptionResult(
                    caption=texts[best] if is_sidecar else self.template_texts[best - len(texts)],
                    score=score,
                    source="sidecar" if is_sidecar else "template",
                    image_embedding=image.cpu().numpy().astype(np.float32),
                )
            )
        return results


def make_captioner(cfg: CaptionConfig, clip: ClipModel) -> Captioner:
    """The captioner `cfg.captioner` names, using the already-loaded `clip`."""
    if cfg.captioner == "clip_rank":
        return ClipRankCaptioner(clip, cfg)
    raise ValueError(f"captions.captioner {cfg.captioner!r} is not one of ['clip_rank']")


__all__ = [
    "CaptionConfig",
    "CaptionResult",
    "Captioner",
    "ClipRankCaptioner",
    "clip_image_embedding",
    "keyframe_indices",
    "make_captioner",
    "rank_candidates",
]
