"""Scene detection with PySceneDetect, fed frame by frame from our own decode.

`SceneTracker` wraps a PySceneDetect detector (AdaptiveDetector by default,
ContentDetector selectable) so the frames we decode once serve both scene detection and
clip sampling. Cuts are frame-exact source frame indices. `lag_frames` bounds how late a
detector may report a cut, which is what lets the cutter emit windows of a long scene
before the scene ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from scenedetect import AdaptiveDetector, ContentDetector, FrameTimecode


@dataclass
class SceneConfig:
    """Which detector and its thresholds (PySceneDetect's defaults)."""

    detector: Literal["adaptive", "content"] = "adaptive"
    adaptive_threshold: float = 3.0
    window_width: int = 2
    min_content_val: float = 15.0
    content_threshold: float = 27.0
    min_scene_len_frames: int = 15
    detect_width_px: int = 256  # frames are downscaled to about this width for detection


def detect_size(height_px: int, width_px: int, detect_width_px: int) -> tuple[int, int]:
    """(h, w) a frame is shrunk to before detection (never enlarged)."""
    if width_px <= detect_width_px:
        return height_px, width_px
    scale = detect_width_px / width_px
    return max(1, round(height_px * scale)), detect_width_px


class SceneTracker:
    """Feed RGB frames in order; collect frame-exact cut positions."""

    def __init__(self, cfg: SceneConfig, fps: float) -> None:
        self.cfg = cfg
        self.fps = fps if fps > 0 else 25.0
        if cfg.detector == "adaptive":
            self.detector = AdaptiveDetector(
                adaptive_threshold=cfg.adaptive_threshold, min_scene_len=cfg.min_scene_len_frames,
                window_width=cfg.window_width, min_content_val=cfg.min_content_val,
            )
        else:
            self.detector = ContentDetector(threshold=cfg.content_threshold, min_scene_len=cfg.min_scene_len_frames)
        self.cuts: list[int] = []
        self._last = -1

    @property
    def lag_frames(self) -> int:
        """Upper bound on how many frames after a cut the detector reports it."""
        return self.cfg.window_width + self.cfg.min_scene_len_frames + 2

    def _timecode(self, index: int) -> FrameTimecode:
        return FrameTimecode(index, fps=self.fps)

    def push(self, index: int, frame_rgb: np.ndarray) -> list[int]:
        """Process one frame; return cuts newly reported (source frame indices)."""
        h, w = frame_rgb.shape[:2]
        dh, dw = detect_size(h, w, self.cfg.detect_width_px)
        small = frame_rgb if (dh, dw) == (h, w) else cv2.resize(frame_rgb, (dw, dh), interpolation=cv2.INTER_AREA)
        bgr = np.ascontiguousarray(small[..., ::-1])  # PySceneDetect expects OpenCV's BGR
        self._last = index
        return self._record(self.detector.process_frame(self._timecode(index), bgr))

    def finish(self) -> list[int]:
        """Flush the detector at end of stream; return any last cuts."""
        if self._last < 0:
            return []
        return self._record(self.detector.post_process(self._timecode(self._last + 1)))

    def _record(self, cuts: list[FrameTimecode]) -> list[int]:
        new = sorted({int(c.frame_num) for c in cuts} - set(self.cuts))
        new = [c for c in new if c > 0]
        self.cuts.extend(new)
        return new
