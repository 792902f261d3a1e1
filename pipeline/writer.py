"""Rolling per-bucket shard writer with the append-only commit protocol (plain Python, no Ray).

`pipeline/run.py` runs a few of these as Ray actors for the whole job; the last stage of the
streaming plan routes each row to one of them (clip rows by bucket and source, side rows by
source). A writer appends clip rows of each bucket to an open Arrow IPC file on local disk;
when the file reaches `target_bytes` it commits it:

  1. close the file, hash it, place it at `shards/<bucket>/part-<name>.arrow` (atomic);
  2. write the record `_state/records/<name>.parquet` (atomic): the shard's clip index rows,
     plus every source / reject row received since the last commit.

A crash before 2 leaves a shard no record names: the next run deletes it and redoes its
clips. Rows still in open files when a writer dies were never committed: their sources stay
incomplete and the next pass redoes them. A restarted writer reads its own records of this
run back, so a row re-sent after a retried call is not committed twice.

With `max_pending_commits` = k > 0 (the writer actors use COMMITS_IN_FLIGHT) steps 1-2 run in
one background thread, in order, while `append` goes on filling new files: hashing and
uploading a 512 MB shard takes seconds, and done inside `append` it held up the router and so
the whole stream. At most k closed shards wait for their commit (an `append` that would make
k + 1 waits), and a commit's error is raised by the next `append` or `flush`. A crash loses the
waiting shards as it loses open ones. k = 0 commits inline.

Memory per writer: one incoming batch (plus the index rows of the waiting shards), and 8 bytes
per clip it has taken this pass (`ClipIdSet`). Local disk
per writer: at most `max_open_bytes` of open files, past which the largest is committed early (a
smaller shard rather than a full disk), plus k closed shards waiting.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.faults import fault_point
from pipeline.logs import get_logger
from pipeline.records import RECORDS_DIR, of_kind, read_record, write_record
from pipeline.shards import (ROWS_PER_BATCH, SCALAR_COLUMNS, SCORE_COLUMNS, TENSOR_COLUMNS, TEXT_COLUMN, ShardError,
                             clips_table, column_shapes)

log = get_logger("writer")
SHARD_COLUMNS = list(SCALAR_COLUMNS) + list(TENSOR_COLUMNS)
DIT_PATCH_HW = 2  # index num_tokens counts tokens at the DiT's default (1, 2, 2) patch
COMMITS_IN_FLIGHT = 2  # closed shards a writer actor may have waiting for their background commit


def shard_path(bucket: str, name: str) -> str:
    return f"shards/{bucket}/part-{name}.arrow"


class ClipIdSet:
    """The clip ids a writer has taken this pass, in ~8 bytes each: 64-bit keys (blake2b of the id)
    in one sorted array plus a small set of the latest. A Python set of the id strings took
    ~128 bytes per id: ~0.8 GB per writer at 100M clips over 16 writers.

    Two ids of one writer's pass sharing 64 bits (odds ~n²/2^65: 1e-6 at 6M ids) would make it
    skip a clip as seen: that clip's source stays incomplete and a repair pass redoes it. The
    hash is keyed by `salt` (the writer's name, new in every pass), so the next pass's writers do
    not collide on the same pair: a wasted source, never a lost clip.
    """

    def __init__(self, ids: frozenset[str] | set[str] = frozenset(), salt: bytes = b"") -> None:
        self._salt = hashlib.blake2b(salt, digest_size=16).digest()  # blake2b keys are at most 64 bytes
        self._sorted = np.zeros(0, np.uint64)
        self._recent: set[int] = set()
        for clip_id in ids:
            self.add(clip_id)

    def _key(self, clip_id: str) -> int:
        return int.from_bytes(hashlib.blake2b(clip_id.encode(), digest_size=8, key=self._salt).digest(), "little")

    def __contains__(self, clip_id: str) -> bool:
        key = self._key(clip_id)
        if key in self._recent:
            return True
        i = int(np.searchsorted(self._sorted, np.uint64(key)))
        return i < len(self._sorted) and int(self._sorted[i]) == key

    def add(self, clip_id: str) -> bool:
        """Take `clip_id`; False when it was already here (one lookup for the check and the add)."""
        if clip_id in self:
            return False
        self._recent.add(self._key(clip_id))
        if len(self._recent) >= max(1 << 16, len(self._sorted) // 8):  # merges cost O(n) each, ~log n of them
            recent = np.fromiter(self._recent, np.uint64, len(self._recent))
            self._sorted = np.union1d(self._sorted, recent)
            self._recent.clear()
        return True

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)


@dataclass
class _OpenShard:
    """One bucket's shard being filled on local disk."""

    path: str
    sink: pa.OSFile
    writer: pa.ipc.RecordBatchFileWriter
    schema: pa.Schema
    index_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return self.sink.tell()


class ShardWriter:
    """Appends clip rows to rolling per-bucket shards and commits them with records."""

    def __init__(self, out_uri: str, name: str, target_bytes: int, max_open_bytes: int,
                 local_dir: str | None = None,
                 max_pending_commits: int = 0) -> None:
        if target_bytes <= 0 or max_open_bytes < target_bytes:
            raise ValueError(f"need 0 < target_bytes ({target_bytes}) <= max_open_bytes ({max_open_bytes})")
        if max_pending_commits < 0:
            raise ValueError(f"max_pending_commits must be >= 0, got {max_pending_commits}")
        self.max_pending = max_pending_commits
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="ditharos-commit") if max_pending_commits else None
        self._pending: deque[Future] = deque()  # background commits, oldest first
        self.out_uri = out_uri
        self.name = name  # unique per run and writer, e.g. "<run_id>-w003"
        self.target_bytes = target_bytes
        self.max_open_bytes = max_open_bytes
        # taken, or committed by this writer before a restart (_recover): a re-sent row is not taken
        # again. Clips committed by earlier runs never reach a writer: the cut step skips them.
        self.skip = ClipIdSet(salt=name.encode())
        self.tmp = tempfile.mkdtemp(prefix="ditharos-writer-", dir=local_dir)
        self.open: dict[str, _OpenShard] = {}
        self.side_rows: list[dict[str, Any]] = []
        self.seq = 0
        self.stats = {"clips": 0, "skipped": 0, "side_rows": 0, "shards": 0, "records": 0, "shard_bytes": 0}
        self._recover()

    # -- public -------------------------------------------------------------

    def append(self, batch: dict[str, np.ndarray]) -> dict[str, int]:
        """Take a batch of stream rows (column arrays with a `kind` column); commit full shards."""
        kinds = [str(k) for k in batch["kind"]]
        by_bucket: dict[str, list[int]] = {}
        for i, kind in enumerate(kinds):
            if kind == "clip":
                cid = str(batch["clip_id"][i])
                if not self.skip.add(cid):  # committed, or re-sent: taken once only
                    self.stats["skipped"] += 1
                    continue
                by_bucket.setdefault(str(batch["bucket"][i]), []).append(i)
            elif kind in ("source", "reject"):
                record = json.loads(str(batch["record_json"][i]))
                if record.get("keyframe_jpeg"):  # JSON carries bytes as base64 (steps.reject_record)
                    record["keyframe_jpeg"] = base64.b64decode(record["keyframe_jpeg"])
                self.side_rows.append(record)
                self.stats["side_rows"] += 1
            else:
                raise ValueError(f"stream row kind {kind!r} is not clip, source or reject")
        for bucket, idx in sorted(by_bucket.items()):
            meta = [str(batch["source_meta"][i]) if "source_meta" in batch else "{}" for i in idx]
            self._append_clips(bucket, {c: [batch[c][i] for i in idx] for c in SHARD_COLUMNS}, meta)
        return {"clips": sum(len(v) for v in by_bucket.values()), "side_rows": len(kinds) - sum(
            len(v) for v in by_bucket.values())}

    def flush(self) -> dict[str, int]:
        """Commit every open shard and any side rows still pending (end of the stream); returns
        once every commit is done."""
        for bucket in sorted(self.open):
            self._commit(bucket)
        if self.side_rows:
            self._write_record([], self._next_name())
        self._wait(0)
        return dict(self.stats)

    def close(self) -> None:
        """Let waiting commits finish (their errors are not raised here), then drop open files."""
        if self._committer is not None:
            self._committer.shutdown(wait=True)
        for shard in self.open.values():
            shard.writer.close()
            shard.sink.close()
        self.open.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- internals ------------------------------------------------------------

    def _append_clips(self, bucket: str, cols: dict[str, list[Any]], source_meta: list[str]) -> None:
        table = clips_table(bucket, cols)
        shard = self.open.get(bucket)
        if shard is not None and shard.schema != table.schema:
            raise ShardError(f"bucket {bucket!r}: rows of shapes {column_shapes(table.schema)} after rows of "
                             f"{column_shapes(shard.schema)}; a bucket has one latent/text shape")
        if shard is None:
            path = os.path.join(self.tmp, f"{bucket}.arrow")
            sink = pa.OSFile(path, "wb")
            shard = _OpenShard(path, sink, pa.ipc.new_file(sink, table.schema), table.schema)
            self.open[bucket] = shard
        first_row = len(shard.index_rows)
        ranges = []
        for batch in table.to_batches(max_chunksize=ROWS_PER_BATCH):
            shard.writer.write_batch(batch)
            size = pa.ipc.get_record_batch_size(batch)  # what the writer just wrote (the schema goes first, lazily)
            ranges.append((shard.sink.tell() - size, size))
        fault_point("mid_write")
        latents = cols["latents"]
        for j in range(table.num_rows):
            shape = [int(d) for d in np.shape(latents[j])]
            c, t, h, w = shape
            shard.index_rows.append({
                "kind": "clip", "clip_id": str(cols["clip_id"][j]), "source_id": str(cols["source_id"][j]),
                "source_uri": str(cols["source_uri"][j]), "split": str(cols["split"][j]), "bucket": bucket,
                "row": first_row + j, "batch_offset": ranges[j][0] if len(ranges) == table.num_rows else None,
                "batch_bytes": ranges[j][1] if len(ranges) == table.num_rows else None,
                "num_frames": int(cols["num_frames"][j]),
                "height_px": int(cols["height_px"][j]), "width_px": int(cols["width_px"][j]),
                "fps": float(cols["fps"][j]), "start_s": float(cols["start_s"][j]), "end_s": float(cols["end_s"][j]),
                "latent_shape": shape, "num_tokens": t * (h // DIT_PATCH_HW) * (w // DIT_PATCH_HW),
                "caption": str(cols["caption"][j]), "caption_source": str(cols["caption_source"][j]),
                "clip_score": float(cols["clip_score"][j]),
                "clip_bytes": _stored_bytes(cols, j),
                "source_meta": source_meta[j], "crop_px": [int(v) for v in cols["crop_px"][j]],
                "phash": int(cols["phash"][j]), "chash": int(cols["chash"][j]),
                **{c: float(cols[c][j]) for c in SCORE_COLUMNS},
            })
        self.stats["clips"] += table.num_rows
        if shard.bytes >= self.target_bytes:
            self._commit(bucket)
        while self.open and sum(s.bytes for s in self.open.values()) > self.max_open_bytes:
            self._commit(max(self.open, key=lambda b: self.open[b].bytes))

    def _next_name(self) -> str:
        name = f"{self.name}-{self.seq:06d}"
        self.seq += 1
        return name

    def _commit(self, bucket: str) -> None:
        if self._committer is not None:  # room in the queue first: at most k closed shards on disk, and
            self._wait(self.max_pending - 1)  # an earlier commit's error is raised before this one is queued
        shard = self.open.pop(bucket)
        shard.writer.close()
        shard.sink.close()
        # a unique local name: the bucket's next open file may be created before this one is uploaded
        closed = f"{shard.path}.{self.seq}"
        os.replace(shard.path, closed)
        name, side, self.side_rows = self._next_name(), self.side_rows, []
        self._run(lambda: self._place(bucket, closed, shard.index_rows, name, side))

    def _place(self, bucket: str, path: str, index_rows: list[dict[str, Any]], name: str,
               side_rows: list[dict[str, Any]]) -> None:
        """Steps 1 and 2 for one closed shard (in the commit thread when there is one)."""
        rel = shard_path(bucket, name)
        size, digest = os.path.getsize(path), storage.sha256(path)
        storage.put_file_atomic(path, storage.join(self.out_uri, rel))  # 1. shard in place
        os.remove(path)
        fault_point("after_shard_move")
        rows = [dict(r, shard=rel, shard_bytes=size, shard_sha256=digest) for r in index_rows]
        write_record(self.out_uri, name, rows + side_rows, {"path": rel, "bytes": size, "sha256": digest,
                                                            "rows": len(rows)})  # 2. the record: committed
        self.stats["records"] += 1
        self.stats["shards"] += 1
        self.stats["shard_bytes"] += size

    def _write_record(self, clip_rows: list[dict[str, Any]], name: str) -> None:
        """A record of side rows (and these clip rows) without a shard, after the commits before it."""
        side, self.side_rows = self.side_rows, []

        def write() -> None:
            write_record(self.out_uri, name, clip_rows + side, None)
            self.stats["records"] += 1
        self._run(write)

    def _run(self, commit: Any) -> None:
        """Run a commit inline, or queue it behind the earlier ones (waiting while k are queued)."""
        if self._committer is None:
            commit()
            return
        self._wait(self.max_pending - 1)
        self._pending.append(self._committer.submit(commit))

    def _wait(self, most: int) -> None:
        """Until at most `most` commits wait; a finished commit's error is raised here."""
        while self._pending and (len(self._pending) > most or self._pending[0].done()):
            self._pending.popleft().result()

    def _recover(self) -> None:
        """After a restart: continue numbering after this writer's records and skip what they hold."""
        root = storage.join(self.out_uri, RECORDS_DIR)
        if not storage.exists(root):
            return
        mine = [u for u, _ in storage.list_files(root)
                if os.path.basename(u).startswith(f"{self.name}-") and u.endswith(".parquet")]
        for uri in mine:
            table = read_record(uri)
            for clip_id in of_kind(table, "clip")["clip_id"].to_pylist():
                self.skip.add(clip_id)
            self.seq = max(self.seq, int(os.path.basename(uri).removesuffix(".parquet").rsplit("-", 1)[1]) + 1)
        if mine:
            log.warning("writer %s restarted: %d record(s) of this run already committed", self.name, len(mine))


def _stored_bytes(cols: dict[str, list[Any]], j: int) -> int:
    """Tensor bytes the shard stores for row j: latents, image embedding, the real text tokens."""
    text = np.asarray(cols[TEXT_COLUMN][j])
    real = int(np.count_nonzero(cols["text_mask"][j]))
    return int(np.asarray(cols["latents"][j]).nbytes + np.asarray(cols["image_embedding"][j]).nbytes
               + real * text.nbytes // max(1, text.shape[0]))
