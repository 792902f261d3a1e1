"""Tests of the generated video corpus (tests/media.py), read back with PyAV.

Which of these decord 0.6 (the PyPI wheel, its own bundled FFmpeg) can open and read, probed
with `decord.VideoReader(path)` and reading every frame; useful for the decode stage:

    file                      decord 0.6
    ------------------------  -------------------------------------------------------------
    av1 (mp4)                 open fails: DECORDError "cannot find video stream" (its FFmpeg
                              has no AV1 decoder; AVERROR_DECODER_NOT_FOUND)
    vp9_webm                  ok, 100/100 frames
    hevc_10bit                ok, 100/100 frames, RGB matches PyAV's to ~0.3/255
    vfr                       ok, 80/80 frames; get_avg_fps() = 20.17 (a mean), but
                              get_frame_timestamp() gives the true irregular pts
    grayscale (hevc gray)     ok, 100/100 frames, returned as (H, W, 3) with R == G == B
    mjpeg_avi                 ok, 100/100 frames
    odd_dims 358x202          ok, (202, 358, 3)
    portrait 180x320          ok, (320, 180, 3)
    weird_name                ok (spaces + non-ASCII path)
    mislabelled (.dat)        ok (content sniffing)
    corrupt / corrupt_header  open fails: RuntimeError "Error reading ..."
    truncated (mp4)           open fails: RuntimeError "Error reading ..." (no moov atom)
    truncated_stream (.ts)    ok, 65 frames of 120: the decodable prefix, no error raised
    empty / not_video         open fails: RuntimeError "Error reading ..."
    audio_only                open fails: DECORDError "cannot find video stream"
    png_as_mov                open fails: DECORDError "Failed to measure duration/frame-count"
    one_frame                 ok, len 1
    absurd_dims 16x2048       "ok" but WRONG: frames come back (2048, 16, 6), garbage pixels
                              (decord mis-handles very narrow frames); probe and reject first

No decord call crashed the process; all failures are Python exceptions.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from tests import media

# name -> (accepted decoder names, decoded pix_fmt, (width, height), num_frames)
ODD_EXPECTED: dict[str, tuple[set[str], str, tuple[int, int], int]] = {
    "av1": ({"av1", "libdav1d", "libaom-av1"}, "yuv420p", (256, 144), 100),
    "vp9_webm": ({"vp9", "libvpx-vp9"}, "yuv420p", (256, 144), 100),
    "hevc_10bit": ({"hevc"}, "yuv420p10le", (256, 144), 100),
    "vfr": ({"h264"}, "yuv420p", (256, 144), 80),
    "grayscale": ({"hevc"}, "gray", (256, 144), 100),
    "mjpeg_avi": ({"mjpeg"}, "yuvj420p", (256, 144), 100),
    "odd_dims": ({"h264"}, "yuv420p", (358, 202), 100),
    "portrait": ({"h264"}, "yuv420p", (180, 320), 100),
    "weird_name": ({"h264"}, "yuv420p", (256, 144), 100),
    "mislabelled": ({"h264"}, "yuv420p", (256, 144), 100),
}


def _decode_all(path: Path) -> tuple[list[av.VideoFrame], Exception | None]:
    """Decode every frame of the first video stream; also return the error that stopped it."""
    frames: list[av.VideoFrame] = []
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                frames.append(frame)
    except av.error.FFmpegError as error:
        return frames, error
    return frames, None


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |a - b| over all pixels and channels, without uint8 wrap-around."""
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ---------------------------------------------------------------------------------------
# scene_frames
# ---------------------------------------------------------------------------------------


def test_scene_frames_seeded_with_hard_cuts() -> None:
    frames = list(media.scene_frames(64, 36, 30, cut_every=10, seed=3))
    again = list(media.scene_frames(64, 36, 30, cut_every=10, seed=3))
    other = next(media.scene_frames(64, 36, 1, cut_every=10, seed=4))
    assert len(frames) == 30
    assert frames[0].shape == (36, 64, 3) and frames[0].dtype == np.uint8
    assert all(np.array_equal(a, b) for a, b in zip(frames, again))
    assert not np.array_equal(frames[0], other)

    diffs = [_mean_abs_diff(frames[i - 1], frames[i]) for i in range(1, 30)]
    at_cuts = [diffs[i - 1] for i in (10, 20)]
    within = [d for i, d in enumerate(diffs, start=1) if i % 10]
    # A cut swaps hue, brightness and layout; inside a scene only a small square moves.
    assert min(at_cuts) > 40.0
    assert max(within) < 8.0
    # Luma alone (what survives a gray encode) still jumps at cuts.
    luma = [f @ np.array([0.299, 0.587, 0.114]) for f in frames]
    assert min(abs(luma[i] - luma[i - 1]).mean() for i in (10, 20)) > 80.0


def test_vfr_timestamps_alternate() -> None:
    times = media.vfr_timestamps(5)
    assert times == [0, Fraction(1, 30), Fraction(3, 30), Fraction(4, 30), Fraction(6, 30)]


# ---------------------------------------------------------------------------------------
# Odd but valid corpus
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ODD_EXPECTED))
def test_odd_video_reads_back(odd_videos: dict[str, Path], name: str) -> None:
    if name not in odd_videos:
        pytest.skip(f"{name}: no encoder in this PyAV build")
    decoders, pix_fmt, (width, height), num_frames = ODD_EXPECTED[name]
    path = odd_videos[name]
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name in decoders
        assert (stream.width, stream.height) == (width, height)
        assert min(width, height) >= 144
        assert container.duration / av.time_base >= 3.0
    frames, error = _decode_all(path)
    assert error is None
    assert len(frames) == num_frames
    assert {f.format.name for f in frames} == {pix_fmt}
    assert (frames[-1].width, frames[-1].height) == (width, height)


def test_odd_video_special_cases(odd_videos: dict[str, Path]) -> None:
    assert odd_videos["grayscale"].suffix == ".mkv"
    assert odd_videos["vp9_webm"].suffix == ".webm"
    assert odd_videos["mjpeg_avi"].suffix == ".avi"
    with av.open(str(odd_videos["mjpeg_avi"])) as container:
        assert container.format.name == "avi"
    name = odd_videos["weird_name"].name
    assert " " in name and not name.isascii()
    # The .dat file is found to be mp4 by content, not by its name.
    assert odd_videos["mislabelled"].suffix == ".dat"
    with av.open(str(odd_videos["mislabelled"])) as container:
        assert "mp4" in container.format.name
    portrait = odd_videos["portrait"]
    with av.open(str(portrait)) as container:
        stream = container.streams.video[0]
        assert Fraction(stream.width, stream.height) == Fraction(9, 16)


def test_vfr_is_irregular(odd_videos: dict[str, Path]) -> None:
    frames, _ = _decode_all(odd_videos["vfr"])
    times = np.array([float(f.time) for f in frames])
    durations = np.round(np.diff(times), 4)
    assert set(durations.tolist()) == {round(1 / 30, 4), round(1 / 15, 4)}
    assert times[-1] == pytest.approx(3.9333, abs=1e-3)  # 40 x (1/30 + 1/15) - 1/15


def test_odd_videos_have_detectable_cuts(odd_videos: dict[str, Path]) -> None:
    """PySceneDetect (PyAV backend, default thresholds) finds every cut, at 1, 2 and 3 s."""
    scenedetect = pytest.importorskip("scenedetect")
    from scenedetect.backends.pyav import VideoStreamAv

    for name, path in odd_videos.items():
        for detector in (scenedetect.ContentDetector, scenedetect.AdaptiveDetector):
            manager = scenedetect.SceneManager()
            manager.add_detector(detector())
            manager.detect_scenes(VideoStreamAv(str(path)))
            cuts_s = [round(start.seconds, 2) for start, _ in manager.get_scene_list()[1:]]
            assert cuts_s == [1.0, 2.0, 3.0], (name, detector.__name__)


# ---------------------------------------------------------------------------------------
# Bad corpus
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["corrupt", "corrupt_header", "truncated", "empty", "not_video"])
def test_bad_file_cannot_be_opened(bad_videos: dict[str, Path], name: str) -> None:
    path = bad_videos[name]
    assert path.suffix == ".mp4"
    with pytest.raises(av.error.InvalidDataError):
        av.open(str(path)).close()


def test_bad_files_are_what_they_claim(bad_videos: dict[str, Path]) -> None:
    assert bad_videos["empty"].stat().st_size == 0
    assert bad_videos["not_video"].name == "notes.mp4"
    assert bad_videos["not_video"].read_text().startswith("Shot list")
    # corrupt_header still carries a real H.264 payload after its wiped first 64 bytes.
    assert bad_videos["corrupt_header"].stat().st_size > 5000
    # truncated.mp4 has its mdat but lost the moov atom (the index) written at the end.
    data = bad_videos["truncated"].read_bytes()
    assert data[4:8] == b"ftyp" and b"mdat" in data and b"moov" not in data


def test_truncated_stream_keeps_early_scenes(bad_videos: dict[str, Path]) -> None:
    path = bad_videos["truncated_stream"]
    assert path.suffix == ".ts"
    frames, _ = _decode_all(path)
    # 55% of the bytes: the first scene and the cut into the second survive, the end doesn't.
    assert media.TRUNC_CUT_EVERY < len(frames) < media.TRUNC_NUM_FRAMES
    assert float(frames[-1].time) < media.TRUNC_NUM_FRAMES / media.FPS - 1.0


def test_audio_only_has_no_video(bad_videos: dict[str, Path]) -> None:
    with av.open(str(bad_videos["audio_only"])) as container:
        assert len(container.streams.video) == 0
        (audio,) = container.streams.audio
        assert audio.codec_context.name == "aac"
        assert container.duration / av.time_base == pytest.approx(2.0, abs=0.1)


def test_png_as_mov_is_a_still_image(bad_videos: dict[str, Path]) -> None:
    path = bad_videos["png_as_mov"]
    assert path.name == "picture.mov"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with av.open(str(path)) as container:
        assert container.format.name == "png_pipe"
        assert container.streams.video[0].codec_context.name == "png"
    frames, _ = _decode_all(path)
    assert len(frames) == 1


def test_one_frame(bad_videos: dict[str, Path]) -> None:
    frames, error = _decode_all(bad_videos["one_frame"])
    assert error is None and len(frames) == 1
    assert frames[0].to_ndarray(format="rgb24").shape == (144, 256, 3)


def test_absurd_dims_is_valid_but_absurd(bad_videos: dict[str, Path]) -> None:
    with av.open(str(bad_videos["absurd_dims"])) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (media.ABSURD_WIDTH, media.ABSURD_HEIGHT)
        assert stream.codec_context.name == "h264"
    frames, error = _decode_all(bad_videos["absurd_dims"])
    assert error is None and len(frames) == 25
    assert frames[0].to_ndarray(format="rgb24").shape == (2048, 16, 3)


# ---------------------------------------------------------------------------------------
# Real sample clips
# ---------------------------------------------------------------------------------------


def test_sample_clips(sample_clips: dict[str, Path]) -> None:
    expected = {"bikes": (640, 272), "bigbuckbunny": (1280, 720), "carphone_pristine": (176, 144)}
    for name, path in sample_clips.items():
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            assert (stream.width, stream.height) == expected[name]
