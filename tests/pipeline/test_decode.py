"""pipeline/decode.py: the PyAV path (OpenCV-scaled 4:2:0 planes, lazy RGB), decord on request, errors, rotation,
odd pixel formats."""

from __future__ import annotations

import itertools
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from pipeline.decode import DecodeConfig, DecodeError, iter_frames
from pipeline.probe import ProbeConfig, probe
from tests import media
from tests.pipeline.test_discover_probe import write_rotated

PYAV = DecodeConfig(backend="pyav")
DECORD = DecodeConfig(backend="decord")


def _decode(path: Path, h: int, w: int, cfg: DecodeConfig, **kw: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices, pts_s, frames (T, H, W, 3)) of a whole file."""
    out = list(iter_frames(str(path), h, w, cfg=cfg, **kw))
    idx = np.array([i for i, _, _ in out])
    pts = np.array([t for _, t, _ in out])
    return idx, pts, np.stack([f for _, _, f in out])


@pytest.fixture(scope="module")
def bikes_both(sample_clips: dict[str, Path]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return {name: _decode(sample_clips["bikes"], 136, 320, cfg, codec="h264")
            for name, cfg in (("decord", DECORD), ("pyav", PYAV))}


def test_backends_agree_on_bikes(bikes_both: dict) -> None:
    (i_d, t_d, f_d), (i_p, t_p, f_p) = bikes_both["decord"], bikes_both["pyav"]
    assert len(f_d) == len(f_p) == 250
    np.testing.assert_array_equal(i_d, np.arange(250))
    np.testing.assert_array_equal(i_p, np.arange(250))
    np.testing.assert_allclose(t_d, np.arange(250) / 25.0, atol=1e-3)
    np.testing.assert_allclose(t_p, t_d, atol=1e-3)
    diff = np.abs(f_d.astype(np.int16) - f_p.astype(np.int16)).mean()
    # Frames one step apart: what an off-by-one frame would look like.
    shifted = np.abs(f_d[1:].astype(np.int16) - f_p[:-1].astype(np.int16)).mean()
    assert shifted > 3.0  # the check can fail
    # The two backends' FFmpeg builds resize and convert colour with their own SIMD rounding:
    # not bit-equal anywhere, and the gap varies by CPU, so bound it by the off-by-one gap.
    assert diff < 0.25 * shifted, (diff, shifted)


def test_output_shape_is_the_requested_size(bikes_both: dict, odd_videos: dict[str, Path]) -> None:
    for _, _, frames in bikes_both.values():
        assert frames.shape == (250, 136, 320, 3) and frames.dtype == np.uint8
    # Any (even odd) size, both backends, aspect not preserved by request.
    for cfg in (DECORD, PYAV):
        _, _, frames = _decode(odd_videos["odd_dims"], 101, 57, cfg, codec="h264")
        assert frames.shape == (100, 101, 57, 3) and frames.dtype == np.uint8


@pytest.mark.parametrize("width", [48, 72])
def test_narrow_widths_decord_mishandles_fall_back_to_pyav(odd_videos: dict[str, Path], width: int) -> None:
    # decord 0.6 returns (H, W, 4) garbage at some narrow widths; auto must not pass that on.
    path = odd_videos["weird_name"]
    _, _, auto = _decode(path, 64, width, DecodeConfig(backend="auto"), codec="h264")
    _, _, ref = _decode(path, 64, width, PYAV, codec="h264")
    assert auto.shape == ref.shape == (100, 64, width, 3)
    np.testing.assert_array_equal(auto, ref)
    with pytest.raises(DecodeError, match="decord"):
        list(iter_frames(str(path), 64, width, codec="h264", cfg=DECORD))


def test_pts_start_at_zero_and_follow_vfr(odd_videos: dict[str, Path]) -> None:
    expected = np.array([float(t) for t in media.vfr_timestamps(80)])
    for cfg in (DECORD, PYAV):
        _, pts, _ = _decode(odd_videos["vfr"], 72, 128, cfg, codec="h264")
        assert pts[0] == 0.0
        np.testing.assert_allclose(pts, expected, atol=2e-3)


@pytest.mark.parametrize("codec", ["av1", "libdav1d"])
def test_av1_auto_falls_back_to_pyav(odd_videos: dict[str, Path], codec: str) -> None:
    if "av1" not in odd_videos:
        pytest.skip("no AV1 encoder in this PyAV build")
    path = odd_videos["av1"]
    _, pts, frames = _decode(path, 72, 128, DecodeConfig(backend="auto"), codec=codec)
    assert frames.shape == (100, 72, 128, 3)
    assert frames.std() > 10  # real pictures, not blank buffers
    _, pts_p, frames_p = _decode(path, 72, 128, PYAV, codec=codec)
    np.testing.assert_array_equal(frames, frames_p)
    np.testing.assert_allclose(pts, pts_p)


def test_decord_only_on_av1_raises_decode_error(odd_videos: dict[str, Path]) -> None:
    if "av1" not in odd_videos:
        pytest.skip("no AV1 encoder in this PyAV build")
    with pytest.raises(DecodeError, match="decord cannot open av1") as e:
        list(iter_frames(str(odd_videos["av1"]), 72, 128, codec="av1", cfg=DECORD))
    assert e.value.frames_decoded == 0


def test_truncated_stream_yields_its_decodable_prefix(bad_videos: dict[str, Path]) -> None:
    # A cut-off MPEG-TS carries no sign of damage (the demuxer drops the partial packet), so
    # decoding ends quietly after the prefix; spotting the truncation is the cut step's job.
    counts = set()
    for cfg in (PYAV, DecodeConfig(backend="auto")):
        idx, pts, frames = _decode(bad_videos["truncated_stream"], 72, 128, cfg, codec="h264")
        assert 0 < len(frames) < media.TRUNC_NUM_FRAMES
        np.testing.assert_allclose(pts, np.arange(len(frames)) / media.FPS, atol=1e-3)
        counts.add(len(frames))
    assert len(counts) == 1


def _corrupt_middle(path: Path, num_bytes: int = 2000) -> Path:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + num_bytes] = np.random.default_rng(0).bytes(num_bytes)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("codec", "suffix", "pix_fmt", "backend"),
    [("mjpeg", "avi", "yuvj420p", "pyav"), ("ffv1", "mkv", "yuv420p", "auto")],
)
def test_damage_mid_stream_raises_decode_error_after_good_frames(
    tmp_path: Path, codec: str, suffix: str, pix_fmt: str, backend: str
) -> None:
    path = media.write_video(tmp_path / f"damaged.{suffix}", media.scene_frames(64, 48, 30, 10, seed=1),
                             codec=codec, fps=25, pix_fmt=pix_fmt)
    _corrupt_middle(path)
    got = []
    with pytest.raises(DecodeError) as e:
        for i, _, frame in iter_frames(str(path), 48, 64, codec=codec,
                                       cfg=DecodeConfig(backend=backend)):
            got.append(i)
    assert 0 < e.value.frames_decoded < 30
    assert e.value.frames_decoded == len(got)  # exactly the frames the caller received
    assert got == list(range(len(got)))
    assert f"after frame {len(got)}" in str(e.value)


def test_missing_file_raises_decode_error(tmp_path: Path) -> None:
    with pytest.raises(DecodeError) as e:
        list(iter_frames(str(tmp_path / "gone.mp4"), 48, 64, codec="h264"))
    assert e.value.frames_decoded == 0


@pytest.mark.parametrize("backend", ["decord", "pyav"])
@pytest.mark.parametrize(("ccw_deg", "k_coded"), [(90, -1), (-90, 1), (180, 2)])
def test_rotated_source_comes_out_upright(tmp_path: Path, backend: str, ccw_deg: int, k_coded: int) -> None:
    upright = list(media.scene_frames(96, 64, 12, 6, seed=5))  # display: 96 wide, 64 tall
    plain = media.write_video(tmp_path / "plain.mp4", upright, codec="libx264", fps=25, options=media.X264)
    # Store each frame turned so that the display matrix (ccw_deg CCW) turns it back upright.
    coded = [np.ascontiguousarray(np.rot90(f, k=k_coded)) for f in upright]
    rotated = write_rotated(tmp_path / "rotated.mp4", coded, ccw_deg)
    info = probe(str(rotated), ProbeConfig())
    assert (info.width_px, info.height_px) == (96, 64)

    cfg = DecodeConfig(backend=backend)
    _, _, want = _decode(plain, 64, 96, cfg, codec="h264")
    _, _, got = _decode(rotated, 64, 96, cfg, codec="h264", rotation_cw=info.rotation_deg)
    assert got.shape == want.shape == (12, 64, 96, 3)
    err = np.abs(got.astype(np.int16) - want.astype(np.int16)).mean()
    wrong = np.abs(np.rot90(got, 2, axes=(1, 2)).astype(np.int16) - want.astype(np.int16)).mean()
    assert err < 3.0, err
    assert wrong > 5 * err + 10, (err, wrong)  # a half-turn error would be caught


@pytest.mark.parametrize("backend", ["decord", "pyav", "auto"])
def test_grayscale_decodes_to_rgb(odd_videos: dict[str, Path], backend: str) -> None:
    _, _, frames = _decode(odd_videos["grayscale"], 72, 128, DecodeConfig(backend=backend), codec="hevc")
    assert frames.shape == (100, 72, 128, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames[..., 0], frames[..., 1])
    np.testing.assert_array_equal(frames[..., 1], frames[..., 2])
    assert frames.std() > 10


def test_hevc_10bit_decodes_to_8bit_rgb_matching_source(odd_videos: dict[str, Path]) -> None:
    source = np.stack(list(media.scene_frames(media.WIDTH, media.HEIGHT, media.NUM_FRAMES, media.CUT_EVERY, seed=3)))
    for backend in ("decord", "pyav"):
        _, _, frames = _decode(odd_videos["hevc_10bit"], media.HEIGHT, media.WIDTH, DecodeConfig(backend=backend),
                               codec="hevc")
        assert frames.shape == source.shape and frames.dtype == np.uint8
        # Lossy encode, but the decoded picture is the source picture (not, e.g., 16-bit bytes).
        assert np.abs(frames.astype(np.int16) - source.astype(np.int16)).mean() < 8.0, backend


def test_a_cut_task_decodes_with_as_many_threads_as_it_has_cpus(
        sample_clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """FFmpeg's own thread count is every core of the node: one cut task per core would then run
    cores x 16 decoder threads (DecodeConfig.for_task)."""
    assert DecodeConfig().for_task(1.0).num_threads == 1
    assert DecodeConfig().for_task(2.5).num_threads == 3
    assert DecodeConfig(num_threads=4).for_task(1.0).num_threads == 4  # an explicit count stands
    assert DecodeConfig(backend="pyav").for_task(0.5) == DecodeConfig(backend="pyav", num_threads=1)

    import pipeline.steps as steps
    from pipeline.config import load_config
    from pipeline.settings import PipelineConfig
    from tests.pipeline.test_steps import probed

    seen = []

    def recording(path, **kw):
        seen.append(kw["decode"])
        return iter(())

    monkeypatch.setattr(steps, "cut_source", recording)
    cfg = load_config(PipelineConfig, None, ["compute.cut_cpus=2"])
    list(steps.make_cut_fn(cfg)(probed(sample_clips["bikes"], cfg)))
    assert seen == [DecodeConfig(num_threads=2)]


# ---------------------------------------------------------------------------
# The 4:2:0 path: OpenCV scales the planes, swscale converts later (decode.Picture)
# ---------------------------------------------------------------------------

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (200, 50, 120), (20, 200, 220), (128, 128, 128),
           (255, 255, 255)]


def _write_bt709_bars(path: Path, height: int = 144, width: int = 256, num_frames: int = 3) -> Path:
    """Eight colour bars, encoded with the BT.709 matrix and tagged so (as HD video is)."""
    bars = np.zeros((height, width, 3), np.uint8)
    for k, c in enumerate(COLOURS):
        bars[:, k * width // 8 : (k + 1) * width // 8] = c
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24, options={"crf": "0"})
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.codec_context.colorspace = 1  # AVCOL_SPC_BT709
        stream.codec_context.color_range = 1  # limited (MPEG)
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(bars, format="rgb24").reformat(format="yuv420p", dst_colorspace=1)
            frame.colorspace, frame.color_range, frame.pts = 1, 1, i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def test_bt709_source_scaled_keeps_its_colours(tmp_path: Path) -> None:
    """The scaled 4:2:0 path converts with the stream's matrix: BT.601 (OpenCV's only one) would
    shift these bars by ~20 levels."""
    path = _write_bt709_bars(tmp_path / "bars709.mp4")
    _, _, frames = _decode(path, 72, 128, PYAV, codec="h264")
    assert frames.shape == (3, 72, 128, 3)
    for k, colour in enumerate(COLOURS):
        centre = frames[0, 36, k * 16 + 8].astype(int)
        assert np.abs(centre - colour).max() <= 4, (colour, centre)
    # And it agrees with swscale scaling and converting in one call, far closer than BT.601 would.
    with av.open(str(path)) as c:
        frame = next(c.decode(video=0))
        ref = frame.to_ndarray(format="rgb24", width=128, height=72, interpolation="AREA")
        bt601 = frame.reformat(width=128, height=72, format="yuv420p").to_ndarray()
    err = np.abs(frames[0].astype(int) - ref).mean()  # bar edges: resize filters differ
    wrong = np.abs(cv2.cvtColor(bt601, cv2.COLOR_YUV2RGB_I420).astype(int) - ref).mean()
    assert err < 4.0 and wrong > 2 * err, (err, wrong)


def test_scaled_4_2_0_frames_stay_i420_until_asked(sample_clips: dict[str, Path]) -> None:
    from pipeline.decode import iter_pictures

    pictures = [p for _, _, p in itertools.islice(iter_pictures(str(sample_clips["bikes"]), 136, 320, codec="h264"),
                                                  5)]
    for p in pictures:
        assert p.pixels is None and p.i420.shape == (204, 320)  # 1.5 bytes a pixel: half of RGB
    _, _, frames = _decode(sample_clips["bikes"], 136, 320, PYAV, codec="h264")
    np.testing.assert_array_equal(np.stack([p.rgb() for p in pictures]), frames[:5])
    # ... and what swscale makes of the same frames scaled and converted in one call.
    with av.open(str(sample_clips["bikes"])) as c:
        ref = [f.to_ndarray(format="rgb24", width=320, height=136, interpolation="AREA")
               for f in itertools.islice(c.decode(video=0), 5)]
    assert np.abs(frames[:5].astype(int) - np.stack(ref)).mean() < 2.0


def test_downscale_by_2x_or_more_averages_instead_of_aliasing(tmp_path: Path) -> None:
    """1-px black/white stripes shrunk 4x are flat grey with area averaging; bilinear (2 taps)
    would sample whole stripes and keep high-contrast bands."""
    stripes = np.zeros((96, 256, 3), np.uint8)
    stripes[:, ::2] = 255
    stripes[::2, :] = 255 - stripes[::2, :]  # a checkerboard: x264 keeps it at CRF 0
    path = media.write_video(tmp_path / "checker.mp4", [stripes] * 2, codec="libx264", fps=25,
                             options={"crf": "0", "preset": "ultrafast"})
    _, _, frames = _decode(path, 24, 64, PYAV, codec="h264")
    assert abs(frames.mean() - 127.5) < 10
    assert frames.std() < 12, frames.std()


@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
def test_detection_frame_matches_the_cropped_rgb_frame(tmp_path: Path, rotation: int) -> None:
    """Picture.detect_rgb (from the I420 planes, BT.601) is the cropped RGB frame at detection size."""
    from pipeline.decode import iter_pictures

    upright = list(media.scene_frames(320, 180, 4, 10, seed=2))  # display 320 x 180
    coded = [np.ascontiguousarray(np.rot90(f, k=rotation // 90)) for f in upright]  # turned CCW
    path = write_rotated(tmp_path / "r.mp4", coded, -rotation)  # displayed turned back CW
    info = probe(str(path), ProbeConfig())
    assert (info.width_px, info.height_px) == (320, 180)
    window = (slice(20, 160), slice(30, 300))  # bars cut off: 140 x 270 of content
    for _, _, picture in iter_pictures(str(path), 180, 320, codec="h264", rotation_cw=info.rotation_deg):
        picture = picture.cropped(window)
        rgb = picture.rgb()
        assert rgb.shape == (140, 270, 3)
        assert picture.shape == (140, 270)
        small = picture.detect_rgb(33, 64)
        assert small.shape == (33, 64, 3)  # exactly: every frame of a source alike, whatever its route
        want = cv2.resize(rgb, (64, 33), interpolation=cv2.INTER_AREA)
        err = np.abs(small.astype(int) - want).mean()
        flipped = np.abs(small[::-1, ::-1].astype(int) - want).mean()
        assert err < 6.0 and flipped > 2 * err, (err, flipped)


def _ycgco_video(path: Path, num_frames: int = 30) -> Path:
    """H.264 whose stream says YCgCo (matrix 8): swscale refuses to convert it."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25, options=media.X264)
        s.height, s.width, s.pix_fmt = 180, 320, "yuv420p"
        s.codec_context.thread_count = 1
        s.codec_context.colorspace = 8
        for i, a in enumerate(media.scene_frames(320, 180, num_frames, 10, seed=1)):
            f = av.VideoFrame.from_ndarray(a, format="rgb24").reformat(format="yuv420p")
            f.colorspace, f.pts = 8, i
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    return path


@pytest.mark.parametrize(("height", "width"), [(90, 160), (180, 320)])  # scaled, and at full size
def test_a_colour_matrix_swscale_refuses_is_a_decode_error(tmp_path: Path, height: int, width: int) -> None:
    path = _ycgco_video(tmp_path / "ycgco.mp4")
    with pytest.raises(DecodeError, match="after frame 0: .*not supported") as e:
        list(iter_frames(str(path), height, width, codec="h264"))
    assert e.value.frames_decoded == 0


def test_keyframe_samples_decode_each_keyframe_once(sample_clips: dict[str, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Big Buck Bunny's 5 seeks all land on its one keyframe (frame 0): converted once (a repeat is
    recognised by its first packet, before any decode), 5 samples of it. Bikes has a keyframe
    near each target: 5 conversions, 5 different samples."""
    import pipeline.decode as decode

    conversions: list[int] = []
    upright = decode._upright
    monkeypatch.setattr(decode, "_upright", lambda f, r: conversions.append(1) or upright(f, r))
    bunny = decode.sample_frames(str(sample_clips["bigbuckbunny"]), 72, 128, duration_s=5.28)
    assert len(conversions) == 1 and bunny.shape == (5, 72, 128, 3)
    with av.open(str(sample_clips["bigbuckbunny"])) as c:
        first = next(c.decode(video=0)).to_ndarray(format="rgb24", width=128, height=72)
    for sample in bunny:
        np.testing.assert_array_equal(sample, first)
    conversions.clear()
    bikes = decode.sample_frames(str(sample_clips["bikes"]), 68, 160, duration_s=10.0)
    assert len(conversions) == 5 and bikes.shape == (5, 68, 160, 3)
    assert min(np.abs(a.astype(int) - b).mean() for a, b in zip(bikes, bikes[1:])) > 5
