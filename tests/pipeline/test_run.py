"""End-to-end pipeline runs on local Ray: the demo, resume, crashes at every commit point, damage, inputs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.buckets import BucketConfig, all_buckets
from pipeline.faults import POINTS
from pipeline.manifest import read_index, read_manifest, read_rejects
from pipeline.records import RECORDS_DIR
from pipeline.run import main
from pipeline.shards import text_tokens
from tests.datasets import refinalize

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TINY_SHARDS = ["--set", "output.shard_target_mb=0.02"]  # several commits even on the three sample clips


def _run(out: Path, *extra: str) -> dict:
    return main(["--output", str(out), *extra])


def _subprocess(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipeline/run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def _clip_ids(out: Path) -> list[str]:
    """Every clip id in every shard file on disk (not what the index claims)."""
    ids = []
    for f in sorted(out.glob("shards/*/*.arrow")):
        ids += pa.ipc.open_file(pa.memory_map(str(f))).read_all().column("clip_id").to_pylist()
    return ids


def _assert_exactly_once(out: Path, expected: list[str]) -> None:
    """Shards on disk hold each expected clip once, the index says exactly that, nothing stray remains."""
    on_disk = _clip_ids(out)
    assert sorted(on_disk) == sorted(expected) and len(set(on_disk)) == len(on_disk)
    manifest = read_manifest(str(out))
    index = read_index(str(out), manifest, ["clip_id", "shard", "row"])
    assert sorted(index["clip_id"].to_pylist()) == sorted(expected)
    for cid, shard, row in zip(*(index[c].to_pylist() for c in ("clip_id", "shard", "row"))):
        table = pa.ipc.open_file(pa.memory_map(str(out / shard))).read_all()
        assert table["clip_id"][row].as_py() == cid
    assert manifest["totals"]["clips"] == len(expected)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert not (out / "_state" / "leases").exists() or not list((out / "_state" / "leases").iterdir())
    assert [p.name for p in (out / "index").iterdir()] == [manifest["files"]["index"].split("/")[1]]


@pytest.fixture(scope="module")
def demo_out(demo_pipeline_output: Path) -> Path:
    return demo_pipeline_output  # shared with other modules: tests here re-run it but never change it


def test_demo_shards_and_index_read_back_with_bare_pyarrow(demo_out: Path) -> None:
    manifest = read_manifest(str(demo_out))
    assert manifest["random_init"] is True
    assert manifest["fingerprint"]["models"]["clip"]["weights"] == "random-init"
    assert manifest["totals"]["inputs"] == 3 and manifest["totals"]["sources_with_clips"] == 3
    specs = {b.name: b for b in all_buckets(BucketConfig())}
    index = pq.read_table(demo_out / manifest["files"]["index"])  # bare pyarrow reads the index folder
    assert index.num_rows == manifest["totals"]["clips"] > 0
    for name, entry in manifest["buckets"].items():
        spec = specs[name]
        rows = index.filter(pa.compute.equal(index["bucket"], name))
        assert rows.num_rows == entry["rows"]
        for shard in set(rows["shard"].to_pylist()):
            table = pa.ipc.open_file(pa.memory_map(str(demo_out / shard))).read_all()
            latents = table.column("latents").combine_chunks().to_numpy_ndarray()
            # Tiny image VAE: 4 channels, frame-wise (T' = T), 8x spatial.
            assert latents.shape[1:] == (4, spec.num_frames, spec.height_px // 8, spec.width_px // 8)
            assert list(latents.shape[1:]) == entry["latent_shape"]
            assert latents.dtype == np.float16 and np.isfinite(latents).all() and latents.std() > 0
            text = text_tokens(table)  # each caption's real tokens only
            assert all(t.shape[1] == 64 and 3 <= t.shape[0] <= 77 for t in text)  # SOT + ≥1 word + EOT
            assert entry["text_shape"] == [77, 64]
            assert set(table.column("bucket").to_pylist()) == {name}
            assert all(c for c in table.column("caption").to_pylist())
            assert all(j[:2] == b"\xff\xd8" for j in table.column("keyframe_jpeg").to_pylist())
    row = index.slice(0, 1).to_pylist()[0]
    c, t, h, w = row["latent_shape"]
    assert row["num_tokens"] == t * (h // 2) * (w // 2) and row["clip_bytes"] > 0
    _assert_exactly_once(demo_out, index["clip_id"].to_pylist())
    # bikes.mp4 is 2.35:1 → the 2.39:1 buckets; its 6 scenes each give a clip.
    assert sum(manifest["buckets"][n]["rows"] for n in manifest["buckets"] if "2_39x1" in n) >= 6
    # one file per bucket for a small dataset, not one per bucket per write block
    assert manifest["totals"]["shard_files"] == len(manifest["buckets"])
    assert (demo_out / "config.yaml").is_file() and (demo_out / "summary.json").is_file()


def test_rerun_skips_complete_sources_and_rewrites_nothing(demo_out: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in demo_out.rglob("*") if p.is_file() and p.name != "summary.json"}
    manifest = (demo_out / "manifest.json").read_bytes()
    summary = _run(demo_out)
    assert summary["this_run"] == {"clips_written": 0, "shards": 0, "records": 0, "sources_resumed_in_part": 0}
    assert (demo_out / "manifest.json").read_bytes() == manifest  # byte-identical
    after = {p: p.stat().st_mtime_ns for p in demo_out.rglob("*") if p.is_file() and p.name != "summary.json"}
    assert after == before  # no file rewritten, none added


def test_driver_and_ray_data_reads_of_the_records_agree(demo_out: Path, tmp_path: Path) -> None:
    """Small state is read on the driver, large with Ray Data shuffles: the same manifest, index, rejects."""
    small = refinalize(demo_out, tmp_path / "small", 64.0)
    large = refinalize(demo_out, tmp_path / "large", 0.0)
    assert small == large
    assert small[0] == json.loads((demo_out / "manifest.json").read_text())  # as the job wrote it
    assert len(small[1]) == small[0]["totals"]["clips"] > 0


@pytest.mark.parametrize("small_state_mb", [64.0, 0.0])
def test_an_index_folder_left_partial_by_a_failed_publish_is_written_again(demo_out: Path, tmp_path: Path,
                                                                           small_state_mb: float) -> None:
    """No manifest names it, so the folder is not trusted: its stray part goes and every clip is back."""
    want = refinalize(demo_out, tmp_path / "whole", small_state_mb)
    got = refinalize(demo_out, tmp_path / "partial", small_state_mb, partial=True)
    assert got == want and len(got[1]) > 1
    assert not list((tmp_path / "partial").rglob("part-stray.parquet"))


def test_small_and_large_listings_dedupe_alike(ray_local: None, tmp_path: Path,
                                               sample_clips: dict[str, Path]) -> None:
    """One block vs a size shuffle: the same rows to do, the same survivors and dedupe rejects; after
    an interrupted run, each incomplete source's committed clip ids reach its own row (a URI shuffle)."""
    import pyarrow as pa
    import ray

    from pipeline.preflight import preflight
    from pipeline.records import NOT_LISTED
    from pipeline.run import Resume, sources_to_do
    from pipeline.settings import PipelineConfig
    from pipeline.state import STATUS_SCHEMA

    src = tmp_path / "raw"
    (src / "b").mkdir(parents=True)
    for i, name in enumerate(sample_clips):
        shutil.copy(sample_clips[name], src / f"{i}.mp4")
    shutil.copy(sample_clips["carphone_pristine"], src / "b" / "copy.mp4")
    shutil.copy(sample_clips["carphone_pristine"], src / "a copy.mp4")
    (src / "notes.md").write_text("not a video")
    (src / "empty" / "deeper").mkdir(parents=True)  # folder tasks that list nothing: empty blocks in the shuffle
    (src / "nothing").mkdir()
    # an interrupted run committed some clips of 0.mp4, of a file no longer listed, and of one whose
    # source row never committed (no size known): their ids must reach only their own row
    partial = pa.Table.from_pylist([
        {"source_uri": str(src / "0.mp4"), "source_id": "s0", "size_bytes": (src / "0.mp4").stat().st_size,
         "mtime_ns": 1, "num_clips": 3, "committed_clips": 2, "complete": False, "committed_ids": ["x1", "x2"]},
        {"source_uri": str(src / "gone.mp4"), "source_id": "sg", "size_bytes": 5, "mtime_ns": 1, "num_clips": 2,
         "committed_clips": 1, "complete": False, "committed_ids": ["g1"]},
        {"source_uri": str(src / "1.mp4"), "source_id": None, "size_bytes": None, "mtime_ns": None,
         "num_clips": -1, "committed_clips": 1, "complete": False, "committed_ids": ["y1"]},
    ], schema=STATUS_SCHEMA)
    found, skips = [], []
    for mb in (64.0, 0.0):
        cfg = PipelineConfig()
        cfg.input.uri, cfg.output.uri, cfg.compute.small_state_mb = str(src), str(tmp_path / "out"), mb
        for resume in (Resume([]), Resume([], status=partial, incomplete=3)):
            todo = sources_to_do(ray, cfg, preflight(cfg), resume).take_all()
            found.append(sorted((r["uri"], r["source_id"], r["dup_of"]) for r in todo if r["reason"] != NOT_LISTED))
            skips.append({r["uri"]: (json.loads(r["skip_clip_ids"] or "[]"), r["reason"] == NOT_LISTED)
                          for r in todo if r["skip_clip_ids"] not in ("", "[]")})
    assert all(f == found[0] for f in found) and len(found[0]) == 6
    # the file no longer listed comes back as a row to close (pipeline.steps.closing_row)
    assert skips == [{}, {str(src / "0.mp4"): (["x1", "x2"], False), str(src / "1.mp4"): (["y1"], False),
                          str(src / "gone.mp4"): (["g1"], True)}] * 2
    dups = [r for r in found[0] if r[2]]
    carphone = sorted(str(p) for p in src.rglob("*.mp4") if p.read_bytes() == sample_clips["carphone_pristine"].read_bytes())
    assert [r[0] for r in dups] == carphone[1:] and {r[2] for r in dups} == {carphone[0]}


def test_dedupe_inputs_are_typed_even_when_empty() -> None:
    """An empty folder task or an empty status partition once fed null-typed columns into the
    dedupe shuffle (2,000-source re-run with compute.small_state_mb=0: ArrowInvalid in its reduce)."""
    import pyarrow as pa

    from pipeline.listing import listing_row
    from pipeline.run import DEDUPE_INPUT_SCHEMA, committed_rows, with_committed_id
    from pipeline.state import STATUS_SCHEMA

    assert committed_rows(STATUS_SCHEMA.empty_table()).schema == DEDUPE_INPUT_SCHEMA
    assert with_committed_id(pa.table({})).schema == DEDUPE_INPUT_SCHEMA
    rows = with_committed_id(pa.Table.from_pylist([listing_row("/v/a.mp4", 10, -1)]))
    assert rows.schema == DEDUPE_INPUT_SCHEMA and rows["committed_id"].to_pylist() == [""]
    status = pa.Table.from_pylist([], schema=STATUS_SCHEMA)
    assert committed_rows(status).num_rows == 0
    status = pa.Table.from_pylist([  # complete; incomplete with its source row; clips but no source row yet
        {"source_uri": "a", "source_id": "sa", "size_bytes": 1, "mtime_ns": 1, "complete": True, "committed_ids": []},
        {"source_uri": "b", "source_id": "sb", "size_bytes": 2, "mtime_ns": 1, "complete": False,
         "committed_ids": ["b1"]},
        {"source_uri": "c", "complete": False, "committed_ids": ["c1"]}], schema=STATUS_SCHEMA)
    rows = committed_rows(status)
    from pipeline.run import Resume, incomplete_examples

    assert incomplete_examples(Resume([], status=status)) == ["b", "c"]  # what the stuck-run error names
    assert rows.schema == DEDUPE_INPUT_SCHEMA
    assert rows.select(["uri", "committed_id", "partial"]).to_pylist() == [
        {"uri": "a", "committed_id": "sa", "partial": False}, {"uri": "b", "committed_id": "sb", "partial": True}]
    from pipeline.state import TO_DO_SCHEMA, attach_skip_ids, partial_rows, todo_rows

    assert partial_rows(status).schema == TO_DO_SCHEMA == attach_skip_ids(pa.table({})).schema
    assert todo_rows(pa.table({})).schema == TO_DO_SCHEMA


def test_empty_listing_blocks_stay_out_of_the_dedupe_shuffle(ray_local: None) -> None:
    """Ray Data skips map stages on a block with no rows, which then has no columns at all."""
    import pyarrow as pa
    import ray

    from pipeline.listing import listing_row
    from pipeline.run import non_empty_blocks, with_committed_id

    def list_task(task: dict) -> list[dict]:
        return [listing_row(f"/v/{task['n']}-{i}.mp4", 100 + i % 3, -1) for i in range(task["n"])]

    ds = (ray.data.from_items([{"n": 0}, {"n": 30}, {"n": 20}], override_num_blocks=3).flat_map(list_task)
          .map_batches(with_committed_id, batch_format="pyarrow").materialize())
    schemas = [ray.get(r).schema.names for r in ds.to_arrow_refs()]
    assert [] in schemas  # the empty block: no columns, so a shuffle could not concatenate it
    kept = non_empty_blocks(ray, ds)
    assert all(ray.get(r).schema.names for r in kept.to_arrow_refs())
    assert kept.repartition(num_blocks=4, keys=["size_bytes"]).count() == 50
    assert non_empty_blocks(ray, ray.data.from_arrow(pa.table({"a": pa.array([], pa.int64())}))).count() == 0
    from pipeline.blocks import non_empty_blocks as rows_only  # the near-duplicate pass's use: None when no rows

    assert rows_only(ray, ray.data.from_arrow(pa.table({"a": pa.array([], pa.int64())}))) is None
    assert rows_only(ray, ds).count() == 50


@contextmanager
def project_warnings() -> Iterator[list[str]]:
    """The warnings the project logger ("ditharos": it does not propagate to pytest's root) logs inside."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("ditharos")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("point", POINTS)
def test_crash_at_any_commit_point_then_rerun_gives_every_clip_once(point: str, demo_out: Path,
                                                                    tmp_path: Path) -> None:
    """The job is killed (driver and workers, SIGKILL-like) at `point`; the re-run repairs everything."""
    expected = _clip_ids(demo_out)
    out = tmp_path / "data"
    crashed = _subprocess("--output", str(out), *TINY_SHARDS, env={"DITHAROS_FAULT": point})
    assert crashed.returncode != 0, crashed.stderr[-3000:]
    assert not (out / "manifest.json").exists() or point == "during_index"
    # The re-run in this process, on the test session's Ray (a new driver and Ray cost ~20 s each).
    with project_warnings() as warnings:
        _run(out, *TINY_SHARDS)
    _assert_exactly_once(out, expected)
    if point == "after_shard_move":
        assert any("no commit record names" in w for w in warnings)  # the stray shard was removed


def test_a_damaged_shard_is_noticed_and_its_clips_redone(demo_out: Path, tmp_path: Path) -> None:
    expected = _clip_ids(demo_out)
    out = tmp_path / "data"
    shutil.copytree(demo_out, out)
    victim = sorted(out.glob("shards/*/*.arrow"))[0]
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated
    summary = _run(out)
    assert 0 < summary["this_run"]["clips_written"] < len(expected)  # only what was lost
    # the sources of the lost shard kept their other clips: cut again, only the lost ones rewritten
    assert summary["this_run"]["sources_resumed_in_part"] > 0
    _assert_exactly_once(out, expected)
    gone = sorted(out.glob("shards/*/*.arrow"))[0]
    gone.unlink()  # missing entirely
    _run(out)
    _assert_exactly_once(out, expected)
    flipped = sorted(out.glob("shards/*/*.arrow"))[-1]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only a checksum sees it
    flipped.write_bytes(bytes(data))
    assert _run(out)["this_run"]["clips_written"] == 0  # sizes only: not noticed ...
    assert _run(out, "--verify")["this_run"]["clips_written"] > 0  # ... --verify redoes it
    _assert_exactly_once(out, expected)
    assert not flipped.exists()  # the damaged file itself is gone; its clips live in a new shard


def test_a_source_gone_after_a_crash_is_closed_keeping_its_committed_clips(
        ray_local: None, tmp_path: Path, sample_clips: dict[str, Path]) -> None:
    """A source committed in part (its shard lost) and then removed from the input cannot be cut
    again: the resume closes it (its committed clips stay, the run finishes) instead of failing
    every run from then on; the other sources of the lost shard are redone as usual."""
    from pipeline.records import CLOSED_STAGE

    src = tmp_path / "raw"
    src.mkdir()
    for name, path in sample_clips.items():
        shutil.copy(path, src / f"{name}.mp4")
    out = tmp_path / "data"
    _run(out, "--input", str(src), *TINY_SHARDS)
    index = read_index(str(out), read_manifest(str(out)), ["clip_id", "source_uri", "shard"]).to_pylist()
    shards_of: dict[str, set] = {}
    for r in index:
        shards_of.setdefault(r["source_uri"], set()).add(r["shard"])
    victim = min(u for u, s in shards_of.items() if len(s) > 1)  # a source over several shards
    from pipeline.records import read_record, record_shard

    # a shard whose record does not also hold the victim's source row (a source known only from its
    # clips is not closed: if it came back it could not be told from a new file)
    with_source_row = {record_shard(str(f)).get("path") for f in (out / "_state" / "records").glob("*.parquet")
                       if any(r["kind"] == "source" and r["source_uri"] == victim
                              for r in read_record(str(f)).select(["kind", "source_uri"]).to_pylist())}
    lost = sorted(shards_of[victim] - with_source_row)[0]
    (out / lost).write_bytes((out / lost).read_bytes()[:100])  # damaged: its record is dropped
    Path(victim).unlink()  # ... and the source is gone before the resume
    kept = sorted(r["clip_id"] for r in index if not (r["source_uri"] == victim and r["shard"] == lost))
    summary = _run(out, "--input", str(src), *TINY_SHARDS)
    assert summary["this_run"]["sources_resumed_in_part"] >= 1
    _assert_exactly_once(out, kept)
    manifest = read_manifest(str(out))
    closed = [r for r in read_rejects(str(out), manifest).to_pylist() if r["stage"] == CLOSED_STAGE]
    assert [r["source_uri"] for r in closed] == [victim] and "no longer listed" in closed[0]["reason"]
    again = _run(out, "--input", str(src), *TINY_SHARDS)  # closed for good: nothing to do, no error
    assert again["this_run"]["clips_written"] == 0 and again["this_run"]["sources_resumed_in_part"] == 0
    _assert_exactly_once(out, kept)


def test_changed_data_settings_on_same_output_are_refused(demo_out: Path) -> None:
    with pytest.raises(SystemExit, match="different settings in \\['buckets'\\]"):
        _run(demo_out, "--set", "buckets.fps=12")


def test_second_run_on_a_live_output_is_refused(demo_out: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    first = subprocess.Popen([sys.executable, "pipeline/run.py", "--output", str(out)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        leases = out / "_state" / "leases"
        for _ in range(600):
            if leases.exists() and list(leases.glob("*.json")):
                break
            assert first.poll() is None, first.communicate()[1][-3000:]
            time.sleep(0.1)
        second = _subprocess("--output", str(out))
        assert second.returncode == 1 and "is being written by run" in second.stderr
        assert second.stderr.strip().count("\n") == 0  # one line, no traceback
    finally:
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    _assert_exactly_once(out, _clip_ids(demo_out))


def test_user_errors_are_one_line_before_ray_and_leave_nothing(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    # Once as the CLI (exit 1, one line, no traceback, before Ray) ...
    r = _subprocess("--input", str(tmp_path / "missing"), "--output", str(out), timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert "does not exist" in r.stderr and "Ray" not in r.stderr  # failed before Ray started
    assert not out.exists()  # nothing left behind, no data_config tying the folder to settings

    # ... the rest in-process (each CLI start costs ~10 s of imports): the run itself must never start.
    import pipeline.run as run_mod

    monkeypatch.setattr(run_mod, "_run", lambda *a, **k: pytest.fail("the run started despite a user error"))

    def fails(*args: str) -> str:
        with pytest.raises(SystemExit) as e:
            main(list(args))
        assert isinstance(e.value.code, str) and e.value.code.startswith("error: ") and "\n" not in e.value.code
        return e.value.code

    (tmp_path / "file").write_text("x")
    assert "is a file" in fails("--output", str(tmp_path / "file"))
    assert f"{tmp_path / 'file'} is a file" in fails("--output", str(tmp_path / "file" / "sub"))
    assert "not writable" in fails("--output", "/proc/ditharos-out")
    listing = tmp_path / "list.csv"
    listing.write_text("path,caption\na.mp4,x\n")
    assert "no 'uri' column" in fails("--input", str(listing), "--output", str(out))
    assert "buckets.fsp" in fails("--output", str(out), "--set", "buckets.fsp=8")
    assert not out.exists()
    old = tmp_path / "old"  # an output begun by a version whose records this code cannot read
    (old / "_state").mkdir(parents=True)
    (old / "_state" / "data_config.json").write_text("{}")
    assert "written by another DiTharos version (commit records v3 or older" in fails("--output", str(old))


def test_output_inside_input_is_left_out_and_an_empty_input_warns(ray_local: None, tmp_path: Path,
                                                                  sample_clips: dict[str, Path]) -> None:
    src = tmp_path / "raw"
    src.mkdir()
    with project_warnings() as warnings:
        empty = _run(tmp_path / "empty_out", "--input", str(src))
        assert empty["clips"] == 0 and empty["sources_processed"] == 0
        assert f"no video found in {src}: the output holds no clips" in warnings
        shutil.copy(sample_clips["carphone_pristine"], src / "carphone.mp4")
        first = _run(src / "data", "--input", str(src))
        assert any("is inside the input" in w for w in warnings)
    again = _run(src / "data", "--input", str(src))  # the output's own files are not read back as input
    assert first["clips"] == again["clips"] > 0 and again["ignored_files"] == 0


def test_corpus_of_odd_and_bad_inputs(ray_local: None, tmp_path: Path, odd_videos: dict[str, Path],
                                      bad_videos: dict[str, Path], sample_clips: dict[str, Path]) -> None:
    src = tmp_path / "raw"
    (src / "nested" / "deeper").mkdir(parents=True)
    for name, p in odd_videos.items():
        shutil.copy(p, src / "nested" / p.name)
    for name, p in bad_videos.items():
        shutil.copy(p, src / p.name)
    shutil.copy(sample_clips["carphone_pristine"], src / "nested" / "deeper" / "carphone.mp4")
    shutil.copy(sample_clips["carphone_pristine"], src / "renamed copy.mp4")  # same bytes, other name
    (src / "nested" / "deeper" / "carphone.txt").write_text("a man talking in a car\n")
    (src / "README.md").write_text("not a video")
    out = tmp_path / "data"
    summary = main(["--input", str(src), "--output", str(out)])

    manifest = read_manifest(str(out))
    rejects = read_rejects(str(out), manifest).to_pylist()
    by_file: dict[str, list[dict]] = {}
    for r in rejects:
        by_file.setdefault(Path(r["source_uri"]).name, []).append(r)
    index = read_index(str(out), manifest, ["source_uri", "caption", "caption_source"])
    clips_of: dict[str, int] = {}
    for uri in index["source_uri"].to_pylist():
        clips_of[Path(uri).name] = clips_of.get(Path(uri).name, 0) + 1
    # Every odd-but-valid video yields clips.
    for name, p in odd_videos.items():
        assert clips_of.get(p.name, 0) > 0, (name, by_file.get(p.name))
    # Every bad input has a reject row with a clear reason; good inputs are unaffected.
    expect = {
        "corrupt": "not a readable media container", "corrupt_header": "not a readable media container",
        "truncated": "not a readable media container", "empty": "empty file", "audio_only": "no video stream",
        "not_video": "text file", "one_frame": "frame", "absurd_dims": "absurd",
    }
    for key, text in expect.items():
        name = bad_videos[key].name
        assert name in by_file and any(text in r["reason"] for r in by_file[name]), (key, by_file.get(name))
    assert clips_of.get(bad_videos["truncated_stream"].name, 0) > 0
    assert clips_of.get(bad_videos["png_as_mov"].name) == 1  # a PNG named .mov: an image source, one clip
    dupes = [r for r in rejects if r["stage"] == "dedupe"]
    # "nested/deeper/carphone.mp4" < "renamed copy.mp4": the nested one survives, deterministically
    assert len(dupes) == 1 and dupes[0]["source_uri"].endswith("renamed copy.mp4")
    assert dupes[0]["reason"] == f"same content as {src / 'nested' / 'deeper' / 'carphone.mp4'}"
    ignored = [r for r in rejects if r["stage"] == "discover"]
    assert [Path(r["source_uri"]).name for r in ignored] == ["README.md"]  # the sidecar .txt is not ignored
    names = {p.name for p in list(odd_videos.values()) + list(bad_videos.values())} | {"carphone.mp4",
                                                                                     "renamed copy.mp4"}
    assert names <= set(clips_of) | set(by_file)  # every input accounted for
    assert manifest["totals"]["inputs"] == len(names) and manifest["totals"]["ignored_files"] == 1
    # the index is the shards' clips less near-duplicates (the generated scenes' smooth gradients
    # give clips of different videos near hashes), each naming a clip the index keeps
    copies = [r for r in rejects if r["stage"] == "near_dup"]
    kept = set(read_index(str(out), manifest, ["clip_id"])["clip_id"].to_pylist())
    assert all(r["duplicate_of"] in kept and r["clip_id"] not in kept for r in copies)
    assert summary["clips"] + len(copies) == len(set(_clip_ids(out))) == len(_clip_ids(out))
    assert len(copies) == sum(manifest["totals"]["near_duplicates"].values()) <= 2


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_listing_file_input_with_captions_and_metadata(ray_local: None, tmp_path: Path, fmt: str,
                                                       sample_clips: dict[str, Path]) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(sample_clips["carphone_pristine"], videos / "carphone.mp4")
    rows = [{"uri": "videos/carphone.mp4", "caption": "a man talking in a car", "licence": "cc-by"},
            {"uri": str(tmp_path / "videos" / "gone.mp4"), "caption": None, "licence": "x"}]
    listing = tmp_path / f"listing.{fmt}"
    table = pa.Table.from_pylist(rows)
    if fmt == "parquet":
        pq.write_table(table, listing)
    elif fmt == "jsonl":
        listing.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        listing.write_text("uri,caption,licence\n" + "\n".join(f"{r['uri']},{r['caption'] or ''},{r['licence']}"
                                                                for r in rows) + "\n")
    out = tmp_path / "data"
    # The only candidate captions are the listing's and one identical template: a sidecar wins ties.
    summary = main(["--input", str(listing), "--output", str(out), "--set", 'caption.templates=["{}"]',
                    "--set", 'caption.vocabulary=["a man talking in a car"]'])
    manifest = read_manifest(str(out))
    index = read_index(str(out), manifest)
    assert set(index["caption_source"].to_pylist()) == {"sidecar"}
    assert summary["clips"] == index.num_rows > 0
    assert set(index["source_uri"].to_pylist()) == {str(videos / "carphone.mp4")}  # relative to the listing
    assert set(index["caption"].to_pylist()) == {"a man talking in a car"}
    assert {json.loads(m)["licence"] for m in index["source_meta"].to_pylist()} == {"cc-by"}
    gone = [r for r in read_rejects(str(out), manifest).to_pylist() if r["source_uri"].endswith("gone.mp4")]
    assert gone and "does not exist" in gone[0]["reason"]


@pytest.mark.parametrize("preset, spatial, sizes", [("tiny-wan", 8, "16"), ("tiny-wan2.2", 16, "32")])
def test_wan_video_vae_end_to_end(ray_local: None, tmp_path: Path, sample_clips: dict[str, Path], preset: str,
                                  spatial: int, sizes: str) -> None:
    """Wan 2.1's VAE and Wan 2.2's (TI2V-5B: 16x spatial, so 32-px bucket steps) through the whole job."""
    src = tmp_path / "raw"
    src.mkdir()
    shutil.copy(sample_clips["carphone_pristine"], src / "carphone.mp4")
    out = tmp_path / "data"
    main(["--input", str(src), "--output", str(out), "--set", "vae.kind=wan", "--set", f"vae.preset={preset}",
          "--set", f"buckets.size_multiple_px={sizes}"])
    manifest = read_manifest(str(out))
    assert manifest["fingerprint"]["models"]["vae"]["class"] == "AutoencoderKLWan"
    index = read_index(str(out), manifest, ["bucket", "shard", "latent_shape"])
    assert manifest["buckets"]
    for name, entry in manifest["buckets"].items():
        frames = entry["num_frames"]
        assert entry["latent_shape"][1] == 1 + (frames - 1) // 4  # 4x temporal compression
        assert entry["latent_shape"][2:] == [entry["height_px"] // spatial, entry["width_px"] // spatial]
        shard = index.filter(pa.compute.equal(index["bucket"], name))["shard"][0].as_py()
        table = pa.ipc.open_file(pa.memory_map(str(out / shard))).read_all()
        assert table.column("latents").combine_chunks().to_numpy_ndarray().shape[1:] == tuple(entry["latent_shape"])


def test_pyarrow_fs_uris_for_input_and_output(ray_local: None, tmp_path: Path, sample_clips: dict[str, Path]) -> None:
    # file:// goes through pyarrow.fs.FileSystem.from_uri, the same path s3:// and gs:// take.
    src = tmp_path / "raw"
    src.mkdir()
    shutil.copy(sample_clips["carphone_pristine"], src / "carphone.mp4")
    out = tmp_path / "data"
    summary = main(["--input", f"file://{src}", "--output", f"file://{out}"])
    assert summary["clips"] > 0 and (out / "manifest.json").is_file()
    assert all(u.startswith(str(src)) for u in pa.ipc.open_file(pa.memory_map(str(
        next(out.glob("shards/*/*.arrow"))))).read_all().column("source_uri").to_pylist())


def test_stalled_run_exits_naming_the_stall_then_a_rerun_completes(ray_local: None, tmp_path: Path,
                                                                   sample_clips: dict[str, Path]) -> None:
    src = tmp_path / "raw"
    src.mkdir()
    shutil.copy(sample_clips["bikes"], src / "bikes.mp4")
    out = tmp_path / "data"
    # Starting the model actors alone takes longer than 0.5 s: nothing reaches the writers in time.
    stalled = _subprocess("--input", str(src), "--output", str(out), "--set", "compute.stall_timeout_s=0.5")
    assert stalled.returncode == 1, stalled.stderr[-3000:]
    assert "error: no clip or source reached the shard writers for 0.5 s" in stalled.stderr
    assert not (out / "manifest.json").exists()
    _run(out, "--input", str(src))  # in this process, on the session's Ray (saves a start)
    ids = _clip_ids(out)
    assert len(ids) == len(set(ids)) >= 6
    assert not list((out / RECORDS_DIR).glob("*.tmp-*"))


def test_filtered_and_letterboxed_sources_end_to_end(ray_local: None, tmp_path: Path,
                                                      sample_clips: dict[str, Path]) -> None:
    """Scores reach shards and index; filtered clips are reject rows counted by score; bars are cropped."""
    from tests.pipeline.test_filters import pan, video

    src = tmp_path / "raw"
    src.mkdir()
    moving = pan()
    video(src, "frozen", np.repeat(moving[:1], len(moving), axis=0))
    boxed = np.zeros((len(moving), 480, 640, 3), np.uint8)
    boxed[:, 106:374] = pan(h=268, w=640, px_per_frame=2.0)
    video(src, "letterboxed", boxed)
    from tests.pipeline.test_text_overlay import title_card

    video(src, "titlecard", np.stack([title_card(f) for f in moving]))  # text over a moving scene
    shutil.copy(sample_clips["carphone_pristine"], src / "carphone.mp4")
    from PIL import Image

    from tests.pipeline.test_filters import texture

    Image.fromarray(texture(300, 400, sigma=1.0)).save(src / "photo.jpg")  # a still image with its caption
    (src / "photo.txt").write_text("a photo of gravel\n")
    out = tmp_path / "data"
    summary = main(["--input", str(src), "--output", str(out), "--set", "filter.example_fraction=1.0"])

    manifest = read_manifest(str(out))
    rejected = [r for r in read_rejects(str(out), manifest).to_pylist() if r["stage"] == "filter"]
    assert all(r["keyframe_jpeg"][:2] == b"\xff\xd8" for r in rejected)  # every one sampled at fraction 1
    assert {Path(r["source_uri"]).name for r in rejected} == {"frozen.mp4", "titlecard.mp4"}
    filtered = [r for r in rejected if r["source_uri"].endswith("frozen.mp4")]
    texts = [r for r in rejected if r["source_uri"].endswith("titlecard.mp4")]
    assert {r["score"] for r in filtered} == {"max_frame_diff"} and all(r["value"] < 0.5 for r in filtered)
    assert texts and {r["score"] for r in texts} == {"text_area"} and all(r["value"] > 0.1 for r in texts)
    assert all(r["text_area"] == pytest.approx(r["value"], rel=1e-6) and r["sharpness"] > 15 for r in texts)
    assert manifest["totals"]["filtered_by_score"] == {"max_frame_diff": len(filtered), "text_area": len(texts)}
    assert summary["filtered_by_score"] == manifest["totals"]["filtered_by_score"]
    assert manifest["totals"]["rejects_by_stage"]["filter"] == len(rejected)
    index = read_index(str(out), manifest)
    rows = index.to_pylist()
    assert {Path(r["source_uri"]).name for r in rows} == {"letterboxed.mp4", "carphone.mp4", "frozen.mp4",
                                                            "photo.jpg"}
    photo = [r for r in rows if r["source_uri"].endswith("photo.jpg")]
    assert len(photo) == 1 and photo[0]["num_frames"] == 1 and photo[0]["bucket"].endswith("4x3_1f")
    assert photo[0]["caption"]  # its sidecar competes with the templates (random-init CLIP picks any)
    rows = [r for r in rows if r not in photo]
    assert all(r["num_frames"] == 1 for r in rows if r["source_uri"].endswith("frozen.mp4"))  # a still is a still
    for r in rows:
        assert r["sharpness"] > 15 and r["black_fraction"] <= 0.5 and (r["num_frames"] == 1 or r["motion"] > 0.003)
        boxed_source = r["source_uri"].endswith("letterboxed.mp4")
        assert ("2_39x1" in r["bucket"]) == boxed_source and (r["crop_px"][0] > 100) == boxed_source
        table = pa.ipc.open_file(pa.memory_map(str(out / r["shard"]))).read_all()
        assert table["sharpness"][r["row"]].as_py() == pytest.approx(r["sharpness"])  # shards carry the scores too
    assert len({r["aesthetic"] for r in rows}) > 1  # the random-init head scored every clip
    moving = [r["phash"] for r in rows if not r["source_uri"].endswith("frozen.mp4")]
    assert len(set(moving)) == len(moving)  # every moving clip's middle frame has its own hash
    assert manifest["fingerprint"]["models"]["aesthetic"]["weights"] == "random-init"
    assert summary["clips"] == len(rows) + 1 and summary["sources_with_clips"] == 5  # cut, then all filtered: counted
    _assert_exactly_once(out, [r["clip_id"] for r in rows + photo])
    assert not {r["clip_id"] for r in rejected} & {r["clip_id"] for r in rows}
    assert all(r["text_area"] <= 0.1 for r in rows + photo)

    # The data card of this output: a page a browser renders, numbers equal to the manifest's.
    from pipeline.datacard import data_card
    from pipeline.inspect import main as inspect_main
    from tests.browser import render

    card = data_card(str(out), manifest, num_examples=4)
    assert card["filtered_by_score"] == manifest["totals"]["filtered_by_score"]
    assert sum(card["scores"]["sharpness"]["kept"]) == len(rows) + 1
    assert sum(card["scores"]["sharpness"]["filtered"]["max_frame_diff"]) == len(filtered)
    assert sum(card["captions"]["word_counts"]) == len(rows) + 1
    assert card["thresholds"]["max_frame_diff"] == {"min": 0.5, "max": None}
    assert len(card["filtered_examples"]["max_frame_diff"]) == min(4, len(filtered))
    assert len(card["examples"]) == 4 and all(ex["keyframe_jpeg"][:2] == b"\xff\xd8" for ex in card["examples"])
    page_path = Path(inspect_main([str(out), "--out", str(tmp_path / "card.html"), "--examples", "4"]))
    text = page_path.read_text()
    assert "Filtered by max_frame_diff" in text and "min 0.5" in text and "random-init" in text
    page = render(page_path, "datacard-pipeline-output")
    assert page.console_errors == [] and page.broken_images == [], page
    assert len(card["filtered_examples"]["text_area"]) == min(4, len(texts))
    assert "Filtered by text_area" in text and "max 0.1" in text
    assert page.images == 4 + min(4, len(filtered)) + min(4, len(texts)) and page.title == "DiTharos data card"
    # The command as users type it (pipeline/ first on sys.path, where inspect.py could shadow the
    # standard library's inspect): the same page.
    cli = subprocess.run([sys.executable, "pipeline/inspect.py", str(out), "--out", str(tmp_path / "cli.html"),
                          "--examples", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert (tmp_path / "cli.html").read_text() == text


def test_the_manifest_reads_back_the_commits_whatever_the_writers_report(
        ray_local: None, tmp_path: Path, sample_clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer restarted after its node died reports only its own commits (often none). The job
    once trusted that count, skipped reading the records back and finalized an empty manifest
    whose index did not exist over committed shards (seen in test_node_loss)."""
    import pipeline.run as run

    real = run.flush_writers
    monkeypatch.setattr(run, "flush_writers",
                        lambda ray, writers: [dict(s, records=0, clips=0, shards=0) for s in real(ray, writers)])
    src = tmp_path / "raw"
    src.mkdir()
    shutil.copy(sample_clips["carphone_pristine"], src / "carphone.mp4")
    out = tmp_path / "data"
    summary = main(["--input", str(src), "--output", str(out)])
    manifest = read_manifest(str(out))
    on_disk = _clip_ids(out)
    assert on_disk and summary["clips"] == manifest["totals"]["clips"] == len(on_disk)
    assert sorted(read_index(str(out), manifest, ["clip_id"])["clip_id"].to_pylist()) == sorted(on_disk)


def test_probe_and_cut_tasks_ask_for_the_cpu_node_resources() -> None:
    """compute.cut_resources keeps probing (a read + hash of every source) and the cut off GPU
    nodes alike; the model stages ask for GPUs instead. The plan's calls are recorded, not run."""
    from types import SimpleNamespace

    from pipeline.run import Resume, build_plan
    from pipeline.settings import PipelineConfig

    calls: list[tuple[str, dict]] = []

    class Recorder:
        def __getattr__(self, name: str):
            def call(*args, **kwargs):
                calls.append((name, kwargs))
                return self
            return call

    fake_ray = SimpleNamespace(cluster_resources=lambda: {"GPU": 8.0},
                               data=SimpleNamespace(ActorPoolStrategy=lambda size: ("pool", size)))
    sha = {"weights_sha256": "0" * 64}
    fingerprints = {"clip": sha, "text": sha, "text_encoder": sha, "vae": sha}
    for resources, want in (({"cpu_node": 1.0}, {"cpu_node": 1.0}), ({}, None)):
        cfg = PipelineConfig()
        cfg.compute.cut_resources = resources
        calls.clear()
        build_plan(fake_ray, cfg, "/tmp/out", Recorder(), Resume([]), fingerprints, [])
        names = [n for n, _ in calls]
        assert names[:2] == ["repartition", "flat_map"]  # probe and cut: one task per source block
        assert calls[1][1]["resources"] == want
        assert [kw.get("num_gpus") for n, kw in calls if n == "map_batches"] == [1.0, 1.0, None]  # caption, VAE, router
    # the routers carry every byte of latents: one per VAE actor unless set, spread over the nodes
    for routers, want in ((0, 3), (5, 5)):
        cfg = PipelineConfig()
        cfg.compute.vae_actors, cfg.compute.router_actors = 3, routers
        calls.clear()
        build_plan(fake_ray, cfg, "/tmp/out", Recorder(), Resume([]), fingerprints, [])
        router = [kw for n, kw in calls if n == "map_batches"][-1]
        assert router["compute"] == ("pool", want) and router["scheduling_strategy"] == "SPREAD"
