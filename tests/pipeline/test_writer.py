"""pipeline/writer.py + pipeline/records.py: rolling shards, commit records, recovery, completeness."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from pipeline.records import (
    RECORDS_DIR, duplicate_clip_ids, of_kind, read_record, record_table, shards_named, source_status,
)
from pipeline.shards import ShardError, clips_table, decode_clip, read_shard, tensor, text_tokens
from pipeline.writer import ShardWriter

from tests.datasets import stream_batch

from .test_shards import BUCKET, make_columns


def columns(n: int, **kw: Any) -> dict[str, Any]:
    """Shard columns whose source URIs follow their source ids (one file per source)."""
    cols = make_columns(n, **kw)
    cols["source_uri"] = [f"/in/{s}.mp4" for s in cols["source_id"]]
    return cols


def source_row(sid: str, uri: str, num_clips: int) -> dict[str, Any]:
    return {"kind": "source", "source_id": sid, "source_uri": uri, "size_bytes": 100, "mtime_ns": 5,
            "num_clips": num_clips, "num_rejects": 0, "duration_s": 1.0}


def all_records(out: Path) -> pa.Table:
    return pa.concat_tables([read_record(str(p)) for p in sorted((out / RECORDS_DIR).glob("*.parquet"))])


@pytest.mark.parametrize("pending", [0, 2])  # commits inline / in the background
def test_rolls_shards_at_target_size_and_records_every_clip(tmp_path: Path, pending: int) -> None:
    cols = columns(40)
    stored = [cols["latents"][i].nbytes + cols["image_embedding"][i].nbytes  # text: the real tokens only
              + cols["text_embedding"][i][cols["text_mask"][i]].nbytes for i in range(40)]
    per_clip = max(stored)
    w = ShardWriter(str(tmp_path), "run1-w000", target_bytes=10 * per_clip, max_open_bytes=100 * per_clip,
                    max_pending_commits=pending)
    sources = sorted(set(cols["source_id"]))
    side = [source_row(s, cols["source_uri"][cols["source_id"].index(s)], cols["source_id"].count(s))
            for s in sources]
    for start in range(0, 40, 8):
        part = {k: v[start:start + 8] for k, v in cols.items()}
        w.append(stream_batch(part, side if start == 0 else []))
    stats = w.flush()
    w.close()
    assert stats["clips"] == 40 and stats["shards"] >= 3  # rolled, not one file per append
    shards = sorted((tmp_path / "shards" / BUCKET).glob("*.arrow"))
    assert len(shards) == stats["shards"]
    records = all_records(tmp_path)
    clips = of_kind(records, "clip")
    assert sorted(clips["clip_id"].to_pylist()) == sorted(cols["clip_id"])
    assert duplicate_clip_ids(records) == []
    # every index row points at the right row of the right shard, whose size/hash it records
    named = shards_named(records).to_pylist()
    assert {n["shard"] for n in named} == {f"shards/{BUCKET}/{p.name}" for p in shards}
    for n in named:
        data = (tmp_path / n["shard"]).read_bytes()
        assert n["shard_bytes"] == len(data)
    latents = {c: cols["latents"][i] for i, c in enumerate(cols["clip_id"])}
    for r in clips.to_pylist():
        table = read_shard(str(tmp_path / r["shard"]))
        assert table["clip_id"][r["row"]].as_py() == r["clip_id"]
        np.testing.assert_array_equal(tensor(table, "latents")[r["row"]], latents[r["clip_id"]])
        assert r["latent_shape"] == [4, 5, 8, 14] and r["num_tokens"] == 5 * 4 * 7
        # one clip per record batch, and the record's byte range is exactly that batch's message
        data = (tmp_path / r["shard"]).read_bytes()
        assert pa.ipc.open_file(pa.py_buffer(data)).num_record_batches == table.num_rows
        one = decode_clip(pa.py_buffer(data[r["batch_offset"]:r["batch_offset"] + r["batch_bytes"]]), table.schema,
                          r["shard"], r["row"], r["clip_id"])
        np.testing.assert_array_equal(one.column(one.schema.get_field_index("latents")).to_numpy_ndarray()[0],
                                      latents[r["clip_id"]])
        i = cols["clip_id"].index(r["clip_id"])
        np.testing.assert_array_equal(text_tokens(one)[0], cols["text_embedding"][i][cols["text_mask"][i]])
        assert r["clip_bytes"] == stored[i]
        assert r["batch_bytes"] < stored[i] + 4096  # the batch carries its own tokens, not the shard's
    status = source_status(records).to_pylist()
    assert len(status) == len(sources) and all(s["complete"] for s in status)
    assert not list(tmp_path.rglob("*.tmp-*"))  # no half-written files


def test_a_source_is_incomplete_until_all_its_clips_commit(tmp_path: Path) -> None:
    cols = columns(6)
    sid = cols["source_id"][0]
    n = cols["source_id"].count(sid)
    w = ShardWriter(str(tmp_path), "r-w000", target_bytes=1 << 30, max_open_bytes=1 << 30)
    first = [i for i, s in enumerate(cols["source_id"]) if s == sid][:1]
    w.append(stream_batch({k: [v[i] for i in first] for k, v in cols.items()},
                          [source_row(sid, cols["source_uri"][first[0]], n)]))
    w._write_record([], w._next_name())  # the side row commits; the clip is still in an open file
    status = {s["source_id"]: s for s in source_status(all_records(tmp_path)).to_pylist()}
    assert status[sid]["complete"] is False and status[sid]["num_clips"] == n
    assert status[sid]["committed_clips"] == 0
    w.flush()
    status = {s["source_id"]: s for s in source_status(all_records(tmp_path)).to_pylist()}
    assert status[sid]["committed_clips"] == 1 and (status[sid]["complete"] is (n == 1))
    w.close()


@pytest.mark.parametrize("pending", [0, 2])
def test_restarted_writer_skips_what_it_committed_and_numbers_on(tmp_path: Path, pending: int) -> None:
    cols = columns(10)
    w = ShardWriter(str(tmp_path), "r-w001", target_bytes=1, max_open_bytes=1 << 30,  # commit every append
                    max_pending_commits=pending)
    w.append(stream_batch({k: v[:6] for k, v in cols.items()}))
    w.close()
    again = ShardWriter(str(tmp_path), "r-w001", target_bytes=1, max_open_bytes=1 << 30, max_pending_commits=pending)
    assert again.seq == 1
    again.append(stream_batch(cols))  # a retried call re-sends the first 6
    again.flush()
    again.close()
    records = all_records(tmp_path)
    assert duplicate_clip_ids(records) == []
    assert sorted(of_kind(records, "clip")["clip_id"].to_pylist()) == sorted(cols["clip_id"])
    assert again.stats["skipped"] == 6


def test_open_bytes_bound_commits_the_largest_shard_early(tmp_path: Path) -> None:
    a, b = columns(8, seed=1), columns(2, bucket="96p_1x1_9f", seed=2)
    per_clip = max(pa.ipc.get_record_batch_size(r) for r in clips_table(BUCKET, a).to_batches(max_chunksize=1))
    w = ShardWriter(str(tmp_path), "r-w002", target_bytes=9 * per_clip, max_open_bytes=9 * per_clip)
    w.append(stream_batch(b))
    w.append(stream_batch({k: v[:6] for k, v in a.items()}))
    assert set(w.open) == {"96p_1x1_9f", BUCKET} and w.stats["shards"] == 0
    w.append(stream_batch({k: v[6:] for k, v in a.items()}))  # 10 clips open > 9: commit the largest
    assert set(w.open) == {"96p_1x1_9f"} and w.stats["shards"] == 1
    w.flush()
    w.close()


def test_a_bucket_keeps_one_shape(tmp_path: Path) -> None:
    cols = columns(4)
    other = dict(columns(4, seed=3))
    other["latents"] = np.zeros((4, 4, 5, 8, 12), np.float16)
    w = ShardWriter(str(tmp_path), "r-w003", target_bytes=1 << 30, max_open_bytes=1 << 30)
    w.append(stream_batch(cols))
    with pytest.raises(ShardError, match="a bucket has one latent/text shape"):
        w.append(stream_batch(other))
    w.close()


def test_record_rows_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown columns \\['colour'\\]"):
        record_table([{"kind": "clip", "colour": "red"}], "x")
    with pytest.raises(ValueError, match="kind 'clips' is not clip, source or reject"):
        record_table([{"kind": "clips"}], "x")


def test_background_commits_let_append_return_in_order_bounded_and_raise_their_errors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An upload held back: appends that fill shards return without waiting for it, until k
    closed shards wait; commits land in order; a failed upload is raised by the next call."""
    import threading
    import time

    from pipeline import storage

    gate, started, placed = threading.Event(), [], []
    real_put = storage.put_file_atomic

    def slow_put(src: str, dst: str) -> None:
        started.append(dst)
        assert gate.wait(10), "the test never released the upload"
        real_put(src, dst)
        placed.append(dst)

    monkeypatch.setattr(storage, "put_file_atomic", slow_put)
    cols = columns(8)
    w = ShardWriter(str(tmp_path), "r-w004", target_bytes=1, max_open_bytes=1 << 30, max_pending_commits=2)
    w.append(stream_batch({k: v[:1] for k, v in cols.items()}))  # fills a shard: its commit waits at the gate
    w.append(stream_batch({k: v[1:2] for k, v in cols.items()}))  # a second closed shard waits too
    deadline = time.monotonic() + 10
    while not started and time.monotonic() < deadline:  # the commit thread hashes, then reaches the upload
        time.sleep(0.01)
    assert len(started) == 1 and not placed and w.stats["shards"] == 0  # both appends returned
    third = threading.Thread(target=w.append, args=(stream_batch({k: v[2:3] for k, v in cols.items()}),))
    third.start()
    time.sleep(0.3)
    assert third.is_alive()  # a third would exceed k = 2 waiting: this append waits
    gate.set()
    third.join(10)
    stats = w.flush()
    assert stats["shards"] == 3 and placed == sorted(placed)  # r-w004-000000, -000001, -000002 in order
    assert sorted(of_kind(all_records(tmp_path), "clip")["clip_id"].to_pylist()) == sorted(cols["clip_id"][:3])

    def failing_put(src: str, dst: str) -> None:
        raise OSError("SlowDown: please reduce your request rate")

    monkeypatch.setattr(storage, "put_file_atomic", failing_put)
    w.append(stream_batch({k: v[3:4] for k, v in cols.items()}))  # its commit fails in the background
    with pytest.raises(OSError, match="SlowDown"):
        w.flush()
    w.close()
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_writer_bench_runs_both_ways_at_a_small_size() -> None:
    """tests/bench/writer.py (inline vs background commits) at a tiny size: it runs, and both
    ways commit the same shards."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "tests/bench/writer.py", "--mb", "24", "--clip-mb", "0.5", "--target-mb", "4",
                          "--writers", "2", "--upload-mb-s", "1000"], capture_output=True, text=True, check=True,
                         timeout=300)
    inline, background = json.loads(out.stdout)["runs"]
    assert (inline["max_pending_commits"], background["max_pending_commits"]) == (0, 2)
    assert inline["shards"] == background["shards"] >= 4


def test_clip_id_set_holds_every_id_through_its_merges_in_8_bytes_each() -> None:
    import tracemalloc

    from pipeline.writer import ClipIdSet

    ids = [f"src{i:029x}-{i % 977:06d}-{i % 13}" for i in range(300_000)]
    tracemalloc.start()
    taken = ClipIdSet(frozenset(ids[:1000]))  # the committed ids it starts from
    for cid in ids[1000:200_000]:
        taken.add(cid)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    for cid in ids[:5000]:
        taken.add(cid)  # again: nothing new
    assert len(taken) == 200_000 and len(taken._sorted) >= 65_536  # merged into the sorted array at least once
    other = ClipIdSet(frozenset(ids[:10]), salt=b"run-p1-w000")
    assert ids[3] in other and other._key(ids[3]) != taken._key(ids[3])  # keyed per writer and pass
    assert all(cid in taken for cid in ids[:200_000:7])  # old, merged and recent ids alike
    assert not any(cid in taken for cid in ids[200_000::7])
    assert "src" not in taken and "" not in taken
    assert held < 200_000 * 30  # a set of the strings: ~128 bytes an id (measured); here 8 + a recent set
