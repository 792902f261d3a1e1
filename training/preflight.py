"""Launcher checks that need a running Ray: can the cluster hold the workers asked for?

Ray Train asks for a placement group of `num_workers` bundles and waits for it forever; on a
cluster that can never provide them (2 CPUs, 100 workers) that was a 30-line traceback every
60 s. The launcher checks first: alive nodes' total resources, placed worker by worker.
"""

from __future__ import annotations

import math
import time
from typing import Any

from training.settings import ScalingConfig


def worker_bundle(s: ScalingConfig) -> dict[str, float]:
    """Resources of one Ray Train worker."""
    return {"CPU": float(s.cpus_per_worker), **({"GPU": 1.0} if s.use_gpu else {})}


def workers_that_fit(nodes: list[dict[str, float]], bundle: dict[str, float]) -> int:
    """How many bundles the nodes hold (each bundle on one node; Ray Train's placement is PACK/SPREAD
    over whole bundles, so a bundle never spans nodes)."""
    return sum(min((math.floor(n.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0), default=0)
               for n in nodes)


def check_resources(ray: Any, s: ScalingConfig, poll_s: float = 2.0) -> None:
    """Return when the alive nodes can hold s.num_workers workers; else wait up to s.resource_wait_s,
    then raise RuntimeError saying what is missing."""
    bundle = worker_bundle(s)
    deadline = time.monotonic() + s.resource_wait_s
    while True:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        fit = workers_that_fit(nodes, bundle)
        if fit >= s.num_workers:
            return
        if time.monotonic() >= deadline:
            total = {k: sum(n.get(k, 0.0) for n in nodes) for k in bundle}
            have = ", ".join(f"{v:g} {k}" for k, v in total.items())
            raise RuntimeError(
                f"scaling.num_workers={s.num_workers} needs {s.num_workers} × {bundle} but the cluster "
                f"({len(nodes)} node(s), {have}) holds {fit} such worker(s)"
                + (f" after waiting {s.resource_wait_s:g} s" if s.resource_wait_s else "")
                + "; lower scaling.num_workers / scaling.cpus_per_worker, or set scaling.resource_wait_s "
                  "on an autoscaling cluster")
        time.sleep(poll_s)
