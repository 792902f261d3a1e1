"""PyAV probe: what a source is (duration, fps, frames, size, codec, rotation) or why it is bad.

The probe opens the container, picks the first video stream, reads its header metadata,
demuxes the first packets to tell constant from variable frame rate, and decodes one
frame to prove the stream is decodable (and to read its display rotation). Anything that
makes a source unusable becomes a `ProbeError` with a reason a person can act on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
import av
import numpy as np

VFR_PACKETS = 240  # packets inspected for frame-rate variability


class ProbeError(Exception):
    """The source cannot be used; the message is the reject reason."""


class StillImage(ProbeError):
    """FFmpeg reads the file as a single picture: a still-image source (pipeline/images.py), not a video."""


@dataclass
class ProbeConfig:
    """Sanity bounds a source must meet."""

    min_side_px: int = 32
    max_side_px: int = 8192
    max_aspect: float = 8.0  # longer/shorter side
    min_frames: int = 2  # a 1-frame "video" is an image
    max_duration_s: float = 6 * 3600.0


@dataclass
class VideoInfo:
    """Probe result. Sizes are display sizes (after rotation)."""

    duration_s: float
    fps: float  # average frame rate
    fps_is_variable: bool
    num_frames: int  # from the header when present, else duration × fps
    num_frames_is_exact: bool
    width_px: int
    height_px: int
    codec: str
    pix_fmt: str
    rotation_deg: int  # clockwise rotation applied to decoded frames for display
    container: str
    has_audio: bool

    def to_row(self) -> dict:
        return asdict(self)


def _rotation_cw(frame: av.VideoFrame) -> int:
    # PyAV reports the display matrix angle counter-clockwise; displaying needs the inverse.
    ccw = int(round(getattr(frame, "rotation", 0) or 0))
    return (-ccw) % 360


def _scan(container: av.container.InputContainer, stream: av.VideoStream) -> tuple[bool, av.VideoFrame | None]:
    """Demux the first packets: (is the frame rate variable?, first decoded frame)."""
    pts, first = [], None
    for i, packet in enumerate(container.demux(stream)):
        if packet.pts is not None:
            pts.append(packet.pts)
        if first is None:
            frames = packet.decode()
            first = frames[0] if frames else None
        if i >= VFR_PACKETS and first is not None:
            break
    ordered = np.sort(np.asarray(pts, dtype=np.int64))
    if len(ordered) > 32:  # a cut-off demux misses reordered (B-)frames near the end
        ordered = ordered[:-16]
    deltas = np.diff(ordered)
    deltas = deltas[deltas > 0]
    if len(deltas) < 2:
        return False, first
    return bool((deltas.max() - deltas.min()) > 0.02 * np.median(deltas) + 1), first


def probe(path: str, cfg: ProbeConfig) -> VideoInfo:
    """Probe a local file; raise ProbeError(reason) if it cannot be a source."""
    try:
        container = av.open(path, metadata_errors="ignore")
    except av.error.InvalidDataError as e:
        raise ProbeError(f"not a readable media container ({e.strerror or e})") from None
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise ProbeError(f"cannot open media: {e}") from None
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["no streams"]
            raise ProbeError(f"no video stream (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        fmt = container.format.name
        if fmt == "image2" or fmt.endswith("_pipe"):
            # FFmpeg reads a lone PNG/JPEG as a 1-frame "video"; say what it really is.
            raise StillImage(f"a still image, not a video ({ctx.name.upper()} image, read by {fmt})")
        width, height = int(ctx.width or 0), int(ctx.height or 0)
        if width <= 0 or height <= 0:
            raise ProbeError(f"video stream has no valid size ({width}x{height})")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        duration_s = 0.0
        if stream.duration is not None and stream.time_base:
            duration_s = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration_s = container.duration / av.time_base
        header_frames = int(stream.frames or 0)
        codec, pix_fmt = ctx.name, str(ctx.pix_fmt or "")
        has_audio = bool(container.streams.audio)
        try:
            vfr, first = _scan(container, stream)
        except (av.error.FFmpegError, ValueError) as e:
            raise ProbeError(f"video stream does not decode ({codec}): {e}") from None
        if first is None:
            raise ProbeError(f"video stream ({codec}) holds no decodable frames")
        rotation = _rotation_cw(first)
        pix_fmt = pix_fmt or first.format.name

    if rotation in (90, 270):
        width, height = height, width
    if fps <= 0 and duration_s > 0 and header_frames > 0:
        fps = header_frames / duration_s
    if fps <= 0:
        raise ProbeError("video stream has no usable frame rate")
    num_frames = header_frames if header_frames > 0 else int(round(duration_s * fps))
    info = VideoInfo(
        duration_s=duration_s or num_frames / fps, fps=fps, fps_is_variable=vfr,
        num_frames=num_frames, num_frames_is_exact=header_frames > 0,
        width_px=width, height_px=height, codec=codec, pix_fmt=pix_fmt,
        rotation_deg=rotation, container=container.format.name, has_audio=has_audio,
    )
    check_bounds(info, cfg)
    return info


def check_bounds(info: VideoInfo, cfg: ProbeConfig) -> None:
    """Reject absurd sizes, 1-frame videos and over-long sources with a clear reason."""
    w, h = info.width_px, info.height_px
    if min(w, h) < cfg.min_side_px or max(w, h) > cfg.max_side_px:
        raise ProbeError(f"absurd dimensions {w}x{h}: each side must be in [{cfg.min_side_px}, {cfg.max_side_px}] px")
    if max(w, h) / min(w, h) > cfg.max_aspect:
        raise ProbeError(f"absurd aspect ratio {w}x{h} (> {cfg.max_aspect}:1)")
    if info.num_frames < cfg.min_frames:
        raise ProbeError(f"only {info.num_frames} frame(s): a video needs at least {cfg.min_frames}")
    if info.duration_s > cfg.max_duration_s:
        raise ProbeError(f"duration {info.duration_s:.0f} s exceeds probe.max_duration_s={cfg.max_duration_s:.0f}")

