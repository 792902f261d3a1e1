"""Training checkpoints: what goes in one, how a run finds its latest, and what may change on resume.

A checkpoint is a folder `<run dir>/checkpoint-NNNNNNNN/` (NNNNNNNN = global steps done), made
by Ray Train from every worker's part:

    deepspeed/            DeepSpeed `save_checkpoint` (model, optimizer, ZeRO partitions of all ranks)
    trainer_state.json    steps done, loader state, data fingerprint, world size, model config
    ema.safetensors       fp32 EMA weights (or model.safetensors when the EMA is off): loadable
                          without DeepSpeed, e.g. by training/sample.py
    config.yaml           the merged run config

Only rank 0 writes the last three; DeepSpeed names its files per rank, so the parts never
collide when Ray Train merges them. Everything here is plain Python (no Ray, no DeepSpeed).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from safetensors.torch import load_file, save_file

from pipeline import storage
from training.data import LoaderState

STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
MODEL_FILE = "model.safetensors"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
UNIVERSAL_TAG = "state_universal"
_NAME = re.compile(r"^checkpoint-(\d{8})$")

# Config keys that define what a run *is*; a relaunch that changes them is a different run.
# Everything else (workers, max_steps, logging, checkpoint cadence, LR schedule length, ...) may change.
FIXED_ON_RESUME = ("model", "flow", "data.seed", "data.split", "data.token_budget", "data.packs_per_step",
                   "data.shuffle_window_shards", "data.image_fraction",
                   "run.seed", "optim.zero_stage")
# ... except these: the same parameters and math through another kernel (a run started with flash-attn
# may go on where only torch's SDPA is installed).
FREE_ON_RESUME = ("model.overrides.attn_backend",)


def checkpoint_name(steps_done: int) -> str:
    return f"checkpoint-{steps_done:08d}"


@dataclass(frozen=True)
class TrainerState:
    """The part of a checkpoint that is ours (DeepSpeed keeps the rest)."""

    steps_done: int  # global steps trained; the next step is this one (0-based)
    loader: LoaderState  # data order position after the last trained step
    data_fingerprint: str  # manifest fingerprint.data_sha256 of the shards trained on
    data_uri: str
    world_size: int
    zero_stage: int
    model: dict[str, Any]  # DiTConfig fields, or {kind: wan, source, config}: rebuilds the module without the run config
    weights: str  # EMA_FILE or MODEL_FILE
    code_version: str

    def to_json(self) -> str:
        d = dict(self.__dict__)
        d["loader"] = self.loader.to_dict()
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        d = json.loads(text)
        d["loader"] = LoaderState.from_dict(d["loader"])
        missing = set(cls.__dataclass_fields__) - set(d)
        if missing:
            raise ValueError(f"{STATE_FILE} lacks {sorted(missing)}")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def read_state(checkpoint_uri: str) -> TrainerState:
    uri = storage.join(checkpoint_uri, STATE_FILE)
    try:
        return TrainerState.from_json(storage.read_bytes(uri).decode())
    except FileNotFoundError:
        raise FileNotFoundError(f"{checkpoint_uri} is not a DiTharos checkpoint (no {STATE_FILE})") from None


def list_checkpoints(run_uri: str) -> list[tuple[int, str]]:
    """(steps done, uri) of every complete checkpoint in a run dir, oldest first.

    Complete = has its trainer state (written before the checkpoint is reported); a folder
    without one is an interrupted upload and is ignored.
    """
    if not storage.exists(run_uri):
        return []
    fs, path = storage.resolve(run_uri)
    found = []
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        m = _NAME.match(info.base_name)
        if m and info.type == pafs.FileType.Directory:
            uri = storage.join(run_uri, info.base_name)
            if storage.exists(storage.join(uri, STATE_FILE)):
                found.append((int(m.group(1)), uri))
    return sorted(found)


def latest_checkpoint(run_uri: str) -> str | None:
    found = list_checkpoints(run_uri)
    return found[-1][1] if found else None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):  # an empty dict adds no keys: {} and absent are the same
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resume_changes(saved: dict[str, Any], now: dict[str, Any],
                   defaults: dict[str, Any] | None = None) -> tuple[list[str], list[str]]:
    """(refused, allowed): config keys that differ between a run's saved config and a relaunch.

    Refused keys change what the run is (model, data order, seeds, ZeRO layout); allowed ones
    (worker count, step budget, logging, ...) are reported so the log says what changed. A key
    the saved config lacks (written by a version before the key existed) counts as its value in
    `defaults` (the current TrainConfig's), so runs of older versions resume unless it changed.
    """
    a, b = {**_flatten(defaults or {}), **_flatten(saved)}, _flatten(now)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    refused = [k for k in changed if k not in FREE_ON_RESUME
               and any(k == f or k.startswith(f + ".") for f in FIXED_ON_RESUME)]
    return refused, [k for k in changed if k not in refused]


def save_weights(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Plain fp32 weights (safetensors) loadable without DeepSpeed."""
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, path)


def resolve(uri: str) -> str:
    """A checkpoint dir as given, or the latest checkpoint of a run dir; FileNotFoundError naming which."""
    if storage.exists(storage.join(uri, STATE_FILE)):
        return uri
    if not storage.exists(uri):
        raise FileNotFoundError(f"checkpoint {uri!r} does not exist")
    latest = latest_checkpoint(uri)
    if latest is None:
        raise FileNotFoundError(f"{uri!r} is neither a checkpoint (no {STATE_FILE}) nor a run dir with checkpoints")
    return latest


def load_weights(checkpoint_uri: str) -> tuple[TrainerState, dict[str, torch.Tensor]]:
    """The checkpoint's state and its plain weights (EMA when it was kept)."""
    state = read_state(checkpoint_uri)
    with storage.local_copy(storage.join(checkpoint_uri, state.weights)) as path:
        return state, load_file(path)


def to_universal(deepspeed_dir: str, out_dir: str) -> str:
    """Convert a checkpoint's DeepSpeed part to DeepSpeed's universal format; returns the load tag.

    ZeRO partitions the optimizer state by data-parallel rank, so DeepSpeed refuses to load a
    checkpoint on another worker count; its universal format (one file per parameter and
    state) loads on any. `out_dir/<tag>` is written once, behind a `done` marker, so
    concurrent callers on one node can share it.
    """
    tag = UNIVERSAL_TAG
    out = Path(out_dir)
    if (out / "done").is_file():
        return tag
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", str(Path(deepspeed_dir) / DEEPSPEED_TAG), "--output_folder", str(out / tag),
           "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]  # the version marker Megatron-style clients add themselves
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if done.returncode != 0:
        raise RuntimeError(f"converting {deepspeed_dir} to a universal checkpoint failed:\n{done.stderr[-3000:]}")
    (out / "done").write_text("ok\n")
    return tag


def is_complete(checkpoint_uri: str) -> bool:
    """Whether every rank's part of a checkpoint is there (trainer state, weights, DeepSpeed files).

    Ray Train registers a checkpoint only after it polls the workers' reports; a worker lost
    right after reporting can leave a complete folder that Ray Train does not list. This check
    lets a restart use it instead of an older one.
    """
    try:
        state = read_state(checkpoint_uri)
    except (FileNotFoundError, ValueError, KeyError):
        return False
    ds = storage.join(checkpoint_uri, DEEPSPEED_DIR, DEEPSPEED_TAG)
    names = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(state.world_size)]
    if state.zero_stage == 3:
        names += [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(state.world_size)]
    else:
        names.append("mp_rank_00_model_states.pt")
    uris = [storage.join(ds, n) for n in names] + [storage.join(checkpoint_uri, state.weights)]
    fs, _ = storage.resolve(checkpoint_uri)
    infos = fs.get_file_info([storage.resolve(u)[1] for u in uris])
    return all(i.type == pafs.FileType.File and i.size > 0 for i in infos)


def latest_complete(run_uri: str) -> tuple[int, str] | None:
    """(steps done, uri) of the newest complete checkpoint in a run dir."""
    for steps, uri in reversed(list_checkpoints(run_uri)):
        if is_complete(uri):
            return steps, uri
    return None
