"""Fréchet Video Distance with the real Kinetics-400 I3D, exactly the original TF protocol.

Protocol (google-research `frechet_video_distance`): uint8 frames [N, T, H, W, 3] →
TF1 `tf.image.resize_bilinear` to 224x224 (align_corners=False, *not* half-pixel centres,
no antialias, no crop) → 2x/255 − 1 → I3D (TF-Hub `deepmind/i3d-kinetics-400/1`) logits
averaged over time (400-d, the tensor `RGB/inception_i3d/Mean:0`) → Fréchet distance in
float64 with covariances normalised by N − 1 (tfgan's `frechet_classifier_distance`).

    python eval/fvd.py REAL FAKE [--num-frames K] [--batch-size 8] [--device auto|cpu|cuda] [--weights PATH]

REAL and FAKE are each a folder of video files or a .npy uint8 [N, T, H, W, 3] array.
Prints {"fvd", "n_real", "n_fake", "num_frames", "detector_sha256", "protocol"} as JSON.
The function API (`FVD`, `compute_fvd`, `frechet_distance`) is what the nightly eval calls.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python eval/fvd.py`: import the package, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
from einops import rearrange

from eval.weights import WeightsError, load_i3d
from pipeline.logs import get_logger, warn_once

log = get_logger("eval.fvd")

I3D_SIZE_PX = 224
MIN_FRAMES = 10
FEATURE_DIM = 400
PROGRESS_S = 30.0  # seconds between progress lines during feature extraction
PROTOCOL = (
    "tf-fvd: TF1 resize_bilinear(align_corners=False) to 224x224, 2x/255-1, I3D Kinetics-400 "
    "(TF-Hub i3d-kinetics-400/1) logits averaged over time (400-d), Frechet distance float64, cov/(N-1)"
)

# ---------------------------------------------------------------------------
# Pure math: Fréchet distance between Gaussians fitted to features
# ---------------------------------------------------------------------------


def feature_moments(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features → float64 mean (D,) and covariance (D, D) normalised by N − 1."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {feats.shape}")
    centred = feats - feats.mean(axis=0)
    return feats.mean(axis=0), centred.T @ centred / (len(feats) - 1)


def _psd_eigvals(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """eigh of a symmetric PSD matrix; eigenvalues below its numerical resolution (rounding noise,
    numpy's matrix_rank tolerance) become exactly 0, since their square roots would not be noise-sized."""
    eigvals, eigvecs = np.linalg.eigh((matrix + matrix.T) / 2)
    tol = max(eigvals.max(initial=0.0), 0.0) * len(matrix) * np.finfo(np.float64).eps
    return np.where(eigvals > tol, eigvals, 0.0), eigvecs


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigh."""
    eigvals, eigvecs = _psd_eigvals(matrix)
    return (eigvecs * np.sqrt(eigvals)) @ eigvecs.T


def frechet_distance_from_moments(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 − mu2||² + tr(S1) + tr(S2) − 2 tr((S1^½ S2 S1^½)^½), in float64.

    tr((S1 S2)^½) is computed as tfgan does, through the symmetric S1^½ S2 S1^½, whose
    eigenvalues are real and >= 0 (up to rounding, zeroed), instead of a general sqrtm.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    root1 = sqrtm_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(_psd_eigvals(middle)[0]).sum()
    mean_term = float(np.sum((mu1 - mu2) ** 2))
    return mean_term + float(np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def frechet_distance(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to (N1, D) and (N2, D) features."""
    return frechet_distance_from_moments(*feature_moments(feats1), *feature_moments(feats2))


# ---------------------------------------------------------------------------
# Preprocessing: TF1 bilinear resize, [-1, 1] scaling
# ---------------------------------------------------------------------------


def _tf1_axis(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices (lower, upper) and weights on one axis, as TF1's legacy bilinear computes them."""
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size  # float32 in / out (align_corners=False)
    src = torch.arange(out_size, dtype=torch.float32) * scale  # dst * scale: no half-pixel offset
    lower = torch.floor(src)
    upper = torch.ceil(src).clamp(max=in_size - 1)
    return lower.long().to(device), upper.long().to(device), (src - lower).to(device)


def resize_bilinear_tf1(frames: torch.Tensor, height_px: int, width_px: int) -> torch.Tensor:
    """(N, H, W, C) float32 → (N, height_px, width_px, C) with TF1 `resize_bilinear(align_corners=False)`."""
    n, h, w, c = frames.shape
    if (h, w) == (height_px, width_px):
        return frames  # scale 1: TF samples every source pixel with weight 0
    y0, y1, wy = _tf1_axis(h, height_px, frames.device)
    x0, x1, wx = _tf1_axis(w, width_px, frames.device)
    rows0, rows1 = frames[:, y0], frames[:, y1]  # (N, h', W, C)
    wx = wx[:, None]  # (w', 1)
    top = rows0[:, :, x0] + (rows0[:, :, x1] - rows0[:, :, x0]) * wx  # (N, h', w', C)
    bottom = rows1[:, :, x0] + (rows1[:, :, x1] - rows1[:, :, x0]) * wx  # (N, h', w', C)
    return top + (bottom - top) * wy[:, None, None]  # same operation order as TF's kernel


def preprocess(video: torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) → float32 (3, T, 224, 224) in [-1, 1], as the TF FVD code prepares it."""
    frames = resize_bilinear_tf1(video.float(), I3D_SIZE_PX, I3D_SIZE_PX)  # (T, 224, 224, 3) in [0, 255]
    return rearrange(2.0 * frames / 255.0 - 1.0, "t h w c -> c t h w")


def check_video(video: np.ndarray | torch.Tensor, where: str) -> None:
    """A video FVD accepts: uint8 (T >= 10, H, W, 3)."""
    if video.dtype not in (np.uint8, torch.uint8):
        raise ValueError(f"{where}: videos must be uint8 with values 0..255, got {video.dtype}")
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"{where}: expected a (T, H, W, 3) RGB video, got shape {tuple(video.shape)}")
    if video.shape[0] < MIN_FRAMES:
        raise ValueError(f"{where}: FVD needs >= {MIN_FRAMES} frames per video, got {video.shape[0]}")


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """Turn off TF32 convs/matmuls (on by default for cuDNN) so GPU features match the fp32 reference."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ---------------------------------------------------------------------------
# Features and the metric
# ---------------------------------------------------------------------------


@dataclass
class Features:
    """I3D logits of a video set: (N, 400) float32, and the frame count every video had."""

    logits: np.ndarray
    num_frames: int


@dataclass
class FVDResult:
    """One FVD number and what it was measured on: the JSON report."""

    fvd: float
    n_real: int
    n_fake: int
    num_frames: int
    detector_sha256: str
    protocol: str = PROTOCOL

    def to_dict(self) -> dict:
        return asdict(self)


def i3d_features(
    videos: np.ndarray | Iterable[np.ndarray | torch.Tensor], model: torch.nn.Module, batch_size: int = 8,
) -> Features:
    """uint8 videos [N, T, H, W, 3] (an array, or any iterable of (T, H, W, 3)) → Features.

    Batched on the model's device; progress is logged every PROGRESS_S seconds.
    """
    device = next(model.parameters()).device
    total = len(videos) if isinstance(videos, Sized) else "?"
    out: list[np.ndarray] = []
    batch: list[torch.Tensor] = []
    num_frames = None
    start = last_log = time.monotonic()

    def flush() -> None:
        nonlocal last_log
        with torch.inference_mode(), full_fp32():
            out.append(model(torch.stack(batch)).float().cpu().numpy())  # (B, 400)
        batch.clear()
        if time.monotonic() - last_log > PROGRESS_S:
            done = sum(len(o) for o in out)
            last_log = time.monotonic()
            log.info("I3D features: %d/%s clips, %.2f clips/s", done, total, done / (last_log - start))

    for i, video in enumerate(videos):
        check_video(video, f"video {i}")
        if num_frames is None:
            num_frames = int(video.shape[0])
        elif video.shape[0] != num_frames:
            raise ValueError(f"video {i} has {video.shape[0]} frames, video 0 has {num_frames}: all must match")
        if not isinstance(video, torch.Tensor):
            video = np.asarray(video)
            video = torch.from_numpy(video if video.flags.writeable else video.copy())  # memory-mapped .npy
        batch.append(preprocess(video.to(device)))  # (3, T, 224, 224)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if num_frames is None:
        raise ValueError("no videos given")
    return Features(np.concatenate(out), num_frames)


def pick_device(device: str = "auto") -> torch.device:
    """'auto' → cuda when present, else cpu; anything else as given."""
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                        "cpu" if device == "auto" else device)


class FVD:
    """FVD with the converted Kinetics-400 I3D: `compute(real, fake)`, or `features` + `distance`."""

    def __init__(self, weights: str | Path | None = None, device: str = "auto", batch_size: int = 8) -> None:
        self.device = pick_device(device)
        self.model, self.detector_sha256 = load_i3d(weights, self.device)
        self.batch_size = batch_size

    def features(self, videos: np.ndarray | Iterable[np.ndarray]) -> Features:
        return i3d_features(videos, self.model, self.batch_size)

    def distance(self, real: Features, fake: Features) -> FVDResult:
        if real.num_frames != fake.num_frames:
            raise ValueError(
                f"real videos have {real.num_frames} frames, fake ones {fake.num_frames}: they must match")
        n_real, n_fake = len(real.logits), len(fake.logits)
        if min(n_real, n_fake) < 2:
            raise ValueError(f"FVD needs >= 2 videos per set, got {n_real} real and {n_fake} fake")
        if min(n_real, n_fake) <= FEATURE_DIM:
            warn_once(log, f"FVD with N <= {FEATURE_DIM} videos per set: covariances are rank-deficient and the "
                           "score carries a positive small-sample bias; compare only numbers at equal N")
        fvd = frechet_distance(real.logits, fake.logits)
        return FVDResult(fvd, n_real, n_fake, real.num_frames, self.detector_sha256)

    def compute(self, real: np.ndarray | Iterable[np.ndarray], fake: np.ndarray | Iterable[np.ndarray]) -> FVDResult:
        return self.distance(self.features(real), self.features(fake))


def compute_fvd(real: np.ndarray | Iterable[np.ndarray], fake: np.ndarray | Iterable[np.ndarray],
                weights: str | Path | None = None, device: str = "auto", batch_size: int = 8) -> FVDResult:
    """One-shot FVD between two uint8 video sets [N, T, H, W, 3]."""
    return FVD(weights, device, batch_size).compute(real, fake)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("real", help="folder of real videos, or .npy uint8 [N, T, H, W, 3]")
    p.add_argument("fake", help="folder of generated videos, or .npy uint8 [N, T, H, W, 3]")
    p.add_argument("--num-frames", type=int, help="cut every video to its first K frames (default: all must match)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per I3D forward")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--weights", help="converted I3D safetensors (default: the cache; converted on first use)")
    args = p.parse_args(argv)
    # Here, not at the top: the decoders (PyAV) are needed for folders of videos only, so the
    # library part (I3D features, FVD of arrays) imports where no decoder is installed.
    from eval.videos import VideoInputError, open_videos

    try:
        real, fake = open_videos(args.real, args.num_frames), open_videos(args.fake, args.num_frames)
        if real.num_frames != fake.num_frames:
            raise VideoInputError(f"real videos have {real.num_frames} frames, fake ones {fake.num_frames}: "
                                  "pass --num-frames K to cut both to their first K frames")
        metric = FVD(args.weights, args.device, args.batch_size)
        log.info("FVD: %d real vs %d fake videos, %d frames, on %s", len(real), len(fake), real.num_frames,
                 metric.device)
        result = metric.compute(real, fake)
    except (VideoInputError, WeightsError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(result.to_dict(), indent=2))


__all__ = [
    "FVD", "FVDResult", "Features", "MIN_FRAMES", "PROTOCOL", "compute_fvd", "feature_moments", "frechet_distance",
    "frechet_distance_from_moments", "i3d_features", "preprocess", "resize_bilinear_tf1", "sqrtm_psd",
]


if __name__ == "__main__":
    main()
