"""Frame-level quality scores of a clip, from frames the cut stage has already decoded.

Plain numpy / OpenCV functions over uint8 RGB frames (T, H, W, 3); no model, no second decode.
The first piece of curation filtering (issue 14): `clip_scores` gives the per-clip numbers a
filter thresholds on, `border_box` the letterbox / pillarbox bars to crop before bucketing.

* **Motion**: dense optical flow (OpenCV's DIS, ultrafast preset) between frames ~0.25 s apart,
  on luma downscaled to 160 px wide: mean flow magnitude in *frame widths per second*, so the
  number means the same at any resolution and fps. Why not codec motion vectors: they need the
  decoder to export them (a second decode path), are absent in intra-only codecs (ProRes,
  MJPEG) and follow the encoder's search, not the scene; DIS at 160 px costs ~1–4 ms per pair.
* **Frozen**: the largest mean absolute luma change between consecutive sampled frames (0–255);
  a frozen shot or a slide show of one image stays below ~0.5.
* **Sharpness**: variance of the Laplacian of luma (median over sampled frames), the classic
  focus measure; comparable between clips of one bucket (same size), as filters use it.
* **Exposure**: share of sampled frames whose mean luma is below 16 (black), and share of pixels
  at luma ≥ 250 (blown highlights).
* **Borders**: rows / columns at the edges that are dark and flat in every sampled frame.

Luma is BT.601 (Y = 0.299 R + 0.587 G + 0.114 B), what video codecs store.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

FLOW_WIDTH_PX = 160  # optical flow runs on luma this wide: motion is coarse, and DIS stays ~ms per pair
MAX_SAMPLES = 8  # frames (or frame pairs) a score looks at: enough for a clip's statistics
BLACK_LUMA = 16  # mean luma below this: a black frame (studio-swing black is 16)
BRIGHT_LUMA = 250  # luma at or above this: a blown-out pixel
BORDER_LUMA = 24  # an edge row/column darker than this in every sampled frame may be a bar
BORDER_FLAT = 6.0  # … if also flat: luma standard deviation along it below this
MIN_BORDER_FRACTION = 0.02  # thinner bars are ignored (compression noise at the edge)
MAX_BORDER_FRACTION = 0.45  # a "bar" covering more than this per side is a dark scene, not a bar


@dataclass(frozen=True)
class ClipScores:
    """The per-clip numbers curation filters on (columns of the shards and the clip index)."""

    motion: float  # mean optical-flow magnitude, frame widths per second
    max_frame_diff: float  # largest mean |Δ luma| between consecutive sampled frames, 0–255
    sharpness: float  # variance of the Laplacian of luma, median over sampled frames
    black_fraction: float  # sampled frames with mean luma < BLACK_LUMA
    bright_fraction: float  # pixels with luma >= BRIGHT_LUMA, over the sampled frames

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def luma(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB → (T, H, W) uint8 BT.601 luma (rounded)."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3) RGB, got shape {frames.shape}")
    # OpenCV's uint8 conversion (BT.601 weights, rounded) is ~20× faster than a float matmul, and
    # uint8 keeps the later OpenCV calls (absdiff, resize, Laplacian) on their fast paths.
    return np.stack([cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames])


def sample_indices(num_frames: int, count: int = MAX_SAMPLES) -> np.ndarray:
    """Up to `count` frame indices spread evenly over a clip, first and last included."""
    return np.unique(np.linspace(0, num_frames - 1, min(count, num_frames)).round().astype(int))


def motion(frames: np.ndarray, fps: float) -> float:
    """Mean dense-flow magnitude between frame pairs ~0.25 s apart, in frame widths per second."""
    t = frames.shape[0]
    if t < 2:
        return 0.0  # one frame (a still image) has no motion
    gap = int(min(t - 1, max(1, round(fps / 4))))  # ~0.25 s: small steps measure noise, big ones alias
    starts = sample_indices(t - gap, MAX_SAMPLES)
    h, w = frames.shape[1:3]
    small_w = min(w, FLOW_WIDTH_PX)
    small = (small_w, max(8, round(h * small_w / w)))  # (width, height) for cv2
    flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
    needed = np.union1d(starts, starts + gap)
    small_y = {int(i): cv2.resize(luma(frames[i:i + 1])[0], small, interpolation=cv2.INTER_AREA)
               for i in needed}  # (h, w) uint8 luma of each frame used
    mags = []
    for s in starts.tolist():
        f = flow.calc(small_y[s], small_y[s + gap], None)  # (h, w, 2) pixels of the small frame
        mags.append(float(np.sqrt((f ** 2).sum(axis=-1)).mean()))
    return float(np.mean(mags)) / small_w * fps / gap


def max_frame_diff(frames: np.ndarray) -> float:
    """Largest mean absolute luma change between consecutive frames of an even sample (0 for one frame)."""
    if frames.shape[0] < 2:
        return 0.0
    y = luma(frames[sample_indices(frames.shape[0], 2 * MAX_SAMPLES)])  # (S, H, W) uint8
    return float(max(cv2.mean(cv2.absdiff(a, b))[0] for a, b in zip(y[:-1], y[1:])))


def sharpness(y: np.ndarray) -> float:
    """Median over luma frames (S, H, W) of the variance of the Laplacian."""
    return float(np.median([cv2.Laplacian(f, cv2.CV_32F).var() for f in y]))


def exposure(y: np.ndarray) -> tuple[float, float]:
    """(share of luma frames (S, H, W) that are black, share of their pixels that are blown out)."""
    return float((y.mean(axis=(1, 2)) < BLACK_LUMA).mean()), float((y >= BRIGHT_LUMA).mean())


def clip_scores(frames: np.ndarray, fps: float) -> ClipScores:
    """Every score of one clip (uint8 RGB frames at `fps`)."""
    y = luma(frames[sample_indices(frames.shape[0])])  # (S, H, W) once for the still-frame scores
    black, bright = exposure(y)
    return ClipScores(motion=motion(frames, fps), max_frame_diff=max_frame_diff(frames),
                      sharpness=sharpness(y), black_fraction=black, bright_fraction=bright)


def border_box(frames: np.ndarray) -> tuple[int, int, int, int]:
    """Letterbox / pillarbox bars as (top, bottom, left, right) pixels to crop; zeros when none.

    An edge row (column) belongs to a bar when, in every sampled frame, it is darker than
    BORDER_LUMA and flat (std < BORDER_FLAT). Bars thinner than MIN_BORDER_FRACTION of the side
    are ignored; a side whose "bar" would exceed MAX_BORDER_FRACTION is a dark scene, not a bar.
    Top and bottom (left and right) are measured separately: burned-in subtitles in one bar do not
    hide the other.
    """
    y = luma(frames[sample_indices(frames.shape[0])])  # (S, H, W)
    dark = (y.max(axis=0) < BORDER_LUMA)  # (H, W) dark in every sampled frame
    row_bar = dark.all(axis=1) & (y.std(axis=2).max(axis=0) < BORDER_FLAT)  # (H,)
    col_bar = dark.all(axis=0) & (y.std(axis=1).max(axis=0) < BORDER_FLAT)  # (W,)

    def run(bar: np.ndarray) -> int:  # length of the bar run from index 0
        return int(np.argmin(bar)) if not bar.all() else len(bar)

    h, w = dark.shape
    sides = [run(row_bar), run(row_bar[::-1]), run(col_bar), run(col_bar[::-1])]
    out = []
    for n, size in zip(sides, (h, h, w, w)):
        out.append(n if MIN_BORDER_FRACTION * size <= n <= MAX_BORDER_FRACTION * size else 0)
    return tuple(out)  # type: ignore[return-value]
