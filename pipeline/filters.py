"""Curation filters: thresholds on the per-clip scores of `pipeline/quality.py`, and border cropping.

A clip whose score falls outside its configured range is not captioned or encoded: the cut
stage turns it into a reject row with stage `filter`, the score's name and its value (and all
its scores, for the data card). Scores are checked in `SCORE_ORDER`, so a clip that fails
several is filed under the first — a frozen black clip counts as `black_fraction`, not motion.

Defaults are meant to pass ordinary footage and drop only what no training set wants; each
one says why. Scores that need motion (`motion`, `max_frame_diff`) are not checked on 1-frame
clips (stills, and 1-frame windows cut from video), which have none by construction.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from pipeline.decode import sample_frames
from pipeline.quality import border_box
from pipeline.text_overlay import TextConfig

BORDER_SAMPLES = 5  # frames spread over a source that must all show a bar for it to be cropped
BORDER_WIDTH_PX = 256  # they are decoded this wide: bars are found to ±1 px here, ±(W/256) px in full

# Scores in the order they are checked: what makes a clip useless first (black, blown out,
# frozen), then what makes it poor (blur, too little or too much motion); then the caption
# stage's model scores.
SCORE_ORDER = ("black_fraction", "bright_fraction", "max_frame_diff", "motion", "sharpness", "aesthetic",
               "text_area")
MOTION_SCORES = ("max_frame_diff", "motion")  # meaningless on a single frame


@dataclass
class Range:
    """Allowed range of one score; None = unbounded on that side."""

    min: float | None = None
    max: float | None = None

    def validate(self) -> None:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"a score range has min {self.min} > max {self.max}")

    def failure(self, value: float) -> str | None:
        if self.min is not None and value < self.min:
            return f"< min {self.min:g}"
        if self.max is not None and value > self.max:
            return f"> max {self.max:g}"
        return None


@dataclass
class FilterConfig:
    """Which clips the cut stage keeps, by score, and whether black borders are cropped."""

    enabled: bool = True  # false: scores are still computed and stored, nothing is dropped
    # Crop letterbox / pillarbox bars found at probe time before choosing the bucket, so a
    # 2.39:1 film inside a 4:3 frame lands in a 2.39:1 bucket without its bars.
    crop_borders: bool = True
    # Share of sampled frames that are black. Over half: a fade-out, a black slate or a dead
    # camera, not a shot; a short fade inside a clip is kept.
    black_fraction: Range = field(default_factory=lambda: Range(max=0.5))
    # Share of pixels at luma >= 250. Skies and lamps blow out a few percent; a third of the
    # frame blown out is a flash, a white slate or a badly over-exposed shot.
    bright_fraction: Range = field(default_factory=lambda: Range(max=0.3))
    # Largest mean |Δ luma| between sampled frames (0–255). Below 0.5: a frozen frame or a still
    # re-encoded as video (encoder noise alone stays below ~0.3); real shots measure 4–40.
    max_frame_diff: Range = field(default_factory=lambda: Range(min=0.5))
    # Mean optical flow in frame widths per second. Below 0.003 (≈6 px/s at 1080p) nothing moves
    # — the sample clips, even a near-static talking head, measure 0.01–0.09. No maximum by
    # default: DIS at 160 px tracks smooth motion faithfully but under-reads jumps of more than
    # ~1/8 of the frame between samples (random camera jumps of up to 37% of the width measure
    # 0.08–0.15), so a max catches fast *smooth* pans only; set one if those are unwanted.
    motion: Range = field(default_factory=lambda: Range(min=0.003))
    # Variance of the Laplacian of luma *at the bucket's resolution* (what the model trains on).
    # The sample clips measure 58–1,180 at 128 px; the same clips blurred by a 1.5-px Gaussian
    # 5–42. 15 drops clearly defocused or heavily blurred clips, not soft ones.
    sharpness: Range = field(default_factory=lambda: Range(min=15.0))
    # LAION aesthetic score (~1–10) of the clip's mean CLIP image embedding, checked in the
    # caption stage. No default: a random-init head's numbers mean nothing; with LAION's head on
    # ViT-L-14, 4.5 drops the clearly unattractive (Open-Sora-Plan keeps >= 4.75).
    aesthetic: Range = field(default_factory=Range)
    # Share of the frame inside detected text boxes (pipeline/text_overlay.py), mean over the
    # caption keyframes, checked in the caption stage. 0.1 drops title cards, slides and credits
    # (PP-OCR: 0.18-0.27 on the test title cards) and keeps a one-line subtitle (0.035-0.053) and
    # clean footage (<= 0.03 mean); set 0.02 to drop subtitled clips too.
    text_area: Range = field(default_factory=lambda: Range(max=0.1))
    text: TextConfig = field(default_factory=TextConfig)  # which detector scores text_area
    # Share of filtered clips whose middle frame is kept (a JPEG in the reject row, ~3–8 KB) for
    # the data card's contact sheets, chosen by hash of clip id. 1%: at 100M clips of which 70M
    # are filtered, 700k frames, ~4 GB in the rejects table; small runs may set 1.0.
    example_fraction: float = 0.01

    def validate(self) -> None:
        if not 0.0 <= self.example_fraction <= 1.0:
            raise ValueError(f"filter.example_fraction must be in [0, 1], got {self.example_fraction}")

    def ranges(self) -> dict[str, Range]:
        return {name: getattr(self, name) for name in SCORE_ORDER}


@dataclass(frozen=True)
class Failure:
    """Why a clip is filtered: the first score outside its range."""

    score: str
    value: float
    reason: str


def check(values: Mapping[str, float], cfg: FilterConfig, num_frames: int) -> Failure | None:
    """The first score (name → value, see quality.ClipScores) outside its configured range, or None (keep)."""
    if not cfg.enabled:
        return None
    for name, rng in cfg.ranges().items():
        if name not in values or (num_frames < 2 and name in MOTION_SCORES):
            continue  # a score of a later stage, or motion of a single frame
        why = rng.failure(values[name])
        if why is not None:
            return Failure(name, values[name], f"{name} {values[name]:.4g} {why} (filter.{name})")
    return None


def keeps_example(clip_id: str, fraction: float) -> bool:
    """Whether a filtered clip's frame is kept for the data card: a stable hash sample of clip ids."""
    return zlib.crc32(clip_id.encode()) < fraction * 2**32


def crop_px(box: tuple[int, int, int, int], small_hw: tuple[int, int], full_hw: tuple[int, int],
            multiple: int = 2) -> tuple[int, int, int, int]:
    """Bars found on a (h, w) thumbnail → (top, bottom, left, right) in full-size pixels.

    Scaled and rounded *up* to `multiple` (bars are cut whole: a dark line left at an edge is
    worse than a line of picture lost), so the content keeps even sizes for the decoders.
    """
    (sh, sw), (fh, fw) = small_hw, full_hw
    out = []
    for n, small, full in zip(box, (sh, sh, sw, sw), (fh, fh, fw, fw)):
        px = -(-n * full // small) if n else 0  # ceil
        out.append(min(full // 2 - 1, -(-px // multiple) * multiple) if px else 0)
    return tuple(out)  # type: ignore[return-value]


def border_crop(path: str, height_px: int, width_px: int, *, duration_s: float,
                rotation_cw: int = 0) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) black bars of a source, in display pixels; zeros when none.

    Found on BORDER_SAMPLES keyframes spread over the whole source (a few keyframe decodes at
    probe time, not a pass over the video: the bucket must be chosen before the cut decodes).
    A bar must be dark in every sample, so one bright scene anywhere keeps the full frame.
    """
    w = min(width_px, BORDER_WIDTH_PX)
    h = max(8, round(height_px * w / width_px))
    frames = sample_frames(path, h, w, duration_s=duration_s, rotation_cw=rotation_cw, count=BORDER_SAMPLES)
    if len(frames) < 2:
        return (0, 0, 0, 0)  # too little to tell a bar from a dark shot
    return crop_px(border_box(frames), (h, w), (height_px, width_px))
