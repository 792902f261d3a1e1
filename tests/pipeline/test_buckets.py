"""pipeline/buckets.py: aspect/resolution choice, frame counts, resize+crop and resampling."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.buckets import (
    Bucket,
    BucketConfig,
    all_buckets,
    available_target_frames,
    bucket_size,
    choose_source_bucket,
    longest_frames_that_fit,
    make_bucket,
    nearest_aspect,
    parse_aspect,
    resample_indices,
    resize_crop,
)

# ---------------------------------------------------------------------------
# Aspect and resolution choice
# ---------------------------------------------------------------------------


def test_parse_aspect() -> None:
    assert parse_aspect("16:9") == pytest.approx(16 / 9)
    assert parse_aspect("2.39:1") == pytest.approx(2.39)
    assert parse_aspect("9:16") == pytest.approx(0.5625)
    assert parse_aspect("1.5") == 1.5


def test_nearest_aspect_examples() -> None:
    aspects = BucketConfig().aspect_ratios
    assert nearest_aspect(235, 100, aspects) == "2.39:1"  # 2.35:1 scope
    assert nearest_aspect(176, 144, aspects) == "4:3"  # QCIF, 1.22
    assert nearest_aspect(1920, 1080, aspects) == "16:9"
    assert nearest_aspect(1080, 1920, aspects) == "9:16"
    assert nearest_aspect(480, 640, aspects) == "3:4"
    assert nearest_aspect(500, 510, aspects) == "1:1"


def test_nearest_aspect_is_in_log_space() -> None:
    # 1.36 lies between 1:1 and 16:9: linearly nearer 1:1 (0.36 vs 0.42), but in log space
    # nearer 16:9 (log-midpoint is sqrt(16/9) = 1.333).
    assert nearest_aspect(136, 100, ["1:1", "16:9"]) == "16:9"
    assert nearest_aspect(132, 100, ["1:1", "16:9"]) == "1:1"
    # Log space is symmetric for portrait: 100x136 is the mirror case.
    assert nearest_aspect(100, 136, ["1:1", "9:16"]) == "9:16"


def test_nearest_aspect_ties_go_to_first_listed() -> None:
    assert nearest_aspect(100, 100, ["2:1", "1:2"]) == "2:1"
    assert nearest_aspect(100, 100, ["1:2", "2:1"]) == "1:2"


def test_bucket_size_hand_computed() -> None:
    assert bucket_size(128, 16 / 9, 16) == (128, 224)  # 227.6 -> 224
    assert bucket_size(96, 16 / 9, 16) == (96, 176)  # 170.7 -> 176
    assert bucket_size(128, 9 / 16, 16) == (224, 128)
    assert bucket_size(96, 2.39, 16) == (96, 224)  # 229.4 -> 224
    assert bucket_size(128, 4 / 3, 16) == (128, 176)  # 170.7 -> 176
    assert bucket_size(100, 1.0, 16) == (96, 96)  # short side rounds too
    assert bucket_size(4, 1.0, 16) == (16, 16)  # never below one multiple


def test_qcif_source_gets_4_3_at_128p_exactly_fitting() -> None:
    sb = choose_source_bucket(176, 144, BucketConfig())
    assert sb is not None
    assert (sb.aspect, sb.resolution_px, sb.height_px, sb.width_px) == ("4:3", 128, 128, 176)


def test_scope_source_gets_2_39() -> None:
    sb = choose_source_bucket(640, 272, BucketConfig())  # bikes.mp4, 2.35:1
    assert sb is not None
    assert (sb.aspect, sb.resolution_px, sb.height_px, sb.width_px) == ("2.39:1", 128, 128, 304)


def test_resolution_is_largest_that_fits_never_upscales_property() -> None:
    cfg = BucketConfig(resolutions_px=[64, 96, 128, 144, 256, 360, 720])
    rng = np.random.default_rng(0)
    num_none = 0
    for _ in range(2000):
        w, h = (int(x) for x in rng.integers(16, 1400, size=2))
        sb = choose_source_bucket(w, h, cfg)
        aspect = nearest_aspect(w, h, cfg.aspect_ratios)
        sizes = {r: bucket_size(r, parse_aspect(aspect), cfg.size_multiple_px) for r in cfg.resolutions_px}
        fitting = [r for r, (bh, bw) in sizes.items() if bh <= h and bw <= w]
        if sb is None:
            num_none += 1
            assert not fitting, (w, h)
            continue
        assert sb.aspect == aspect
        assert sb.height_px <= h and sb.width_px <= w, (w, h, sb)
        assert (sb.height_px, sb.width_px) == sizes[sb.resolution_px]
        assert sb.resolution_px == max(fitting), (w, h, sb)
    assert 0 < num_none < 2000  # the sample covers both outcomes


def test_none_when_nothing_fits() -> None:
    assert choose_source_bucket(90, 60, BucketConfig()) is None  # 96p needs >= 96 rows
    assert choose_source_bucket(50, 200, BucketConfig()) is None  # portrait, too narrow
    sb = choose_source_bucket(60, 200, BucketConfig(resolutions_px=[48]))
    assert sb is not None and sb.width_px <= 60 and sb.height_px <= 200


def test_bucket_sizes_are_multiples_of_size_multiple() -> None:
    for multiple in (8, 16, 32):
        cfg = BucketConfig(resolutions_px=[90, 128, 200, 333], size_multiple_px=multiple)
        buckets = all_buckets(cfg)
        assert len(buckets) == 4 * len(cfg.aspect_ratios) * len(cfg.num_frames)
        assert len({b.name for b in buckets}) == len(buckets)
        for b in buckets:
            assert b.height_px % multiple == 0 and b.width_px % multiple == 0, b
            # Within half a multiple of the ideal size on each side.
            ratio = parse_aspect(b.aspect)
            short, long_ = min(b.height_px, b.width_px), max(b.height_px, b.width_px)
            assert abs(short - b.resolution_px) <= multiple / 2
            assert abs(long_ - b.resolution_px * max(ratio, 1 / ratio)) <= multiple / 2 + 1e-6


def test_longest_frames_that_fit() -> None:
    cfg = BucketConfig(num_frames=[17, 1, 9])  # order in the config does not matter
    expected = {0: None, 1: 1, 8: 1, 9: 9, 16: 9, 17: 17, 500: 17}
    assert {n: longest_frames_that_fit(n, cfg) for n in expected} == expected


def test_bucket_name_and_make_bucket() -> None:
    cfg = BucketConfig()
    sb = choose_source_bucket(1920, 1080, cfg)
    b = make_bucket(sb, 17, cfg)
    assert b == Bucket(128, "16:9", 17, 128, 224, 8.0)
    assert b.name == "128p_16x9_17f"
    assert b.duration_s == pytest.approx(17 / 8)
    assert Bucket(96, "2.39:1", 9, 96, 224, 8.0).name == "96p_2_39x1_9f"
    assert Bucket(96, "1.5", 1, 96, 144, 8.0).name == "96p_1_5_1f"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resolutions_px": []}, "resolutions_px"),
        ({"resolutions_px": [128, 0]}, "resolutions_px"),
        ({"num_frames": []}, "num_frames"),
        ({"num_frames": [1, -9]}, "num_frames"),
        ({"fps": 0.0}, "fps must be > 0"),
        ({"fps": -8.0}, "fps must be > 0"),
        ({"size_multiple_px": 0}, "size_multiple_px"),
        ({"aspect_ratios": ["16:9", "wide"]}, "'wide' must look like"),
        ({"aspect_ratios": ["1:0"]}, "'1:0' must look like"),
        ({"aspect_ratios": ["0:1"]}, "outside"),
        ({"aspect_ratios": ["40:1"]}, "outside"),
    ],
)
def test_bucket_config_validate_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BucketConfig(**kwargs).validate()


def test_default_bucket_config_is_valid() -> None:
    BucketConfig().validate()


# ---------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ((272, 640), (128, 304)),  # landscape, downscale
        ((320, 180), (224, 128)),  # portrait
        ((37, 101), (33, 17)),  # odd sizes, crop both ways
        ((144, 176), (128, 176)),  # exact width, crop height only
        ((64, 64), (96, 160)),  # upscale path
        ((100, 100), (100, 100)),  # identity
    ],
)
def test_resize_crop_output_shape_is_exact(src: tuple[int, int], dst: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, size=(*src, 3), dtype=np.uint8)
    out = resize_crop(frame, *dst)
    assert out.shape == (*dst, 3) and out.dtype == np.uint8
    assert out.flags["C_CONTIGUOUS"]


def test_resize_crop_identity_returns_same_pixels() -> None:
    frame = np.random.default_rng(2).integers(0, 256, size=(48, 80, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_crop(frame, 48, 80), frame)


def _halves(h: int, w: int, axis: int) -> np.ndarray:
    """Red first half, blue second half along `axis` (1 = left/right, 0 = top/bottom)."""
    img = np.zeros((h, w, 3), np.uint8)
    if axis == 1:
        img[:, : w // 2, 0] = 255
        img[:, w // 2 :, 2] = 255
    else:
        img[: h // 2, :, 0] = 255
        img[h // 2 :, :, 2] = 255
    return img


def test_resize_crop_is_a_centre_crop_horizontally() -> None:
    out = resize_crop(_halves(100, 200, axis=1), 100, 100)  # no resize: columns 50..150
    assert (out[:, :50, 0] == 255).all() and (out[:, :50, 2] == 0).all()
    assert (out[:, 50:, 2] == 255).all() and (out[:, 50:, 0] == 0).all()


def test_resize_crop_is_a_centre_crop_after_resize() -> None:
    out = resize_crop(_halves(200, 400, axis=1), 50, 50)  # 400x200 -> 100x50, keep columns 25..75
    red, blue = out[..., 0].astype(int), out[..., 2].astype(int)
    assert (red[:, :24] >= 250).all() and (blue[:, :24] <= 5).all()
    assert (blue[:, 26:] >= 250).all() and (red[:, 26:] <= 5).all()


def test_resize_crop_is_a_centre_crop_vertically() -> None:
    out = resize_crop(_halves(300, 100, axis=0), 100, 100)  # rows 100..200 of 300
    assert (out[:50, :, 0] == 255).all() and (out[:50, :, 2] == 0).all()
    assert (out[50:, :, 2] == 255).all() and (out[50:, :, 0] == 0).all()


def test_resize_crop_keeps_aspect_no_stretch() -> None:
    # A centred disc must stay round: a stretch would make its bounding box non-square.
    h, w = 240, 480
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.uint8)
    img[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= 60**2] = 255
    out = resize_crop(img, 64, 96)  # scale 96/480 = 0.2667 vs 64/240 = 0.2667 -> then crop
    rows = np.where(out[..., 0].max(axis=1) > 127)[0]
    cols = np.where(out[..., 0].max(axis=0) > 127)[0]
    assert abs((rows[-1] - rows[0]) - (cols[-1] - cols[0])) <= 1
    assert abs((rows[0] + rows[-1]) / 2 - 31.5) <= 1 and abs((cols[0] + cols[-1]) / 2 - 47.5) <= 1


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def test_available_target_frames() -> None:
    assert available_target_frames(0.0, 1.0, 8.0) == 8
    assert available_target_frames(0.0, 0.9999999, 8.0) == 8  # pts rounding absorbed
    assert available_target_frames(0.0, 0.99, 8.0) == 7
    assert available_target_frames(0.5, 2.6, 8.0) == 16
    assert available_target_frames(0.0, 2.125, 8.0) == 17
    assert available_target_frames(1.0, 1.0, 8.0) == 0
    assert available_target_frames(2.0, 1.0, 8.0) == 0  # never negative


def test_resample_constant_rate() -> None:
    pts = np.arange(50) / 25.0  # 25 fps, 2 s
    # Targets 0, .125, .25, .375 s -> frames floor(t * 25).
    np.testing.assert_array_equal(resample_indices(pts, 0.0, 4, 8.0), [0, 3, 6, 9])
    np.testing.assert_array_equal(resample_indices(pts, 0.5, 4, 8.0), [12, 15, 18, 21])
    # Exact multiples land on the frame that starts at that time, not the one before.
    np.testing.assert_array_equal(resample_indices(pts, 0.0, 3, 5.0), [0, 5, 10])


def test_resample_variable_rate_picks_frame_on_screen() -> None:
    # Frame durations alternate 1/30 s and 1/15 s (like the VFR test video).
    durations = [1 / 30, 1 / 15] * 6
    pts = np.concatenate([[0.0], np.cumsum(durations)[:-1]])
    # pts: 0, .0333, .1, .1333, .2, .2333, .3, .3333, .4, .4333, .5, .5333, .6
    # targets at 7 fps: 0, .1429, .2857, .4286, .5714 -> frames 0, 3, 5, 8, 11
    np.testing.assert_array_equal(resample_indices(pts, 0.0, 5, 7.0), [0, 3, 5, 8, 11])


def test_resample_variable_rate_long_hold() -> None:
    pts = np.array([0.0, 0.1, 0.2, 1.0, 1.1, 1.2])  # frame 2 stays on screen for 0.8 s
    np.testing.assert_array_equal(resample_indices(pts, 0.0, 6, 4.0), [0, 2, 2, 2, 3, 5])


def test_resample_tolerates_rounded_pts_and_clips_at_ends() -> None:
    assert resample_indices(np.array([0.0, 0.04, 0.08, 0.12004, 0.16]), 0.12, 1, 8.0)[0] == 3
    assert resample_indices(np.array([0.0, 0.04, 0.08, 0.11999, 0.16]), 0.12, 1, 8.0)[0] == 3
    assert resample_indices(np.array([0.0, 0.04, 0.08, 0.1205, 0.16]), 0.12, 1, 8.0)[0] == 2
    pts = np.array([0.5, 0.6, 0.7])
    np.testing.assert_array_equal(resample_indices(pts, 0.0, 2, 2.0), [0, 0])  # before first
    np.testing.assert_array_equal(resample_indices(pts, 0.6, 3, 2.0), [1, 2, 2])  # past last


def test_resample_indices_respect_bucket_duration() -> None:
    # A 17-frame bucket at 8 fps taken from a 29.97 fps source starting at 1 s.
    src_fps = 30000 / 1001
    pts = np.arange(200) / src_fps
    idx = resample_indices(pts, 1.0, 17, 8.0)
    assert len(idx) == 17 and (np.diff(idx) > 0).all()
    expected = [math.floor((1.0 + k / 8.0) * src_fps + 1e-4 * src_fps) for k in range(17)]
    np.testing.assert_array_equal(idx, expected)
