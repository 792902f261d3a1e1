"""DiTharos training job: a VideoDiT with rectified flow on the pipeline's shards, DeepSpeed ZeRO under Ray Train.

Run locally (starts a local Ray):      python training/train.py [--config FILE] [--set k=v ...]
On a cluster:                          ray job submit --working-dir . -- python training/train.py \
                                           --config training/configs/<file>.yaml
With no arguments it trains DiT-tiny on runs/demo/data (make it with `python pipeline/run.py`)
with 2 CPU workers, ZeRO-2, into runs/demo/train/.

Plan: parse config → save it in the run dir → TorchTrainer(train_loop_per_worker) with one
worker per GPU (or CPU slot) → each worker reads the shards itself (training/data.py) and
trains (training/loop.py) → summary from metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python training/train.py`: import the package, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import ray
import ray.train
from ray.train.torch import TorchTrainer

from pipeline import storage
from pipeline.config import ConfigError, dump_yaml, load_config, to_dict
from pipeline.logs import get_logger
from training.loop import train_loop_per_worker
from training.settings import TrainConfig

log = get_logger("training")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML config file (default: the demo settings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.lr=3e-4")
    return p.parse_args(argv)


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        cfg = load_config(TrainConfig, args.config, args.set)
    except (ConfigError, ValueError) as e:
        sys.exit(f"config error: {e}")
    t_start = time.perf_counter()
    run_dir = Path(cfg.run.dir).resolve()
    cfg.data.uri = storage.canonical(cfg.data.uri)  # workers may start in another directory
    if (run_dir / "metrics.jsonl").exists():
        # Resume is not implemented yet: refuse rather than mix two runs' metrics.
        sys.exit(f"{run_dir} already holds a run (metrics.jsonl); pick another --set run.dir=...")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))

    ray.init(ignore_reinit_error=True)
    s = cfg.scaling
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "run_dir": str(run_dir)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker={"CPU": s.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=run_dir.name, storage_path=str(run_dir.parent),
            # DeepSpeed picks its accelerator at import; on CPU workers it must not probe for CUDA.
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}} if not s.use_gpu else None),
    )
    result = trainer.fit()
    if result.error:
        raise result.error

    rows = read_metrics(run_dir / "metrics.jsonl")
    head, tail = rows[:5], rows[-5:]
    summary = {
        "run_dir": str(run_dir), "data": cfg.data.uri, "model": cfg.model.name,
        "workers": s.num_workers, "zero_stage": cfg.optim.zero_stage, "steps": len(rows),
        "loss_first5": sum(r["loss"] for r in head) / max(1, len(head)),
        "loss_last5": sum(r["loss"] for r in tail) / max(1, len(tail)),
        "tokens": sum(r["tokens"] for r in rows),
        "tokens_per_s": sum(r["tokens"] for r in rows) / max(1e-9, sum(r["step_s"] for r in rows)),
        "wall_s": round(time.perf_counter() - t_start, 2),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def print_summary(s: dict) -> None:
    print("\n=== DiTharos training summary ===")
    print(f"run dir     {s['run_dir']}")
    print(f"data        {s['data']}")
    print(f"model       {s['model']}  ({s['workers']} worker(s), ZeRO-{s['zero_stage']})")
    print(f"steps       {s['steps']}  ({s['tokens']} tokens, {s['tokens_per_s']:.0f} tok/s)")
    print(f"loss        {s['loss_first5']:.4f} (first 5 steps) → {s['loss_last5']:.4f} (last 5)")
    print(f"wall        {s['wall_s']} s")


if __name__ == "__main__":
    result = main()
    ray.shutdown()
    print_summary(result)
