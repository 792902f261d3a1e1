"""Text-overlay score: the share of a clip's frames covered by text (subtitles, captions, credits, logos).

Burned-in text teaches a video model to draw glyphs; curators drop clips with much of it
(Open-Sora and Open-Sora-Plan with OCR, HunyuanVideo and Wan likewise). One interface, two
detectors, chosen by `filter.text.detector`:

* `ppocr` — the PP-OCRv4 text *detection* network (DBNet; Apache-2.0, shipped as ONNX in the
  `rapidocr_onnxruntime` wheel, which the `ocr` extra installs) run by onnxruntime. Only the
  detector runs: the score needs where text is, not what it says. ~14 ms of CPU per 480-px
  frame on the 2-core dev box (idle; 38 ms under load). On a caption actor with a GPU it runs
  on onnxruntime's CUDA execution provider when onnxruntime-gpu is installed (replace
  onnxruntime by onnxruntime-gpu after the `ocr` extra: both ship the `onnxruntime` module), a
  clip's keyframes in one batch; without it, on the CPU with a warning.
  (int8 static quantization was measured and left out: 1.4x faster on this CPU and it moved
  subtitle areas by up to 40%.)
* `classical` — no model: glyphs are blobs lighter or darker than their surroundings (local
  contrast >= 50) of glyph shape and size; four or more of one height side by side in a row
  make a text line. 2.5 ms per frame. On the test frames it reads clean footage as <= 0.002,
  title cards 0.11-0.23 and subtitles 0.016-0.041 (PP-OCR: 0-0.027, 0.18-0.27, 0.035-0.053),
  but it misses low-contrast text and can take a regular high-contrast pattern (a fence, a
  keyboard) for text: a fallback for machines without onnxruntime. (OpenCV 5.0's MSER found
  no regions on crisp white-on-grey text, so this thresholds locally instead.)
* `auto` (default) — `ppocr` when onnxruntime imports and a model is found (`filter.text.model`,
  else the one in the rapidocr wheel), `classical` otherwise.

The PP-OCR cascade (`filter.text.cascade`, default on). Three keyframes through DBNet cost ~0.9x
the clip's decode in CPU seconds (tests/bench/pipeline.py), far more than every other score
together (the scores' budget is 0.3x). Most footage has no text, and burned-in text that stays
(logos, watermarks, channel bugs, title cards) is in the middle keyframe too, so PP-OCR reads
the middle keyframe first and the others only when it found text there, or when the classical
detector (2 ms a frame) finds a text line in them (a subtitle that comes and goes: the
classical detector finds every subtitle line of the test frames). A clip without text costs
1.08 DBNet frames instead of 3 on the test footage (1.09 on the benchmark's clips: 2.5x the
clips per second, ~0.35x decode). What it can miss: low-contrast text that is in an outer
keyframe and not in the middle one (a faint watermark fading in) — measured on the test frames,
at most 0.015 of area below the full mean, where the default filter drops at 0.1.
`cascade=false` reads every keyframe (the exact mean); with a GPU, where DBNet is cheap, it
costs little.

Why not `rapidocr_onnxruntime`'s own pipeline: it runs detection, angle classification and
recognition per call (~10x the work); we want one number from the detection map. The score
(`text_area`, 0-1) is the share of the frame inside detected text boxes, averaged over the
caption stage's keyframes; it is computed in the caption stage (a model actor, next to CLIP)
so the cut tasks stay cheap.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from pipeline.logs import get_logger

DETECTORS = ("auto", "classical", "ppocr")
# Frames are scored this wide (enlarged or reduced): PP-OCR's detector finds subtitle-sized glyphs
# (~5% of the height) from ~12 px; at 320 px it missed most of them on 128-px clips, at 640 px
# it took flat regions for text (tests/pipeline/test_text_overlay.py measures both detectors).
WIDTH_PX = 480
log = get_logger(__name__)


@dataclass
class TextConfig:
    """Which text detector scores `text_area` (see the module doc)."""

    detector: str = "auto"
    model: str = ""  # a PP-OCR det .onnx; empty: the one in the rapidocr_onnxruntime wheel when installed
    cascade: bool = True  # PP-OCR: the middle keyframe first, the others when text is likely (module doc)

    def validate(self) -> None:
        if self.detector not in DETECTORS:
            raise ValueError(f"filter.text.detector={self.detector!r}: use one of {list(DETECTORS)}")
        if self.model and not Path(self.model).is_file():
            raise ValueError(f"filter.text.model={self.model!r} is not a file (a PP-OCR text detection .onnx)")


class TextDetector(Protocol):
    def area(self, frame: np.ndarray) -> float:
        """Share (0-1) of an RGB uint8 frame (H, W, 3) covered by text boxes."""

    def areas(self, frames: list[np.ndarray]) -> list[float]:
        """`area` of each frame (a model may run them together)."""

    def clip_area(self, frames: list[np.ndarray]) -> float:
        """Mean `area` of a clip's keyframes (a detector may skip frames it can tell are text-free)."""

    def fingerprint(self) -> dict:
        """What defines its numbers (for the manifest's model fingerprints)."""


def _small(frame: np.ndarray) -> np.ndarray:
    """The frame WIDTH_PX wide (a 128-px bucket's frames are enlarged: detectors need ~8-px glyphs)."""
    h, w = frame.shape[:2]
    size = (WIDTH_PX, max(8, round(h * WIDTH_PX / w)))
    return cv2.resize(np.ascontiguousarray(frame), size, interpolation=cv2.INTER_AREA if w > WIDTH_PX else
                      cv2.INTER_LINEAR)


def _box_area(boxes: list[tuple[int, int, int, int]], h: int, w: int) -> float:
    """Union area of (x, y, bw, bh) boxes over the frame's."""
    mask = np.zeros((h, w), np.uint8)
    for x, y, bw, bh in boxes:
        mask[max(0, y):min(h, y + bh), max(0, x):min(w, x + bw)] = 1
    return float(mask.mean())


class ClassicalText:
    """Text lines as rows of glyph-shaped stable regions (module doc); no model."""

    MIN_H, MAX_H = 0.025, 0.15  # glyph height as a share of frame height
    MIN_ASPECT, MAX_ASPECT = 0.15, 1.6  # glyph width / height
    MIN_FILL, MAX_FILL = 0.2, 0.95  # region pixels / its box
    GAP = 2.5  # glyphs of a line are at most this many glyph heights apart (word gaps, missed glyphs)
    MIN_GLYPHS = 4
    CONTRAST = 50  # luma above / below the 31-px local mean that marks a stroke (text is drawn to be read)

    def glyphs(self, y: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Glyph-shaped blobs standing out of their surroundings: light ones, then dark ones."""
        h = y.shape[0]
        local = cv2.blur(y, (31, 31)).astype(np.int16)
        out = set()
        for mask in (y.astype(np.int16) > local + self.CONTRAST, y.astype(np.int16) < local - self.CONTRAST):
            n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
            for x, top, bw, bh, px in stats[1:].tolist():
                if (self.MIN_H * h <= bh <= self.MAX_H * h and self.MIN_ASPECT <= bw / bh <= self.MAX_ASPECT
                        and self.MIN_FILL <= px / (bw * bh) <= self.MAX_FILL):
                    out.add((x, top, bw, bh))
        return sorted(out)

    def area(self, frame: np.ndarray) -> float:
        y = cv2.cvtColor(_small(frame), cv2.COLOR_RGB2GRAY)
        glyphs = self.glyphs(y)
        used = [False] * len(glyphs)
        lines = []
        for i, (x, top, bw, bh) in enumerate(glyphs):  # left to right: chain glyphs of one height and row
            if used[i]:
                continue
            members, right, mid = [glyphs[i]], x + bw, top + bh / 2
            used[i] = True
            for j in range(i + 1, len(glyphs)):
                x2, top2, bw2, bh2 = glyphs[j]
                if x2 > right + self.GAP * bh:
                    break
                if not used[j] and abs(top2 + bh2 / 2 - mid) < 0.35 * bh and 0.6 < bh2 / bh < 1.6 and \
                        x2 >= right - 0.3 * bh:
                    members.append(glyphs[j])
                    used[j] = True
                    right = max(right, x2 + bw2)
            if len(members) >= self.MIN_GLYPHS:
                x0, y0 = min(m[0] for m in members), min(m[1] for m in members)
                lines.append((x0, y0, right - x0, max(m[1] + m[3] for m in members) - y0))
        return _box_area(lines, *y.shape)

    def areas(self, frames: list[np.ndarray]) -> list[float]:
        return [self.area(f) for f in frames]

    def clip_area(self, frames: list[np.ndarray]) -> float:
        return float(np.mean(self.areas(frames)))

    def fingerprint(self) -> dict:
        return {"detector": "classical", "weights": "none", "weights_sha256": "", "width_px": WIDTH_PX}


class PPOCRText:
    """PP-OCR's DBNet text detector through onnxruntime (module doc)."""

    THRESH = 0.3  # DB's pixel threshold on the probability map (PP-OCR's default)
    BOX_THRESH = 0.5  # a region is text when its mean probability exceeds this (PP-OCR's default)
    UNCLIP = 1.6  # DB shrinks text regions by this ratio in training; boxes are grown back by it
    # A text line is wider than high. The network also fires on any flat shape with sharp edges
    # (a solid square over a gradient: probability 0.99, 5-15% of the frame), which this excludes;
    # lone glyphs go with it.
    MIN_ASPECT = 1.5

    def __init__(self, model: str, device: str = "cpu", cascade: bool = True) -> None:
        import onnxruntime as ort

        self.gate = ClassicalText() if cascade else None  # the cascade's gate of the outer keyframes (module doc)

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # one per caption actor: the cluster's actors are the parallelism
        options.inter_op_num_threads = 1
        self.path = model
        providers: list = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" in ort.get_available_providers():
                index = int(device.split(":")[1]) if ":" in device else 0
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
            else:
                log.warning("PP-OCR text detection runs on the CPU although this actor has a GPU: onnxruntime "
                            "has no CUDA execution provider here (install onnxruntime-gpu in place of onnxruntime)")
        self.session = ort.InferenceSession(model, options, providers=providers)
        self.providers = self.session.get_providers()
        self.input = self.session.get_inputs()[0].name

    @staticmethod
    def _input(frame: np.ndarray) -> np.ndarray:
        """(3, ph, pw) float32: the frame WIDTH_PX wide, sides rounded to multiples of 32 (DBNet's),
        BGR (PP-OCR is trained on it), scaled to [-1, 1]."""
        img = _small(frame)
        h, w = img.shape[:2]
        ph, pw = max(32, round(h / 32) * 32), max(32, round(w / 32) * 32)
        x = cv2.resize(img, (pw, ph)).astype(np.float32)[..., ::-1]
        return ((x / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)

    def area(self, frame: np.ndarray) -> float:
        return self.areas([frame])[0]

    def areas(self, frames: list[np.ndarray]) -> list[float]:
        """`area` of each frame; frames of one size (a clip's keyframes) go through the network together."""
        inputs = [self._input(f) for f in frames]
        out: list[float] = [0.0] * len(frames)
        for shape in {x.shape for x in inputs}:
            idx = [i for i, x in enumerate(inputs) if x.shape == shape]
            probs = self.session.run(None, {self.input: np.stack([inputs[i] for i in idx])})[0][:, 0]  # (n, ph, pw)
            for i, prob in zip(idx, probs):
                out[i] = self._boxes_area(prob)
        return out

    def clip_area(self, frames: list[np.ndarray]) -> float:
        """Mean area of the keyframes, through the cascade when on (module doc): the middle keyframe,
        then the others if it had text, else those where the classical detector sees a text line."""
        if self.gate is None or len(frames) == 1:
            return float(np.mean(self.areas(frames)))
        mid = len(frames) // 2
        found = {mid: self.areas([frames[mid]])[0]}
        rest = [i for i in range(len(frames)) if i != mid]
        if found[mid] == 0.0:
            rest = [i for i in rest if self.gate.area(frames[i]) > 0.0]
        if rest:
            found.update(zip(rest, self.areas([frames[i] for i in rest])))
        return float(np.mean([found.get(i, 0.0) for i in range(len(frames))]))

    def _boxes_area(self, prob: np.ndarray) -> float:
        """Share of the (ph, pw) probability map inside DB's text boxes."""
        ph, pw = prob.shape
        n, labels, stats, _ = cv2.connectedComponentsWithStats((prob > self.THRESH).astype(np.uint8), connectivity=4)
        boxes = []
        for i in range(1, n):
            x0, y0, bw, bh, px = stats[i]
            if px < 3 or bw < self.MIN_ASPECT * bh or prob[labels == i].mean() < self.BOX_THRESH:
                continue
            grow = int(round(bw * bh * self.UNCLIP / (2 * (bw + bh))))  # DB's unclip distance for the box
            boxes.append((x0 - grow, y0 - grow, bw + 2 * grow, bh + 2 * grow))
        return _box_area(boxes, ph, pw)

    def fingerprint(self) -> dict:
        digest = hashlib.sha256(Path(self.path).read_bytes()).hexdigest()
        return {"detector": "ppocr", "weights": self.path, "weights_sha256": digest, "width_px": WIDTH_PX,
                "cascade": self.gate is not None}


def bundled_model() -> str | None:
    """The PP-OCRv4 det model inside the rapidocr_onnxruntime wheel, when that is installed."""
    try:
        import rapidocr_onnxruntime
    except ImportError:
        return None
    path = Path(rapidocr_onnxruntime.__file__).parent / "models" / "ch_PP-OCRv4_det_infer.onnx"
    return str(path) if path.is_file() else None


@functools.lru_cache(maxsize=4)
def load_text_detector(detector: str, model: str, device: str = "cpu", cascade: bool = True) -> TextDetector:
    """The detector `filter.text` names, once per process; PP-OCR on `device`, through the cascade
    when `cascade` (see PPOCRText)."""
    if detector == "classical":
        return ClassicalText()
    path = model or bundled_model()
    if detector == "ppocr":
        if path is None:
            raise ValueError("filter.text.detector=ppocr needs filter.text.model (a PP-OCR det .onnx) or the "
                             "rapidocr_onnxruntime wheel (pip install '.[ocr]')")
        return PPOCRText(path, device, cascade)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return ClassicalText()
    return PPOCRText(path, device, cascade) if path else ClassicalText()


def text_area(frames: list[np.ndarray] | np.ndarray, detector: TextDetector) -> float:
    """Mean text area of a clip's keyframes (each (H, W, 3) uint8 RGB), as the detector reads a clip."""
    return detector.clip_area(list(frames)) if len(frames) else 0.0
