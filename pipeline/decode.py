"""Stream RGB frames from a local video file: decord fast path, PyAV fallback.

Frames come out one at a time as (index, pts_s, frame (H, W, 3) uint8), already scaled
to the requested size by the decoder (downscale early: a long 1080p source never sits in
memory) and turned upright by the source's display rotation. decord serves the codecs it
handles well; anything it cannot open (AV1 with decord 0.6, for one) goes to PyAV.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import av
import numpy as np

from pipeline.logs import get_logger

log = get_logger(__name__)

# Codecs decord 0.6 decodes correctly here (see tests/media.py for the checked table);
# everything else goes straight to PyAV rather than risking a crash inside decord.
DECORD_CODECS = {"h264", "hevc", "mpeg4", "vp8", "vp9", "mjpeg", "mpeg2video", "mpeg1video"}
# decord trusts the container's index; without one (MPEG-TS, raw streams) it silently
# repeats "recovered" frames on damage, so only indexed containers take the fast path.
DECORD_CONTAINERS = ("mov", "mp4", "matroska", "webm", "avi")

Frame = tuple[int, float, np.ndarray]


class DecodeError(Exception):
    """Decoding stopped early; `frames_decoded` frames were delivered before it."""

    def __init__(self, message: str, frames_decoded: int) -> None:
        super().__init__(message)
        self.frames_decoded = frames_decoded


@dataclass
class DecodeConfig:
    """Decoder choice and threading."""

    backend: Literal["auto", "decord", "pyav"] = "auto"
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


def _pyav_frames(path: str, height_px: int, width_px: int, rotation_cw: int, threads: int) -> Iterator[Frame]:
    ch, cw = _coded_size(height_px, width_px, rotation_cw)
    i, t0 = 0, None
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
                rgb = frame.to_ndarray(format="rgb24", width=cw, height=ch)
                yield i, float(t - t0), _upright(rgb, rotation_cw)
                i += 1
    except (av.error.FFmpegError, ValueError) as e:
        raise DecodeError(f"PyAV failed after frame {i}: {e}", i) from None


def sample_frames(path: str, height_px: int, width_px: int, *, duration_s: float, rotation_cw: int = 0,
                  count: int = 5) -> np.ndarray:
    """Up to `count` frames spread over a source, RGB uint8 (S, height_px, width_px, 3), upright.

    Each is the first frame decoded after a seek to (k + ½)/count of the duration — a keyframe,
    so a sample costs one keyframe decode, not a decode from the start (long GOPs stay cheap).
    What cannot be seeked or decoded is skipped; the result may hold fewer frames (or none).
    """
    ch, cw = _coded_size(height_px, width_px, rotation_cw)
    out: list[np.ndarray] = []
    try:
        with av.open(path, metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            base = stream.time_base
            start = stream.start_time or 0
            for k in range(count):
                target = duration_s * (k + 0.5) / count
                if base:
                    container.seek(start + int(target / base), stream=stream)  # to the keyframe before
                frame = next(iter(container.decode(stream)), None)
                if frame is not None:
                    out.append(_upright(frame.to_ndarray(format="rgb24", width=cw, height=ch), rotation_cw))
    except (av.error.FFmpegError, ValueError, StopIteration) as e:
        log.debug("sampling frames of %s stopped after %d: %s", path, len(out), e)
    return np.stack(out) if out else np.zeros((0, height_px, width_px, 3), np.uint8)


def iter_frames(
    path: str, height_px: int, width_px: int, *, codec: str, container: str = "mp4", rotation_cw: int = 0,
    cfg: DecodeConfig | None = None,
) -> Iterator[Frame]:
    """Yield (index, pts_s from the first frame, RGB uint8 (height_px, width_px, 3)), upright."""
    cfg = cfg or DecodeConfig()
    indexed = any(name in container.split(",") for name in DECORD_CONTAINERS)
    use_decord = cfg.backend == "decord" or (cfg.backend == "auto" and codec in DECORD_CODECS and indexed)
    if use_decord:
        try:
            gen = _decord_frames(path, height_px, width_px, rotation_cw, cfg.num_threads)
            first = next(gen, None)
        except Exception as e:  # decord raises its own error types, and RuntimeError/ValueError
            if cfg.backend == "decord":
                raise DecodeError(f"decord cannot open {codec} stream: {e}", 0) from None
            log.debug("decord could not open %s (%s); using PyAV", path, e)
        else:
            if first is not None:
                yield first
                yield from gen
                return
            if cfg.backend == "decord":
                raise DecodeError("decord delivered no frames", 0)
    yield from _pyav_frames(path, height_px, width_px, rotation_cw, cfg.num_threads)
