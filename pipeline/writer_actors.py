"""The Ray edge of the shard writers: the writer actors, the stage that routes rows to them, the
drain loop with its stall watchdog, and the end-of-pass flush (the writer itself is plain Python,
`pipeline/writer.py`).

Fault model (one place): a writer holds uncommitted rows in open local files; when its node is
lost they are lost with it, the actor restarts (up to `WRITER_RESTARTS` times) and reads its own
records back, so any row re-sent to it is committed at most once. A source is complete only when
its committed clips number what its source row promised (`pipeline.records`), so a row that never
reaches a writer — dropped here, or lost in a dead writer's open file — leaves its source
incomplete, and the driver's repair pass redoes that source. Hence the router may always re-send,
and may drop (with a warning) rather than fail the whole pass when a writer stays unreachable.
"""

from __future__ import annotations

import threading
import time
import zlib

import numpy as np

from pipeline.logs import get_logger
from pipeline.settings import PipelineConfig

log = get_logger("pipeline")
WRITER_RESTARTS = 3


class WriterActor:
    """Ray actor around `pipeline.writer.ShardWriter` (made with ray.remote in `start_writers`)."""

    def __init__(self, *args, **kwargs) -> None:
        from pipeline.writer import COMMITS_IN_FLIGHT, ShardWriter

        # commits in the background: the router's hand-off does not wait for shard uploads
        self.writer = ShardWriter(*args, max_pending_commits=COMMITS_IN_FLIGHT, **kwargs)
        self.rows = 0

    def append(self, batch: dict) -> None:
        self.rows += len(batch["kind"])
        self.writer.append(batch)

    def progress(self) -> dict:
        return {"rows": self.rows}

    def flush(self) -> dict:
        try:
            return self.writer.flush()
        finally:  # the node's local disk is freed even when a commit failed
            self.writer.close()


def start_writers(ray, cfg: PipelineConfig, out: str, run_id: str) -> list:
    """Writers live on the driver's node when it can hold them (soft): the node a job needs anyway —
    or, with compute.writer_resources, spread over the nodes that have those resources."""
    if cfg.compute.writer_resources:
        placement = {"resources": dict(cfg.compute.writer_resources), "scheduling_strategy": "SPREAD"}
    else:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        placement = {"scheduling_strategy": NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=True)}
    actor = ray.remote(num_cpus=0, max_restarts=WRITER_RESTARTS, max_task_retries=WRITER_RESTARTS,
                       **placement)(WriterActor)
    writers = [actor.remote(out, f"{run_id}-w{i:03d}", int(cfg.output.shard_target_mb * 2**20),
                            int(max(cfg.compute.writer_open_mb, cfg.output.shard_target_mb) * 2**20))
               for i in range(cfg.compute.writer_actors)]
    if cfg.compute.writer_resources:  # no node with them (or the autoscaler at its limit): say so, do not hang
        wait_s = cfg.compute.stall_timeout_s
        ready, _ = ray.wait([w.progress.remote() for w in writers], num_returns=len(writers), timeout=wait_s)
        if len(ready) < len(writers):
            raise Stalled(f"{len(writers) - len(ready)} of {len(writers)} shard writers found no place in {wait_s:g} s: "
                          f"no node offers compute.writer_resources {dict(cfg.compute.writer_resources)} "
                          "(cluster/*.yaml's CPU nodes advertise cpu_node; set it to {} to keep writers on the "
                          "driver's node)")
    return writers


def writer_of(batch: dict[str, np.ndarray], num_writers: int) -> np.ndarray:
    """Each row's writer: clips by bucket + source (a source's clips of one bucket share shards),
    side rows by source URI (stable across runs and passes: crc32, not Python's salted hash)."""
    key = [f"{b}|{s}" if k == "clip" else f"|{u}" for k, b, s, u in
           zip(batch["kind"], batch["bucket"], batch["source_id"], batch["source_uri"])]
    return np.array([zlib.crc32(k.encode()) % num_writers for k in key], dtype=np.int64)


def call_writers(ray, writers: list, method: str, args: dict[int, tuple], wait_s: float,
                 retry_s: float = 1.0) -> tuple[dict[int, object], dict[int, str]]:
    """`writers[w].<method>(*args[w])` for each w, all at once; (answers by w, why by w for those lost).

    A writer that is unavailable (its node lost, the actor restarting) is called again until it
    answers or `wait_s` has passed: the call may or may not have run, which the writers make safe
    (module docstring). One that died for good (restarts used up), or stays unavailable past
    `wait_s`, is given up on. Any other error is the writer's answer being wrong: it is raised.
    """
    pending, answers, lost = dict(args), {}, {}
    deadline = time.monotonic() + wait_s
    while pending:
        calls = {w: getattr(writers[w], method).remote(*a) for w, a in sorted(pending.items())}
        for w, ref in calls.items():
            try:
                answers[w] = ray.get(ref)
                del pending[w]
            except ray.exceptions.ActorUnavailableError as e:
                if time.monotonic() < deadline:
                    log.warning("shard writer %d unavailable (%s); calling %s again", w,
                                str(e).splitlines()[0][:200], method)
                    continue
                del pending[w]
                lost[w] = f"still unavailable after {wait_s:g} s"
            except ray.exceptions.RayActorError as e:  # died for good (restarts used up)
                del pending[w]
                lost[w] = f"lost ({type(e).__name__})"
        if pending:
            time.sleep(retry_s)
    return answers, lost


def hand_off(ray, writers: list, parts: dict[int, dict], wait_s: float, retry_s: float = 1.0) -> int:
    """Send `parts[w]` to `writers[w]` for each w (`call_writers`); the number of rows dropped.

    A re-sent row is committed at most once; the rows of a writer given up on are dropped with a
    warning: their sources stay incomplete and the repair pass redoes them.
    """
    _, lost = call_writers(ray, writers, "append", {w: (part,) for w, part in parts.items()}, wait_s, retry_s)
    dropped = 0
    for w, why in sorted(lost.items()):
        n = len(parts[w]["kind"])
        log.warning("shard writer %d %s: %d row(s) not handed off; their sources stay incomplete and the "
                    "repair pass redoes them", w, why, n)
        dropped += n
    return dropped


class Router:
    """Last stage of the plan: hand each row to its shard writer."""

    def __init__(self, writers: list, wait_s: float) -> None:
        self.writers = writers
        self.wait_s = wait_s

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        target = writer_of(batch, len(self.writers))
        parts = {w: {c: v[target == w] for c, v in batch.items()} for w in sorted(set(target.tolist()))}
        dropped = hand_off(ray, self.writers, parts, self.wait_s)
        return {"rows": np.array([len(target) - dropped])}


class Stalled(RuntimeError):
    """No row reached the writers for compute.stall_timeout_s."""


def run_streaming(ray, ds, writers: list, stall_timeout_s: float) -> None:
    """Drain the plan in a thread; stop with Stalled when the writers see nothing new for too long."""
    done: dict[str, BaseException | None] = {}

    def drain() -> None:
        try:
            for _ in ds.iter_internal_ref_bundles():
                pass
            done["error"] = None
        except BaseException as e:  # noqa: BLE001 — re-raised in the main thread
            done["error"] = e

    thread = threading.Thread(target=drain, daemon=True, name="ditharos-plan")
    thread.start()
    seen, last_change = None, time.monotonic()
    poll_s = min(5.0, stall_timeout_s / 4)
    while thread.is_alive():
        thread.join(poll_s)
        try:
            stats = ray.get([w.progress.remote() for w in writers])
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError) as e:
            # A writer on a lost node restarts (or is gone: the flush after the pass sees it and a
            # repair pass redoes its sources). Not progress, not a crash: the stall clock runs on.
            log.warning("a shard writer did not answer the progress check (%s); still waiting", type(e).__name__)
            stats = seen
        if stats != seen:
            seen, last_change = stats, time.monotonic()
        elif time.monotonic() - last_change > stall_timeout_s:
            raise Stalled(f"no clip or source reached the shard writers for {stall_timeout_s:g} s "
                          f"(writers so far: {sum(s['rows'] for s in stats)} row(s)); a stage upstream is stuck "
                          "(a lost node, a hung decoder); re-run to resume from what was committed")
    if done.get("error") is not None:
        raise done["error"]


def flush_writers(ray, writers: list, wait_s: float = 60.0) -> list[dict]:
    """Each writer's flush stats, all flushing at once (`call_writers`); a writer restarting after its
    node was lost is waited for, one given up on counts as nothing committed (its sources stay
    incomplete and a repair pass redoes them)."""
    answers, lost = call_writers(ray, writers, "flush", {w: () for w in range(len(writers))}, wait_s)
    for w, why in sorted(lost.items()):
        log.warning("shard writer %d %s at the flush: its uncommitted sources are redone", w, why)
    return [answers.get(w, {}) for w in range(len(writers))]
