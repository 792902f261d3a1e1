"""Stream RGB frames from a local video file: PyAV, with OpenCV scaling the 4:2:0 planes.

Frames come out one at a time as (index, pts_s, frame (H, W, 3) uint8), already scaled
to the requested size (downscale early: a long 1080p source never sits in memory) and turned
upright by the source's display rotation. The cut stage takes them as `Picture`s: I420 until
the clip sampler picks them.

Why not one FFmpeg call (swscale scales and converts) or decord: scaling is what costs. Real
1080p footage (396 frames) to 720p RGB, one thread, CPU seconds on the dev box: decode alone
1.9; swscale scale+convert 3.0 (fast bilinear) to 4.5 (bicubic); decord 0.6 (its FFmpeg filter
graph) 3.6; OpenCV shrinking the Y, U and V planes (see `shrink`), then swscale's unscaled
colour conversion (which honours the stream's matrix and range, BT.709 included; OpenCV's own
conversion is BT.601 only) 2.5 — against 2.3-2.4 for decoding to full-size RGB. decord stays
selectable (`backend: decord`); it is no longer the default.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import av
import cv2
import numpy as np
from av.video.reformatter import VideoReformatter

from pipeline.logs import get_logger

log = get_logger(__name__)

Frame = tuple[int, float, np.ndarray]


class DecodeError(Exception):
    """Decoding stopped early; `frames_decoded` frames were delivered before it."""

    def __init__(self, message: str, frames_decoded: int) -> None:
        super().__init__(message)
        self.frames_decoded = frames_decoded


@dataclass
class DecodeConfig:
    """Decoder choice and threading."""

    backend: Literal["auto", "decord", "pyav"] = "auto"  # auto = pyav (see the module docstring)
    num_threads: int = 0  # 0 = the cut task's CPUs (see for_task); N = N threads per decoder

    def for_task(self, cpus: float) -> DecodeConfig:
        """The settings one cut task decodes with: `num_threads` 0 becomes the task's CPUs
        (compute.cut_cpus, rounded up). FFmpeg's own choice (thread count 0) is every core of the
        node, up to 16 frame threads, each holding a decoded frame: on a node running one cut task
        per core that is 16x oversubscribed and ~200 MB of frames in flight per task on a 4K
        source. One thread also costs less CPU per frame here (no hand-off between threads:
        3.48 s against 3.77 s for 396 1080p frames scaled to 720p, decord, this box)."""
        return self if self.num_threads else dataclasses.replace(self, num_threads=max(1, math.ceil(cpus)))


def _upright(frame: np.ndarray, rotation_cw: int) -> np.ndarray:
    if rotation_cw % 360 == 0:
        return frame
    return np.ascontiguousarray(np.rot90(frame, k=-(rotation_cw // 90)))


def _coded_size(height_px: int, width_px: int, rotation_cw: int) -> tuple[int, int]:
    return (width_px, height_px) if rotation_cw in (90, 270) else (height_px, width_px)


# 8-bit 4:2:0: what nearly every H.264 / HEVC / VP9 / AV1 web video decodes to.
_YUV420 = ("yuv420p", "yuvj420p")
# AVColorSpace values swscale (FFmpeg 8) converts: RGB, BT.709, unspecified, FCC, BT.470BG,
# SMPTE 170M / 240M, BT.2020 NCL. Others fail at conversion time, so they are converted at decode.
_SWS_MATRICES = (0, 1, 2, 4, 5, 6, 7, 9)


def _split_i420(i420: np.ndarray) -> list[np.ndarray]:
    """An I420 array (H * 3/2, W) → views of its Y (H, W), U and V (H/2, W/2) planes."""
    h, w = i420.shape[0] * 2 // 3, i420.shape[1]
    chroma = i420[h:].reshape(2, h // 2, w // 2)
    return [i420[:h], chroma[0], chroma[1]]


def _plane(plane: av.video.plane.VideoPlane, height: int, width: int) -> np.ndarray:
    """One decoded plane as a (height, width) uint8 view of FFmpeg's buffer (rows padded to line_size)."""
    rows = np.frombuffer(plane, np.uint8, count=plane.line_size * height).reshape(height, plane.line_size)
    return rows[:, :width]


def shrink(src: np.ndarray, dst: np.ndarray) -> None:
    """Resize one plane `src` (H, W) into the no larger `dst` (h, w), anti-aliased.

    Halve by area averaging while the plane is 2x or more too big (an even-sized plane takes
    OpenCV's fast 2x2 box path; an odd side, as 135 rows after 1080 -> 540 -> 270, the general
    one), then bilinear for the rest (under 2x, where its 2 taps do not alias). One area resize
    does as well but takes OpenCV's general path at non-integer factors: 2-2.7 ms for 1080p luma
    to 256 or 854 px wide, against 0.2-0.3 ms this way.
    """
    h, w = dst.shape
    while src.shape[0] >= 2 * h and src.shape[1] >= 2 * w:
        src = cv2.resize(src, (src.shape[1] // 2, src.shape[0] // 2), interpolation=cv2.INTER_AREA)
    if src.shape == dst.shape:
        np.copyto(dst, src)
    else:
        cv2.resize(src, (w, h), dst=dst, interpolation=cv2.INTER_LINEAR)


def _i420(planes: list[np.ndarray], height_px: int, width_px: int) -> np.ndarray:
    """Y, U, V planes (any size) shrunk into one I420 array (height_px * 3/2, width_px) uint8."""
    out = np.empty((height_px * 3 // 2, width_px), np.uint8)  # I420: Y, then U, then V
    for src, dst in zip(planes, _split_i420(out)):  # views: shrink writes into `out`
        shrink(src, dst)
    return out


@dataclass
class Picture:
    """One decoded frame at the decode size, converted to RGB only when asked.

    A 4:2:0 frame stays I420 (1.5 bytes a pixel, half of RGB): the cutter buffers a scene's
    frames so, and the frames its sampler skips (2 of 5 of a 60 fps source sampled at 24 fps)
    are never converted. `window` (display pixels) is the part callers see: black bars cut off.
    """

    i420: np.ndarray | None  # (H * 3/2, W) uint8, coded orientation; None when `pixels` is set
    pixels: np.ndarray | None = None  # (H, W, 3) uint8 RGB, upright: formats converted at decode
    fmt: str = "yuv420p"
    colorspace: int = 2  # AVColorSpace / AVColorRange of the stream, for the conversion
    color_range: int = 0
    rotation_cw: int = 0
    window: tuple[slice, slice] = (slice(None), slice(None))
    # swscale context of the decoder that made this picture (one per decoder: creating one per
    # frame costs ~0.2 ms, as much as converting a 720p frame). Not thread-safe: one thread
    # converts a decoder's pictures (the cut task's).
    reformatter: VideoReformatter | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_rgb(cls, rgb: np.ndarray) -> Picture:
        return cls(None, rgb)

    def cropped(self, window: tuple[slice, slice]) -> Picture:
        return dataclasses.replace(self, window=window)

    def rgb(self) -> np.ndarray:
        """(h, w, 3) uint8 RGB of the window, upright (a view when nothing is cropped or converted)."""
        if self.pixels is not None:
            return self.pixels[self.window]
        frame = av.VideoFrame.from_ndarray(self.i420, format=self.fmt)
        frame.colorspace, frame.color_range = self.colorspace, self.color_range
        # one swscale thread: a cut task has compute.cut_cpus cores, and the conversion is ~0.3 ms
        rgb = (self.reformatter or VideoReformatter()).reformat(frame, format="rgb24", threads=1).to_ndarray()
        return _upright(rgb, self.rotation_cw)[self.window]

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the window, display pixels."""
        ys, xs = self._window_box()
        return ys[1] - ys[0], xs[1] - xs[0]

    def _display_size(self) -> tuple[int, int]:
        """(height, width) of the whole frame as displayed (upright)."""
        if self.pixels is not None:
            return self.pixels.shape[:2]
        # the coded <-> display swap of a quarter turn is its own inverse
        return _coded_size(self.i420.shape[0] * 2 // 3, self.i420.shape[1], self.rotation_cw)

    def _window_box(self) -> tuple[tuple[int, int], tuple[int, int]]:
        dh, dw = self._display_size()
        ys, xs = self.window
        return ys.indices(dh)[:2], xs.indices(dw)[:2]

    def detect_rgb(self, height_px: int, width_px: int) -> np.ndarray:
        """The window shrunk to exactly (height_px, width_px), RGB uint8, for scene detection.

        From the I420 planes: a fifth of the bytes an RGB frame would take through the resize.
        OpenCV converts with BT.601, limited range, whatever the stream's matrix and range: the
        detector compares frames with each other; a matrix shifts every frame alike, and a
        full-range source's differences come out ~1.16x larger (slightly more sensitive cuts).
        """
        if self.pixels is not None:
            rgb = self.rgb()
        else:
            (top, bottom), (left, right) = self._window_box()
            h, w = self.i420.shape[0] * 2 // 3, self.i420.shape[1]  # coded
            dh, dw = self._display_size()
            s = min(1.0, width_px / (right - left))
            sh, sw = max(2, round(h * s / 2) * 2), max(2, round(w * s / 2) * 2)  # even: 4:2:0 planes
            small = self.i420 if (sh, sw) == (h, w) else _i420(_split_i420(self.i420), sh, sw)
            whole = _upright(cv2.cvtColor(small, cv2.COLOR_YUV2RGB_I420), self.rotation_cw)  # (sh', sw', 3)
            fy, fx = whole.shape[0] / dh, whole.shape[1] / dw
            rgb = whole[round(top * fy) : round(bottom * fy), round(left * fx) : round(right * fx)]
        if rgb.shape[:2] == (height_px, width_px):
            return np.ascontiguousarray(rgb)
        # Exactly the size asked (the I420 route rounds to even sizes): the detector compares each
        # frame with the last, so every frame of a source must come out the same size, whichever
        # route it took (a stream may change format or size mid-way).
        interp = cv2.INTER_AREA if rgb.shape[1] > width_px else cv2.INTER_LINEAR
        return cv2.resize(rgb, (width_px, height_px), interpolation=interp)


def to_picture(frame: av.VideoFrame, height_px: int, width_px: int, rotation_cw: int,
               reformatter: VideoReformatter) -> Picture:
    """A decoded frame at (height_px, width_px) coded size. A 4:2:0 frame (not enlarged) is kept
    I420, resized plane by plane when smaller (see shrink); swscale converts it later, without
    scaling, with the stream's colour matrix and range. Anything else (odd sizes, 10-bit, 4:2:2,
    RGB, gray, upscaling) is scaled and converted by swscale now."""
    h, w = frame.height, frame.width
    fmt = frame.format.name
    if (fmt not in _YUV420 or frame.colorspace not in _SWS_MATRICES or height_px > h or width_px > w
            or (h | w | height_px | width_px) % 2):
        # Converted now, inside the decoder's error handling: a matrix swscale refuses (YCgCo,
        # BT.2020 constant luminance, ICtCp, reserved values) rejects the span as a decode error.
        rgb = reformatter.reformat(frame, width=width_px, height=height_px, format="rgb24",
                                   threads=1).to_ndarray()
        return Picture.from_rgb(_upright(rgb, rotation_cw))
    planes = [_plane(frame.planes[0], h, w)] + [_plane(frame.planes[k], h // 2, w // 2) for k in (1, 2)]
    return Picture(_i420(planes, height_px, width_px), None, fmt, frame.colorspace, frame.color_range,
                   rotation_cw, reformatter=reformatter)


def _decord_frames(path: str, height_px: int, width_px: int, rotation_cw: int, threads: int) -> Iterator[Frame]:
    import decord  # imported lazily: only workers that decode need it

    # decord 0.6 applies the display matrix itself (rotation_cw unused): ask for the display size.
    vr = decord.VideoReader(path, ctx=decord.cpu(0), width=width_px, height=height_px, num_threads=threads)
    n = len(vr)
    stamps = vr.get_frame_timestamp(np.arange(n))[:, 0] if n else np.zeros(0)
    t0 = float(stamps[0]) if n else 0.0
    for i in range(n):
        try:
            frame = vr.next().asnumpy()
        except StopIteration:
            return
        except decord.DECORDError as e:
            raise DecodeError(f"decord failed at frame {i}: {e}", i) from None
        if frame.shape != (height_px, width_px, 3):
            # decord 0.6 mis-strides some narrow widths (16, 24, 48, 72 px): (H, W, 4) garbage.
            raise DecodeError(f"decord returned shape {frame.shape}, expected {(height_px, width_px, 3)}", i)
        yield i, float(stamps[i]) - t0, frame


def _pyav_pictures(path: str, height_px: int, width_px: int, rotation_cw: int,
                   threads: int) -> Iterator[tuple[int, float, Picture]]:
    ch, cw = _coded_size(height_px, width_px, rotation_cw)
    i, t0 = 0, None
    reformatter = VideoReformatter()
    try:
        with av.open(path, metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if threads:
                stream.codec_context.thread_count = threads
            fps = float(stream.average_rate or stream.guessed_rate or 25)
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else i / fps
                t0 = t if t0 is None else t0
                yield i, float(t - t0), to_picture(frame, ch, cw, rotation_cw, reformatter)
                i += 1
    except (av.error.FFmpegError, ValueError) as e:
        raise DecodeError(f"PyAV failed after frame {i}: {e}", i) from None


def sample_frames(path: str, height_px: int, width_px: int, *, duration_s: float, rotation_cw: int = 0,
                  count: int = 5) -> np.ndarray:
    """Up to `count` frames spread over a source, RGB uint8 (S, height_px, width_px, 3), upright.

    Each is the first frame decoded after a seek to (k + ½)/count of the duration — a keyframe,
    so a sample costs one keyframe decode, not a decode from the start (long GOPs stay cheap).
    Seeks that land on a keyframe already decoded (a short source, a long GOP) reuse its sample
    instead of decoding it again: the big-buck-bunny clip's 5 seeks all land on frame 0, and a
    1080p keyframe costs ~25 ms. What cannot be seeked or decoded is skipped; the result may hold
    fewer frames (or none).
    """
    ch, cw = _coded_size(height_px, width_px, rotation_cw)
    out: list[np.ndarray] = []
    by_key: dict[tuple[int, int], np.ndarray] = {}  # first packet after a seek (pts, byte pos) -> its sample
    try:
        with av.open(path, metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            base = stream.time_base
            start = stream.start_time or 0
            for k in range(count):
                target = duration_s * (k + 0.5) / count
                if base:
                    container.seek(start + int(target / base), stream=stream)  # to the keyframe before
                key, frame = None, None
                for i, packet in enumerate(container.demux(stream)):
                    # pts alone can repeat in a stream (concatenated MPEG-TS segments)
                    key = (packet.pts, packet.pos) if i == 0 and packet.pts is not None else key
                    if key in by_key:
                        break
                    decoded = packet.decode()  # a decoder with a reorder delay needs a few packets
                    if decoded:
                        frame = decoded[0]
                        break
                if key is not None and key in by_key:
                    out.append(by_key[key])
                elif frame is not None:
                    out.append(_upright(frame.to_ndarray(format="rgb24", width=cw, height=ch), rotation_cw))
                    if key is not None:
                        by_key[key] = out[-1]
    except (av.error.FFmpegError, ValueError, StopIteration) as e:
        log.debug("sampling frames of %s stopped after %d: %s", path, len(out), e)
    return np.stack(out) if out else np.zeros((0, height_px, width_px, 3), np.uint8)


def iter_pictures(
    path: str, height_px: int, width_px: int, *, codec: str, rotation_cw: int = 0, cfg: DecodeConfig | None = None,
) -> Iterator[tuple[int, float, Picture]]:
    """Yield (index, pts_s from the first frame, Picture of display size (height_px, width_px))."""
    cfg = cfg or DecodeConfig()
    if cfg.backend != "decord":
        yield from _pyav_pictures(path, height_px, width_px, rotation_cw, cfg.num_threads)
        return
    try:
        gen = _decord_frames(path, height_px, width_px, rotation_cw, cfg.num_threads)
        first = next(gen, None)
    except DecodeError:
        raise
    except Exception as e:  # decord raises its own error types, and RuntimeError/ValueError
        raise DecodeError(f"decord cannot open {codec} stream: {e}", 0) from None
    if first is None:
        raise DecodeError("decord delivered no frames", 0)
    for i, t, rgb in itertools.chain([first], gen):
        yield i, t, Picture.from_rgb(rgb)


def iter_frames(
    path: str, height_px: int, width_px: int, *, codec: str, rotation_cw: int = 0, cfg: DecodeConfig | None = None,
) -> Iterator[Frame]:
    """Yield (index, pts_s from the first frame, RGB uint8 (height_px, width_px, 3)), upright."""
    for i, t, picture in iter_pictures(path, height_px, width_px, codec=codec, rotation_cw=rotation_cw, cfg=cfg):
        yield i, t, picture.rgb()
