"""The training job's config: one dataclass tree, loaded by `pipeline.config.load_config`.

Defaults train DiT-tiny on the demo shards on a laptop (2 CPU workers, ZeRO-2, fp32);
production settings live in YAML files under `training/configs/`. The model's input widths
(`in_channels`, `text_dim`) are not config: they are read from the shards' manifest at start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from training.attention import BACKENDS
from training.flow import FlowConfig
from training.optim import OptimConfig
from training.wan import WAN_LORA_TARGETS, WAN_PRESETS


@dataclass
class DataConfig:
    """Which shards, and how a global step is cut from them (see training/data.py)."""

    uri: str = "runs/demo/data"  # folder or pyarrow.fs URI holding manifest.json
    split: str = "train"
    seed: int = 0  # data order: epoch permutations are a function of (seed, epoch)
    packs_per_step: int = 2  # packs in one global step; divisible by scaling.num_workers
    token_budget: int = 2688  # tokens per pack (one micro-batch); the demo's largest clip has 2584
    prefetch_depth: int = 2  # steps built ahead in a background thread
    # Open shards per worker, least recently used closed first. Each open local shard is one
    # memory map (Linux allows 65,530 per process by default); a remote one is held in memory.
    max_open_shards: int = 512
    max_open_mb: float = 16384.0
    # Also check each shard's committed sha256 when a worker first opens it (reads the shard once
    # more). Sizes, Arrow footers and finite latents are always checked; `--verify` sets this.
    verify: bool = False
    # Remote shards (s3://, gs://) read whole (remote_reads below) are downloaded into a node-local
    # cache shared by the node's workers (training/cache.py), `fetch_ahead_steps` steps before a
    # step reads them.
    # Size it for (fetch_ahead_steps + 1) steps' shards of the node's workers plus two shuffle
    # windows (smaller: fetched shards are evicted before use and fetched again); disk in use
    # can exceed cache_mb by the evicted shards workers still hold open (≤ max_open_mb each).
    # "" = the system temp folder. Local data is memory-mapped in place and never cached.
    # cache_dir/index/ holds the node's one memory-mapped copy of the clip index (local and remote
    # data; ~90 bytes per clip, training/indexfile.py), outside cache_mb.
    # 0: each epoch is one uniform permutation of all clips (local data; remote data is then read
    # clip by clip, one ranged GET each — see remote_reads).
    # W > 0: shard files permuted and cut into windows of W, clips permuted within a window —
    # for remote data read in whole shards, so that a node cache of ~2 windows downloads each
    # shard once per epoch (training/data.py epoch_order). Part of the data order: fixed for a run.
    shuffle_window_shards: int = 0
    # Share of each epoch's clips drawn from 1-frame buckets (images and 1-frame clips), e.g. 0.5
    # for Open-Sora-style joint image-video training; images are repeated or left out to meet it.
    # None: clips come in their natural proportion. Part of the data order: fixed for a run.
    image_fraction: float | None = None
    cache_dir: str = ""
    cache_mb: float = 65536.0
    # How remote clips are read: "shards" — whole shards through the node cache above; "clips" —
    # each clip's own record batch by one ranged GET into the worker's memory (≤ clip_reads_mb,
    # training/clipreads.py), what a uniform order over remote data needs; "auto" — "clips" when
    # shuffle_window_shards is 0 and verify is off (a sha256 needs the whole file), else "shards".
    remote_reads: str = "auto"
    clip_reads_mb: float = 4096.0
    fetch_ahead_steps: int = 4
    fetch_threads: int = 8
    # Resuming a checkpoint on shards with another manifest fingerprint changes what the saved
    # data order means; it is refused unless this is set.
    allow_fingerprint_mismatch: bool = False

    def validate(self) -> None:
        if self.packs_per_step < 1 or self.token_budget < 1:
            raise ValueError(f"data: packs_per_step and token_budget must be >= 1, got "
                             f"{self.packs_per_step}, {self.token_budget}")
        if self.max_open_shards < 1 or self.max_open_mb <= 0:
            raise ValueError(f"data: max_open_shards must be >= 1 and max_open_mb > 0, got "
                             f"{self.max_open_shards}, {self.max_open_mb}")
        if self.image_fraction is not None and not 0.0 <= self.image_fraction < 1.0:
            raise ValueError(f"data.image_fraction must be in [0, 1) or null, got {self.image_fraction}")
        if self.shuffle_window_shards < 0:
            raise ValueError(f"data.shuffle_window_shards must be >= 0, got {self.shuffle_window_shards}")
        if self.cache_mb <= 0 or self.fetch_ahead_steps < 0 or self.fetch_threads < 1:
            raise ValueError(f"data: cache_mb must be > 0, fetch_ahead_steps >= 0 and fetch_threads >= 1, got "
                             f"{self.cache_mb}, {self.fetch_ahead_steps}, {self.fetch_threads}")
        if self.prefetch_depth < 1:
            raise ValueError(f"data.prefetch_depth must be >= 1, got {self.prefetch_depth}")
        if self.remote_reads not in REMOTE_READS:
            raise ValueError(f"data.remote_reads must be one of {list(REMOTE_READS)}, got {self.remote_reads!r}")
        if self.clip_reads_mb <= 0:
            raise ValueError(f"data.clip_reads_mb must be > 0, got {self.clip_reads_mb}")

    def reads_clips(self) -> bool:
        """Remote data read clip by clip (else whole shards through the node cache)."""
        if self.remote_reads == "auto":
            return self.shuffle_window_shards == 0 and not self.verify
        return self.remote_reads == "clips"


REMOTE_READS = ("auto", "shards", "clips")
MODEL_KINDS = ("ditharos", "wan")


@dataclass
class ModelConfig:
    """The network (training/backbone.py): DiTharos's VideoDiT at a registry size
    (training.model.DIT_SIZES) plus DiTConfig field overrides, or diffusers' Wan transformer."""

    kind: str = "ditharos"  # ditharos | wan
    name: str = "DiT-tiny"  # kind ditharos: the registry size
    overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {attn_backend: sdpa}; not in_channels/text_dim
    # kind wan: a local diffusers WanTransformer3DModel folder (or one holding transformer/), or a
    # random-init preset for tests and the demo (then `path` stays empty).
    path: str = ""
    preset: str = ""
    # kind wan: LoRA (peft, diffusers' adapter format) of this rank on the `lora_targets`
    # projections of every block; 0 = full fine-tuning. Only the LoRA factors train, sit in the
    # optimizer and in checkpoints; the frozen base is rebuilt from model.path (or, for a preset,
    # from a fixed seed). lora_alpha 0 = the rank (scale 1).
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(WAN_LORA_TARGETS))

    def validate(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model.kind={self.kind!r} is not one of {list(MODEL_KINDS)}")
        if self.lora_rank < 0 or self.lora_alpha < 0:
            raise ValueError(f"model.lora_rank and model.lora_alpha must be >= 0, got {self.lora_rank}, {self.lora_alpha}")
        if self.lora_rank and self.kind != "wan":
            raise ValueError("model.lora_rank is for model.kind: wan (fine-tuning a pretrained model); "
                             "a DiTharos DiT trains in full")
        if self.lora_rank and not self.lora_targets:
            raise ValueError(f"model.lora_targets is empty; e.g. {list(WAN_LORA_TARGETS)}")
        fixed = {"in_channels", "text_dim"} & set(self.overrides)
        if fixed:
            raise ValueError(f"model.overrides: {sorted(fixed)} come from the shards' manifest, not config")
        if self.kind == "ditharos" and (self.path or self.preset):
            raise ValueError("model.path / model.preset are for model.kind: wan; a DiTharos DiT is model.name")
        if self.kind == "wan":
            if bool(self.path) == bool(self.preset):
                raise ValueError(f"model.kind: wan needs exactly one of model.path (a local diffusers "
                                 f"WanTransformer3DModel folder) or model.preset (one of {list(WAN_PRESETS)})")
            if self.preset and self.preset not in WAN_PRESETS:
                raise ValueError(f"model.preset={self.preset!r} is not one of {list(WAN_PRESETS)}")
            extra = set(self.overrides) - {"attn_backend"}
            if extra:
                raise ValueError(f"model.overrides {sorted(extra)} do not apply to model.kind: wan (its sizes are "
                                 f"the checkpoint's); valid: ['attn_backend']")
            backend = self.overrides.get("attn_backend", "auto")
            if backend not in BACKENDS:
                raise ValueError(f"model.overrides.attn_backend={backend!r} is not one of {list(BACKENDS)}")


@dataclass
class ScalingConfig:
    """Ray Train workers: one per GPU (or per CPU slot when use_gpu is false)."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    # When the cluster cannot place num_workers now: seconds to wait for it to grow (an
    # autoscaling cluster adds nodes on demand) before refusing with one line; 0 refuses at once.
    resource_wait_s: float = 0.0

    def validate(self) -> None:
        if self.num_workers < 1 or self.cpus_per_worker < 1:
            raise ValueError(f"scaling: num_workers and cpus_per_worker must be >= 1, got "
                             f"{self.num_workers}, {self.cpus_per_worker}")
        if self.resource_wait_s < 0:
            raise ValueError(f"scaling.resource_wait_s must be >= 0, got {self.resource_wait_s}")


@dataclass
class RunConfig:
    """Where the run writes and how long it goes."""

    # metrics/, clips/ (training/runlog.py), tensorboard/, config.yaml, summary.json, checkpoint-NNNNNNNN/.
    # Relaunching with the same dir resumes from its latest checkpoint. A local path or a
    # pyarrow.fs URI (s3://, gs://) of storage every node can reach.
    dir: str = "runs/demo/train"
    max_steps: int = 200  # global optimizer steps
    log_every: int = 10  # progress line every N steps (every step goes to the run log)
    checkpoint_every: int = 50  # steps between checkpoints (the last step is always saved); 0: only the last
    keep_checkpoints: int = 3  # older checkpoints are deleted
    max_failures: int = 3  # worker-group restarts from the latest checkpoint before the run fails
    seed: int = 0  # model init and the per-step noise / time / CFG-drop draws
    activation_checkpointing: bool = False
    # torch.compile each DiT block on its own, dynamic shapes (training/parallel.py): fuses the
    # modulation, RoPE and norms; minutes of compiling at start, so off for the CPU demo.
    compile: bool = False
    log_clip_ids: bool = True  # <dir>/clips/: which clips every step trained on (audit, resume checks)
    tensorboard: bool = True  # event files in <dir>/tensorboard
    peak_tflops: float = 0.0  # per-device peak for the MFU estimate; 0: known GPUs by name, else none

    def validate(self) -> None:
        if self.max_steps < 1 or self.log_every < 1:
            raise ValueError(f"run: max_steps and log_every must be >= 1, got {self.max_steps}, {self.log_every}")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1 or self.max_failures < 0:
            raise ValueError(f"run: need checkpoint_every >= 0, keep_checkpoints >= 1 and max_failures >= 0, got "
                             f"{self.checkpoint_every}, {self.keep_checkpoints}, {self.max_failures}")
        if self.peak_tflops < 0:
            raise ValueError(f"run.peak_tflops must be >= 0, got {self.peak_tflops}")


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

    @property
    def micro_batches(self) -> int:
        """Packs per worker per global step = DeepSpeed's gradient accumulation steps."""
        return self.data.packs_per_step // self.scaling.num_workers

    def is_checkpoint_step(self, step: int) -> bool:
        """Whether a checkpoint is saved after global step `step` (0-based)."""
        done = step + 1
        every = self.run.checkpoint_every
        return done == self.run.max_steps or (every > 0 and done % every == 0)
