"""The pipeline on a real object store: pyarrow's S3 client against a local S3 server (moto) on 127.0.0.1.

Listing (a prefix and a listing file), probe, shard writes, commit records, the lease, resume
and the index all go through `s3://` — the code path a cluster on AWS takes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from pipeline.records import record_shard
from tests.conftest import s3fs

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipeline/run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=900)


# Rolled at 50 KB (several commits); state read with Ray Data shuffles, not by the driver (the
# listing-file test below takes the small-state path on the store).
SETTINGS = ("--set", "output.shard_target_mb=0.05", "--set", "compute.small_state_mb=0")


def test_pipeline_end_to_end_on_s3(s3_env: dict[str, str], sample_clips: dict[str, Path], tmp_path: Path) -> None:
    from tests.pipeline.test_tars import picture, write_tar

    fs = s3fs()
    fs.create_dir("raw")
    fs.create_dir("data")
    for name in ("carphone_pristine", "bikes"):
        pafs.copy_files(str(sample_clips[name]), f"raw/videos/{name}.mp4",
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    with fs.open_output_stream("raw/videos/carphone_pristine.txt") as f:
        f.write(b"a man talking in a car\n")
    with fs.open_output_stream("raw/notes.md") as f:
        f.write(b"not a video")
    shard = write_tar(tmp_path / "images-000.tar", [  # a WebDataset shard: two images, their captions, a label
        ("000000.jpg", picture(0)), ("000000.txt", b"a red car\n"), ("000001.png", picture(1, "PNG")),
        ("000001.cls", b"3")])
    pafs.copy_files(str(shard), "raw/shards/images-000.tar", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)

    first = run(s3_env, "--input", "s3://raw", "--output", "s3://data/out", *SETTINGS)
    assert first.returncode == 0, first.stderr[-4000:]

    from pipeline.manifest import read_index, read_manifest, read_rejects

    manifest = read_manifest("s3://data/out")
    index = read_index("s3://data/out", manifest, ["clip_id", "source_uri", "shard", "row", "source_meta",
                                                   "num_frames"])
    assert manifest["totals"]["clips"] == index.num_rows > 6
    assert {u.rsplit("/", 1)[1] for u in index["source_uri"].to_pylist()} == {
        "carphone_pristine.mp4", "bikes.mp4", "000000.jpg", "000001.png"}
    members = [r for r in index.to_pylist() if r["source_uri"].startswith("s3://raw/shards/images-000.tar#")]
    assert len(members) == 2 and all(r["num_frames"] == 1 for r in members)  # each image: one 1-frame clip
    assert {json.loads(r["source_meta"])["key"] for r in members} == {"000000", "000001"}
    assert all(u.startswith(("s3://raw/videos/", "s3://raw/shards/")) for u in index["source_uri"].to_pylist())
    records = fs.get_file_info(pafs.FileSelector("data/out/_state/records"))
    shards = [i for i in fs.get_file_info(pafs.FileSelector("data/out/shards", recursive=True))
              if i.type == pafs.FileType.File]
    assert len(shards) > 1  # rolled at 50 KB: several commits, each a shard + its record
    named = [record_shard(f"s3://{i.path}") for i in records]
    assert sorted(n["path"] for n in named if n) == sorted(i.path.removeprefix("data/out/") for i in shards)
    assert set(index["shard"].to_pylist()) == {i.path.removeprefix("data/out/") for i in shards}

    for shard, cid, row in zip(index["shard"].to_pylist(), index["clip_id"].to_pylist(), index["row"].to_pylist()):
        with fs.open_input_file(f"data/out/{shard}") as f:
            assert pa.ipc.open_file(f).read_all()["clip_id"][row].as_py() == cid
    rejects = read_rejects("s3://data/out", manifest).to_pylist()
    assert sorted((r["stage"], r["source_uri"].rsplit("/", 1)[1]) for r in rejects) == [
        ("discover", "000001.cls"), ("discover", "notes.md")]
    assert not fs.get_file_info(pafs.FileSelector("data/out/_state/leases", allow_not_found=True))
    # The tar's listing is indexed on the store (later runs read it instead of the tar).
    from pipeline import tars
    from pipeline.discover import InputConfig

    (tar_index,) = fs.get_file_info(pafs.FileSelector("data/out/" + tars.INDEX_DIR))
    tar_mtime = fs.get_file_info("raw/shards/images-000.tar").mtime_ns
    assert tars.read_index(f"s3://{tar_index.path}") == list(
        tars.list_tar(InputConfig(), "s3://raw/shards/images-000.tar", tar_mtime))

    # Resume: nothing new → nothing written, the same manifest bytes.
    with fs.open_input_stream("data/out/manifest.json") as f:
        before = f.read()
    again = run(s3_env, "--input", "s3://raw", "--output", "s3://data/out", *SETTINGS)
    assert again.returncode == 0, again.stderr[-4000:]
    with fs.open_input_stream("data/out/manifest.json") as f:
        assert f.read() == before
    with fs.open_input_stream("data/out/summary.json") as f:
        assert json.loads(f.read())["this_run"]["clips_written"] == 0

    # A damaged shard on the store is noticed and redone.
    victim = shards[0].path
    with fs.open_input_stream(victim) as f:
        head = f.read(1000)
    with fs.open_output_stream(victim) as f:
        f.write(head)
    fixed = run(s3_env, "--input", "s3://raw", "--output", "s3://data/out", *SETTINGS)
    assert fixed.returncode == 0 and "damaged" in fixed.stderr, fixed.stderr[-4000:]
    after = read_index("s3://data/out", read_manifest("s3://data/out"), ["clip_id"])["clip_id"].to_pylist()
    assert sorted(after) == sorted(index["clip_id"].to_pylist())


def test_listing_file_on_s3(s3_env: dict[str, str], sample_clips: dict[str, Path]) -> None:
    fs = s3fs()
    fs.create_dir("lst")
    pafs.copy_files(str(sample_clips["carphone_pristine"]), "lst/v/carphone.mp4",
                    source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    with fs.open_output_stream("lst/listing.jsonl") as f:
        f.write(json.dumps({"uri": "v/carphone.mp4", "caption": "a man in a car", "source": "test"}).encode() + b"\n")
    r = run(s3_env, "--input", "s3://lst/listing.jsonl", "--output", "s3://lst/out")
    assert r.returncode == 0, r.stderr[-4000:]
    from pipeline.manifest import read_index, read_manifest

    index = read_index("s3://lst/out", read_manifest("s3://lst/out"), ["source_uri", "source_meta"])
    assert set(index["source_uri"].to_pylist()) == {"s3://lst/v/carphone.mp4"}
    assert {json.loads(m)["source"] for m in index["source_meta"].to_pylist()} == {"test"}


def test_publishing_a_parquet_folder_on_s3_copies_every_part_and_removes_the_temp(
        s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The index / rejects folders are published by server-side copies, many at a time."""
    import threading

    import pyarrow.parquet as pq

    from pipeline import run as job

    fs = s3fs()
    fs.create_dir("pub")
    for i in range(40):
        pq.write_table(pa.table({"x": [i]}), f"pub/tmp/part-{i:05d}.parquet", filesystem=fs)
    in_flight, most, lock = [0], [0], threading.Lock()

    class Counting:
        """The S3 filesystem, counting the copies in flight (pyarrow's type cannot be patched)."""

        def __getattr__(self, name: str):
            return getattr(fs, name)

        def copy_file(self, src: str, dst: str) -> None:
            with lock:
                in_flight[0] += 1
                most[0] = max(most[0], in_flight[0])
            try:
                threading.Event().wait(0.05)  # a CopyObject's round trip
                fs.copy_file(src, dst)
            finally:
                with lock:
                    in_flight[0] -= 1

    monkeypatch.setattr(job.storage, "is_object_store", lambda f: True)
    job._publish(Counting(), "pub/tmp", "pub/index/abc")
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector("pub/index/abc")))
    assert names == [f"part-{i:05d}.parquet" for i in range(40)]
    assert fs.get_file_info("pub/tmp").type == pafs.FileType.NotFound
    assert pq.read_table("pub/index/abc", filesystem=fs)["x"].to_pylist() == list(range(40))
    assert most[0] > 1  # copies overlap
