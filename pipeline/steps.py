"""The pipeline's steps as plain row → row(s) functions and batch classes (no Ray here).

`pipeline/run.py` wires them into one streaming Ray Data plan; tests call them on plain dicts.
- `make_probe_fn`: listing row (after dedupe) → + source id, probe result, bucketing, or a reason
- `make_cut_fn`: probed source → stream rows: its clips (frames at bucket shape, black bars
  cropped, curation scores attached), then side rows — one `reject` row per dropped span or
  clip filtered by score (pipeline/filters.py), one `source` row saying how many clips it cut
- `CaptionStage`, `VAEStage`: actor classes over batches of stream rows; side rows pass
  through, and a clip a stage cannot handle becomes a clip-level `reject` row

Every stream row has the same columns (`STREAM_COLUMNS`; side rows carry placeholders) and
a `kind`: clip | source | reject. Side rows carry their commit-record row as `record_json`.
Accounting per source: clips cut = clips written + clips rejected after the cut.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import cv2
import numpy as np
import torch

from pipeline import storage
from pipeline.aesthetic import Aesthetic
from pipeline.buckets import SourceBucketing, choose_source_bucket
from pipeline.captions import keyframe_indices, make_captioner
from pipeline.clip_model import load_clip
from pipeline.text_encoder import load_umt5, write_null_text
from pipeline.config import to_dict
from pipeline.cutting import Clip, cut_image, cut_source
from pipeline.discover import CONTENT_ID_PREFIX, content_id, is_image, sniff_other
from pipeline.faults import fault_point
from pipeline.filters import border_crop, keeps_example
from pipeline.filters import check as check_scores
from pipeline.images import IMAGE_CONTAINER, probe_image
from pipeline.neardup import clip_chash, clip_phash
from pipeline.probe import ProbeError, StillImage, probe
from pipeline.quality import clip_scores
from pipeline.records import CLOSED_STAGE, NOT_LISTED
from pipeline.settings import PipelineConfig
from pipeline.shards import FRAME_SCORE_COLUMNS, clip_id, split_of
from pipeline.text_overlay import load_text_detector, text_area
from pipeline.vae import load_vae

Row = dict[str, Any]
Batch = dict[str, np.ndarray]

# Columns of every row leaving the cut step (the model stages add theirs).
CUT_COLUMNS = (
    "kind", "record_json", "clip_id", "source_id", "source_uri", "split", "bucket", "scene_index",
    "window_index", "start_frame", "end_frame", "start_s", "end_s", "source_fps", "fps", "num_frames",
    "height_px", "width_px", "sidecars", "source_meta", "crop_px", "phash", "chash", *FRAME_SCORE_COLUMNS, "frames",
)


def _device(num_gpus: float) -> str:
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def uri_id(uri: str) -> str:
    """Id of a file that was never hashed (ignored / unreadable): from its URI, not its bytes."""
    return "uri" + hashlib.sha256(uri.encode()).hexdigest()[:29]


# ---------------------------------------------------------------------------
# side rows: what a step decided about a source or a clip, bound for the commit record
# ---------------------------------------------------------------------------


def side_row(record: Row) -> Row:
    """A stream row carrying one commit-record row (kind source or reject)."""
    row: Row = {
        "kind": record["kind"], "record_json": json.dumps(record, sort_keys=True), "clip_id": record.get("clip_id") or "",
        "source_id": record.get("source_id", ""), "source_uri": record.get("source_uri", ""), "split": "",
        "bucket": "", "scene_index": -1, "window_index": -1, "start_frame": -1, "end_frame": -1,
        "start_s": 0.0, "end_s": 0.0, "source_fps": 0.0, "fps": 0.0, "num_frames": 0, "height_px": 0,
        "width_px": 0, "sidecars": "[]", "source_meta": "{}", "crop_px": np.zeros(4, np.int32), "phash": 0, "chash": 0,
        **{c: 0.0 for c in FRAME_SCORE_COLUMNS}, "frames": np.zeros((0, 0, 0, 3), np.uint8),
    }
    return row


def source_record(row: Row, source_id: str, num_clips: int, num_rejects: int, duration_s: float) -> Row:
    return {"kind": "source", "source_id": source_id, "source_uri": row["uri"], "size_bytes": int(row["size_bytes"]),
            "mtime_ns": int(row.get("mtime_ns", -1)), "num_clips": num_clips, "num_rejects": num_rejects,
            "duration_s": duration_s}


def reject_record(source_id: str, source_uri: str, stage: str, reason: str, start_frame: int = -1,
                  end_frame: int = -1, clip: str | None = None, **extra: Any) -> Row:
    """A reject row; `extra`: record columns of the stage (filter: score, value and the scores)."""
    return {"kind": "reject", "source_id": source_id, "source_uri": source_uri, "stage": stage, "reason": reason,
            "start_frame": int(start_frame), "end_frame": int(end_frame), "clip_id": clip, **extra}


def keyframe_jpeg(frames: np.ndarray, quality: int) -> bytes:
    """The middle frame of a clip (T, H, W, 3) RGB as JPEG bytes (b"" if encoding fails)."""
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(frames[len(frames) // 2][..., ::-1]),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    return buf.tobytes() if ok else b""


def clip_indices(batch: Batch) -> list[int]:
    return [i for i, k in enumerate(batch["kind"]) if k == "clip"]


def _objects(values: list[Any]) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def _with_columns(batch: Batch, clips: list[int], new: dict[str, tuple[list[Any], Any]]) -> Batch:
    """batch + columns whose values are given for the clip rows and a placeholder for side rows."""
    out = dict(batch)
    n = len(batch["kind"])
    for name, (values, placeholder) in new.items():
        col = [placeholder] * n
        for j, i in enumerate(clips):
            col[i] = values[j]
        out[name] = _objects(col) if any(isinstance(v, (np.ndarray, bytes, str)) for v in col) else np.asarray(col)
    return out


def _to_reject(batch: Batch, i: int, stage: str, reason: str, **extra: Any) -> None:
    """Turn clip row i of `batch` into a clip-level reject row, in place (`extra`: see reject_record)."""
    rec = reject_record(str(batch["source_id"][i]), str(batch["source_uri"][i]), stage, reason,
                        int(batch["start_frame"][i]), int(batch["end_frame"][i]), str(batch["clip_id"][i]), **extra)
    batch["kind"][i] = "reject"
    batch["record_json"][i] = json.dumps(rec, sort_keys=True)


# ---------------------------------------------------------------------------
# probe
# ---------------------------------------------------------------------------


def make_probe_fn(cfg: PipelineConfig) -> Callable[[Row], Row]:
    """Listing row (+ source_id, dup_of from dedupe) → + {source_id, info (JSON), bucketing (JSON), stage, reason}."""

    def probe_row(row: Row, local: tuple[str, str] | None = None) -> Row:
        """`local`: (a local copy of the file, its bytes' sha256) when the caller made one
        (make_source_fn); else the file is read here (hashed first if it has no id yet)."""
        out = dict(row, source_id=str(row.get("source_id") or ""), info="", bucketing="", stage="", reason="")
        if not row.get("candidate", True):
            return dict(out, source_id=uri_id(row["uri"]), stage="discover", reason=row.get("reason") or "not a video")
        if row.get("dup_of"):
            return dict(out, stage="dedupe", reason=f"same content as {row['dup_of']}")
        try:
            if int(row["size_bytes"]) == 0:
                out["source_id"] = uri_id(row["uri"])
                raise ProbeError("empty file (0 bytes)")
            if not out["source_id"]:
                out["source_id"] = content_id(row["uri"]) if local is None else CONTENT_ID_PREFIX + local[1][:29]
            with storage.local_copy(row["uri"]) if local is None else contextlib.nullcontext(local[0]) as path:
                still = is_image(row["uri"], row.get("sniffed") or "", cfg.input)
                try:
                    info = probe_image(path, cfg.probe) if still else probe(path, cfg.probe)
                except StillImage:  # FFmpeg reads it as one picture (a PNG named .mov)
                    if not (cfg.input.image_extensions or cfg.input.sniff_images):
                        raise
                    info, still = probe_image(path, cfg.probe), True
                crop = (0, 0, 0, 0)
                if cfg.filter.crop_borders and not still:  # bars of one picture cannot be told from dark sky
                    crop = border_crop(path, info.height_px, info.width_px, duration_s=info.duration_s,
                                       rotation_cw=info.rotation_deg)
        except ProbeError as e:
            reason = str(e)
            if "not a readable media container" in reason or "cannot open media" in reason:
                head = storage.read_bytes(row["uri"], 64) if int(row["size_bytes"]) else b""
                sniffed = row.get("sniffed")
                reason = f"{reason}; content looks like: {sniff_other(head) if not sniffed else sniffed + ' (damaged)'}"
            return dict(out, stage="probe", reason=reason)
        except OSError as e:
            return dict(out, source_id=out["source_id"] or uri_id(row["uri"]), stage="probe",
                        reason=f"cannot read file: {e}")
        out["info"] = json.dumps(dict(info.to_row(), crop_px=list(crop)))
        if info.container == IMAGE_CONTAINER and 1 not in cfg.buckets.num_frames:
            return dict(out, stage="bucket", reason=(
                f"a still image, and buckets.num_frames has no 1 ({sorted(cfg.buckets.num_frames)}): add 1 "
                "to train on images, or set input.image_extensions: [] and input.sniff_images: false"))
        content_w, content_h = info.width_px - crop[2] - crop[3], info.height_px - crop[0] - crop[1]
        sb = choose_source_bucket(content_w, content_h, cfg.buckets)
        if sb is None:
            bars = f" ({info.width_px}x{info.height_px} less black borders)" if any(crop) else ""
            return dict(out, stage="bucket", reason=(
                f"{content_w}x{content_h}{bars} is smaller than every bucket resolution "
                f"{sorted(cfg.buckets.resolutions_px)} at its nearest aspect"))
        out["bucketing"] = json.dumps(to_dict(sb))
        return out

    return probe_row


# ---------------------------------------------------------------------------
# decode + scene cut + bucket sampling (the CPU path)
# ---------------------------------------------------------------------------


def make_cut_fn(cfg: PipelineConfig) -> Callable[[Row], Iterator[Row]]:
    """Probed source → its clip rows, then its reject rows and one source row.

    The row's `skip_clip_ids` (a JSON list, from dedupe): clips of this source an earlier,
    interrupted run already committed; cutting is deterministic, so they are recognised by id
    and not redone (still counted in the source row's num_clips).
    """

    def cut_row(row: Row, local_path: str | None = None) -> Iterator[Row]:
        """`local_path`: a local copy of the file the caller made (make_source_fn); else copied here."""
        sid = row["source_id"]
        if row["reason"]:  # rejected before cutting: the reject and an empty source summary
            yield side_row(reject_record(sid, row["uri"], row["stage"], row["reason"]))
            yield side_row(source_record(row, sid, 0, 1, 0.0))
            return
        info = json.loads(row["info"])
        sb = SourceBucketing(**json.loads(row["bucketing"]))
        crop = tuple(info.get("crop_px", (0, 0, 0, 0)))
        split = split_of(sid, cfg.output.val_fraction)
        skip_clip_ids = frozenset(json.loads(row.get("skip_clip_ids") or "[]"))
        rejects: list[Row] = []
        num_clips = 0
        with storage.local_copy(row["uri"]) if local_path is None else contextlib.nullcontext(local_path) as path:
            if info["container"] == IMAGE_CONTAINER:
                pieces = cut_image(path, sb, cfg.buckets)
            else:
                pieces = cut_source(
                    path, width_px=info["width_px"], height_px=info["height_px"], fps=info["fps"],
                    codec=info["codec"], rotation_cw=info["rotation_deg"],
                    duration_s=info["duration_s"], sb=sb, crop_px=crop,
                    buckets=cfg.buckets, scenes=cfg.scenes, decode=cfg.decode.for_task(cfg.compute.cut_cpus),
                )
            for piece in pieces:
                if not isinstance(piece, Clip):
                    rejects.append(reject_record(sid, row["uri"], piece.stage, piece.reason, piece.start_frame,
                                                 piece.end_frame))
                    continue
                num_clips += 1
                t, h, w = piece.frames.shape[:3]
                cid = clip_id(sid, piece.start_frame, t)
                if cid in skip_clip_ids:
                    continue
                scores = clip_scores(piece.frames, cfg.buckets.fps).to_dict()
                failed = check_scores(scores, cfg.filter, t)
                if failed is not None:  # dropped before the model stages spend anything on it
                    example = {}
                    if keeps_example(cid, cfg.filter.example_fraction):
                        jpeg = keyframe_jpeg(piece.frames, cfg.output.keyframe_jpeg_quality)
                        example = {"keyframe_jpeg": base64.b64encode(jpeg).decode()}  # JSON side row
                    rejects.append(reject_record(sid, row["uri"], "filter", failed.reason, piece.start_frame,
                                                 piece.end_frame, cid, score=failed.score, value=failed.value,
                                                 **scores, **example))
                    continue
                yield {
                    "kind": "clip", "record_json": "", "clip_id": cid, "source_id": sid, "source_uri": row["uri"],
                    "split": split, "bucket": piece.bucket_name, "scene_index": piece.scene_index,
                    "window_index": piece.window_index, "start_frame": piece.start_frame,
                    "end_frame": piece.end_frame, "start_s": piece.start_s, "end_s": piece.end_s,
                    "source_fps": info["fps"], "fps": cfg.buckets.fps, "num_frames": t,
                    "height_px": h, "width_px": w, "sidecars": row.get("sidecars") or "[]",
                    "source_meta": row.get("source_meta") or "{}", "crop_px": np.asarray(crop, np.int32),
                    "phash": clip_phash(piece.frames),
                    "chash": clip_chash(piece.frames),
                    **scores, "frames": piece.frames,
                }
        fault_point("after_cut")
        if num_clips == 0 and not rejects:
            rejects.append(reject_record(sid, row["uri"], "scene", "no clip could be cut from any scene"))
        for rec in rejects:
            yield side_row(rec)
        yield side_row(source_record(row, sid, num_clips, len(rejects), float(info["duration_s"])))

    return cut_row


def closing_row(row: Row) -> Row | None:
    """A source an interrupted run committed in part that cannot be cut again under its URI — no
    longer listed, or now a copy of another source — gets one CLOSED_STAGE reject row instead of
    a cut: its committed clips stay, and the source counts as complete, so later runs finish
    rather than fail on it forever. Any other row: None."""
    if not (row.get("dup_of") or row.get("reason") == NOT_LISTED):
        return None
    committed = json.loads(row.get("skip_clip_ids") or "[]")
    if not committed:
        return None
    why = f"same content as {row['dup_of']}" if row.get("dup_of") else NOT_LISTED
    return side_row(reject_record(str(row.get("source_id") or uri_id(row["uri"])), row["uri"], CLOSED_STAGE,
                                  f"closed: {why}; the {len(committed)} clip(s) an interrupted run committed are "
                                  "kept, the rest are not cut"))


def make_source_fn(cfg: PipelineConfig) -> Callable[[Row], Iterator[Row]]:
    """Listing row (+ source_id, dup_of from dedupe) → its clip, reject and source rows: probe and
    cut over one local copy of the file, hashed as it is copied.

    Done as two stages, a remote source was read three times — hashed for its id, copied to
    probe, copied again to cut: at 10M sources of ~100 MB, 2 PB and ~250M GETs more than needed.
    """
    probe_row, cut_row = make_probe_fn(cfg), make_cut_fn(cfg)

    def source_rows(row: Row) -> Iterator[Row]:
        closing = closing_row(row)
        if closing is not None:
            yield closing
            return
        if not row.get("candidate", True) or row.get("dup_of") or not int(row.get("size_bytes") or 0):
            yield from cut_row(probe_row(row))  # rejected without reading the file
            return
        hasher = hashlib.sha256() if not row.get("source_id") else None  # dedupe may have hashed it
        with contextlib.ExitStack() as stack:
            try:
                path = stack.enter_context(storage.local_copy(row["uri"], hasher))
            except OSError:  # unreadable: probe_row names the error as a probe reject
                path = None
            if path is None:
                yield from cut_row(probe_row(row))
                return
            yield from cut_row(probe_row(row, (path, hasher.hexdigest() if hasher else "")), path)

    return source_rows


# ---------------------------------------------------------------------------
# model stages (actor pools)
# ---------------------------------------------------------------------------


def _check_fingerprint(actual: dict, expected_sha: str, what: str) -> None:
    if expected_sha and actual["weights_sha256"] != expected_sha:
        raise RuntimeError(
            f"{what} weights on this worker (sha256 {actual['weights_sha256'][:12]}) differ from the driver's "
            f"({expected_sha[:12]}): every worker must load identical weights"
        )


class CaptionStage:
    """Stream batch → + caption, clip_score, aesthetic, text_area, image/text embeddings, text mask, keyframe JPEG.

    A clip whose aesthetic or text_area score is outside its `filter.*` range becomes a `filter`
    reject row here (the first point the scores exist), before the VAE spends anything on it.
    """

    def __init__(self, cfg: PipelineConfig, num_gpus: float = 0.0, expected_sha256: str = "",
                 aesthetic_sha256: str = "", text_sha256: str = "", encoder_sha256: str = "",
                 null_text_uri: str = "") -> None:
        self.cfg = cfg
        self.clip = load_clip(cfg.caption.clip, _device(num_gpus))
        _check_fingerprint(self.clip.fingerprint(), expected_sha256, "CLIP")
        self.encoder = self.clip  # text_encoder.kind clip: the captioner's CLIP encodes the captions too
        if cfg.text_encoder.kind == "umt5":
            self.encoder = load_umt5(cfg.text_encoder, _device(num_gpus))
            _check_fingerprint(self.encoder.fingerprint(), encoder_sha256, "umT5 text encoder")
        if null_text_uri:  # the encoder's "" once per output: a pretrained backbone's null caption
            write_null_text(null_text_uri, self.encoder)
        self.captioner = make_captioner(cfg.caption, self.clip)
        self.aesthetic = None
        if cfg.caption.aesthetic.enabled:
            self.aesthetic = Aesthetic(cfg.caption.aesthetic, self.clip.embed_dim, _device(num_gpus))
            _check_fingerprint(self.aesthetic.fingerprint(), aesthetic_sha256, "aesthetic head")
        self.text = load_text_detector(cfg.filter.text.detector, cfg.filter.text.model, _device(num_gpus),
                                       cfg.filter.text.cascade)
        _check_fingerprint(self.text.fingerprint(), text_sha256, "text detector")

    def __call__(self, batch: Batch) -> Batch:
        idx = clip_indices(batch)
        clips = [batch["frames"][i] for i in idx]
        k = self.cfg.caption.num_keyframes
        keyframes = [c[keyframe_indices(len(c), k)] for c in clips]
        sidecars = [json.loads(batch["sidecars"][i]) if self.cfg.caption.use_sidecar else [] for i in idx]
        results = self.captioner.caption(keyframes, sidecars) if idx else []
        if idx:
            tokens, mask = self.encoder.text_tokens([r.caption for r in results])  # (N, L, D), (N, L)
            tokens, mask = tokens.cpu().numpy().astype(np.float16), mask.cpu().numpy().astype(np.uint8)
        jpegs = [keyframe_jpeg(c, self.cfg.output.keyframe_jpeg_quality) for c in clips]
        aesthetic = [0.0] * len(idx)
        if self.aesthetic is not None and idx:
            aesthetic = self.aesthetic.score(np.stack([r.image_embedding for r in results])).tolist()
        text = [text_area(kf, self.text) for kf in keyframes]
        out = _with_columns(batch, idx, {
            "aesthetic": (aesthetic, 0.0),
            "text_area": (text, 0.0),
            "caption": ([r.caption for r in results], ""),
            "caption_source": ([r.source for r in results], ""),
            "clip_score": ([float(r.score) for r in results], 0.0),
            "image_embedding": ([r.image_embedding.astype(np.float16) for r in results], np.zeros(0, np.float16)),
            "text_embedding": ([tokens[j] for j in range(len(idx))] if idx else [], np.zeros((0, 0), np.float16)),
            "text_mask": ([mask[j] for j in range(len(idx))] if idx else [], np.zeros(0, np.uint8)),
            "keyframe_jpeg": (jpegs, b""),
        })
        if self.cfg.filter.enabled and idx:
            self._filter(out, idx, aesthetic, text, jpegs)
        return out

    def _filter(self, batch: Batch, idx: list[int], aesthetic: list[float], text: list[float],
                jpegs: list[bytes]) -> None:
        """Clip rows whose aesthetic (when scored) or text_area is out of range → `filter` reject rows (in place)."""
        batch["kind"], batch["record_json"] = _objects(list(batch["kind"])), _objects(list(batch["record_json"]))
        for j, i in enumerate(idx):
            model_scores = {"text_area": text[j], **({"aesthetic": aesthetic[j]} if self.aesthetic else {})}
            failed = check_scores(model_scores, self.cfg.filter, int(batch["num_frames"][i]))
            if failed is None:
                continue
            scores = {c: float(batch[c][i]) for c in FRAME_SCORE_COLUMNS if c in batch}
            example = ({"keyframe_jpeg": base64.b64encode(jpegs[j]).decode()}
                       if keeps_example(str(batch["clip_id"][i]), self.cfg.filter.example_fraction) else {})
            _to_reject(batch, i, "filter", failed.reason, score=failed.score, value=failed.value,
                       aesthetic=aesthetic[j], text_area=text[j], **scores, **example)


STORED_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}


def store_latents(z: torch.Tensor, latent_dtype: str) -> np.ndarray:
    """Latents as the shard stores them: bfloat16 as its uint16 bits (numpy has none; see shards.as_float32)."""
    if latent_dtype == "bfloat16":
        return z.to(torch.bfloat16).view(torch.uint16).cpu().numpy()
    return z.cpu().numpy().astype(STORED_DTYPES[latent_dtype])


class VAEStage:
    """Stream batch → + latents (storage dtype) on clip rows; drops the pixel frames.

    A clip the VAE cannot encode becomes a clip-level `vae` reject row naming the error; the
    rest of the batch goes on.
    """

    def __init__(self, cfg: PipelineConfig, num_gpus: float = 0.0, expected_sha256: str = "") -> None:
        self.vae = load_vae(cfg.vae, _device(num_gpus))
        _check_fingerprint(self.vae.fingerprint(), expected_sha256, "VAE")
        self.cfg = cfg
        self.latent_dtype = STORED_DTYPES[cfg.vae.latent_dtype]

    def _encode(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        z = self.vae.encode(np.stack(frames))  # (B, C, T', H', W')
        return [store_latents(z[j], self.cfg.vae.latent_dtype) for j in range(len(frames))]

    def __call__(self, batch: Batch) -> Batch:
        batch = {k: (v.copy() if k in ("kind", "record_json") else v) for k, v in batch.items()}
        batch["kind"], batch["record_json"] = _objects(list(batch["kind"])), _objects(list(batch["record_json"]))
        idx = clip_indices(batch)
        latents: dict[int, np.ndarray] = {}
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i in idx:
            by_shape.setdefault(tuple(batch["frames"][i].shape), []).append(i)
        for group in by_shape.values():
            try:
                latents.update(zip(group, self._encode([batch["frames"][i] for i in group])))
            except Exception:  # noqa: BLE001 — find the clip(s) at fault, keep the rest
                for i in group:
                    try:
                        latents[i] = self._encode([batch["frames"][i]])[0]
                    except Exception as e:  # noqa: BLE001 — any failure of one clip is that clip's reject
                        _to_reject(batch, i, "vae", f"VAE encode failed: {type(e).__name__}: {e}")
        kept = clip_indices(batch)
        placeholder = np.zeros((0, 0, 0, 0), self.latent_dtype)
        out = {k: v for k, v in batch.items() if k not in ("frames", "sidecars")}
        return _with_columns(out, kept, {"latents": ([latents[i] for i in kept], placeholder)})
