"""What the nightly eval's driver spends on the data before any GPU work, first night vs the next; prints JSON.

    python tests/bench/nightly_cache.py [--clips 1000000] [--shards 10000]

On a synthetic clip index (tests/bench/loader_scale.py's: the pipeline's index schema and
manifest, 1% of clips held out, no shard files), for one run dir:
  * `plan_s`: choosing the eval set's 2,048 held-out reals (eval/plan.py `cached_reals`);
  * `data_card_s`: the report's data card (pipeline/datacard.py, a pass over every clip's
    scores and captions; no example keyframes, as the synthetic data has no shards),
each on the first night (`miss`: computed and saved in RUN/eval/cache/) and on a night after
it with the same data (`hit`: read back). The reals task's own pass over the held-out index
and its decode of every real clip are skipped on a hit the same way (tests/eval/test_nightly.py
checks it); they need the models and are not timed here. Not a pass/fail test.
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
sys.path.insert(0, str(ROOT / "tests" / "bench"))

from loader_scale import synthetic_index  # noqa: E402

from eval import cache  # noqa: E402
from eval.nightly import night_card  # noqa: E402
from eval.plan import cached_reals  # noqa: E402
from eval.settings import NightlyConfig  # noqa: E402
from pipeline.manifest import read_manifest  # noqa: E402


def timed(fn) -> tuple[object, float]:
    t = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t, 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=1_000_000)
    p.add_argument("--shards", type=int, default=10_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ditharos-nightly-bench-") as tmp:
        data, run = Path(tmp) / "data", Path(tmp) / "run"
        data.mkdir()
        _, build_s = timed(lambda: synthetic_index(data, args.clips, args.shards))
        manifest = read_manifest(str(data))
        cfg = NightlyConfig()
        cfg.reals.split, cfg.reals.allow_train, cfg.reals.max_clips = "val", False, 2048
        where = cache.cache_dir(str(run))
        sha = manifest["fingerprint"]["data_sha256"]
        result: dict = {"clips": args.clips, "shards": args.shards, "index_build_s": round(build_s, 1)}
        for night in ("miss", "hit"):
            (reals, _, _), plan_s = timed(lambda: cached_reals(str(data), sha, cfg, where))
            _, card_s = timed(lambda: night_card(str(run), str(data), manifest, 0))
            result[night] = {"plan_s": plan_s, "data_card_s": card_s, "reals": len(reals)}
        result["cache_bytes"] = sum(f.stat().st_size for f in Path(where).glob("*.json"))
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
