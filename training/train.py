"""DiTharos training job: a VideoDiT with rectified flow on the pipeline's shards, DeepSpeed ZeRO under Ray Train.

Run locally (starts a local Ray):      python training/train.py [--config FILE] [--set k=v ...]
On a cluster:                          ray job submit --working-dir . -- python training/train.py \
                                           --config training/configs/<file>.yaml
With no arguments it trains DiT-tiny on runs/demo/data (make it with `python pipeline/run.py`)
with 2 CPU workers, ZeRO-2, into runs/demo/train/.

Relaunching the same command resumes from the run dir's latest checkpoint (exactly: same
weights, optimizer, EMA and data position), also with another `scaling.num_workers` (through
DeepSpeed's universal checkpoint format). Settings that define the run (model, flow, data order, seeds, ZeRO stage) must not
change; a checkpoint made on other shards (manifest fingerprint) is refused unless
`data.allow_fingerprint_mismatch=true`.

Plan: parse config → check it against the run dir's saved config and latest checkpoint →
TorchTrainer(train_loop_per_worker) with one worker per GPU (or CPU slot), checkpoints kept by
Ray Train, restarts on worker failure → each worker reads the shards itself (training/data.py)
and trains (training/loop.py) → summary from the run log (training/runlog.py).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python training/train.py`: import the package, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import ray
import ray.train
import yaml
from ray.train.torch import TorchTrainer

from pipeline import storage
from pipeline.config import ConfigError, dump_yaml, load_config, to_dict
from pipeline.logs import get_logger
from pipeline.manifest import ManifestError, read_manifest
from pipeline.shards import ShardError
from training import backbone
from training import checkpoint as ckpt
from training import runlog
from training.data import FingerprintMismatch, check_fingerprint
from training.index import DataError, check_data
from training.loop import data_error_uri, train_loop_per_worker
from training.preflight import check_resources
from training.settings import TrainConfig

log = get_logger("training")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML config file (default: the demo settings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.lr=3e-4")
    p.add_argument("--verify", action="store_true",
                   help="check each shard's committed sha256 when a worker first opens it (sets data.verify)")
    return p.parse_args(argv)


def fit_or_data_error(trainer: TorchTrainer, marker_uri: str, poll_s: float | None = None) -> Any:
    """trainer.fit(), unless a worker reports a data error first: then stop Ray and exit with it.

    Ray Train restarts a failed worker group up to run.max_failures times whatever the error;
    damaged data fails identically each time, so the workers leave the error at `marker_uri`
    (training.loop.train_loop_per_worker) and this stops the run on it. Each poll is one stat —
    on S3 a HEAD and a LIST (pyarrow's check for a missing key): every 0.5 s that is ~10M
    requests over a month-long run, so object stores are polled every 5 s (restarting a worker
    group takes longer than that anyway).
    """
    if poll_s is None:
        poll_s = 0.5 if storage.is_local(marker_uri) else 5.0
    done: dict[str, Any] = {}

    def fit() -> None:
        try:
            done["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 — re-raised below
            done["error"] = e

    thread = threading.Thread(target=fit, daemon=True, name="ditharos-fit")
    thread.start()
    try:
        while thread.is_alive():
            thread.join(poll_s)
            try:
                found = storage.exists(marker_uri)
            except OSError as e:  # a storage hiccup must not end a healthy run: look again next poll
                log.warning("could not check %s for worker data errors: %s", marker_uri, e)
                continue
            if found:
                message = storage.read_bytes(marker_uri).decode()
                ray.shutdown()  # stops the workers and Ray Train's retries
                # Leave at once, as leave_after_interrupt does: with sys.exit the fit thread, still
                # unwinding Ray Train, could print after the error (CI once saw Ray's "... start will
                # fail" line there), and the error must stay the run's last line.
                print(f"error: {message}", file=sys.stderr, flush=True)
                sys.stdout.flush()
                os._exit(1)
    except KeyboardInterrupt:  # Ctrl-C / SIGINT: fit() in its thread would not see it
        leave_after_interrupt(ray.shutdown)
    if "error" in done:
        raise done["error"]
    return done["result"]


def leave_after_interrupt(shutdown: Any, grace_s: float = 20.0) -> None:
    """Stop Ray (at most `grace_s`), tell the user how to resume, exit with status 1. Never returns.

    ray.shutdown() can hang on a loaded machine while Train tears its workers down: CI once saw it
    last over 100 s although it ran in a thread joined with a 20 s timeout, which fits a shutdown
    that holds the GIL while Ray's IO threads wait for it (no Python-level timeout can fire then).
    faulthandler's watchdog is a C thread that needs no GIL: after `grace_s` it prints every
    thread's stack (to diagnose the hang) and _exit(1)s. Leaving early loses nothing: a local
    Ray's processes end with this one, a cluster's Train workers with their driver, and
    checkpoints are committed atomically (training/checkpoint.py).
    """
    print(f"interrupted: stopping the workers (at most {grace_s:.0f} s)", file=sys.stderr, flush=True)
    faulthandler.dump_traceback_later(grace_s, exit=True, file=sys.stderr)
    shutdown()
    print("interrupted: workers stopped; launch the same command again to resume from the latest checkpoint",
          file=sys.stderr, flush=True)
    os._exit(1)


def check_resume(cfg: TrainConfig, run_uri: str) -> str | None:
    """Refuse a relaunch that would not continue the run in `run_uri`; return its latest checkpoint.

    Raises SystemExit with the reason: a changed setting that defines the run, or a checkpoint
    from other shards.
    """
    saved_uri = storage.join(run_uri, "config.yaml")
    if storage.exists(saved_uri):
        saved = yaml.safe_load(storage.read_bytes(saved_uri).decode())
        refused, allowed = ckpt.resume_changes(saved, to_dict(cfg), to_dict(TrainConfig()))
        if refused:
            sys.exit(f"{run_uri} holds a run whose {', '.join(refused)} differ from this config; these define "
                     f"the run and cannot change on resume (valid to change: anything else, and "
                     f"{', '.join(ckpt.FREE_ON_RESUME)}). "
                     f"Use another run.dir to start a new run.")
        if allowed:
            log.info("relaunch of %s with changed settings: %s", run_uri, ", ".join(allowed))
    found, newest = ckpt.latest_complete(run_uri), ckpt.latest_checkpoint(run_uri)
    if newest is not None and (found is None or found[1] != newest):
        log.warning("checkpoint %s is incomplete or damaged (a rank's file is missing or empty): resuming "
                    "from %s", newest, found[1] if found else "step 0")
    if found is None:
        return None
    latest = found[1]
    state = ckpt.read_state(latest)
    try:
        check_fingerprint(state.data_fingerprint, read_manifest(cfg.data.uri), cfg.data.allow_fingerprint_mismatch)
    except FingerprintMismatch as e:
        sys.exit(f"cannot resume {latest}: {e}")
    log.info("resuming %s from %s (step %d)", run_uri, latest, state.steps_done)
    return latest


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        cfg = load_config(TrainConfig, args.config, args.set)
    except (ConfigError, ValueError) as e:
        sys.exit(f"config error: {e}")
    cfg.data.verify = cfg.data.verify or args.verify
    t_start = time.perf_counter()
    cfg.data.uri = storage.canonical(cfg.data.uri)  # workers may start in another directory
    run_uri = cfg.run.dir = storage.canonical(cfg.run.dir)
    if cfg.model.path:  # a folder every node sees at the same path (shared storage)
        cfg.model.path = str(Path(cfg.model.path).resolve())
    try:  # a data or model problem is one line here, not a traceback in every worker after retries
        check_data(cfg.data.uri, cfg.data.split)
        backbone.check(cfg.model, read_manifest(cfg.data.uri))
    except (ShardError, ManifestError, DataError, FileNotFoundError, backbone.BackboneError) as e:
        sys.exit(f"error: {e}")
    latest = check_resume(cfg, run_uri)
    storage.makedirs(run_uri)
    storage.write_bytes_atomic(storage.join(run_uri, "config.yaml"), dump_yaml(cfg).encode())

    ray.init(ignore_reinit_error=True)
    try:
        check_resources(ray, cfg.scaling)
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    launch_id = uuid.uuid4().hex[:12]
    s, parent = cfg.scaling, run_uri.rstrip("/").rsplit("/", 1)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "run_uri": run_uri, "launch_id": launch_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker={"CPU": s.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            # Ray Train keeps its run state and our checkpoints in <parent>/<name> = run.dir, and
            # restores from there when the same run dir is launched again.
            name=parent[1], storage_path=parent[0] or "/",
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            # DeepSpeed picks its accelerator at import; on CPU workers it must not probe for CUDA.
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}} if not s.use_gpu else None),
    )
    result = fit_or_data_error(trainer, data_error_uri(run_uri, launch_id))
    if result.error:
        raise result.error

    logged = runlog.summarize(run_uri)  # streamed: a long run's log does not fit in memory
    final = ckpt.latest_checkpoint(run_uri)
    model = cfg.model.name if cfg.model.kind == "ditharos" else f"wan:{cfg.model.preset or cfg.model.path}"
    summary = {
        "run_dir": run_uri, "data": cfg.data.uri, "model": model,
        "workers": s.num_workers, "zero_stage": cfg.optim.zero_stage, "steps": logged["steps"],
        "resumed_from": latest, "checkpoint": final,
        **{k: logged[k] for k in ("loss_first5", "loss_last5", "tokens", "tokens_per_s", "data_wait_fraction")},
        "wall_s": round(time.perf_counter() - t_start, 2),
    }
    storage.write_bytes_atomic(storage.join(run_uri, "summary.json"), (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def print_summary(s: dict) -> None:
    print("\n=== DiTharos training summary ===")
    print(f"run dir     {s['run_dir']}")
    print(f"data        {s['data']}")
    print(f"model       {s['model']}  ({s['workers']} worker(s), ZeRO-{s['zero_stage']})")
    print(f"steps       {s['steps']}  ({s['tokens']} tokens, {s['tokens_per_s']:.0f} tok/s)")
    print(f"loss        {s['loss_first5']:.4f} (first 5 steps) → {s['loss_last5']:.4f} (last 5)")
    print(f"data wait   {s['data_wait_fraction']:.2%} of step time")
    if s["resumed_from"]:
        print(f"resumed     {s['resumed_from']}")
    print(f"checkpoint  {s['checkpoint']}")
    print(f"wall        {s['wall_s']} s")


if __name__ == "__main__":
    result = main()
    ray.shutdown()
    print_summary(result)
