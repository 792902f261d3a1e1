"""Declarative buckets: resolution × aspect ratio × frame count at a target fps.

A source gets one aspect (nearest in log space) and one resolution (the largest whose
pixel size fits inside the source, so nothing is upscaled); each clip cut from it then
gets the longest frame count that fits its duration. `resize_crop` and
`resample_indices` turn decoded frames into exactly the bucket's shape and timing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np


@dataclass
class BucketConfig:
    """The bucket spec: every shard holds clips of exactly one bucket."""

    # Short side in pixels ("144p" = 144 rows for landscape, 144 columns for portrait).
    resolutions_px: list[int] = field(default_factory=lambda: [96, 128])
    # Width:height ratios, written "16:9" or as a number ("2.39").
    aspect_ratios: list[str] = field(default_factory=lambda: ["9:16", "3:4", "1:1", "4:3", "16:9", "2.39:1"])
    # Frame counts at `fps`; 4k+1 so temporal VAEs (4x in time) map them to whole latent frames.
    num_frames: list[int] = field(default_factory=lambda: [1, 9, 17])
    fps: float = 8.0
    # Bucket sizes are rounded to this (VAE 8x spatial * DiT 2x patch = 16).
    size_multiple_px: int = 16

    def validate(self) -> None:
        if not self.resolutions_px or any(r <= 0 for r in self.resolutions_px):
            raise ValueError(f"buckets.resolutions_px must be positive integers, got {self.resolutions_px}")
        if not self.num_frames or any(n <= 0 for n in self.num_frames):
            raise ValueError(f"buckets.num_frames must be positive integers, got {self.num_frames}")
        if self.fps <= 0:
            raise ValueError(f"buckets.fps must be > 0, got {self.fps}")
        if self.size_multiple_px <= 0:
            raise ValueError(f"buckets.size_multiple_px must be > 0, got {self.size_multiple_px}")
        for a in self.aspect_ratios:
            parse_aspect(a)


@dataclass(frozen=True)
class Bucket:
    """One cell of the spec: a fixed (num_frames, height_px, width_px) at fps."""

    resolution_px: int
    aspect: str
    num_frames: int
    height_px: int
    width_px: int
    fps: float

    @property
    def name(self) -> str:
        # e.g. "128p_16x9_17f" — safe as a directory name on every filesystem.
        return f"{self.resolution_px}p_{self.aspect.replace(':', 'x').replace('.', '_')}_{self.num_frames}f"

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps


def parse_aspect(text: str) -> float:
    """'16:9' → 1.777…, '2.39:1' → 2.39, '1.5' → 1.5; errors name the bad value."""
    try:
        if ":" in text:
            w, h = text.split(":", 1)
            value = float(w) / float(h)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"aspect ratio {text!r} must look like '16:9' or '2.39'") from None
    if not (0.05 < value < 20):
        raise ValueError(f"aspect ratio {text!r} is outside (0.05, 20)")
    return value


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def bucket_size(resolution_px: int, aspect: float, multiple: int) -> tuple[int, int]:
    """(height_px, width_px) of a bucket: short side = resolution, rounded to `multiple`."""
    if aspect >= 1:
        h, w = resolution_px, resolution_px * aspect
    else:
        h, w = resolution_px / aspect, resolution_px
    return _round_to(h, multiple), _round_to(w, multiple)


def nearest_aspect(width_px: int, height_px: int, aspects: list[str]) -> str:
    """The configured aspect closest to width/height in log space (ties → first listed)."""
    target = math.log(width_px / height_px)
    return min(aspects, key=lambda a: abs(math.log(parse_aspect(a)) - target))


@dataclass(frozen=True)
class SourceBucketing:
    """What a source maps to: aspect + resolution (+ the decode size that covers it)."""

    aspect: str
    resolution_px: int
    height_px: int
    width_px: int


def choose_source_bucket(width_px: int, height_px: int, cfg: BucketConfig) -> SourceBucketing | None:
    """Nearest aspect, then the largest resolution whose size fits the source; None if none fits."""
    aspect = nearest_aspect(width_px, height_px, cfg.aspect_ratios)
    ratio = parse_aspect(aspect)
    best = None
    for res in sorted(set(cfg.resolutions_px)):
        h, w = bucket_size(res, ratio, cfg.size_multiple_px)
        if h <= height_px and w <= width_px:
            best = SourceBucketing(aspect, res, h, w)
    return best


def longest_frames_that_fit(available_frames: int, cfg: BucketConfig) -> int | None:
    """Longest configured frame count ≤ available_frames, or None."""
    fitting = [n for n in cfg.num_frames if n <= available_frames]
    return max(fitting) if fitting else None


def make_bucket(sb: SourceBucketing, num_frames: int, cfg: BucketConfig) -> Bucket:
    return Bucket(sb.resolution_px, sb.aspect, num_frames, sb.height_px, sb.width_px, cfg.fps)


def all_buckets(cfg: BucketConfig) -> list[Bucket]:
    """Every bucket of the spec (for manifests and training-side shape tables)."""
    out = []
    for res in sorted(set(cfg.resolutions_px)):
        for aspect in cfg.aspect_ratios:
            h, w = bucket_size(res, parse_aspect(aspect), cfg.size_multiple_px)
            for n in sorted(set(cfg.num_frames)):
                out.append(Bucket(res, aspect, n, h, w, cfg.fps))
    return out


# ---------------------------------------------------------------------------
# Pixels and timing
# ---------------------------------------------------------------------------


def cover_size(src_h: int, src_w: int, dst_h: int, dst_w: int) -> tuple[int, int]:
    """Smallest (h, w) with the source's aspect that covers (dst_h, dst_w)."""
    scale = max(dst_h / src_h, dst_w / src_w)
    return max(dst_h, math.ceil(src_h * scale - 1e-6)), max(dst_w, math.ceil(src_w * scale - 1e-6))


def resize_crop(frame: np.ndarray, height_px: int, width_px: int) -> np.ndarray:
    """Resize (area filter, aspect kept) to cover the target, then center-crop. (H, W, 3) uint8."""
    src_h, src_w = frame.shape[:2]
    ch, cw = cover_size(src_h, src_w, height_px, width_px)
    if (ch, cw) != (src_h, src_w):
        interp = cv2.INTER_AREA if ch <= src_h else cv2.INTER_CUBIC
        frame = cv2.resize(frame, (cw, ch), interpolation=interp)
    top, left = (ch - height_px) // 2, (cw - width_px) // 2
    return np.ascontiguousarray(frame[top : top + height_px, left : left + width_px])


def available_target_frames(start_s: float, end_s: float, fps: float) -> int:
    """How many frames at `fps` fit in [start_s, end_s) — a small epsilon absorbs pts rounding."""
    return max(0, int(math.floor((end_s - start_s) * fps + 1e-3)))


def resample_indices(pts_s: np.ndarray, start_s: float, num_frames: int, fps: float) -> np.ndarray:
    """For each target time start_s + k/fps, the index of the source frame shown at that time.

    `pts_s` are the (sorted) presentation times of the candidate source frames, so
    variable-frame-rate sources resample correctly: the frame shown at time t is the
    last one whose pts ≤ t (ties resolved by a small tolerance for rounded pts).
    """
    targets = start_s + np.arange(num_frames) / fps
    idx = np.searchsorted(pts_s, targets + 1e-4, side="right") - 1
    return np.clip(idx, 0, len(pts_s) - 1)
