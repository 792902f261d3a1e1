"""What a night of eval measures: which shard clips are the reals, and which videos get generated.

Real videos for FVD are the eval clips' *latents decoded by the data's own VAE* ("VAE
reconstructions"). Shards keep latents, not pixels, and decoding gives reals at exactly the
size and frame count the generated videos have, through the same decoder: FVD then measures
the DiT, not the VAE's reconstruction error (which every generated video shares).

`build_plan` is deterministic given the shards and the config: the eval clips are the first
`reals.max_clips` usable clips of `reals.split` by clip id; video i is paired with real clip
i mod N (its caption is the default prompt, its size the default size) and drawn with seed + i.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from eval.fvd import MIN_FRAMES
from eval.settings import EVAL_SECTIONS, NightlyConfig
from pipeline.config import to_dict
from pipeline.vae import VideoVAE
from training.index import ClipRef, ShardIndex
from training.sample import read_prompts_file


class PlanError(ValueError):
    """The shards or the config cannot give a meaningful eval set; the message says what to change."""


@dataclass(frozen=True)
class RealClip:
    """One shard clip used as a real video."""

    clip_id: str
    split: str
    bucket: str
    file: int  # index into the ShardIndex's files
    row: int
    caption: str
    width_px: int
    height_px: int
    num_frames: int  # the clip's own frame count (>= the plan's num_frames; decoded then cut)


@dataclass(frozen=True)
class VideoSpec:
    """One video to generate for every checkpoint."""

    index: int
    prompt: str
    seed: int
    width_px: int
    height_px: int
    num_frames: int

    @property
    def name(self) -> str:
        return f"{self.index:03d}-seed{self.seed}"


@dataclass(frozen=True)
class EvalPlan:
    """The fixed eval set of one night: reals + videos, and what they were drawn from."""

    data_uri: str
    data_sha256: str
    reals: list[RealClip]
    videos: list[VideoSpec]
    num_frames: int
    reals_split: str  # the split the reals come from: reals.split, or "all" after the allow_train fallback
    held_out: bool  # False: the reals include clips the model was trained on
    eval_sha256: str  # config sections + this plan: a checkpoint is evaluated once per value

    @property
    def prompts(self) -> list[str]:
        return [v.prompt for v in self.videos]


# ---------------------------------------------------------------------------
# Pure choices
# ---------------------------------------------------------------------------


def list_clips(index: ShardIndex) -> list[RealClip]:
    """Every clip with the scalar columns eval needs, sorted by clip id: from the clip index
    (opened with `scalars=True`), no shard is opened."""
    if index.scalars is None:
        raise ValueError("list_clips needs ShardIndex.open(..., scalars=True)")
    col = {k: index.scalars.column(k).to_pylist() for k in ("split", "caption", "width_px", "height_px", "num_frames")}
    return [RealClip(c.clip_id, col["split"][i], c.bucket, c.file, c.row, col["caption"][i], col["width_px"][i],
                     col["height_px"][i], col["num_frames"][i]) for i, c in enumerate(index.clips)]


def choose_num_frames(clips: list[RealClip]) -> int:
    """The most common frame count >= FVD's minimum (ties: the longer)."""
    counts = Counter(c.num_frames for c in clips if c.num_frames >= MIN_FRAMES)
    if not counts:
        raise PlanError(f"no clip has >= {MIN_FRAMES} frames (FVD's minimum); "
                        f"frame counts present: {sorted({c.num_frames for c in clips})}")
    return max(counts, key=lambda n: (counts[n], n))


def choose_reals(clips: list[RealClip], split: str, allow_train: bool, max_clips: int,
                 num_frames: int) -> tuple[list[RealClip], int, bool]:
    """(eval clips, frames per video, held out?) from all clips of the shards.

    Clips with at least `num_frames` frames (0: `choose_num_frames` of the split) are usable;
    at least 2 are needed (FVD fits a covariance). Falls back to every split only if allowed.
    """
    held = [c for c in clips if c.split == split]
    for pool, held_out in ((held, True), (clips, False)):
        if not held_out and not allow_train:
            break
        if not pool:
            continue
        try:
            frames = num_frames or choose_num_frames(pool)
        except PlanError:
            continue
        usable = [c for c in pool if c.num_frames >= frames]
        if len(usable) >= 2:
            return (usable[:max_clips] if max_clips else usable), frames, held_out
    splits = dict(Counter(c.split for c in clips))
    hint = ("" if allow_train else " or set reals.allow_train=true (reals then include training clips)")
    raise PlanError(f"need >= 2 clips of split {split!r} with >= {num_frames or MIN_FRAMES} frames for FVD; the "
                    f"shards have {splits} clips by split. Hold out more sources (pipeline "
                    f"--set output.val_fraction=0.1){hint}")


def plan_videos(reals: list[RealClip], prompts: list[str], seed: int, num_videos: int, width_px: int,
                height_px: int, num_frames: int) -> list[VideoSpec]:
    """Video i: prompt i (mod the list), size of real clip i (mod N) unless a size is given, seed + i."""
    if not prompts:
        prompts = [c.caption for c in reals]
    n = num_videos or len(prompts)
    videos = []
    for i in range(n):
        real = reals[i % len(reals)]
        w, h = (width_px, height_px) if width_px else (real.width_px, real.height_px)
        videos.append(VideoSpec(i, prompts[i % len(prompts)], seed + i, w, h, num_frames))
    return videos


def build_plan(data_uri: str, cfg: NightlyConfig) -> EvalPlan:
    """Read the clip index's scalar columns (shards stay closed) and fix the night's eval set."""
    # patch (1, 1, 1): every latent shape fits
    index = ShardIndex.open(data_uri, (1, 1, 1), split=None, scalars=True)
    clips = list_clips(index)
    r = cfg.reals
    reals, frames, held_out = choose_reals(clips, r.split, r.allow_train, r.max_clips, r.num_frames)
    prompts = list(cfg.prompts.prompts) or (read_prompts_file(cfg.prompts.file) if cfg.prompts.file else [])
    s = cfg.sampling
    videos = plan_videos(reals, prompts, cfg.prompts.seed, cfg.prompts.num_videos, s.width_px, s.height_px, frames)
    if len(videos) < 2:
        raise PlanError(f"{len(videos)} video(s) planned; FVD needs >= 2 (set prompts.num_videos)")
    defining = {k: to_dict(getattr(cfg, k)) for k in EVAL_SECTIONS}
    defining["metrics"].pop("fvd_batch_size")  # batching does not change the numbers
    defining["plan"] = {"data_sha256": index.fingerprint, "num_frames": frames,
                        "reals": [c.clip_id for c in reals], "videos": [asdict(v) for v in videos]}
    sha = hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()
    split = r.split if held_out else "all"
    return EvalPlan(index.data_uri, index.fingerprint, reals, videos, frames, split, held_out, sha)


def read_latents(index: ShardIndex, clip: RealClip) -> torch.Tensor:
    """A clip's latents (C, T', H', W') as float32 (the training reader: checked shard, finite values)."""
    return index.latents(ClipRef(clip.clip_id, clip.bucket, clip.file, clip.row, 0))  # (C, T', H', W')


def decode_reals(index: ShardIndex, vae: VideoVAE, reals: list[RealClip], num_frames: int) -> Iterator[np.ndarray]:
    """uint8 (T, H, W, 3) real videos, one at a time: each clip's latents through `vae`, first num_frames."""
    for c in reals:
        video = vae.decode(read_latents(index, c)[None])[0]  # (T, H, W, 3)
        yield np.ascontiguousarray(video[:num_frames])


__all__ = ["EvalPlan", "PlanError", "RealClip", "VideoSpec", "build_plan", "choose_num_frames", "choose_reals",
           "decode_reals", "list_clips", "plan_videos", "read_latents"]
