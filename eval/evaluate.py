"""The work of one nightly task, as plain functions a test calls without Ray.

`evaluate_checkpoint` samples the plan's videos from one checkpoint (saving each as mp4 + its
settings JSON), and `evaluate_reals` decodes the plan's real clips from their latents; both
then score their videos in one streaming pass: Kinetics-400 I3D logits for FVD, CLIP-score
against the prompts (captions for the reals), and a strip of frames for the report. The
driver (eval/nightly.py) turns the two feature sets into an FVD.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch

from eval import cache
from eval.clip_score import clip_score_from_embeddings
from eval.fvd import FVD, Features, frechet_distance, pick_device
from eval.plan import EvalPlan, decode_reals, open_index
from eval.settings import NightlyConfig
from pipeline import storage
from pipeline.captions import keyframe_indices
from pipeline.clip_model import ClipModel, load_clip
from pipeline.logs import get_logger
from pipeline.manifest import read_manifest
from training.sample import load_data_models, load_sampler, write_video

log = get_logger("eval.evaluate")

STRIP_GAP_PX = 2
STRIP_FILE = "strip.jpg"
REALS_CACHE = "reals-scores"  # eval/cache.py entry in a reals folder: features + scores of that eval set


@dataclass
class VideoScores:
    """What one set of videos scored, plus a picture of it."""

    features: Features  # I3D logits (N, 400), for FVD
    clip_score: float  # torchmetrics convention: max(mean of per_video, 0)
    per_video: list[float]  # 100 · mean-over-frames cosine(frame, prompt)
    strip_jpeg: bytes  # the first videos' frames, one row per video (JPEG)


@dataclass
class SetResult:
    """One task's outcome: a checkpoint's generated videos, or the real clips (`name` "reals")."""

    name: str
    uri: str  # checkpoint dir, or the data dir for the reals
    steps_done: int | None
    scores: VideoScores
    out_uri: str  # folder with the videos / strip / scores.json
    detector_sha256: str
    clip_scorer: dict[str, Any]  # fingerprint of the CLIP that computed clip_score
    fingerprints: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    wall_s: float = 0.0
    from_cache: bool = False  # the reals' features and scores were read back (eval/cache.py), not computed


# ---------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------


def frame_row(video: np.ndarray, num_frames: int, height_px: int) -> np.ndarray:
    """`num_frames` evenly spaced frames of a uint8 (T, H, W, 3) video side by side, `height_px` tall."""
    t, h, w, _ = video.shape
    width = max(1, round(w * height_px / h))
    frames = [cv2.resize(video[i], (width, height_px), interpolation=cv2.INTER_AREA)
              for i in keyframe_indices(t, num_frames)]
    gap = np.full((height_px, STRIP_GAP_PX, 3), 255, np.uint8)
    return np.concatenate([x for f in frames for x in (f, gap)][:-1], axis=1)  # (height_px, W', 3)


def stack_rows(rows: list[np.ndarray]) -> np.ndarray:
    """Rows of possibly different widths, left-aligned on white, one under the other."""
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, STRIP_GAP_PX), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(padded)[:-STRIP_GAP_PX]


def jpeg_bytes(image: np.ndarray, quality: int = 85) -> bytes:
    """uint8 RGB (H, W, 3) → JPEG (noisy early samples make PNGs of megabytes; the report inlines these)."""
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


# ---------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------


def score_videos(videos: Iterable[np.ndarray], prompts: list[str], fvd: FVD, clip: ClipModel,
                 strip_videos: int = 4, strip_frames: int = 6, strip_height_px: int = 96) -> VideoScores:
    """One pass over uint8 (T, H, W, 3) videos: I3D features, per-frame CLIP embeddings, strip rows."""
    embeddings: list[torch.Tensor] = []
    rows: list[np.ndarray] = []

    def tap() -> Iterator[np.ndarray]:
        for i, video in enumerate(videos):
            embeddings.append(clip.embed_images(video))  # (T, D)
            if i < strip_videos:
                rows.append(frame_row(video, strip_frames, strip_height_px))
            yield video

    features = fvd.features(tap())
    if len(embeddings) != len(prompts):
        raise ValueError(f"{len(embeddings)} videos for {len(prompts)} prompts")
    cs = clip_score_from_embeddings(embeddings, clip.embed_texts(prompts))
    return VideoScores(features, cs.clip_score, cs.per_video, jpeg_bytes(stack_rows(rows)))


def fvd_between(real: Features, fake: Features) -> float:
    """FVD of two feature sets with the same frame count."""
    if real.num_frames != fake.num_frames:
        raise ValueError(f"real videos have {real.num_frames} frames, generated ones {fake.num_frames}")
    return frechet_distance(real.logits, fake.logits)


def file_sha256(uri: str) -> str:
    h = hashlib.sha256()
    for chunk in storage.iter_chunks(uri):
        h.update(chunk)
    return h.hexdigest()


def _scorer(cfg: NightlyConfig, data_clip: ClipModel, device: torch.device) -> ClipModel:
    return data_clip if cfg.metrics.use_data_clip else load_clip(cfg.metrics.clip, device)


def _scores_value(scores: VideoScores) -> dict[str, Any]:
    """VideoScores as eval/cache.py stores them: the logits as raw bytes of their own dtype (exact)."""
    logits = np.ascontiguousarray(scores.features.logits)
    return {"logits": logits.tobytes(), "dtype": logits.dtype.str, "shape": list(logits.shape),
            "num_frames": scores.features.num_frames,
            "clip_score": scores.clip_score, "per_video": list(scores.per_video), "strip_jpeg": scores.strip_jpeg}


def _load_scores(value: dict[str, Any] | None) -> VideoScores | None:
    if value is None:
        return None
    logits = np.frombuffer(value["logits"], value["dtype"]).reshape(value["shape"]).copy()
    return VideoScores(Features(logits, int(value["num_frames"])), float(value["clip_score"]),
                       [float(x) for x in value["per_video"]], value["strip_jpeg"])


def _save_scores(out_uri: str, scores: VideoScores, prompts: list[str], names: list[str]) -> None:
    storage.write_bytes_atomic(storage.join(out_uri, STRIP_FILE), scores.strip_jpeg)
    per_video = [{"name": n, "prompt": p, "clip_score": s} for n, p, s in zip(names, prompts, scores.per_video)]
    body = {"clip_score": scores.clip_score, "per_video": per_video, "num_frames": scores.features.num_frames}
    storage.write_bytes_atomic(storage.join(out_uri, "scores.json"), (json.dumps(body, indent=2) + "\n").encode())


# ---------------------------------------------------------------------------
# The two kinds of task
# ---------------------------------------------------------------------------


def evaluate_checkpoint(checkpoint_uri: str, plan: EvalPlan, cfg: NightlyConfig, out_uri: str) -> SetResult:
    """Sample the plan's videos from one checkpoint, save them, score them."""
    t0 = time.perf_counter()
    device = pick_device(cfg.compute.device)
    sampler = load_sampler(checkpoint_uri, str(device), data_uri=plan.data_uri,
                           other_expert=cfg.sampling.other_expert or None)
    if sampler.state.data_fingerprint != plan.data_sha256:
        raise ValueError(f"{checkpoint_uri} was trained on data {sampler.state.data_fingerprint[:16]}…, the eval "
                         f"set comes from {plan.data_sha256[:16]}…")
    fvd = FVD(cfg.metrics.i3d_weights or None, str(device), cfg.metrics.fvd_batch_size)
    clip = _scorer(cfg, sampler.clip, device)
    s = cfg.sampling
    low = s.guidance_scale_low_noise or None  # the low-noise expert's scale (0: the same as guidance_scale)

    def videos() -> Iterator[np.ndarray]:
        for v in plan.videos:
            video = sampler.generate([v.prompt], v.width_px, v.height_px, v.num_frames, s.steps,
                                     s.guidance_scale, seed=v.seed, low_noise_guidance=low)[0]  # (T, H, W, 3)
            settings = sampler.settings(v.prompt, v.seed, v.width_px, v.height_px, v.num_frames, s.steps,
                                        s.guidance_scale, low)
            write_video(out_uri, v.name, video, settings)
            yield video

    r = cfg.report
    scores = score_videos(videos(), plan.prompts, fvd, clip, r.strip_videos, r.strip_frames, r.strip_height_px)
    _save_scores(out_uri, scores, plan.prompts, [v.name for v in plan.videos])
    state = sampler.state
    fingerprints = {
        "checkpoint": checkpoint_uri.rstrip("/").rsplit("/", 1)[-1],
        "weights_file": state.weights,
        "weights_sha256": file_sha256(storage.join(checkpoint_uri, state.weights)),
        "data_fingerprint": state.data_fingerprint,
        "code_version": state.code_version,
        "model": state.model,
        "random_init_models": sampler.random_init_models,
    }
    return SetResult(fingerprints["checkpoint"], checkpoint_uri, state.steps_done, scores, out_uri,
                     fvd.detector_sha256, clip.fingerprint(), fingerprints, str(device),
                     round(time.perf_counter() - t0, 2))


def evaluate_reals(plan: EvalPlan, cfg: NightlyConfig, out_uri: str) -> SetResult:
    """Decode the plan's real clips with the data's VAE and score them against their captions.

    The result is kept in `out_uri` (REALS_CACHE, keyed by the eval set, the VAE, the detector,
    the CLIP scorer and the device) and read back on later nights: the reals of an unchanged
    eval set cost loading the models, not a pass over the index and a decode of every clip."""
    t0 = time.perf_counter()
    device = pick_device(cfg.compute.device)
    manifest = read_manifest(plan.data_uri)
    data_clip, vae = load_data_models(plan.data_uri, manifest, device)
    fvd = FVD(cfg.metrics.i3d_weights or None, str(device), cfg.metrics.fvd_batch_size)
    clip = _scorer(cfg, data_clip, device)
    captions = [c.caption for c in plan.reals]
    fingerprints = {"data_sha256": manifest["fingerprint"]["data_sha256"], "vae": vae.fingerprint()["weights_sha256"],
                    "clips": [c.clip_id for c in plan.reals]}
    r = cfg.report
    key = cache.cache_key(what="reals_scores", eval_sha256=plan.eval_sha256, detector=fvd.detector_sha256,
                          scorer=clip.fingerprint(), device=str(device),
                          strip=[r.strip_videos, r.strip_frames, r.strip_height_px], **fingerprints)
    scores = _load_scores(cache.load(out_uri, REALS_CACHE, key))
    hit = scores is not None
    if not hit:
        index = open_index(plan.data_uri, plan.reals_split)  # the index the plan's RealClip.file points into
        scores = score_videos(decode_reals(index, vae, plan.reals, plan.num_frames), captions, fvd, clip,
                              r.strip_videos, r.strip_frames, r.strip_height_px)
        cache.save(out_uri, REALS_CACHE, key, _scores_value(scores))
    _save_scores(out_uri, scores, captions, [c.clip_id for c in plan.reals])  # on a hit too: the files match the key
    return SetResult("reals", plan.data_uri, None, scores, out_uri, fvd.detector_sha256, clip.fingerprint(),
                     fingerprints, str(device), round(time.perf_counter() - t0, 2), from_cache=hit)


def checkpoint_name(checkpoint_uri: str) -> str:
    return checkpoint_uri.rstrip("/").rsplit("/", 1)[-1]


__all__ = ["STRIP_FILE", "SetResult", "VideoScores", "checkpoint_name", "evaluate_checkpoint", "evaluate_reals",
           "frame_row", "fvd_between", "jpeg_bytes", "score_videos", "stack_rows"]
