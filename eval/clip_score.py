"""CLIP-score of videos against their prompts (torchmetrics' convention, per frame).

score(video) = mean over frames of 100 * cos(image_embedding(frame), text_embedding(prompt));
CLIP-score = max(mean over videos of score(video), 0): the clamp at 0 comes *after*
averaging, as in torchmetrics' `CLIPScore`. The same function scores generated clips
and real clips (the reference score). The CLIP comes from `ClipConfig` through the
pipeline's `load_clip` (a local open_clip checkpoint, or the random-init "tiny" preset).

    python eval/clip_score.py VIDEOS [--prompts FILE] [--num-frames K] [--config YAML] [--set clip.arch=ViT-L-14 ...]

VIDEOS is a folder of video files (prompts from `--prompts` or each video's sidecar
`<stem>.txt`/`<stem>.json` caption) or a .npy uint8 [N, T, H, W, 3] (prompts from
`--prompts`: a .txt with one prompt per line in video order, or a .json list). Videos may
have different lengths; `--num-frames K` scores only the first K frames of each.
Prints {"clip_score", "n_videos", "per_video", "clip"} as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python eval/clip_score.py`: import the package, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
import torch.nn.functional as F

from eval.fvd import pick_device
from eval.videos import VideoInputError, VideoSet, open_videos
from pipeline.clip_model import ClipConfig, ClipModel, load_clip
from pipeline.config import ConfigError, config_json, load_config
from pipeline.logs import get_logger

log = get_logger("eval.clip_score")


@dataclass
class ClipScoreConfig:
    """Which CLIP scores the videos, and where it runs."""

    clip: ClipConfig = field(default_factory=ClipConfig)
    device: str = "auto"  # auto = cuda when present


@dataclass
class ClipScoreResult:
    clip_score: float  # max(mean of per_video, 0)
    per_video: list[float]  # 100 * mean-over-frames cosine of each video, not clamped
    n_videos: int


def clip_score_from_embeddings(
    image_embeddings: Sequence[torch.Tensor], text_embeddings: torch.Tensor,
) -> ClipScoreResult:
    """Per-video frame embeddings [(T_i, D)] and prompt embeddings (N, D) → scores (normalised here)."""
    if len(image_embeddings) != len(text_embeddings) or len(text_embeddings) == 0:
        raise ValueError(f"{len(image_embeddings)} videos but {len(text_embeddings)} prompts (need >= 1 each)")
    per_video = []
    for frames, text in zip(image_embeddings, F.normalize(text_embeddings.float(), dim=-1)):
        cos = F.normalize(frames.float(), dim=-1) @ text  # (T_i,)
        per_video.append(float(100.0 * cos.mean()))
    return ClipScoreResult(max(float(np.mean(per_video)), 0.0), per_video, len(per_video))


def clip_score(clip: ClipModel, videos: Iterable[np.ndarray], prompts: Sequence[str]) -> ClipScoreResult:
    """uint8 videos (each (T, H, W, 3)) and one prompt per video → ClipScoreResult."""
    prompts = list(prompts)
    text = clip.embed_texts(prompts)  # (N, D)
    frames = []
    for i, video in enumerate(videos):
        if i >= len(prompts):
            raise ValueError(f"more videos than the {len(prompts)} prompts")
        video = np.asarray(video)
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3 or len(video) == 0:
            raise ValueError(f"video {i}: expected uint8 (T >= 1, H, W, 3), got {video.dtype} {video.shape}")
        frames.append(clip.embed_images(video))  # (T_i, D)
    return clip_score_from_embeddings(frames, text)


def read_prompts(path: Path | None, videos: VideoSet) -> list[str]:
    """One prompt per video: --prompts (.txt lines / .json list) or the videos' sidecar captions."""
    if path is None:
        missing = [n for n, caps in zip(videos.names, videos.captions) if not caps]
        if not videos.captions or missing:
            raise VideoInputError(f"no prompt for {missing[:3] or videos.source}: give --prompts FILE "
                                  "or a <stem>.txt caption beside each video")
        return [caps[0] for caps in videos.captions]
    if not path.is_file():
        raise VideoInputError(f"prompts file {path} does not exist")
    if path.suffix == ".json":
        prompts = json.loads(path.read_text())
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise VideoInputError(f"{path}: expected a JSON list of strings")
    else:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(prompts) != len(videos):
        raise VideoInputError(f"{path}: {len(prompts)} prompts for {len(videos)} videos (in order: {videos.names[:3]}...)")
    return prompts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("videos", help="folder of videos, or .npy uint8 [N, T, H, W, 3]")
    p.add_argument("--prompts", type=Path, help=".txt (one per line, in video order) or .json list")
    p.add_argument("--num-frames", type=int, help="score only each video's first K frames")
    p.add_argument("--config", help="YAML with a ClipScoreConfig (clip:, device:)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. clip.arch=ViT-B-32")
    args = p.parse_args(argv)
    try:
        cfg = load_config(ClipScoreConfig, args.config, args.set)
        videos = open_videos(args.videos, args.num_frames, same_length=False)  # lengths may differ
        prompts = read_prompts(args.prompts, videos)
        clip = load_clip(cfg.clip, pick_device(cfg.device))
        result = clip_score(clip, videos, prompts)
    except (ConfigError, VideoInputError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    log.info("config: %s", config_json(cfg).replace("\n", " "))
    print(json.dumps({
        "clip_score": result.clip_score,
        "n_videos": result.n_videos,
        "per_video": [{"name": n, "prompt": t, "score": s} for n, t, s in zip(videos.names, prompts, result.per_video)],
        "clip": clip.fingerprint(),
    }, indent=2))


__all__ = ["ClipScoreConfig", "ClipScoreResult", "clip_score", "clip_score_from_embeddings", "read_prompts"]


if __name__ == "__main__":
    main()
