"""The CPU path: one decode of each frame serves scene detection and clip sampling.

`cut_source` streams a source's frames through a `SceneTracker`, keeps only the frames
of the scene still open, and turns each finished scene (or each full-length window of
a long scene, as soon as no later cut can fall inside it) into bucket-shaped clips:
resampled to the bucket fps by timestamps, resized and center-cropped. Memory is bounded
by one window of frames (kept I420 as decoded: 1.5 bytes a pixel) plus the detector's lag,
however long the source is; only the frames a clip samples are converted to RGB.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from pipeline.buckets import (
    BucketConfig, SourceBucketing, available_target_frames, cover_size, make_bucket, resample_indices, resize_crop,
)
from pipeline.decode import DecodeConfig, DecodeError, Picture, iter_pictures
from pipeline.images import read_image
from pipeline.probe import ProbeError
from pipeline.scenes import SceneConfig, SceneTracker, detect_size


@dataclass
class Clip:
    """One bucket-shaped clip cut from a source."""

    scene_index: int
    window_index: int
    start_frame: int  # first source frame (inclusive)
    end_frame: int  # source frame after the clip (exclusive)
    start_s: float
    end_s: float
    bucket_name: str
    frames: np.ndarray  # (T, H, W, 3) uint8


@dataclass
class SpanReject:
    """A span of a source that yields no clip, and why."""

    stage: str
    reason: str
    start_frame: int = -1
    end_frame: int = -1


@dataclass
class _Buffered:
    index: int
    pts_s: float
    frame: Picture = field(repr=False)


class ArrayPool:
    """Clip arrays whose memory is reused once nothing references them any more.

    A fresh 180 MB clip array (65 frames at 720p) costs ~57 ms of first-touch page faults on the
    dev box (kernel time zeroing pages: MAP_POPULATE is no cheaper); one whose pages are already
    mapped, 7 ms. glibc hands big arrays back to the kernel on free, so each clip paid it anew:
    ~0.13 of a plain decode at production bucket sizes. An array is handed out again only when
    the pool's reference is the only one left: every numpy view, buffer export (Arrow zero-copy
    included) and pickle-in-progress of a clip holds a reference to its owner array, so a clip
    Ray Data still holds in a block is never overwritten. Each Cutter has its own pool, so
    memory is reused between the clips of one source and nothing stays mapped after it; at most
    `keep` owners are kept (2 x 356 MB for 129-frame 720p clips, about what two clips in flight
    take anyway).
    """

    def __init__(self, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"ArrayPool keep={keep} must be >= 1")
        self.keep = keep
        self.owners: list[np.ndarray] = []  # 1-D uint8, owning their memory
        self.lock = threading.Lock()

    def empty(self, shape: tuple[int, ...]) -> np.ndarray:
        """An uninitialised uint8 array of `shape`, on reused memory when some is free."""
        n = math.prod(shape)
        with self.lock:
            for i in range(len(self.owners)):  # (enumerate's reused tuple would hold a reference)
                # 2 = this list and getrefcount's argument: no clip uses the owner
                if self.owners[i].size >= n and sys.getrefcount(self.owners[i]) == 2:
                    owner = self.owners.pop(i)
                    self.owners.append(owner)  # most recently used last
                    return owner[:n].reshape(shape)
            owner = np.empty(n, np.uint8)
            self.owners = (self.owners + [owner])[-self.keep :]
            return owner[:n].reshape(shape)


class Cutter:
    """Incremental scene → window → clip logic for one source (no I/O; unit-testable)."""

    def __init__(self, sb: SourceBucketing, buckets: BucketConfig, scenes: SceneConfig, source_fps: float) -> None:
        self.sb, self.cfg = sb, buckets
        self.fps = buckets.fps
        self.max_frames = max(buckets.num_frames)
        self.min_frames = min(buckets.num_frames)
        self.tracker = SceneTracker(scenes, source_fps)
        self.source_fps = source_fps
        self.buffer: list[_Buffered] = []
        self.scene_index = 0
        self.window_index = 0
        self.window_start = 0  # source frame index where the next window starts
        self.arrays = ArrayPool()

    # -- buffer helpers -------------------------------------------------------
    def _pos(self, index: int) -> int:
        return index - self.buffer[0].index

    def _pts(self, index: int) -> float:
        return self.buffer[self._pos(index)].pts_s

    def _drop_before(self, index: int) -> None:
        if self.buffer and index > self.buffer[0].index:
            del self.buffer[: min(len(self.buffer), self._pos(index))]

    def _first_at_or_after(self, t: float, start: int, stop: int) -> int | None:
        """First buffered frame index in [start, stop) shown at or after time t."""
        for b in self.buffer[self._pos(start) :]:
            if b.index >= stop:
                return None
            if b.pts_s >= t - 1e-4:
                return b.index
        return None

    def _make_clip(self, start: int, end: int, num_frames: int) -> Clip:
        span = self.buffer[self._pos(start) : self._pos(start) + (end - start)]
        pts = np.array([b.pts_s for b in span])
        start_s = span[0].pts_s
        picks = resample_indices(pts, start_s, num_frames, self.fps)
        frames = self.arrays.empty((num_frames, self.sb.height_px, self.sb.width_px, 3))  # (T, H, W, 3)
        for j, k in enumerate(picks):  # only picked frames are converted (see decode.Picture)
            frames[j] = frames[j - 1] if j and k == picks[j - 1] else \
                resize_crop(span[k].frame.rgb(), self.sb.height_px, self.sb.width_px)
        bucket = make_bucket(self.sb, num_frames, self.cfg)
        clip = Clip(self.scene_index, self.window_index, start, end, start_s, start_s + num_frames / self.fps,
                    bucket.name, frames)
        self.window_index += 1
        return clip

    # -- the two events: a frame arrives, a scene closes ---------------------------
    def push(self, index: int, pts_s: float, frame: Picture | np.ndarray) -> list[Clip | SpanReject]:
        """Add one decoded frame (a Picture, or RGB (H, W, 3)); return clips/rejects that became final."""
        picture = frame if isinstance(frame, Picture) else Picture.from_rgb(frame)
        self.buffer.append(_Buffered(index, pts_s, picture))
        out: list[Clip | SpanReject] = []
        small = picture.detect_rgb(*detect_size(*picture.shape, self.tracker.cfg.detect_width_px))
        for cut in self.tracker.push(index, small):
            out += self._close_scene(cut, self._pts(cut))
        out += self._emit_ready_windows(index)
        return out

    def finish(self, frame_duration_s: float | None = None) -> list[Clip | SpanReject]:
        """End of stream: flush the detector and close the last scene."""
        if not self.buffer:
            return []
        out: list[Clip | SpanReject] = []
        last = self.buffer[-1]
        for cut in self.tracker.finish():
            if cut <= last.index:
                out += self._close_scene(cut, self._pts(cut))
        if frame_duration_s is None:
            frame_duration_s = 1.0 / self.source_fps
        out += self._close_scene(last.index + 1, last.pts_s + frame_duration_s)
        return out

    def _emit_ready_windows(self, newest: int) -> list[Clip | SpanReject]:
        out: list[Clip | SpanReject] = []
        while self.buffer:
            start_s = self._pts(self.window_start)
            nxt = self._first_at_or_after(start_s + self.max_frames / self.fps, self.window_start, newest + 1)
            # Emit only once no cut can still be reported inside [window_start, nxt).
            if nxt is None or newest < nxt - 1 + self.tracker.lag_frames:
                break
            out.append(self._make_clip(self.window_start, nxt, self.max_frames))
            self.window_start = nxt
            self._drop_before(nxt)
        return out

    def _close_scene(self, end: int, end_s: float) -> list[Clip | SpanReject]:
        out: list[Clip | SpanReject] = []
        if end <= self.window_start:  # a (late) cut inside an emitted window: nothing left to close
            return out
        while True:
            start_s = self._pts(self.window_start)
            available = available_target_frames(start_s, end_s, self.fps)
            if available >= self.max_frames:
                nxt = self._first_at_or_after(start_s + self.max_frames / self.fps, self.window_start, end)
                out.append(self._make_clip(self.window_start, nxt if nxt is not None else end, self.max_frames))
                if nxt is None:
                    break
                self.window_start = nxt
                continue
            fitting = [n for n in self.cfg.num_frames if n <= available]
            if fitting:
                out.append(self._make_clip(self.window_start, end, max(fitting)))
            elif available > 0 or self.window_index == 0:
                out.append(SpanReject(
                    "scene", f"scene {self.scene_index} span of {available} frame(s) at {self.fps:g} fps is shorter "
                    f"than the shortest bucket ({self.min_frames} frames)", self.window_start, end))
            break
        self.scene_index += 1
        self.window_index = 0
        self.window_start = end
        self._drop_before(end)
        return out


def decode_size(src_h: int, src_w: int, sb: SourceBucketing, detect_width_px: int) -> tuple[int, int]:
    """Decode at the size that covers the bucket, but never below the detection width (or above source)."""
    ch, cw = cover_size(src_h, src_w, sb.height_px, sb.width_px)
    dh, dw = detect_size(src_h, src_w, detect_width_px)
    if dw > cw:
        ch, cw = dh, dw
    return ch + (ch % 2), cw + (cw % 2)  # even sizes keep swscale's chroma paths exact


def crop_window(height_px: int, width_px: int, crop_px: tuple[int, int, int, int] | list[int], sb: SourceBucketing,
                detect_width_px: int) -> tuple[tuple[int, int], tuple[slice, slice]]:
    """(decode (h, w) of the whole frame, the content's slices in it) for a source with bars `crop_px`.

    The whole frame is decoded at the scale that gives the *content* its decode size (so the
    bars cost decode time but never resolution), then the bars are sliced off (a view, no copy).
    """
    top, bottom, left, right = crop_px
    content_h, content_w = height_px - top - bottom, width_px - left - right
    ch, cw = decode_size(content_h, content_w, sb, detect_width_px)
    sy, sx = min(ch, content_h) / content_h, min(cw, content_w) / content_w
    full_h, full_w = round(height_px * sy), round(width_px * sx)
    full_h, full_w = min(height_px, full_h + full_h % 2), min(width_px, full_w + full_w % 2)
    t, b, le, r = round(top * sy), round(bottom * sy), round(left * sx), round(right * sx)
    return (full_h, full_w), (slice(t, full_h - b), slice(le, full_w - r))


def small_pages() -> None:
    """Have numpy stop asking the kernel for transparent huge pages (madvise) for big arrays.

    numpy marks every array of 4 MB or more MADV_HUGEPAGE. Where the kernel's THP defrag setting
    is `madvise` (Ubuntu's default, and this dev box's), each fresh allocation so marked waits for
    memory compaction: a 65-frame 720p clip (180 MB) took 0.26 s to assemble against 0.08 s with
    4 KB pages — a third of the CPU path at production bucket sizes (tests/bench/pipeline.py
    --config pipeline/configs/production.yaml). The cut stage makes one such array per clip and
    drops it once Ray Data has copied it into a block, so huge pages buy it nothing. The switch
    is numpy's own (what its NUMPY_MADVISE_HUGEPAGE=0 sets at import), per process.
    """
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    if setter is not None:
        setter(False)


def cut_source(
    path: str, *, width_px: int, height_px: int, fps: float, codec: str, rotation_cw: int,
    duration_s: float = 0.0, sb: SourceBucketing, buckets: BucketConfig, scenes: SceneConfig, decode: DecodeConfig,
    crop_px: tuple[int, int, int, int] | list[int] = (0, 0, 0, 0),
) -> Iterator[Clip | SpanReject]:
    """Decode `path` once and yield its clips (and rejected spans) as they become final.

    `crop_px` (top, bottom, left, right display pixels, see filters.border_crop) are black bars
    cut off every frame before scene detection and bucketing; `sb` is the bucket of what is left.
    """
    small_pages()  # this process assembles clips of up to hundreds of MB each (see small_pages)
    (dh, dw), window = crop_window(height_px, width_px, crop_px, sb, scenes.detect_width_px)
    cutter = Cutter(sb, buckets, scenes, fps)
    last_pts = None
    deltas: list[float] = []
    try:
        frames = iter_pictures(path, dh, dw, codec=codec, rotation_cw=rotation_cw, cfg=decode)
        for index, pts_s, frame in frames:
            if last_pts is not None:
                deltas = (deltas + [pts_s - last_pts])[-8:]
            last_pts = pts_s
            yield from cutter.push(index, pts_s, frame.cropped(window))
    except DecodeError as e:
        yield SpanReject("decode", f"decoding stopped after {e.frames_decoded} frame(s); clips before that were "
                         f"kept: {e}", e.frames_decoded, -1)
    else:
        # A stream that ends well before its declared duration was cut short (truncated file).
        decoded_s = (last_pts or 0.0) + 1.0 / fps
        if duration_s > 0 and decoded_s < 0.9 * duration_s and duration_s - decoded_s > 0.5:
            yield SpanReject("decode", f"stream ended at {decoded_s:.2f} s but declares {duration_s:.2f} s "
                             "(truncated?); clips before that were kept", -1, -1)
    positive = [d for d in deltas if d > 0]
    yield from cutter.finish(float(np.median(positive)) if positive else None)


def cut_image(path: str, sb: SourceBucketing, buckets: BucketConfig) -> Iterator[Clip | SpanReject]:
    """A still image → its one 1-frame clip (resized and centre-cropped to the bucket), or why not."""
    try:
        frame = read_image(path)  # (H, W, 3) as displayed
    except ProbeError as e:
        yield SpanReject("decode", str(e), 0, 1)
        return
    bucket = make_bucket(sb, 1, buckets)
    pixels = resize_crop(frame, sb.height_px, sb.width_px)[None]  # (1, H, W, 3)
    yield Clip(0, 0, 0, 1, 0.0, 1.0 / buckets.fps, bucket.name, pixels)
