"""requirements.lock is complete for pyproject.toml and is what this environment runs."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            out[normal(name)] = version
    return out


def test_lock_pins_every_direct_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    names = {normal(re.match(r"[A-Za-z0-9_.-]+", d).group()) for d in wanted}
    missing = names - pins().keys()
    assert not missing, f"pyproject.toml dependencies missing from requirements.lock (run `make lock`): {missing}"


def test_environment_matches_the_lock():
    """A venv that drifted from the lock (installed by hand, stale) is named here, before numbers differ."""
    drift = {}
    for name, version in pins().items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = "not installed"
        if have.split("+")[0] != version:
            drift[name] = f"lock {version}, installed {have}"
    assert not drift, f"environment differs from requirements.lock (re-run `make test` to reinstall): {drift}"
