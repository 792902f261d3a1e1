"""pipeline/quality.py: each score separates the footage it is for from ordinary footage."""

from __future__ import annotations

import av
import cv2
import numpy as np
import pytest

from pipeline.quality import border_box, clip_scores, luma, sample_indices
from pipeline.samples import SAMPLE_NAMES, sample_dir

FPS = 24.0


def texture(h: int, w: int, seed: int = 0, sigma: float = 3.0) -> np.ndarray:
    """A smooth random RGB texture (something optical flow can track), uint8 (h, w, 3)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return cv2.GaussianBlur(base, (0, 0), sigma)


def panning(t: int = 24, h: int = 128, w: int = 224, px_per_frame: float = 2.0) -> np.ndarray:
    """A camera pan over a scene whose detail scales with the frame (the same shot at any size)."""
    wide = texture(h, w + int(px_per_frame * t) + 8, sigma=3.0 * w / 224)
    return np.stack([wide[:, int(round(i * px_per_frame)):int(round(i * px_per_frame)) + w] for i in range(t)])


def test_luma_and_samples() -> None:
    frames = np.zeros((3, 2, 2, 3), np.uint8)
    frames[..., 1] = 255  # pure green
    assert np.allclose(luma(frames), 0.587 * 255, atol=0.5)  # uint8 rounding
    assert sample_indices(100, 8).tolist()[0] == 0 and sample_indices(100, 8).tolist()[-1] == 99
    assert sample_indices(3, 8).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        luma(np.zeros((3, 4, 4), np.uint8))


def test_motion_is_in_frame_widths_per_second_at_any_size() -> None:
    # 2 px per frame over 224 px at 24 fps = 0.214 widths/s; at twice the size and speed, the same.
    small, large = clip_scores(panning(w=224, px_per_frame=2.0), FPS), clip_scores(
        panning(h=256, w=448, px_per_frame=4.0), FPS)
    assert small.motion == pytest.approx(2.0 / 224 * FPS, rel=0.2)
    assert large.motion == pytest.approx(small.motion, rel=0.2)
    frozen = clip_scores(np.repeat(texture(128, 224)[None], 24, axis=0), FPS)
    assert frozen.motion < 0.01 and frozen.max_frame_diff == 0.0
    assert small.max_frame_diff > 1.0  # frozen: exactly 0
    assert clip_scores(texture(128, 224)[None], FPS).motion == 0.0  # a still image


def test_sharpness_exposure_and_black_frames() -> None:
    detailed = np.repeat(texture(128, 224, sigma=0.7)[None], 8, axis=0)
    blurred = np.stack([cv2.GaussianBlur(f, (0, 0), 2.5) for f in detailed])  # out of focus
    assert clip_scores(blurred, FPS).sharpness < 0.1 * clip_scores(detailed, FPS).sharpness
    sharp = panning()
    black = np.full((24, 64, 64, 3), 8, np.uint8)
    assert clip_scores(black, FPS).black_fraction == 1.0
    half = sharp.copy()
    half[12:] = 0  # a cut to black halfway
    assert 0.3 < clip_scores(half, FPS).black_fraction < 0.7
    blown = sharp.copy()
    blown[:, :, :64] = 255  # the left 64 of 224 columns
    assert clip_scores(blown, FPS).bright_fraction == pytest.approx(64 / 224, abs=0.02)
    assert clip_scores(sharp, FPS).bright_fraction < 0.01


def test_letterbox_and_pillarbox_bars_are_found_and_dark_scenes_are_not_bars() -> None:
    # A 2.39:1 film inside a 4:3 frame: 480×640 with bars of (480 − 640/2.39)/2 ≈ 106 rows.
    film = panning(t=12, h=268, w=640)
    frame = np.zeros((12, 480, 640, 3), np.uint8)
    frame[:, 106:374] = film
    top, bottom, left, right = border_box(frame)
    assert (top, bottom, left, right) == (106, 106, 0, 0)
    assert (640 - left - right) / (480 - top - bottom) == pytest.approx(2.39, abs=0.01)
    pillar = np.zeros((12, 360, 640, 3), np.uint8)
    pillar[:, :, 80:560] = panning(t=12, h=360, w=480)  # 4:3 inside 16:9
    assert border_box(pillar) == (0, 0, 80, 80)
    subtitled = frame.copy()
    subtitled[:, 420:440, 200:440] = 255  # burned-in subtitles in the bottom bar
    assert border_box(subtitled)[0] == 106 and border_box(subtitled)[1] < 106
    assert border_box(panning()) == (0, 0, 0, 0)
    assert border_box(np.full((12, 120, 160, 3), 5, np.uint8)) == (0, 0, 0, 0)  # all dark: a night scene


def _frames(path: str, limit: int = 48) -> tuple[np.ndarray, float]:
    with av.open(path) as c:
        stream = c.streams.video[0]
        fps = float(stream.average_rate)
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(limit), c.decode(stream))]
    return np.stack(frames), fps


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_the_sample_clips_are_ordinary_footage(name: str) -> None:
    """Real footage: moving, in focus, exposed, without bars (what filters must let through)."""
    frames, fps = _frames(str(sample_dir() / name))
    s = clip_scores(frames, fps)
    assert s.motion > 0.005 and s.max_frame_diff > 0.5, s
    assert s.sharpness > 20 and s.black_fraction == 0.0 and s.bright_fraction < 0.2, s  # some sky is normal
    assert border_box(frames) == (0, 0, 0, 0)
