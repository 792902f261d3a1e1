"""Generated test-video corpus, written with PyAV.

Two corpora for the pipeline tests:

- `make_odd_valid_corpus`: real, playable videos in awkward-but-legal forms (AV1, VP9/WebM,
  10-bit HEVC, variable frame rate, grayscale, MJPEG/AVI, odd and portrait dims, a file name
  with spaces and non-ASCII, an mp4 with a misleading extension). Each is >= 3 s with >= 2
  hard scene cuts, so probe, decode and scene splitting all have something to do.
- `make_bad_corpus`: files a pipeline must reject or handle gracefully (random bytes,
  damaged header, truncation, empty, audio only, not a video at all, one frame, absurd dims).

Frames come from `scene_frames`: seeded, several visually distinct scenes joined by hard
cuts, so PySceneDetect's ContentDetector / AdaptiveDetector find the cuts at known frames.
Everything is small (<= 360 px) so both corpora build in a few seconds on a 2-core box.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# ---------------------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------------------

# Golden-ratio hue step: consecutive scenes land far apart on the hue circle (>= 0.38 turn).
_HUE_STEP = 0.381966
# Alternate bright/dark scenes so cuts survive conversion to grayscale, where hue is lost:
# ContentDetector averages H, S and V deltas, so a gray cut needs a V jump of ~3x its
# threshold (27); 0.9 -> 0.15 luma gives ~45.
_SCENE_LUMAS = (0.9, 0.15)


def scene_frames(
    width: int, height: int, num_frames: int, cut_every: int, seed: int = 0
) -> Iterator[np.ndarray]:
    """Yield `num_frames` RGB frames (H, W, 3) uint8 with a hard cut every `cut_every` frames.

    Each scene has its own hue, brightness and gradient direction, plus a square of the
    complementary colour moving at a constant velocity; within a scene only the square and
    a slow gradient drift change, so a content detector sees cuts only at multiples of
    `cut_every`.
    """
    rng = np.random.default_rng(seed)
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]  # (H, 1)
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]  # (1, W)
    hue0 = float(rng.random())
    for i in range(num_frames):
        scene, t = divmod(i, cut_every)
        if t == 0:
            hue = (hue0 + scene * _HUE_STEP) % 1.0
            luma = _SCENE_LUMAS[scene % len(_SCENE_LUMAS)]
            base = _rgb_with_luma(hue, 0.8, luma)
            square_rgb = _rgb_with_luma((hue + 0.5) % 1.0, 1.0, 1.0 - 0.7 * luma)
            angle = rng.uniform(0.0, 2.0 * np.pi)
            ramp = np.cos(angle) * xs + np.sin(angle) * ys  # (H, W), direction differs per scene
            side = max(4, int(min(width, height) * rng.uniform(0.2, 0.35)))
            start = rng.uniform(0.0, 1.0, size=2) * (np.array([width, height]) - side)
            velocity = rng.uniform(1.0, 3.0, size=2) * rng.choice([-1.0, 1.0], size=2)
        shade = 0.8 + 0.2 * np.cos(2.0 * np.pi * (ramp + 0.01 * t))  # (H, W), slow drift
        frame = shade[:, :, None] * base[None, None, :]  # (H, W, 3)
        # Bounce the square off the borders so it stays fully visible for any scene length.
        x, y = (_bounce(start[k] + velocity[k] * t, (width, height)[k] - side) for k in (0, 1))
        frame[y : y + side, x : x + side] = square_rgb
        yield (frame * 255.0 + 0.5).astype(np.uint8)


def _rgb_with_luma(hue: float, sat: float, luma: float) -> np.ndarray:
    """RGB (3,) float in [0, 1] of the given hue whose Rec.601 luma is `luma`.

    Scales toward black, or blends toward white (losing some saturation), because a
    saturated blue cannot be bright nor a saturated yellow dark.
    """
    rgb = np.array(colorsys.hsv_to_rgb(hue, sat, 1.0), dtype=np.float32)
    current = float(rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
    if luma <= current:
        return rgb * (luma / current)
    return rgb + (1.0 - rgb) * ((luma - current) / (1.0 - current))


def _bounce(pos: float, limit: int) -> int:
    """Reflect `pos` into [0, limit] (a triangle wave), as an int pixel offset."""
    if limit <= 0:
        return 0
    period = 2 * limit
    p = pos % period
    return int(p if p <= limit else period - p)


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    *,
    codec: str,
    fps: int | Fraction,
    pix_fmt: str | None = None,
    options: dict[str, str] | None = None,
    timestamps_s: Sequence[float | Fraction] | None = None,
    container_format: str | None = None,
) -> Path:
    """Encode RGB uint8 frames (H, W, 3) to `path`; return the path.

    `timestamps_s` gives explicit per-frame presentation times (variable frame rate); without
    it frames are spaced 1/fps apart. `container_format` overrides the guess from the suffix
    (needed when the suffix lies, e.g. an mp4 saved as `.dat`).
    """
    path = Path(path)
    frame_iter = iter(frames)
    first = next(frame_iter)
    height, width = first.shape[:2]
    if timestamps_s is None:
        time_base = 1 / Fraction(fps)  # CFR: pts counts frames exactly
    else:
        time_base = Fraction(1, 90000)  # VFR: MPEG clock, fine enough for any jitter we use
    num_written = 0
    with av.open(str(path), mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        # One encoder thread: threaded x264 / libvpx / SVT-AV1 split the work by core count, and
        # the bitstream (bytes, lossy error, where a truncation lands) would differ per machine.
        stream.codec_context.thread_count = 1
        stream.width, stream.height = width, height
        if pix_fmt is not None:
            stream.pix_fmt = pix_fmt
        stream.codec_context.time_base = time_base
        stream.time_base = time_base
        for i, array in enumerate(_chain(first, frame_iter)):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            t = i / Fraction(fps) if timestamps_s is None else Fraction(timestamps_s[i])
            frame.pts = round(t / time_base)
            frame.time_base = time_base
            # rgb24 → the stream's pix_fmt (gray, yuv420p10le, ...) on one thread: swscale
            # slices the picture by core count, and at odd sizes that changes chroma rounding.
            frame = frame.reformat(format=stream.pix_fmt, threads=1)
            frame.pts = round(t / time_base)
            frame.time_base = time_base
            container.mux(stream.encode(frame))
            num_written += 1
        container.mux(stream.encode(None))  # flush delayed frames (B-frames, lookahead)
    if timestamps_s is not None and len(timestamps_s) != num_written:
        raise ValueError(f"{len(timestamps_s)} timestamps for {num_written} frames")
    return path


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """Put back the frame peeked to learn the size."""
    yield first
    yield from rest


def write_sine_audio(path: str | Path, duration_s: float, *, freq_hz: float = 440.0) -> Path:
    """Write a mono AAC sine tone (no video stream) to `path`; return the path."""
    path = Path(path)
    sample_rate = 44100
    frame_size = 1024  # AAC's fixed frame size
    num_samples = int(duration_s * sample_rate)
    t = np.arange(num_samples, dtype=np.float32) / sample_rate
    samples = (0.3 * np.sin(2.0 * np.pi * freq_hz * t)).astype(np.float32)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=sample_rate, layout="mono")
        for start in range(0, num_samples, frame_size):
            chunk = samples[start : start + frame_size]
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
            frame.sample_rate = sample_rate
            frame.pts = start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def png_bytes(image: np.ndarray) -> bytes:
    """Encode one RGB uint8 image (H, W, 3) as PNG bytes with PyAV's png encoder."""
    ctx = av.CodecContext.create("png", "w")
    ctx.width, ctx.height = image.shape[1], image.shape[0]
    ctx.pix_fmt = "rgb24"
    ctx.time_base = Fraction(1, 1)
    frame = av.VideoFrame.from_ndarray(image, format="rgb24")
    packets = [*ctx.encode(frame), *ctx.encode(None)]
    return b"".join(bytes(p) for p in packets)


def first_encoder(candidates: Sequence[str]) -> str | None:
    """Return the first of `candidates` this PyAV build can encode with, else None."""
    for name in candidates:
        try:
            av.codec.Codec(name, "w")
        except av.codec.codec.UnknownCodecError:
            continue
        return name
    return None


# ---------------------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------------------

# Shared recipe for the valid clips: 4 s at 25 fps, cuts at 1, 2 and 3 s.
FPS = 25
NUM_FRAMES = 100
CUT_EVERY = 25
WIDTH, HEIGHT = 256, 144  # shortest side 144: the smallest a pipeline is expected to keep

# veryfast, not ultrafast: ultrafast turns off x264's scenecut, and real footage has
# keyframes at cuts. At these sizes veryfast is still a few ms per frame.
# Plain C paths (asm=0), one thread: x264's and x265's SIMD and thread choices depend on the CPU
# (seen: packet sizes of the same frames differ between a 1-core and a 2-core run), and tests
# that cut a file at a byte offset or bound a lossy error need the same bitstream everywhere.
# At these frame sizes the C paths are still milliseconds per frame.
X264 = {"preset": "veryfast", "crf": "28", "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0:asm=0"}
X265 = {"preset": "ultrafast", "crf": "30", "x265-params": "log-level=error:pools=1:frame-threads=1:asm=0"}
VP9 = {"deadline": "realtime", "cpu-used": "8", "crf": "35", "b": "0"}
# Fast settings per AV1 encoder, tried in this order. Only libsvtav1 is in PyAV 18's wheel;
# the other two entries follow FFmpeg's option names but are untested here.
AV1_ENCODERS = {
    "libsvtav1": {"preset": "10", "crf": "45", "svtav1-params": "lp=1"},  # SVT-AV1 4.x maps 12 to 11; 10 is plenty
    "libaom-av1": {"cpu-used": "8", "usage": "realtime", "crf": "45"},
    "librav1e": {"speed": "10", "qp": "120"},
}

WEIRD_NAME = "clip with spaces – ünïcødé 映像.mp4"

# VFR pattern: alternate 1/30 s and 1/15 s frame durations (mean 1/20 s).
VFR_DURATIONS_S = (Fraction(1, 30), Fraction(1, 15))


def vfr_timestamps(num_frames: int) -> list[Fraction]:
    """Per-frame pts (s) alternating between the `VFR_DURATIONS_S` frame durations."""
    times, t = [], Fraction(0)
    for i in range(num_frames):
        times.append(t)
        t += VFR_DURATIONS_S[i % len(VFR_DURATIONS_S)]
    return times


def _scenes(
    width: int = WIDTH, height: int = HEIGHT, num_frames: int = NUM_FRAMES, seed: int = 0
) -> Iterator[np.ndarray]:
    """The standard multi-scene content at the given size."""
    return scene_frames(width, height, num_frames, CUT_EVERY, seed=seed)


def make_odd_valid_corpus(out_dir: str | Path) -> dict[str, Path]:
    """Write the odd-but-valid videos into `out_dir`; return name -> path.

    If no AV1 encoder is built into PyAV the `av1` entry is left out (callers skip it).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    videos: dict[str, Path] = {}

    av1 = first_encoder(list(AV1_ENCODERS))
    if av1 is not None:
        # SVT-AV1 prints a ~25-line banner to stderr per encoder; keep only its errors.
        os.environ.setdefault("SVT_LOG", "1")
        videos["av1"] = write_video(out / "av1.mp4", _scenes(seed=1), codec=av1, fps=FPS,
                                    pix_fmt="yuv420p", options=AV1_ENCODERS[av1])
    videos["vp9_webm"] = write_video(out / "vp9.webm", _scenes(seed=2), codec="libvpx-vp9",
                                     fps=FPS, options=VP9)
    videos["hevc_10bit"] = write_video(out / "hevc_10bit.mp4", _scenes(seed=3), codec="libx265",
                                       fps=FPS, pix_fmt="yuv420p10le", options=X265)
    # 80 frames at a mean 1/20 s = 4 s, so same cut times (1, 2, 3 s) as the CFR clips.
    num_vfr = 80
    videos["vfr"] = write_video(out / "vfr.mp4",
                                scene_frames(WIDTH, HEIGHT, num_vfr, num_vfr // 4, seed=4),
                                codec="libx264", fps=30, options=X264,
                                timestamps_s=vfr_timestamps(num_vfr))
    # HEVC 4:0:0, not H.264: FFmpeg's h264 decoder returns monochrome streams as yuv420p with
    # flat chroma, while its hevc decoder hands back pix_fmt gray (ffv1 would too, at 50x
    # the size). mkv so the corpus has a Matroska file that is not WebM.
    videos["grayscale"] = write_video(out / "grayscale.mkv", _scenes(seed=5), codec="libx265",
                                      fps=FPS, pix_fmt="gray", options=X265)
    videos["mjpeg_avi"] = write_video(out / "mjpeg.avi", _scenes(seed=6), codec="mjpeg",
                                      fps=FPS, pix_fmt="yuvj420p", options={"q:v": "5"})
    # 358 and 202 are even (yuv420p needs that) but not multiples of 16 (macroblock padding).
    videos["odd_dims"] = write_video(out / "odd_dims_358x202.mp4", _scenes(358, 202, seed=7),
                                     codec="libx264", fps=FPS, options=X264)
    videos["portrait"] = write_video(out / "portrait_180x320.mp4", _scenes(180, 320, seed=8),
                                     codec="libx264", fps=FPS, options=X264)
    videos["weird_name"] = write_video(out / WEIRD_NAME, _scenes(seed=9), codec="libx264",
                                       fps=FPS, options=X264)
    # Forced format: the `.dat` suffix would otherwise make PyAV refuse to guess a muxer.
    videos["mislabelled"] = write_video(out / "not_a_video.dat", _scenes(seed=10),
                                        codec="libx264", fps=FPS, options=X264,
                                        container_format="mp4")
    return videos


# Truncated clips: 4.8 s, cuts at 1.2, 2.4, 3.6 s; keep 55% of the bytes.
TRUNC_NUM_FRAMES = 120
TRUNC_CUT_EVERY = 30
TRUNC_KEEP = 0.55
ABSURD_WIDTH, ABSURD_HEIGHT = 16, 2048


def make_bad_corpus(out_dir: str | Path) -> dict[str, Path]:
    """Write the broken / unusable files into `out_dir`; return name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    bad: dict[str, Path] = {}

    bad["corrupt"] = out / "corrupt.mp4"
    bad["corrupt"].write_bytes(rng.bytes(64 * 1024))

    header = write_video(out / "corrupt_header.mp4", _scenes(seed=20), codec="libx264",
                         fps=FPS, options=X264)
    data = bytearray(header.read_bytes())
    data[:64] = rng.bytes(64)  # wipes ftyp and the first box sizes
    header.write_bytes(bytes(data))
    bad["corrupt_header"] = header

    # mp4 puts the moov atom (the index) at the end, so a cut-off mp4 cannot even be opened.
    def trunc_frames() -> Iterator[np.ndarray]:
        return scene_frames(WIDTH, HEIGHT, TRUNC_NUM_FRAMES, TRUNC_CUT_EVERY, seed=21)

    bad["truncated"] = _truncate(write_video(out / "truncated.mp4", trunc_frames(),
                                             codec="libx264", fps=FPS, options=X264))
    # MPEG-TS has no index: a cut-off .ts still decodes up to the cut, keeping early scenes.
    bad["truncated_stream"] = _truncate(write_video(out / "truncated_stream.ts", trunc_frames(),
                                                    codec="libx264", fps=FPS, options=X264))

    bad["empty"] = out / "empty.mp4"
    bad["empty"].write_bytes(b"")

    bad["audio_only"] = write_sine_audio(out / "audio_only.mp4", duration_s=2.0)

    bad["not_video"] = out / "notes.mp4"
    bad["not_video"].write_text("Shot list\n- beach, sunset\n- city at night\n")

    bad["png_as_mov"] = out / "picture.mov"
    bad["png_as_mov"].write_bytes(png_bytes(next(_scenes(seed=22))))

    bad["one_frame"] = write_video(out / "one_frame.mp4", _scenes(num_frames=1, seed=23),
                                   codec="libx264", fps=FPS, options=X264)

    bad["absurd_dims"] = write_video(
        out / f"absurd_dims_{ABSURD_WIDTH}x{ABSURD_HEIGHT}.mp4",
        scene_frames(ABSURD_WIDTH, ABSURD_HEIGHT, 25, 25, seed=24),
        codec="libx264", fps=FPS, options=X264)
    return bad


def _truncate(path: Path, keep: float = TRUNC_KEEP) -> Path:
    """Cut `path` to the first `keep` fraction of its bytes, in place; return the path."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path
