"""The pipeline's steps as plain row → row(s) functions and batch classes (no Ray here).

`pipeline/run.py` wires them into a Ray Data plan; tests call them on plain dicts.
- `make_probe_fn`: candidate file → source id + probe result (or reject reason)
- `make_cut_fn`: probed source → clip rows (frames at bucket shape); it also writes the
  source's reject rows and a summary (clips made) to staging, keyed by source id, so a
  retried task rewrites the same file
- `CaptionStage`, `VAEStage`: actor classes over batches of clip rows
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import cv2
import numpy as np
import torch

from pipeline import storage
from pipeline.buckets import SourceBucketing
from pipeline.captions import keyframe_indices, make_captioner
from pipeline.clip_model import load_clip
from pipeline.cutting import Clip, cut_source
from pipeline.discover import content_id, sniff_other
from pipeline.probe import ProbeError, probe
from pipeline.settings import PipelineConfig
from pipeline.shards import clip_id, split_of
from pipeline.vae import load_vae

Row = dict[str, Any]


def _device(num_gpus: float) -> str:
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------
# discover + probe
# ---------------------------------------------------------------------------


def make_probe_fn(cfg: PipelineConfig) -> Callable[[Row], Row]:
    """Row {uri, size_bytes, sniffed, sidecars} → + {source_id, info (JSON), reason}."""

    def probe_row(row: Row) -> Row:
        out = dict(row, source_id="", info="", reason="")
        try:
            if row["size_bytes"] == 0:
                raise ProbeError("empty file (0 bytes)")
            out["source_id"] = content_id(row["uri"])
            with storage.local_copy(row["uri"]) as path:
                info = probe(path, cfg.probe)
            out["info"] = json.dumps(info.to_row())
        except ProbeError as e:
            reason = str(e)
            if "not a readable media container" in reason or "cannot open media" in reason:
                head = storage.read_bytes(row["uri"], 64) if row["size_bytes"] else b""
                reason = f"{reason}; content looks like: {sniff_other(head) if not row.get('sniffed') else row['sniffed'] + ' (damaged)'}"
            out["reason"] = reason
        except OSError as e:
            out["reason"] = f"cannot read file: {e}"
        return out

    return probe_row


# ---------------------------------------------------------------------------
# decode + scene cut + bucket sampling (the CPU path)
# ---------------------------------------------------------------------------


def make_cut_fn(cfg: PipelineConfig, staging_uri: str) -> Callable[[Row], Iterator[Row]]:
    """Source row → clip rows; writes `<staging>/sources/<source_id>.json` when the source is done."""

    def cut_row(row: Row) -> Iterator[Row]:
        info = json.loads(row["info"])
        sb = SourceBucketing(**json.loads(row["bucketing"]))
        sidecars = row.get("sidecars") or "[]"
        split = split_of(row["source_id"], cfg.output.val_fraction)
        rejects: list[Row] = []
        num_clips, t0 = 0, time.perf_counter()
        with storage.local_copy(row["uri"]) as path:
            pieces = cut_source(
                path, width_px=info["width_px"], height_px=info["height_px"], fps=info["fps"],
                codec=info["codec"], rotation_cw=info["rotation_deg"], container=info["container"],
                duration_s=info["duration_s"], sb=sb,
                buckets=cfg.buckets, scenes=cfg.scenes, decode=cfg.decode,
            )
            for piece in pieces:
                if not isinstance(piece, Clip):
                    rejects.append({"source_id": row["source_id"], "source_uri": row["uri"], "stage": piece.stage,
                                    "reason": piece.reason, "start_frame": piece.start_frame,
                                    "end_frame": piece.end_frame})
                    continue
                num_clips += 1
                t, h, w = piece.frames.shape[:3]
                yield {
                    "clip_id": clip_id(row["source_id"], piece.start_frame, t),
                    "source_id": row["source_id"], "source_uri": row["uri"], "split": split,
                    "bucket": piece.bucket_name, "scene_index": piece.scene_index,
                    "window_index": piece.window_index, "start_frame": piece.start_frame,
                    "end_frame": piece.end_frame, "start_s": piece.start_s, "end_s": piece.end_s,
                    "source_fps": info["fps"], "fps": cfg.buckets.fps, "num_frames": t,
                    "height_px": h, "width_px": w, "sidecars": sidecars, "frames": piece.frames,
                }
        if num_clips == 0 and not rejects:
            rejects.append({"source_id": row["source_id"], "source_uri": row["uri"], "stage": "scene",
                            "reason": "no clip could be cut from any scene", "start_frame": -1, "end_frame": -1})
        summary = {"source_id": row["source_id"], "uri": row["uri"], "clips": num_clips, "rejects": rejects,
                   "duration_s": info["duration_s"], "cut_wall_s": time.perf_counter() - t0}
        storage.write_bytes_atomic(storage.join(staging_uri, "sources", f"{row['source_id']}.json"),
                                   json.dumps(summary).encode())

    return cut_row


# ---------------------------------------------------------------------------
# model stages (actor pools)
# ---------------------------------------------------------------------------


def _rows_of(batch: dict[str, np.ndarray], name: str) -> list[Any]:
    return list(batch[name])


def _check_fingerprint(actual: dict, expected_sha: str, what: str) -> None:
    if expected_sha and actual["weights_sha256"] != expected_sha:
        raise RuntimeError(
            f"{what} weights on this worker (sha256 {actual['weights_sha256'][:12]}) differ from the driver's "
            f"({expected_sha[:12]}): every worker must load identical weights"
        )


class CaptionStage:
    """Batch of clip rows → + caption, clip_score, image/text embeddings, text mask, keyframe JPEG."""

    def __init__(self, cfg: PipelineConfig, num_gpus: float = 0.0, expected_sha256: str = "") -> None:
        self.cfg = cfg
        self.clip = load_clip(cfg.caption.clip, _device(num_gpus))
        _check_fingerprint(self.clip.fingerprint(), expected_sha256, "CLIP")
        self.captioner = make_captioner(cfg.caption, self.clip)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        clips = _rows_of(batch, "frames")
        k = self.cfg.caption.num_keyframes
        keyframes = [c[keyframe_indices(len(c), k)] for c in clips]
        sidecars = [json.loads(s) if self.cfg.caption.use_sidecar else [] for s in _rows_of(batch, "sidecars")]
        results = self.captioner.caption(keyframes, sidecars)
        tokens, mask = self.clip.text_tokens([r.caption for r in results])  # (N, L, D), (N, L)
        quality = [cv2.IMWRITE_JPEG_QUALITY, self.cfg.output.keyframe_jpeg_quality]
        jpegs = []
        for c in clips:
            ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(c[len(c) // 2][..., ::-1]), quality)
            jpegs.append(buf.tobytes() if ok else b"")
        out = dict(batch)
        out["caption"] = np.array([r.caption for r in results], dtype=object)
        out["caption_source"] = np.array([r.source for r in results], dtype=object)
        out["clip_score"] = np.array([r.score for r in results], dtype=np.float32)
        out["image_embedding"] = np.stack([r.image_embedding for r in results]).astype(np.float16)
        out["text_embedding"] = tokens.cpu().numpy().astype(np.float16)
        out["text_mask"] = mask.cpu().numpy().astype(np.uint8)
        out["keyframe_jpeg"] = np.array(jpegs, dtype=object)
        return out


class VAEStage:
    """Batch of clip rows → + latents (storage dtype); drops the pixel frames."""

    def __init__(self, cfg: PipelineConfig, num_gpus: float = 0.0, expected_sha256: str = "") -> None:
        self.vae = load_vae(cfg.vae, _device(num_gpus))
        _check_fingerprint(self.vae.fingerprint(), expected_sha256, "VAE")
        self.latent_dtype = {"float16": np.float16, "float32": np.float32}.get(cfg.vae.latent_dtype)
        self.cfg = cfg

    def _store(self, z: torch.Tensor) -> np.ndarray:
        if self.cfg.vae.latent_dtype == "bfloat16":
            # numpy has no bfloat16: keep the bits, stored as uint16 (training views them back).
            return z.to(torch.bfloat16).view(torch.uint16).cpu().numpy()
        return z.cpu().numpy().astype(self.latent_dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        clips = _rows_of(batch, "frames")
        latents: list[np.ndarray | None] = [None] * len(clips)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, c in enumerate(clips):
            by_shape.setdefault(tuple(c.shape), []).append(i)
        for idx in by_shape.values():
            z = self.vae.encode(np.stack([clips[i] for i in idx]))  # (B, C, T', H', W')
            for j, i in enumerate(idx):
                latents[i] = self._store(z[j])
        out = {k: v for k, v in batch.items() if k not in ("frames", "sidecars")}
        shapes = {x.shape for x in latents}
        out["latents"] = np.stack(latents) if len(shapes) == 1 else np.array(latents + [None], dtype=object)[:-1]
        return out
