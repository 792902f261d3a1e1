"""The pipeline job's config: one dataclass tree, laptop defaults = the demo.

Each component owns its Config dataclass (discover.InputConfig, probe.ProbeConfig, …);
this module composes them and adds output and compute settings. Production settings
live in `pipeline/configs/production.yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.buckets import BucketConfig
from pipeline.captions import CaptionConfig
from pipeline.config import to_dict
from pipeline.decode import DecodeConfig
from pipeline.discover import InputConfig
from pipeline.filters import FilterConfig
from pipeline.neardup import DedupConfig
from pipeline.probe import ProbeConfig
from pipeline.scenes import SceneConfig
from pipeline.text_encoder import TextEncoderConfig
from pipeline.vae import VAEConfig, spatial_factor_of


@dataclass
class OutputConfig:
    """Where shards go and how they are grouped."""

    uri: str = "runs/demo/data"
    val_fraction: float = 0.0  # share of sources held out as split="val" (by hash of source id)
    keyframe_jpeg_quality: int = 85
    # Shards roll over at this size. 512 MB: 50 TB of latents is ~100k files (one LIST page per
    # 1,000, and far below a default vm.max_map_count of 65,530 once the loader bounds its open
    # maps); an object-store GET of a whole shard runs at full bandwidth (>= 64 MB objects), and
    # each clip is its own record batch whose byte range the clip index records, so training in
    # a uniform order reads single clips by range (data.remote_reads) and a large shard costs no
    # extra reads. A writer buffers up to compute.writer_open_mb of open shards on local disk.
    shard_target_mb: float = 512.0

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"output.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_target_mb <= 0:
            raise ValueError(f"output.shard_target_mb must be > 0, got {self.shard_target_mb}")


@dataclass
class ComputeConfig:
    """Ray resources. Model stages run as actor pools, on GPUs when the cluster has them."""

    cut_cpus: float = 1.0  # one decode+scene-cut task at a time per core
    # Sources per probe+cut task. Each Ray task costs fixed time and driver-side bookkeeping, so
    # one source per task is slow and grows the driver with the corpus; many per task let one
    # long source hold back the others of its task. Outputs stream out of a task as it goes.
    # Measured (tests/bench/scale.py, 2,000 sources): 1 → 2.6× the bare pass, 8 → 1.17×, 16 → 0.99×.
    sources_per_task: int = 16
    # Extra Ray resources per probe and cut task, e.g. {cpu_node: 1} to keep reading, hashing and
    # decoding on the CPU node type of cluster/*.yaml (which advertise cpu_node = their CPU count)
    # and off the GPU nodes.
    cut_resources: dict[str, float] = field(default_factory=dict)
    caption_batch_size: int = 8
    caption_actors: int = 1
    vae_batch_size: int = 4
    vae_actors: int = 1
    model_actor_cpus: float = 0.5  # CPUs reserved per model actor (0.5 leaves a 2-core laptop room to cut)
    gpus_per_model_actor: float = -1.0  # -1 = 1 when the cluster has GPUs, else 0 (CPU)
    # Shard writers: actors that own the rolling shards and commit records (I/O bound, so no CPU
    # is reserved). Rows are spread over them by (bucket, source); more writers, more bandwidth.
    writer_actors: int = 1
    writer_open_mb: float = 8192.0  # local disk a writer may fill with open shards before committing early
    # Where writers live. Empty: on the driver's node (soft), right for one machine or a small
    # cluster. Custom resources, e.g. {writer_slot: 1} (cluster/*.yaml's CPU nodes offer 2 slots:
    # a per-node cap, which Ray's SPREAD alone is not): spread over the nodes that have them, so
    # each node's disk (writer_open_mb per writer), NIC and memory carry only its writers' share
    # of the latents (50 TB through the head node would take days and outgrow its disk).
    writer_resources: dict[str, float] = field(default_factory=dict)
    # Routers: the last stage, handing each batch of latents to its writers. Every byte of the
    # output passes through one of them, so one router is one process and one node's NIC for the
    # whole corpus (50 TB at ~1 GB/s: ~14 h, whatever the cluster). 0 = one per VAE actor; they
    # are spread over the nodes (no CPU reserved: they wait on the network).
    router_actors: int = 0
    shuffle_blocks: int = 0  # partitions of the dedupe / resume shuffles; 0 = 2 per cluster CPU
    # Small state skips Ray Data's hash shuffles (seconds of fixed cost each): commit records up
    # to this many MB in all are read by the driver in one go, and a listing up to this size is
    # deduplicated in one block; larger ones are grouped with shuffles. Records take ~0.17 KB per
    # source on storage (Parquet, 2 clips per source) but the driver grows ~19 KB per source
    # reading them (tests/bench/scale.py: +35 MB at 2,000 sources), so 0.25 MB (~1,500 sources)
    # bounds that at ~30 MB; past it the driver holds no per-source state (+2.8 MB per 1k
    # sources measured, 200 → 2,000 sources). An earlier 64 MB meant ~7 GB on the driver.
    small_state_mb: float = 0.25
    # A run holds its output through a lease that expires this long after its last heartbeat
    # (at once when its process is gone from this host).
    lease_ttl_s: float = 120.0
    # Sources left incomplete by a lost writer are redone this many times within the run.
    repair_passes: int = 2
    # No row reaches the writers for this long → the job exits non-zero naming the stall; the
    # re-run resumes. Must exceed the slowest single source's cut + caption + encode.
    stall_timeout_s: float = 1800.0

    def validate(self) -> None:
        if self.stall_timeout_s <= 0:
            raise ValueError("compute.stall_timeout_s must be > 0")
        if self.small_state_mb < 0:
            raise ValueError("compute.small_state_mb must be >= 0")
        if self.sources_per_task < 1:
            raise ValueError("compute.sources_per_task must be >= 1")
        if self.writer_actors < 1:
            raise ValueError("compute.writer_actors must be >= 1")
        if self.router_actors < 0:
            raise ValueError("compute.router_actors must be >= 0 (0: one per VAE actor)")
        if self.lease_ttl_s <= 0:
            raise ValueError("compute.lease_ttl_s must be > 0")
        for name, why in (("cut_resources", "CPUs are compute.cut_cpus"), ("writer_resources", "writers take no CPU")):
            bad = {k: v for k, v in getattr(self, name).items()  # Ray refuses amounts below 0.0001
                   if k in ("CPU", "GPU") or isinstance(v, bool) or not isinstance(v, (int, float)) or v < 1e-4}
            if bad:
                raise ValueError(f"compute.{name}: {bad} — give custom resources with amounts of at least "
                                 f"0.0001 ({why})")


@dataclass
class PipelineConfig:
    """Everything `pipeline/run.py` reads."""

    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    scenes: SceneConfig = field(default_factory=SceneConfig)
    buckets: BucketConfig = field(default_factory=BucketConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    # the per-token text states the DiT is conditioned on: clip (the captioner's) | umt5 (Wan's)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)  # when the index is built; shards stay as they are
    compute: ComputeConfig = field(default_factory=ComputeConfig)

    def validate(self) -> None:
        if self.vae.kind == "wan":
            bad = [n for n in self.buckets.num_frames if (n - 1) % 4]
            if bad:
                raise ValueError(f"buckets.num_frames {bad} are not 4k+1: the wan VAE compresses time 4x "
                                 "and needs 1, 5, 9, 13, 17, ... frames")
        factor = spatial_factor_of(self.vae) or 8
        if self.buckets.size_multiple_px % factor:
            raise ValueError(f"buckets.size_multiple_px={self.buckets.size_multiple_px} must be a multiple of "
                             f"{factor} (the VAE's spatial factor)")


# Sections that change what the shards contain; compute/placement settings do not.
DATA_SECTIONS = ("probe", "decode", "scenes", "buckets", "filter", "caption", "text_encoder", "vae")


def data_config(cfg: PipelineConfig) -> dict:
    """The part of the config that defines the data (hashed into the fingerprint)."""
    d = {k: to_dict(getattr(cfg, k)) for k in DATA_SECTIONS}
    d["input"] = {k: v for k, v in to_dict(cfg.input).items() if k != "uri"}
    d["output"] = {k: v for k, v in to_dict(cfg.output).items() if k not in ("uri", "shard_target_mb")}
    return d
