"""DiTharos nightly eval: a run's new checkpoints → fixed prompts and seeds → FVD, CLIP-score → history, report.

On a cluster:   ray job submit --runtime-env cluster/runtime_env.yaml -- \
                    python eval/nightly.py --run s3://bucket/runs/x [--latest] [--config eval/configs/production.yaml]
Locally:        python eval/nightly.py --run runs/demo/train [--latest] [--set sampling.steps=4 ...]

Every checkpoint of the run that has no row for tonight's eval set in `RUN/eval/history.jsonl`
is evaluated (with `--latest`: only the newest one); a second run the same night finds nothing
new. Outputs, all under `RUN/eval/`: history.jsonl (one row per checkpoint per eval set),
report.html (self-contained), summary.json, samples/<checkpoint>-<set>/ (mp4 + settings JSON
per video, strip.jpg, scores.json), samples/reals-<set>/, sets/<set>.json (config + eval set),
cache/ (the eval set's reals, their scores and the data card, per data version: eval/cache.py, so
a night on unchanged data reads no clip index and decodes no real clip).
The run dir must be storage every node reaches (as for training).

Plan: parse config → list checkpoints, drop the evaluated ones → fix the eval set from the
shards (driver, eval/plan.py) → one Ray task for the real clips and one per checkpoint
(eval/evaluate.py: sample, save, I3D + CLIP features; a GPU each when the cluster has them) →
FVD per checkpoint and a history row as each finishes (driver) → report.html → summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python eval/nightly.py`: import the package, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import ray

from eval import cache
from eval.evaluate import STRIP_FILE, SetResult, evaluate_checkpoint, evaluate_reals, fvd_between
from eval.history import EVAL_DIR, append_rows, history_uri, make_row, now_utc, pending_checkpoints, read_history
from eval.plan import EvalPlan, PlanError, build_plan
from eval.report import ReportData, render_report
from eval.settings import NightlyConfig
from eval.weights import WeightsError, ensure_weights
from pipeline import storage
from pipeline.config import ConfigError, config_hash, dump_yaml, load_config, to_dict
from pipeline.datacard import data_card
from pipeline.logs import get_logger
from pipeline.manifest import read_manifest
from pipeline.version import code_version
from training import checkpoint as ckpt
from training.runlog import MetricsDigest

log = get_logger("eval.nightly")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="training run dir (local path or URI) holding checkpoint-NNNNNNNN/")
    p.add_argument("--latest", action="store_true", help="evaluate only the newest checkpoint")
    p.add_argument("--config", help="YAML config file (default: the demo settings, eval/configs/demo.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. sampling.steps=30")
    p.add_argument("--data", help="the shards' location, if they moved since training")
    return p.parse_args(argv)


def find_checkpoints(run_uri: str) -> list[tuple[int, str]]:
    """(steps done, uri) of the run's complete checkpoints; SystemExit with the reason when there are none."""
    if not storage.exists(run_uri):
        sys.exit(f"error: run dir {run_uri} does not exist")
    found = ckpt.list_checkpoints(run_uri)
    if not found:
        sys.exit(f"error: no checkpoints in {run_uri} (expected checkpoint-NNNNNNNN/ folders with "
                 f"{ckpt.STATE_FILE}; training writes them every run.checkpoint_every steps)")
    return found


# ---------------------------------------------------------------------------
# The Ray part: one task per checkpoint, one for the real clips
# ---------------------------------------------------------------------------


@ray.remote
def eval_task(kind: str, threads: int, *args: Any) -> SetResult:
    import torch

    torch.set_num_threads(threads)  # as many as the CPUs Ray reserved, so tasks side by side share the cores
    return evaluate_reals(*args) if kind == "reals" else evaluate_checkpoint(*args)


def task_options(cfg: NightlyConfig) -> dict[str, Any]:
    gpus = cfg.compute.gpus_per_task
    if gpus < 0:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return {"num_cpus": cfg.compute.cpus_per_task, "num_gpus": gpus, "max_retries": 1}


def _reason(e: Exception) -> str:
    cause = getattr(e, "cause", None) or e
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"


def evaluate(run_uri: str, todo: list[tuple[int, str]], plan: EvalPlan, cfg: NightlyConfig,
             manifest: dict[str, Any]) -> tuple[list[dict[str, Any]], SetResult, list[str]]:
    """Run the tasks; append a history row as each checkpoint finishes. Returns (rows, reals, errors)."""
    opts, threads = task_options(cfg), max(1, int(cfg.compute.cpus_per_task))
    samples = storage.join(run_uri, EVAL_DIR, "samples")
    tag = plan.eval_sha256[:8]
    reals_ref = eval_task.options(**opts).remote("reals", threads, plan, cfg, storage.join(samples, f"reals-{tag}"))
    refs = {eval_task.options(**opts).remote("checkpoint", threads, uri, plan, cfg,
                                             storage.join(samples, f"{Path(uri).name}-{tag}")): uri
            for _, uri in todo}
    log.info("evaluating %d checkpoint(s) against %d real clips (%d frames), %d videos each",
             len(todo), len(plan.reals), plan.num_frames, len(plan.videos))
    try:
        reals = ray.get(reals_ref)
    except ray.exceptions.RayError as e:  # without the reals there is no FVD: the night ends here
        for ref in refs:
            ray.cancel(ref, force=True)
        sys.exit(f"error: preparing the real clips of {plan.data_uri} failed: {_reason(e)}")
    rows, errors, pending, version = [], [], list(refs), code_version()
    while pending:
        (ref,), pending = ray.wait(pending, num_returns=1)
        try:
            result = ray.get(ref)
        except (ray.exceptions.RayError, ValueError) as e:
            errors.append(f"{refs[ref]}: {_reason(e)}")
            log.error("checkpoint %s failed: %s", refs[ref], _reason(e))
            continue
        row = make_row(result, reals, fvd_between(reals.scores.features, result.scores.features), plan, manifest,
                       version, now_utc())
        append_rows(run_uri, [row])  # as each finishes: a later failure keeps the finished rows
        rows.append(row)
        log.info("%s (step %d): FVD %.2f, CLIP-score %.2f, %.0f s", row["checkpoint"], row["steps_done"], row["fvd"],
                 row["clip_score"], result.wall_s)
    return rows, reals, errors


# ---------------------------------------------------------------------------
# Report and summary
# ---------------------------------------------------------------------------


def _read_optional(uri: str) -> bytes | None:
    return storage.read_bytes(uri) if storage.exists(uri) else None


def night_card(run_uri: str, data_uri: str, manifest: dict[str, Any], num_examples: int) -> dict[str, Any]:
    """The data card (a pass over the whole clip index and rejects), computed once per data version
    and kept in the run's eval cache for the nights after (eval/cache.py). The key holds the whole
    manifest (the card shows its fingerprints and totals; a re-finalize by newer code rewrites it
    over the same records) and the data's location (shown too; `--data` may move it)."""
    key = cache.cache_key(what="data_card", manifest=manifest, data_uri=data_uri, num_examples=num_examples)
    card = cache.load(cache.cache_dir(run_uri), "data_card", key)
    if card is None:
        card = data_card(data_uri, manifest, num_examples)
        cache.save(cache.cache_dir(run_uri), "data_card", key, card)
    return card


def write_report(run_uri: str, cfg: NightlyConfig, plan: EvalPlan, manifest: dict[str, Any],
                 history: list[dict[str, Any]], evaluated: list[str], errors: list[str]) -> str:
    """Gather everything the report shows, render it, write RUN/eval/report.html; returns its URI."""
    metrics = MetricsDigest.of_run(run_uri)  # bounded memory however long the run
    current = [r for r in history if r["eval_sha256"] == plan.eval_sha256]
    strips = {r["samples_uri"]: s for r in current if (s := _read_optional(storage.join(r["samples_uri"], STRIP_FILE)))}
    reals_dir = storage.join(run_uri, EVAL_DIR, "samples", f"reals-{plan.eval_sha256[:8]}")
    reals_strip = _read_optional(storage.join(reals_dir, STRIP_FILE))
    fp, models = manifest["fingerprint"], manifest["fingerprint"]["models"]
    latest = max(current, key=lambda r: r["steps_done"]) if current else None
    fingerprints = {
        "run dir": run_uri,
        "eval set sha256 (config + prompts, seeds, sizes, real clips)": plan.eval_sha256,
        "eval config sha256 (the whole merged config)": config_hash(cfg),
        "eval code version": code_version(),
        "detector sha256 (I3D Kinetics-400)": latest["detector_sha256"] if latest else "—",
        "data sha256 (manifest)": fp["data_sha256"],
        "data config sha256": fp.get("config_sha256"),
        "data code version": fp.get("code_version"),
        "latest checkpoint": f"{latest['checkpoint']} weights sha256 "
                             f"{latest['fingerprints']['checkpoint_weights_sha256']}" if latest else "—",
        "CLIP (text encoder + captions)": {k: v for k, v in models["clip"].items()},
        "VAE": {k: v for k, v in models["vae"].items() if k != "config"},
    }
    plan_info = {"num_frames": plan.num_frames, "reals_split": plan.reals_split, "held_out": plan.held_out,
                 "reals": [c.clip_id for c in plan.reals], "videos": [asdict(v) for v in plan.videos]}
    html = render_report(ReportData(
        run_uri=run_uri, generated_at=now_utc(), eval_sha256=plan.eval_sha256, history=history, metrics=metrics,
        card=night_card(run_uri, plan.data_uri, manifest, cfg.report.caption_examples), plan=plan_info,
        fingerprints=fingerprints, config_yaml=dump_yaml(cfg), strips=strips, reals_strip=reals_strip,
        evaluated_now=evaluated, errors=errors))
    uri = storage.join(run_uri, EVAL_DIR, "report.html")
    storage.write_bytes_atomic(uri, html.encode())
    set_uri = storage.join(run_uri, EVAL_DIR, "sets", f"{plan.eval_sha256[:8]}.json")
    storage.write_bytes_atomic(set_uri, (json.dumps({"eval_sha256": plan.eval_sha256, "config": to_dict(cfg),
                                                     "plan": plan_info}, indent=1) + "\n").encode())
    return uri


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        cfg = load_config(NightlyConfig, args.config, args.set)
    except (ConfigError, ValueError) as e:
        sys.exit(f"config error: {e}")
    run_uri = storage.canonical(args.run)
    checkpoints = find_checkpoints(run_uri)
    data_uri = storage.canonical(args.data or ckpt.read_state(checkpoints[-1][1]).data_uri)
    try:
        manifest = read_manifest(data_uri)
        plan = build_plan(data_uri, cfg, cache.cache_dir(run_uri))
    except (FileNotFoundError, PlanError) as e:
        sys.exit(f"error: {e}")
    history = read_history(run_uri)
    todo, skipped = pending_checkpoints(checkpoints, history, plan.eval_sha256, args.latest)
    rows, errors, reals_cached = [], [], None
    if todo:
        try:  # fetch + convert the I3D once here rather than in every first task (no-op when cached)
            ensure_weights(Path(cfg.metrics.i3d_weights) if cfg.metrics.i3d_weights else None)
        except (WeightsError, OSError) as e:
            sys.exit(f"error: FVD detector weights: {e}")
        ray.init(ignore_reinit_error=True)
        rows, reals, errors = evaluate(run_uri, todo, plan, cfg, manifest)
        reals_cached = reals.from_cache
    else:
        log.info("nothing new to evaluate in %s (%d checkpoint(s) already in the history)", run_uri, len(skipped))
    report = write_report(run_uri, cfg, plan, manifest, read_history(run_uri), [r["checkpoint"] for r in rows], errors)
    summary = {
        "run_dir": run_uri, "data": data_uri, "eval_sha256": plan.eval_sha256,
        "evaluated": [{k: r[k] for k in ("checkpoint", "steps_done", "fvd", "clip_score", "clip_score_real")}
                      for r in sorted(rows, key=lambda r: r["steps_done"])],
        "skipped": [Path(uri).name for _, uri in skipped], "errors": errors,
        "n_real": len(plan.reals), "n_fake": len(plan.videos), "num_frames": plan.num_frames,
        "reals_split": plan.reals_split, "reals_held_out": plan.held_out,
        "reals_from_cache": reals_cached,  # None: no checkpoint to evaluate, so no reals needed
        "random_init": bool(manifest.get("random_init")), "history": history_uri(run_uri), "report": report,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    storage.write_bytes_atomic(storage.join(run_uri, EVAL_DIR, "summary.json"),
                               (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def print_summary(s: dict[str, Any]) -> None:
    label = "  (random-init models: numbers are not meaningful)" if s["random_init"] else ""
    reals = s["reals_split"] + ("" if s["reals_held_out"] else ", NOT held out")
    print("\n=== DiTharos nightly eval summary ===")
    print(f"run dir     {s['run_dir']}{label}")
    print(f"eval set    {s['eval_sha256'][:12]}: {s['n_fake']} generated vs {s['n_real']} real clips ({reals}), "
          f"{s['num_frames']} frames")
    print(f"evaluated   {len(s['evaluated'])} checkpoint(s); skipped {len(s['skipped'])} already in the history")
    for r in s["evaluated"]:
        print(f"  {r['checkpoint']}  step {r['steps_done']:>7}  FVD {r['fvd']:10.2f}  "
              f"CLIP-score {r['clip_score']:6.2f} (real {r['clip_score_real']:.2f})")
    for e in s["errors"]:
        print(f"  FAILED {e}")
    print(f"history     {s['history']}")
    print(f"wall        {s['wall_s']} s")
    print(f"report      {s['report']}")


if __name__ == "__main__":
    result = main()
    ray.shutdown()
    print_summary(result)
    sys.exit(1 if result["errors"] else 0)
