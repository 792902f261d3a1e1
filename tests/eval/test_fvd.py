"""FVD: TF1 resize semantics, input checks, and the metric on real clips with the real I3D."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eval.fvd import FVD, Features, i3d_features, main, preprocess, resize_bilinear_tf1
from eval.videos import VideoInputError, open_videos
from tests import media


def resize_1d(values: list[float], out: int) -> list[float]:
    x = torch.tensor(values).view(1, 1, -1, 1)  # (N=1, H=1, W, C=1)
    return resize_bilinear_tf1(x, 1, out).flatten().tolist()


# --- resize: TF1 resize_bilinear(align_corners=False) --------------------------


def test_resize_upsample_uses_dst_times_scale_not_half_pixel() -> None:
    # scale 2/4: src x = 0, 0.5, 1.0, 1.5 -> lower 0, 0, 1, 1; upper clamped to 1 -> 0, 5, 10, 10
    assert resize_1d([0.0, 10.0], 4) == [0.0, 5.0, 10.0, 10.0]
    half_pixel = F.interpolate(torch.tensor([[[0.0, 10.0]]]), size=4, mode="linear", align_corners=False)
    assert half_pixel.flatten().tolist() == [0.0, 2.5, 7.5, 10.0]  # what TF1 does *not* do


def test_resize_downsample_samples_without_antialias() -> None:
    assert resize_1d([0.0, 10.0, 20.0, 30.0], 2) == [0.0, 20.0]  # src x = 0, 2: no averaging, no offset
    assert resize_1d([0.0, 10.0, 20.0], 2) == [0.0, 15.0]  # src x = 0, 1.5


def test_resize_2d_hand_computed() -> None:
    image = torch.tensor([[0.0, 10.0], [20.0, 30.0]]).view(1, 2, 2, 1)
    # scale 2/3: src = 0, 2/3, 4/3 -> (lower, upper, lerp) = (0, 0, 0), (0, 1, 2/3), (1, 1, 1/3)
    expected = [[0.0, 20 / 3, 10.0], [40 / 3, 20.0, 70 / 3], [20.0, 80 / 3, 30.0]]
    np.testing.assert_allclose(resize_bilinear_tf1(image, 3, 3)[0, :, :, 0].numpy(), expected, atol=1e-5)


def test_preprocess_scales_to_minus_one_one() -> None:
    video = torch.zeros(10, 224, 224, 3, dtype=torch.uint8)
    video[:, :, 112:] = 255
    x = preprocess(video)
    assert x.shape == (3, 10, 224, 224) and x.dtype == torch.float32
    assert x[:, :, :, :112].eq(-1).all() and x[:, :, :, 112:].eq(1).all()  # 224 input: resize is the identity
    assert preprocess(torch.full((10, 64, 48, 3), 255, dtype=torch.uint8)).eq(1).all()


# --- input checks (no I3D needed) ---------------------------------------------


@pytest.mark.parametrize("videos, message", [
    (np.zeros((2, 9, 32, 32, 3), np.uint8), ">= 10 frames"),
    (np.zeros((2, 10, 32, 32, 3), np.float32), "uint8"),
    (np.zeros((2, 10, 32, 32), np.uint8), r"\(T, H, W, 3\)"),
    ([np.zeros((10, 32, 32, 3), np.uint8), np.zeros((12, 32, 32, 3), np.uint8)], "all must match"),
])
def test_i3d_features_refuses_bad_videos(videos: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        i3d_features(videos, torch.nn.Linear(1, 1))


def test_open_videos_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(VideoInputError, match="does not exist"):
        open_videos(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoInputError, match="no video files"):
        open_videos(tmp_path / "empty")
    np.save(tmp_path / "float.npy", np.zeros((2, 10, 8, 8, 3), np.float32))
    with pytest.raises(VideoInputError, match=r"float\.npy: expected uint8 \[N, T, H, W, 3\]"):
        open_videos(tmp_path / "float.npy")
    np.save(tmp_path / "short.npy", np.zeros((2, 10, 8, 8, 3), np.uint8))
    with pytest.raises(VideoInputError, match="fewer than --num-frames 16"):
        open_videos(tmp_path / "short.npy", num_frames=16)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    media.write_video(corrupt / "good.mp4", media.scene_frames(64, 64, 12, 6), codec="libx264", fps=24)
    (corrupt / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(VideoInputError, match="broken.mp4"):
        open_videos(corrupt)


def test_folder_frame_counts_must_match_or_be_cut(tmp_path: Path) -> None:
    for name, frames in (("a.mp4", 12), ("b.mp4", 15)):
        media.write_video(tmp_path / name, media.scene_frames(64, 48, frames, 6), codec="libx264", fps=24)
    with pytest.raises(VideoInputError, match="b.mp4 has 15 frames but .*a.mp4 has 12.*--num-frames"):
        open_videos(tmp_path)
    videos = open_videos(tmp_path, num_frames=10)
    arrays = list(videos)
    assert len(videos) == 2 and videos.num_frames == 10
    assert [a.shape for a in arrays] == [(10, 48, 64, 3)] * 2 and arrays[0].dtype == np.uint8


def test_cli_reports_bad_input(tmp_path: Path) -> None:
    np.save(tmp_path / "ok.npy", np.zeros((2, 10, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit, match="error: .*missing.npy does not exist"):
        main([str(tmp_path / "ok.npy"), str(tmp_path / "missing.npy")])
    np.save(tmp_path / "t12.npy", np.zeros((2, 12, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit, match="real videos have 10 frames, fake ones 12"):
        main([str(tmp_path / "ok.npy"), str(tmp_path / "t12.npy")])


# --- the metric with the real I3D ---------------------------------------------


def test_features_are_deterministic_and_batch_independent(fvd_metric: FVD, bikes_clips: np.ndarray) -> None:
    clips = bikes_clips[:3]
    batched = fvd_metric.features(clips).logits  # one batch of 3
    single = np.concatenate([fvd_metric.features(clips[i : i + 1]).logits for i in range(3)])
    assert batched.shape == (3, 400) and batched.dtype == np.float32
    # oneDNN picks its conv3d kernel by batch size and CPU, so logits (~10) agree to rounding
    # only; a batch-mixing bug moves them by O(1).
    assert np.abs(batched - single).max() < 1e-4 * max(1.0, float(np.abs(batched).max())) * 10
    assert np.array_equal(fvd_metric.features(clips).logits, batched)


def test_real_clips_give_confident_varied_logits(bikes_features: Features, noise_features: Features) -> None:
    real, noise = bikes_features.logits, noise_features.logits
    assert real.std(axis=1).min() > 1.5  # a trained classifier's spread, not a near-constant output
    assert len(set(real.argmax(axis=1).tolist())) >= 2  # different scenes, different top classes
    assert np.abs(real - noise.mean(axis=0)).mean() > 1.0


def test_fvd_of_a_set_against_itself_is_zero(fvd_metric: FVD, bikes_clips: np.ndarray) -> None:
    result = fvd_metric.compute(bikes_clips, bikes_clips)  # end to end, I3D run twice
    assert abs(result.fvd) < 1e-6
    assert (result.n_real, result.n_fake, result.num_frames) == (6, 6, 10)


def test_fvd_real_vs_noise_is_large(fvd_metric: FVD, bikes_clips: np.ndarray, bikes_features: Features,
                                    noise_features: Features) -> None:
    # the same clips with +-2 grey levels of noise: the same distribution to I3D, far from pure noise
    jitter = np.random.default_rng(1).integers(-2, 3, bikes_clips.shape)
    jittered = fvd_metric.features(np.clip(bikes_clips + jitter, 0, 255).astype(np.uint8))
    near = fvd_metric.distance(bikes_features, jittered)
    far = fvd_metric.distance(bikes_features, noise_features)
    assert far.fvd > 1000 and far.fvd > 20 * near.fvd > 0
    assert far.detector_sha256 == fvd_metric.detector_sha256 and "resize_bilinear" in far.protocol


def test_reference_example_black_vs_white(fvd_metric: FVD) -> None:
    # google-research's example.py: 16 black vs 16 white videos, 15 frames of 64x64, "FVD should be
    # around 131". Identical videos per set -> zero covariance, so FVD = ||logits(black) - logits(white)||^2.
    black, white = (np.full((1, 15, 64, 64, 3), v, np.uint8) for v in (0, 255))
    feats = [Features(np.repeat(fvd_metric.features(v).logits, 16, axis=0), 15) for v in (black, white)]
    assert fvd_metric.distance(*feats).fvd == pytest.approx(133.9, abs=0.1)  # ours: 133.9 (TF-Hub logits matched)


def test_cli_on_npy_prints_the_report(i3d_weights: Path, bikes_clips: np.ndarray, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    small = bikes_clips[:, :, ::4, ::4]  # (6, 10, 68, 160, 3)
    np.save(tmp_path / "real.npy", small[:3])
    np.save(tmp_path / "fake.npy", small[3:])
    main([str(tmp_path / "real.npy"), str(tmp_path / "fake.npy"), "--device", "cpu", "--batch-size", "2",
          "--weights", str(i3d_weights)])
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"fvd", "n_real", "n_fake", "num_frames", "detector_sha256", "protocol"}
    assert report["fvd"] > 0 and (report["n_real"], report["n_fake"], report["num_frames"]) == (3, 3, 10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_features_match_cpu(i3d_weights: Path, bikes_clips: np.ndarray, bikes_features: Features) -> None:
    gpu = FVD(i3d_weights, device="cuda", batch_size=6).features(bikes_clips)  # resize + I3D on the GPU, TF32 off
    np.testing.assert_allclose(gpu.logits, bikes_features.logits, atol=2e-3)


def test_the_fvd_library_imports_without_a_video_decoder() -> None:
    """FVD of arrays and I3D features need no decoder: the GPU machines have no PyAV, and the prepared
    GPU check's FVD timing was skipped there while eval.fvd imported the decoders at the top."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['av'] = None\n"  # `import av` now raises ImportError
            "from eval.fvd import FVD, i3d_features\n"
            "try:\n    import pipeline.decode\nexcept ImportError:\n    print('no decoder, fvd imported')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no decoder, fvd imported" in proc.stdout
