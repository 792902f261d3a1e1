"""The nightly eval job's config: one dataclass tree, loaded by `pipeline.config.load_config`.

Defaults = the laptop demo (`eval/configs/demo.yaml`): few short videos, few sampling steps.
Production settings live in `eval/configs/production.yaml`. The sections that decide what
the numbers mean (EVAL_SECTIONS: prompts, reals, sampling, metrics) are hashed, with the
resolved eval set, into the plan's `eval_sha256` (eval/plan.py); a checkpoint counts as evaluated
once per such hash, so numbers on one trend line are comparable. Compute and report settings
are not hashed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.clip_model import ClipConfig


@dataclass
class PromptConfig:
    """What the generated videos show. Video i is drawn with seed + i every night."""

    prompts: list[str] = field(default_factory=list)  # [] = the eval clips' captions (or `file`)
    file: str = ""  # .txt (one per line) or .json list, used when `prompts` is empty
    seed: int = 0
    num_videos: int = 0  # 0 = one per prompt (per real clip for captions); more: prompts repeat, seeds differ

    def validate(self) -> None:
        if self.num_videos < 0:
            raise ValueError(f"prompts.num_videos must be >= 0, got {self.num_videos}")


@dataclass
class RealsConfig:
    """Which shard clips are the real videos FVD compares against (decoded from their latents)."""

    split: str = "val"  # the held-out clips (pipeline output.val_fraction)
    # With fewer than 2 usable clips in `split`, use clips of every split instead; history and the
    # report then say the reals are not held out. The demo holds out nothing (val_fraction 0).
    allow_train: bool = True
    max_clips: int = 16  # the first N usable clips by clip id; 0 = all
    num_frames: int = 0  # frames per video; 0 = the most common count >= 10 (FVD's minimum) in the split

    def validate(self) -> None:
        if self.max_clips < 0 or self.num_frames < 0:
            raise ValueError(f"reals: max_clips and num_frames must be >= 0, got {self.max_clips}, {self.num_frames}")


@dataclass
class SamplingConfig:
    """How videos are sampled; fixed numbers so nights stay comparable."""

    width_px: int = 0  # 0 (with height_px 0) = the size of the video's paired real clip
    height_px: int = 0
    steps: int = 8  # Euler steps
    guidance_scale: float = 5.0
    # A run that trains one expert of a pair (flow.t_min or t_max = the boundary, Wan 2.2 A14B):
    # the other expert — its checkpoint or run dir, or the pretrained diffusers (pipeline) folder.
    other_expert: str = ""
    guidance_scale_low_noise: float = 0.0  # with other_expert: the low-noise expert's scale; 0 = guidance_scale

    def validate(self) -> None:
        if (self.width_px == 0) != (self.height_px == 0) or min(self.width_px, self.height_px) < 0:
            raise ValueError("sampling.width_px and height_px must both be 0 (the reals' sizes) or both positive")
        if self.steps < 1:
            raise ValueError(f"sampling.steps must be >= 1, got {self.steps}")
        if self.guidance_scale_low_noise < 0:
            raise ValueError(f"sampling.guidance_scale_low_noise must be >= 0 (0: guidance_scale), got "
                             f"{self.guidance_scale_low_noise}")


@dataclass
class MetricsConfig:
    """FVD detector and the CLIP that scores text alignment."""

    i3d_weights: str = ""  # "" = the cached conversion of the pinned Kinetics-400 I3D (eval/weights.py)
    fvd_batch_size: int = 4  # clips per I3D forward
    # true: score with the CLIP that captioned the data (its captions were chosen by this same
    # score, so the real clips' reference is biased upwards); false: use `clip` below
    use_data_clip: bool = True
    clip: ClipConfig = field(default_factory=ClipConfig)


@dataclass
class ComputeConfig:
    """Ray resources of each task (one per checkpoint, one for the real clips)."""

    cpus_per_task: float = 1.0  # 1 lets a 2-core laptop run two tasks side by side
    gpus_per_task: float = -1.0  # -1 = 1 when the cluster has GPUs, else 0 (CPU)
    device: str = "auto"  # inside a task: auto = cuda when Ray gave it a GPU


@dataclass
class ReportConfig:
    """What report.html shows."""

    strip_videos: int = 4  # videos per checkpoint in the sample strips
    strip_frames: int = 6  # frames per video in a strip
    strip_height_px: int = 96
    caption_examples: int = 8  # data card: example clips with their captions and keyframes

    def validate(self) -> None:
        if min(self.strip_videos, self.strip_frames, self.strip_height_px) < 1:
            raise ValueError("report: strip_videos, strip_frames and strip_height_px must be >= 1")


@dataclass
class NightlyConfig:
    """Everything `eval/nightly.py` reads; saved beside the report as eval_config.yaml."""

    prompts: PromptConfig = field(default_factory=PromptConfig)
    reals: RealsConfig = field(default_factory=RealsConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


EVAL_SECTIONS = ("prompts", "reals", "sampling", "metrics")  # what the numbers depend on


__all__ = ["EVAL_SECTIONS", "NightlyConfig"]
