"""What a night of eval measures: which shard clips are the reals, and which videos get generated.

Real videos for FVD are the eval clips' *latents decoded by the data's own VAE* ("VAE
reconstructions"). Shards keep latents, not pixels, and decoding gives reals at exactly the
size and frame count the generated videos have, through the same decoder: FVD then measures
the DiT, not the VAE's reconstruction error (which every generated video shares).

`build_plan` is deterministic given the shards and the config: the eval clips are the first
`reals.max_clips` usable clips of `reals.split` by clip id (only that split's clip index is
read, as columns); video i is paired with real clip
i mod N (its caption is the default prompt, its size the default size) and drawn with seed + i.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from eval import cache
from eval.fvd import MIN_FRAMES
from eval.settings import EVAL_SECTIONS, NightlyConfig
from pipeline.config import to_dict
from pipeline.manifest import read_manifest, stream_index
from pipeline.vae import VideoVAE
from training.index import ClipRef, ShardIndex
from training.sample import read_prompts_file


ALL = "all"  # EvalPlan.reals_split when the reals were drawn from every split


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


def open_index(data_uri: str, reals_split: str, scalars: bool = False) -> ShardIndex:
    """The clip index of one split ("all": every clip), shards closed: RealClip.file points into
    this index's files, so the plan and the eval tasks open it the same way. One split is what
    keeps this small — the held-out split is ~1% of a 100M-clip corpus."""
    # patch (1, 1, 1): every latent shape fits
    return ShardIndex.open(data_uri, (1, 1, 1), split=None if reals_split == ALL else reals_split, scalars=scalars)


def real_clips(index: ShardIndex, positions: Sequence[int]) -> list[RealClip]:
    """The clips at `positions` of an index opened with `scalars=True`, from its columns alone."""
    if index.scalars is None:
        raise ValueError("real_clips needs ShardIndex.open(..., scalars=True)")
    at = pa.array(np.asarray(positions, np.int64), pa.int64())
    col = {k: index.scalars.column(k).take(at).to_pylist()
           for k in ("split", "caption", "width_px", "height_px", "num_frames")}
    out = []
    for i, position in enumerate(positions):
        c = index.clips[int(position)]
        out.append(RealClip(c.clip_id, col["split"][i], c.bucket, c.file, c.row, col["caption"][i],
                            col["width_px"][i], col["height_px"][i], col["num_frames"][i]))
    return out


def choose_num_frames(num_frames: np.ndarray) -> int:
    """The most common frame count >= FVD's minimum (ties: the longer), of clips' frame counts."""
    values, counts = np.unique(np.asarray(num_frames, np.int64), return_counts=True)
    keep = values >= MIN_FRAMES
    if not keep.any():
        raise PlanError(f"no clip has >= {MIN_FRAMES} frames (FVD's minimum); "
                        f"frame counts present: {values.tolist()}")
    values, counts = values[keep], counts[keep]
    return int(values[np.lexsort((values, counts))[-1]])


def usable(num_frames: np.ndarray, max_clips: int, frames: int) -> tuple[np.ndarray, int] | None:
    """(positions, frames): the first `max_clips` (0: all) clips of a pool with >= `frames` frames
    (0: `choose_num_frames` of the pool); None when fewer than 2 (FVD fits a covariance)."""
    try:
        frames = frames or choose_num_frames(num_frames)
    except PlanError:
        return None
    positions = np.flatnonzero(np.asarray(num_frames) >= frames)
    if len(positions) < 2:
        return None
    return (positions[:max_clips] if max_clips else positions), frames


def choose_reals(data_uri: str, split: str, allow_train: bool, max_clips: int,
                 num_frames: int) -> tuple[list[RealClip], int, str]:
    """(eval clips, frames per video, the split they come from: `split`, or "all" after the
    allow_train fallback) — the first usable clips by clip id.

    Only `split`'s index is read (Arrow columns; RealClips made for the chosen clips only), and
    every clip's only when falling back to all splits is allowed (small and demo data).
    """
    for pool in (split, ALL):
        if pool == ALL and not allow_train:
            break
        index = open_index(data_uri, pool, scalars=True)
        found = usable(index.num_frames, max_clips, num_frames)
        if found is not None:
            positions, frames = found
            return real_clips(index, positions), frames, pool
    hint = ("" if allow_train else " or set reals.allow_train=true (reals then include training clips)")
    raise PlanError(f"need >= 2 clips of split {split!r} with >= {num_frames or MIN_FRAMES} frames for FVD; the "
                    f"shards have {split_counts(data_uri)} clips by split. Hold out more sources (pipeline "
                    f"--set output.val_fraction=0.1){hint}")


def split_counts(data_uri: str) -> dict[str, int]:
    """Clips per split, streamed from the clip index (one column, record batch by record batch)."""
    counts: Counter[str] = Counter()
    for batch in stream_index(data_uri, read_manifest(data_uri), ["split"]):
        found = pc.value_counts(batch.column(0))
        counts.update(dict(zip(found.field("values").to_pylist(), found.field("counts").to_pylist())))
    return {str(k): int(v) for k, v in sorted(counts.items(), key=lambda kv: str(kv[0]))}


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


def cached_reals(data_uri: str, data_sha256: str, cfg: NightlyConfig,
                 cache_uri: str | None) -> tuple[list[RealClip], int, str]:
    """`choose_reals` for these settings, read from `cache_uri` (eval/cache.py) when an earlier
    night chose them from the same data; otherwise chosen (a pass over the split's index) and saved."""
    r = cfg.reals
    key = cache.cache_key(what="reals", data_sha256=data_sha256, split=r.split, allow_train=r.allow_train,
                          max_clips=r.max_clips, num_frames=r.num_frames)
    hit = cache.load(cache_uri, "reals", key) if cache_uri else None
    if hit is not None:
        return [RealClip(**c) for c in hit["reals"]], int(hit["frames"]), str(hit["split"])
    reals, frames, split = choose_reals(data_uri, r.split, r.allow_train, r.max_clips, r.num_frames)
    if cache_uri:
        cache.save(cache_uri, "reals", key, {"reals": [asdict(c) for c in reals], "frames": frames, "split": split})
    return reals, frames, split


def build_plan(data_uri: str, cfg: NightlyConfig, cache_uri: str | None = None) -> EvalPlan:
    """Read the clip index's scalar columns (shards stay closed) and fix the night's eval set; with
    `cache_uri` (a run's eval cache), a night on data an earlier night planned for reads no index."""
    data_sha256 = read_manifest(data_uri)["fingerprint"]["data_sha256"]
    reals, frames, reals_split = cached_reals(data_uri, data_sha256, cfg, cache_uri)
    held_out = reals_split != ALL
    prompts = list(cfg.prompts.prompts) or (read_prompts_file(cfg.prompts.file) if cfg.prompts.file else [])
    s = cfg.sampling
    videos = plan_videos(reals, prompts, cfg.prompts.seed, cfg.prompts.num_videos, s.width_px, s.height_px, frames)
    if len(videos) < 2:
        raise PlanError(f"{len(videos)} video(s) planned; FVD needs >= 2 (set prompts.num_videos)")
    defining = {k: to_dict(getattr(cfg, k)) for k in EVAL_SECTIONS}
    defining["metrics"].pop("fvd_batch_size")  # batching does not change the numbers
    defining["plan"] = {"data_sha256": data_sha256, "num_frames": frames,
                        "reals": [c.clip_id for c in reals], "videos": [asdict(v) for v in videos]}
    sha = hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()
    return EvalPlan(data_uri, data_sha256, reals, videos, frames, reals_split, held_out, sha)


def read_latents(index: ShardIndex, clip: RealClip) -> torch.Tensor:
    """A clip's latents (C, T', H', W') as float32 (the training reader: checked shard, finite values)."""
    return index.latents(ClipRef(clip.clip_id, clip.bucket, clip.file, clip.row, 0))  # (C, T', H', W')


def decode_reals(index: ShardIndex, vae: VideoVAE, reals: list[RealClip], num_frames: int) -> Iterator[np.ndarray]:
    """uint8 (T, H, W, 3) real videos, one at a time: each clip's latents through `vae`, first num_frames."""
    for c in reals:
        video = vae.decode(read_latents(index, c)[None])[0]  # (T, H, W, 3)
        yield np.ascontiguousarray(video[:num_frames])


__all__ = ["ALL", "EvalPlan", "PlanError", "RealClip", "VideoSpec", "build_plan", "cached_reals", "choose_num_frames",
           "choose_reals", "decode_reals", "open_index", "plan_videos", "read_latents", "real_clips", "split_counts", "usable"]
