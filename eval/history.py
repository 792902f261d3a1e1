"""`RUN/eval/history.jsonl`: one JSON row per checkpoint per eval set, appended by the nightly driver.

A row is keyed by (checkpoint name, steps done, eval_sha256): a checkpoint is evaluated once
per eval set (config + resolved prompts, seeds, sizes, real clips), so a second night skips
it and the history never holds the same key twice. Object stores cannot append, so the file
is rewritten whole, atomically.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from eval.evaluate import SetResult
from eval.plan import EvalPlan
from pipeline import storage

EVAL_DIR = "eval"
HISTORY_FILE = "history.jsonl"

Key = tuple[str, int, str]


def history_uri(run_uri: str) -> str:
    return storage.join(run_uri, EVAL_DIR, HISTORY_FILE)


def history_key(row: dict[str, Any]) -> Key:
    return row["checkpoint"], int(row["steps_done"]), row["eval_sha256"]


def read_history(run_uri: str) -> list[dict[str, Any]]:
    uri = history_uri(run_uri)
    if not storage.exists(uri):
        return []
    rows = []
    for i, line in enumerate(storage.read_bytes(uri).decode().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{uri} line {i} is not JSON: {e}") from None
    return rows


def append_rows(run_uri: str, rows: list[dict[str, Any]]) -> None:
    """Add rows to the history; a key that is already there is an error (never a duplicate row)."""
    old = read_history(run_uri)
    seen = {history_key(r) for r in old}
    for row in rows:
        key = history_key(row)
        if key in seen:
            raise ValueError(f"history already holds {key[0]} (step {key[1]}) for eval set {key[2][:12]}")
        seen.add(key)
    lines = [json.dumps(r, sort_keys=True) for r in old + rows]
    storage.write_bytes_atomic(history_uri(run_uri), ("\n".join(lines) + "\n").encode())


def pending_checkpoints(checkpoints: list[tuple[int, str]], history: list[dict[str, Any]], eval_sha256: str,
                        latest_only: bool = False) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(to evaluate, already evaluated) among (steps done, uri) checkpoints, oldest first."""
    done = {history_key(r) for r in history}
    candidates = checkpoints[-1:] if latest_only else checkpoints
    todo, skipped = [], []
    for steps, uri in candidates:
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        (skipped if (name, steps, eval_sha256) in done else todo).append((steps, uri))
    return todo, skipped


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def make_row(result: SetResult, reals: SetResult, fvd: float, plan: EvalPlan, manifest: dict[str, Any],
             eval_code_version: str, timestamp: str) -> dict[str, Any]:
    """The history row of one evaluated checkpoint."""
    models = manifest["fingerprint"]["models"]
    random_models = sorted(set(result.fingerprints.get("random_init_models", []))
                           | {n for n, m in models.items() if m.get("weights") == "random-init"})
    if result.clip_scorer.get("weights") == "random-init":
        random_models = sorted(set(random_models) | {"clip_scorer"})
    return {
        "timestamp": timestamp,
        "night": timestamp[:10],
        "checkpoint": result.name,
        "checkpoint_uri": result.uri,
        "steps_done": result.steps_done,
        "fvd": fvd,
        "n_real": len(reals.scores.features.logits),
        "n_fake": len(result.scores.features.logits),
        "num_frames": plan.num_frames,
        "clip_score": result.scores.clip_score,
        "clip_score_real": reals.scores.clip_score,
        "detector_sha256": result.detector_sha256,
        "eval_sha256": plan.eval_sha256,
        "reals_split": plan.reals_split,
        "reals_held_out": plan.held_out,
        "random_init": bool(manifest.get("random_init")) or bool(random_models),
        "random_init_models": random_models,
        "sizes_px": sorted({f"{v.width_px}x{v.height_px}" for v in plan.videos}),
        "fingerprints": {
            "checkpoint_weights_sha256": result.fingerprints["weights_sha256"],
            "checkpoint_code_version": result.fingerprints["code_version"],
            "data_sha256": plan.data_sha256,
            "clip_weights_sha256": models["clip"]["weights_sha256"],
            "vae_weights_sha256": models["vae"]["weights_sha256"],
            "clip_scorer_sha256": result.clip_scorer["weights_sha256"],
            "detector_sha256": result.detector_sha256,
            "eval_sha256": plan.eval_sha256,
            "eval_code_version": eval_code_version,
        },
        "samples_uri": result.out_uri,
        "device": result.device,
        "wall_s": result.wall_s,
    }


__all__ = ["HISTORY_FILE", "append_rows", "history_key", "history_uri", "make_row", "now_utc",
           "pending_checkpoints", "read_history"]
