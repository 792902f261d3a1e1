"""The shard sink: how long the stream waits on writers whose commits run inline or in the background; prints JSON.

    python tests/bench/writer.py [--mb 768] [--clip-mb 1.8] [--batch 8] [--target-mb 96]
                                 [--writers 4] [--produce-mb-s 400] [--upload-mb-s 100] [--dest local|s3]

Rows of the real shard schema (latents of `--clip-mb` each) come from a producer that takes
batch bytes / `--produce-mb-s` seconds per batch of `--batch` (the upstream stages) and hands
each batch to one of `--writers` `pipeline.writer.ShardWriter`s in turn, waiting for the call
as the router does; each writer rolls `--target-mb` shards. `--dest local`: a local folder,
each shard's upload also taking its bytes / `--upload-mb-s` (one S3 stream's bandwidth, spent
waiting, not computing: this 2-core box cannot run a server fast enough to show it); `--dest
s3`: a local S3 server (moto), no added time. For `max_pending_commits` 0 (commits inline, as
writers did) and 2 (the writer actors' COMMITS_IN_FLIGHT): `append_s`, the producer's time
blocked in `append` (what the router, and so the whole stream, waited); `wall_s` to the end of
the writers' flushes; `mb_per_s` = row bytes / wall_s. Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from pipeline import storage  # noqa: E402
from pipeline.writer import COMMITS_IN_FLIGHT, ShardWriter  # noqa: E402
from tests.datasets import stream_batch  # noqa: E402
from tests.pipeline.test_shards import make_columns  # noqa: E402


def batches(total_mb: float, clip_mb: float, batch: int) -> list[dict]:
    c, t, w = 16, 9, 104
    h = max(1, int(clip_mb * 2**20 / (2 * c * t * w)))
    n = max(batch, int(total_mb / clip_mb))
    cols = make_columns(n, seed=1)
    cols["latents"] = np.random.default_rng(1).standard_normal((n, c, t, h, w)).astype(np.float16)
    cols["clip_id"] = [f"clip-{i:07d}" for i in range(n)]
    return [stream_batch({k: v[i:i + batch] for k, v in cols.items()}) for i in range(0, n, batch)]


def run(out: str, parts: list[dict], target_mb: float, produce_mb_s: float, writers: int, pending: int) -> dict:
    ws = [ShardWriter(f"{out}/w{i}", f"bench-p{pending}-w{i}", int(target_mb * 2**20), int(4 * target_mb * 2**20),
                      max_pending_commits=pending) for i in range(writers)]
    blocked, total = 0.0, 0
    start = time.perf_counter()
    for k, part in enumerate(parts):
        size = sum(a.nbytes for a in part["latents"])
        time.sleep(size / 2**20 / produce_mb_s)  # the upstream stages making this batch
        t = time.perf_counter()
        ws[k % writers].append(part)
        blocked += time.perf_counter() - t
        total += size
    t = time.perf_counter()
    shards = sum(w.flush()["shards"] for w in ws)
    flush_s = time.perf_counter() - t
    wall = time.perf_counter() - start
    for w in ws:
        w.close()
    return {"max_pending_commits": pending, "append_s": round(blocked, 2), "flush_s": round(flush_s, 2),
            "wall_s": round(wall, 2), "mb_per_s": round(total / 2**20 / wall, 1), "shards": shards,
            "produce_only_s": round(total / 2**20 / produce_mb_s, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=768)
    p.add_argument("--clip-mb", type=float, default=1.8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--target-mb", type=float, default=96)
    p.add_argument("--writers", type=int, default=4)
    p.add_argument("--produce-mb-s", type=float, default=400)
    p.add_argument("--upload-mb-s", type=float, default=100, help="--dest local: simulated upload bandwidth per shard")
    p.add_argument("--dest", choices=["s3", "local"], default="local")
    args = p.parse_args()
    parts = batches(args.mb, args.clip_mb, args.batch)
    result = {"mb": args.mb, "target_mb": args.target_mb, "writers": args.writers, "produce_mb_s": args.produce_mb_s,
              "dest": args.dest, "upload_mb_s": args.upload_mb_s if args.dest == "local" else None, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        if args.dest == "s3":
            import pyarrow.fs as pafs
            from moto.server import ThreadedMotoServer

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()
            os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x",
                               "AWS_SECRET_ACCESS_KEY": "x", "AWS_REGION": "us-east-1",
                               "AWS_EC2_METADATA_DISABLED": "true"})
            pafs.S3FileSystem(endpoint_override=f"http://127.0.0.1:{port}", scheme="http", access_key="x",
                              secret_key="x", region="us-east-1", allow_bucket_creation=True).create_dir("bench")
        else:  # a shard's upload takes its bytes / upload_mb_s of waiting (network), then the real put
            real_put = storage.put_file_atomic

            def put(src: str, dst: str) -> None:
                time.sleep(os.path.getsize(src) / 2**20 / args.upload_mb_s)
                real_put(src, dst)
            storage.put_file_atomic = put
        try:
            for pending in (0, COMMITS_IN_FLIGHT):
                out = f"s3://bench/out-{pending}" if server else str(Path(tmp) / f"out-{pending}")
                result["runs"].append(run(out, parts, args.target_mb, args.produce_mb_s, args.writers, pending))
        finally:
            if server is not None:
                server.stop()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
