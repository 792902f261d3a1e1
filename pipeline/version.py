"""Code version: git commit when available, else a hash of the package sources."""

from __future__ import annotations

import hashlib
import subprocess
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def code_version() -> str:
    """`git:<sha>[+dirty]`, or `src:<sha256 of pipeline/training/eval .py files>` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pipeline", "training", "eval"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return f"git:{sha[:12]}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        h = hashlib.sha256()
        for pkg in ("pipeline", "training", "eval"):
            for f in sorted((ROOT / pkg).rglob("*.py")):
                h.update(str(f.relative_to(ROOT)).encode())
                h.update(f.read_bytes())
        return f"src:{h.hexdigest()[:12]}"
