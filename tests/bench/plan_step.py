"""Time the loader's step planner on the production bucket mix; prints JSON.

    python tests/bench/plan_step.py [--packs 64,256,1024] [--budget 16384] [--reference-up-to 256]

For each packs-per-step P: the clips of the production mix (tests/bench/packing.py's
MIX_WEIGHTS, Wan latents, patch 1×2×2) in a seeded order; `plan_step_s` is the mean time of
`training.data.plan_step` over consecutive steps. The first definition (FFD re-run over all
taken clips for every new clip, kept in tests/training/test_ffd.py) is timed too up to
`--reference-up-to` packs — it is about cubic — and the plans are checked to be equal.
Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from tests.bench.packing import draw_mix, tokens_of  # noqa: E402
from tests.training.test_ffd import reference_plan_step  # noqa: E402
from training.data import LoaderState, plan_step  # noqa: E402


def time_steps(plan, counts: list[int], order: np.ndarray, packs: int, budget: int, steps: int) -> tuple[float, list]:
    plans, pos, t = [], 0, time.perf_counter()
    for _ in range(steps):
        got = plan(pos)
        plans.append(got)
        pos = got[2]
    return (time.perf_counter() - t) / steps, plans


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--packs", default="64,256,1024")
    p.add_argument("--budget", type=int, default=16384)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--reference-up-to", type=int, default=256)
    args = p.parse_args()
    out = {"budget": args.budget, "runs": []}
    for packs in [int(x) for x in args.packs.split(",")]:
        shapes, _ = draw_mix(packs * 12 * (args.steps + 1), args.budget, seed=0)
        counts = np.array([tokens_of(s) for s in shapes])
        order = np.random.default_rng(0).permutation(len(counts))
        new_s, plans = time_steps(lambda pos: plan_step(counts, order, LoaderState(0, pos, 0), packs, args.budget),
                                  counts, order, packs, args.budget, args.steps)
        run = {"packs_per_step": packs, "clips_per_step": round(np.mean([sum(map(len, p[0])) for p in plans]), 1),
               "distinct_sizes": len(set(counts)), "plan_step_s": round(new_s, 4)}
        if packs <= args.reference_up_to:
            ref_s, ref = time_steps(lambda pos: reference_plan_step(counts, order, pos, packs, args.budget),
                                    counts, order, packs, args.budget, args.steps)
            run.update(reference_plan_step_s=round(ref_s, 4), same_plans=ref == plans)
        out["runs"].append(run)
        print(json.dumps(run), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
