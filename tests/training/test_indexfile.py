"""training/indexfile.py: one memory-mapped copy of a ShardIndex's columns per node."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tests.training.test_data import PATCH, write_dataset
from training import index as index_module
from training.index import ShardIndex

ROOT = Path(__file__).resolve().parents[2]


def same(a: ShardIndex, b: ShardIndex) -> None:
    assert a.clip_ids.equals(b.clip_ids) and a.files == b.files
    for name in ("bucket_code", "file_of", "row_of", "num_frames", "num_tokens"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert (a.file_bytes, a.file_sha256) == (b.file_bytes, b.file_sha256)


def test_shared_index_equals_a_private_one_and_is_built_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    write_dataset(data)
    shared = tmp_path / "node" / "index"
    private = ShardIndex.open(str(data), PATCH, split="train")
    first = ShardIndex.open(str(data), PATCH, split="train", shared_dir=str(shared))
    same(first, private)
    built = sorted(p.name for p in shared.iterdir() if p.suffix == ".arrow")
    assert len(built) == 2 and built[0].endswith(".clips.arrow")

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the clip index was read again")

    monkeypatch.setattr(index_module, "_read_columns", refuse)
    allocated = pa.total_allocated_bytes()
    again = ShardIndex.open(str(data), PATCH, split="train", shared_dir=str(shared))  # mapped, not built
    # Views of the mapped file, not copies (a copy of the columns would come from Arrow's pool).
    columns_bytes = again.clip_ids.nbytes + again.row_of.nbytes + again.file_of.nbytes + again.num_tokens.nbytes
    assert pa.total_allocated_bytes() - allocated < columns_bytes / 4, (pa.total_allocated_bytes() - allocated)
    same(again, private)
    assert not again.row_of.flags.writeable
    assert again.clips[3] == private.clips[3] and again.latents(again.clips[3]).equal(private.latents(private.clips[3]))
    # Another split, patch or dataset is another file; the built ones are not rebuilt or touched.
    monkeypatch.undo()
    val = ShardIndex.open(str(data), PATCH, split="val", shared_dir=str(shared))
    assert len(val.clips) and len([p for p in shared.iterdir() if p.suffix == ".arrow"]) == 4


def test_a_failed_write_leaves_nothing_and_the_worker_keeps_a_private_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    write_dataset(data)
    shared = tmp_path / "index"
    real_new_file = pa.ipc.new_file
    calls = []

    def full(sink, schema):  # noqa: ANN001, ANN202 — the disk fills while the second file is written
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return real_new_file(sink, schema)

    monkeypatch.setattr(pa.ipc, "new_file", full)
    got = ShardIndex.open(str(data), PATCH, split="train", shared_dir=str(shared))
    same(got, ShardIndex.open(str(data), PATCH, split="train"))  # trains on, from its own copy
    assert "could not share the clip index" in caplog.text and "No space left" in caplog.text
    assert not [p for p in shared.iterdir() if ".clips.arrow" in p.name or ".tmp-" in p.name]  # nothing half-written
    monkeypatch.undo()
    same(ShardIndex.open(str(data), PATCH, split="train", shared_dir=str(shared)),
         ShardIndex.open(str(data), PATCH, split="train"))  # the next worker builds it whole
    assert len([p for p in shared.iterdir() if p.suffix == ".arrow"]) == 2


def test_processes_of_a_node_build_it_once(tmp_path: Path) -> None:
    """Four processes open the index at once and keep it open, as training workers do: one builds
    it (slowly) under the lock, all see the same columns, and none waits for another to let go
    (the first protocol deadlocked here: a waiter asked for an exclusive lock the builder, now
    using the index, held shared for the whole run)."""
    data = tmp_path / "data"
    write_dataset(data)
    shared = tmp_path / "index"
    code = ("import sys, json, time; sys.path.insert(0, sys.argv[1]);"
            "from training import index as m; calls = [];"
            "real = m._read_columns; m._read_columns = lambda *a: calls.append(1) or time.sleep(1.5) or real(*a);"
            "t = time.monotonic();"
            "i = m.ShardIndex.open(sys.argv[2], (1, 2, 2), split='train', shared_dir=sys.argv[3]);"
            "print(json.dumps([len(calls), len(i.clips), i.clip_ids[0].as_py(), time.monotonic() - t]), flush=True);"
            "time.sleep(12)")  # holding the index, as a worker does for the whole run
    procs = [subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(data), str(shared)], stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    import json

    results = [json.loads(o) for o in outs]
    assert sum(r[0] for r in results) == 1  # one reader of the index
    assert len({tuple(r[1:3]) for r in results}) == 1
    assert max(r[3] for r in results) < 9, results  # nobody waited for a holder to exit (12 s)


def test_stale_files_of_other_data_go_unless_a_worker_maps_them(tmp_path: Path) -> None:
    import fcntl

    data = tmp_path / "data"
    write_dataset(data)
    shared = tmp_path / "index"
    shared.mkdir()
    week = time.time() - 8 * 86400
    for key in ("0000", "1111", "2222"):  # stale, stale but mapped by a running worker, recent
        for name in (f"index-{key}.clips.arrow", f"index-{key}.files.arrow", f"index-{key}.lock"):
            (shared / name).write_bytes(b"x")
            if key != "2222":
                os.utime(shared / name, (week, week))
    with open(shared / "index-1111.lock", "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_SH)
        index = ShardIndex.open(str(data), PATCH, split="train", shared_dir=str(shared))
    names = {p.name for p in shared.iterdir()}
    assert "index-0000.clips.arrow" not in names and "index-0000.files.arrow" not in names
    assert {"index-1111.clips.arrow", "index-2222.clips.arrow"} <= names
    assert index._shared_lock is not None and len(index.clips)


def test_an_unusable_folder_costs_the_sharing_not_the_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    write_dataset(data)
    not_a_folder = tmp_path / "index"
    not_a_folder.write_text("a file where the folder should be")
    index = ShardIndex.open(str(data), PATCH, split="train", shared_dir=str(not_a_folder / "sub"))
    same(index, ShardIndex.open(str(data), PATCH, split="train"))
    assert index._shared_lock is None and "could not share the clip index" in caplog.text
