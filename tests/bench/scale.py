"""Pipeline cost per source from 10^2 to 10^4 sources; prints JSON.

    python tests/bench/scale.py [--sizes 200,2000,10000] [--keep DIR] [--set KEY=VALUE ...]

For each N: a generated corpus of N small distinct sources (3 s, 160×128 H.264, one scene
cut each; distinct bytes), run through the real job (`pipeline/run.py`, tiny random-init
models, a fresh local Ray, as a user would) and, in the same run, through a bare single
`ray.data` pass over the same stage functions (probe → cut → caption → VAE) with no dedupe,
no writers and no commit protocol. Reported per N:

  per_source_s            job wall time / N
  pipeline_over_bare      job wall / bare wall                         (goal <= 1.15)
  driver_peak_rss_mb      the job's driver process, sampled every 0.2 s
  driver_stream_growth_mb its RSS after the streaming pass minus before it (summary.json)
  state_bytes_per_source  bytes under _state/ (commit records, leases) / N
  files_per_1000_clips    shard files per 1,000 clips
  resume_scan_s           wall time of a re-run over the complete output (nothing to do)
and across N: per_source_ratio (largest N / smallest, goal <= 1.1) and
driver_rss_growth_mb_per_1k_sources (goal <= 5; peak RSS, which carries ±100 MB of noise from
~1 GB of imports, so also driver_stream_growth_mb_per_1k_sources at the largest N). Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import av  # noqa: E402

from tests import media  # noqa: E402

SECONDS, FPS, WIDTH, HEIGHT = 3, 8, 160, 128


def make_corpus(out: Path, n: int) -> None:
    """n distinct sources: one encoded base clip, remuxed with a per-file comment (distinct bytes)."""
    out.mkdir(parents=True, exist_ok=True)
    base = out.parent / f"base-{n}.mp4"
    media.write_video(base, media.scene_frames(WIDTH, HEIGHT, SECONDS * FPS, SECONDS * FPS // 2, seed=1),
                      codec="libx264", fps=FPS, options=media.X264)
    for i in range(n):
        sub = out / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        with av.open(str(base)) as src, av.open(str(sub / f"src{i:06d}.mp4"), "w") as dst:
            dst.metadata["comment"] = f"source {i}"
            stream = dst.add_stream_from_template(src.streams.video[0])
            for packet in src.demux(src.streams.video[0]):
                if packet.dts is None:
                    continue
                packet.stream = stream
                dst.mux(packet)
    base.unlink()


def peak_rss_of(proc: subprocess.Popen) -> dict[str, float]:
    """Sample the process's resident set every 0.2 s until it exits."""
    peak = {"mb": 0.0}

    def sample() -> None:
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        peak["mb"] = max(peak["mb"], int(line.split()[1]) / 1024)
            except OSError:
                return
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    return peak


def run_job(src: Path, out: Path, overrides: list[str]) -> dict:
    start = time.perf_counter()
    sets = [a for o in overrides for a in ("--set", o)]
    proc = subprocess.Popen([sys.executable, "pipeline/run.py", "--input", str(src), "--output", str(out), *sets],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = peak_rss_of(proc)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"pipeline failed:\n{stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": wall, "driver_peak_rss_mb": peak["mb"], "phases_s": summary.get("phases_s", {}),
            "driver_rss_mb": summary.get("driver_rss_mb", {})}


def bare_pass(src: str) -> None:
    """The same stage functions in one Ray Data pass, nothing committed (run in a child process)."""
    import ray

    from pipeline.listing import listing_row
    from pipeline.settings import PipelineConfig
    from pipeline.steps import CaptionStage, VAEStage, make_cut_fn, make_probe_fn

    cfg = PipelineConfig()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    files = sorted(p for p in Path(src).rglob("*.mp4"))
    rows = [dict(listing_row(str(p), p.stat().st_size, p.stat().st_mtime_ns), source_id="", dup_of="") for p in files]
    n = (ray.data.from_items(rows).map(make_probe_fn(cfg)).flat_map(make_cut_fn(cfg), num_cpus=cfg.compute.cut_cpus)
         .map_batches(CaptionStage, fn_constructor_kwargs={"cfg": cfg}, batch_size=cfg.compute.caption_batch_size,
                      compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cfg.compute.model_actor_cpus,
                      batch_format="numpy")
         .map_batches(VAEStage, fn_constructor_kwargs={"cfg": cfg}, batch_size=cfg.compute.vae_batch_size,
                      compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cfg.compute.model_actor_cpus,
                      batch_format="numpy")
         .count())
    print(json.dumps({"rows": n}))


def run_bare(src: Path) -> float:
    start = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--bare", str(src)], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"bare pass failed:\n{r.stderr[-4000:]}")
    return time.perf_counter() - start


def measure(n: int, tmp: Path, overrides: list[str]) -> dict:
    src, out = tmp / f"src-{n}", tmp / f"out-{n}"
    t = time.perf_counter()
    make_corpus(src, n)
    gen_s = time.perf_counter() - t
    job = run_job(src, out, overrides)
    bare_s = run_bare(src)
    resume = run_job(src, out, overrides)
    manifest = json.loads((out / "manifest.json").read_text())
    state_bytes = sum(p.stat().st_size for p in (out / "_state").rglob("*") if p.is_file())
    return {
        "sources": n, "clips": manifest["totals"]["clips"], "corpus_generation_s": round(gen_s, 1),
        "job_wall_s": round(job["wall_s"], 2), "per_source_s": round(job["wall_s"] / n, 4),
        "bare_wall_s": round(bare_s, 2), "pipeline_over_bare": round(job["wall_s"] / bare_s, 3),
        "driver_peak_rss_mb": round(job["driver_peak_rss_mb"], 1),
        # What the streaming stages add to the driver (its RSS after the pass minus before it):
        # the part that can grow with N; the peak also holds ~1 GB of imports that do not.
        "driver_stream_growth_mb": round(job["driver_rss_mb"]["after_stream"] - job["driver_rss_mb"]["after_list_dedupe"], 1),
        "driver_rss_at_phase_ends_mb": job["driver_rss_mb"],
        "state_bytes_per_source": round(state_bytes / n, 1),
        "shard_files": manifest["totals"]["shard_files"],
        "files_per_1000_clips": manifest["totals"]["files_per_1000_clips"],
        "resume_scan_s": round(resume["wall_s"], 2),
        "job_phases_s": job["phases_s"], "resume_phases_s": resume["phases_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="200,2000,10000")
    p.add_argument("--keep", help="keep corpora and outputs in this folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline config override for the job runs, e.g. compute.sources_per_task=16")
    p.add_argument("--bare", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bare:
        bare_pass(args.bare)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ditharos-scale-"))
    try:
        runs = []
        for n in sizes:
            runs.append(measure(n, tmp, args.set))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    first, last = runs[0], runs[-1]
    result = {
        "machine": {"cpus": os.cpu_count()}, "overrides": args.set, "runs": runs,
        "per_source_ratio": round(last["per_source_s"] / first["per_source_s"], 3),
        "driver_rss_growth_mb_per_1k_sources": round(
            (last["driver_peak_rss_mb"] - first["driver_peak_rss_mb"]) / ((last["sources"] - first["sources"]) / 1000),
            2) if last["sources"] > first["sources"] else None,
        "driver_stream_growth_mb_per_1k_sources": round(last["driver_stream_growth_mb"] / (last["sources"] / 1000), 2),
        "goals": {"per_source_ratio": "<= 1.1", "pipeline_over_bare": "<= 1.15",
                  "driver_rss_growth_mb_per_1k_sources": "<= 5"},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
