"""The training job's config: one dataclass tree, loaded by `pipeline.config.load_config`.

Defaults train DiT-tiny on the demo shards on a laptop (2 CPU workers, ZeRO-2, fp32);
production settings live in YAML files under `training/configs/`. The model's input widths
(`in_channels`, `text_dim`) are not config: they are read from the shards' manifest at start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from training.flow import FlowConfig
from training.optim import OptimConfig


@dataclass
class DataConfig:
    """Which shards, and how a global step is cut from them (see training/data.py)."""

    uri: str = "runs/demo/data"  # folder or pyarrow.fs URI holding manifest.json
    split: str = "train"
    seed: int = 0  # data order: epoch permutations are a function of (seed, epoch)
    packs_per_step: int = 2  # packs in one global step; divisible by scaling.num_workers
    token_budget: int = 2688  # tokens per pack (one micro-batch); the demo's largest clip has 2584
    prefetch_depth: int = 2  # steps built ahead in a background thread

    def validate(self) -> None:
        if self.packs_per_step < 1 or self.token_budget < 1:
            raise ValueError(f"data: packs_per_step and token_budget must be >= 1, got "
                             f"{self.packs_per_step}, {self.token_budget}")
        if self.prefetch_depth < 1:
            raise ValueError(f"data.prefetch_depth must be >= 1, got {self.prefetch_depth}")


@dataclass
class ModelConfig:
    """A registry size (training.model.DIT_SIZES) plus DiTConfig field overrides."""

    name: str = "DiT-tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {attn_backend: sdpa}; not in_channels/text_dim

    def validate(self) -> None:
        fixed = {"in_channels", "text_dim"} & set(self.overrides)
        if fixed:
            raise ValueError(f"model.overrides: {sorted(fixed)} come from the shards' manifest, not config")


@dataclass
class ScalingConfig:
    """Ray Train workers: one per GPU (or per CPU slot when use_gpu is false)."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1

    def validate(self) -> None:
        if self.num_workers < 1 or self.cpus_per_worker < 1:
            raise ValueError(f"scaling: num_workers and cpus_per_worker must be >= 1, got "
                             f"{self.num_workers}, {self.cpus_per_worker}")


@dataclass
class RunConfig:
    """Where the run writes and how long it goes."""

    dir: str = "runs/demo/train"  # metrics.jsonl, config.yaml, summary.json (and later checkpoints)
    max_steps: int = 200  # global optimizer steps
    log_every: int = 10  # progress line every N steps (every step goes to metrics.jsonl)
    checkpoint_every: int = 0  # 0: no checkpoints (not implemented yet)
    keep_checkpoints: int = 3
    seed: int = 0  # model init and the per-step noise / time / CFG-drop draws
    activation_checkpointing: bool = False

    def validate(self) -> None:
        if self.max_steps < 1 or self.log_every < 1:
            raise ValueError(f"run: max_steps and log_every must be >= 1, got {self.max_steps}, {self.log_every}")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ValueError(f"run: need checkpoint_every >= 0 and keep_checkpoints >= 1, got "
                             f"{self.checkpoint_every}, {self.keep_checkpoints}")


@dataclass
class TrainConfig:
    """Everything one training run needs; saved as config.yaml in the run dir."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        if self.data.packs_per_step % self.scaling.num_workers:
            raise ValueError(f"data.packs_per_step={self.data.packs_per_step} must be divisible by "
                             f"scaling.num_workers={self.scaling.num_workers}")
        share = self.data.packs_per_step // self.scaling.num_workers
        if self.optim.grad_accumulation != share:
            raise ValueError(f"optim.grad_accumulation={self.optim.grad_accumulation} must equal the packs per "
                             f"worker per step (data.packs_per_step / scaling.num_workers = {share})")
