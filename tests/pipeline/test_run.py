"""End-to-end pipeline runs on local Ray: the demo, resume, crashes at every commit point, damage, inputs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
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
def demo_out(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    _run(out)
    return out


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
            text = table.column("text_embedding").combine_chunks().to_numpy_ndarray()
            mask = table.column("text_mask").combine_chunks().to_numpy_ndarray()
            assert text.shape[1:] == (77, 64) and mask.shape[1:] == (77,)
            assert (mask.sum(axis=1) >= 3).all()  # SOT + ≥1 word + EOT
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
    assert summary["this_run"] == {"clips_written": 0, "shards": 0, "records": 0}
    assert (demo_out / "manifest.json").read_bytes() == manifest  # byte-identical
    after = {p: p.stat().st_mtime_ns for p in demo_out.rglob("*") if p.is_file() and p.name != "summary.json"}
    assert after == before  # no file rewritten, none added


def _finalized(ray_mod, src: Path, out: Path, small_state_mb: float) -> tuple[dict, list, list]:
    """A copy of `src` without manifest / index / rejects, finalized again with the given threshold."""
    from pipeline.run import finalize, read_state
    from pipeline.settings import PipelineConfig

    shutil.copytree(src, out)
    for name in ("index", "rejects"):
        shutil.rmtree(out / name)
    (out / "manifest.json").unlink()
    cfg = PipelineConfig()
    cfg.compute.small_state_mb = small_state_mb
    resume = read_state(ray_mod, str(out), cfg, verify=False)
    assert (resume.table is not None) == (small_state_mb > 0)  # the path under test was taken
    old = json.loads((src / "manifest.json").read_text())
    manifest = finalize(ray_mod, cfg, str(out), resume, {k: v for k, v in old["fingerprint"].items()
                                                            if k != "data_sha256"})
    index = sorted(read_index(str(out), manifest).to_pylist(), key=lambda r: r["clip_id"])
    return manifest, index, read_rejects(str(out), manifest).to_pylist()


def test_driver_and_ray_data_reads_of_the_records_agree(demo_out: Path, tmp_path: Path) -> None:
    """Small state is read on the driver, large with Ray Data shuffles: the same manifest, index, rejects."""
    import ray

    small = _finalized(ray, demo_out, tmp_path / "small", 64.0)
    large = _finalized(ray, demo_out, tmp_path / "large", 0.0)
    assert small == large
    assert small[0] == json.loads((demo_out / "manifest.json").read_text())  # as the job wrote it
    assert len(small[1]) == small[0]["totals"]["clips"] > 0


def test_small_and_large_listings_dedupe_alike(ray_local: None, tmp_path: Path,
                                               sample_clips: dict[str, Path]) -> None:
    """One block vs a size shuffle: the same rows to do, the same survivors and dedupe rejects."""
    import ray

    from pipeline.preflight import preflight
    from pipeline.run import Resume, sources_to_do
    from pipeline.settings import PipelineConfig

    src = tmp_path / "raw"
    (src / "b").mkdir(parents=True)
    for i, name in enumerate(sample_clips):
        shutil.copy(sample_clips[name], src / f"{i}.mp4")
    shutil.copy(sample_clips["carphone_pristine"], src / "b" / "copy.mp4")
    shutil.copy(sample_clips["carphone_pristine"], src / "a copy.mp4")
    (src / "notes.md").write_text("not a video")
    (src / "empty" / "deeper").mkdir(parents=True)  # folder tasks that list nothing: empty blocks in the shuffle
    (src / "nothing").mkdir()
    found = []
    for mb in (64.0, 0.0):
        cfg = PipelineConfig()
        cfg.input.uri, cfg.output.uri, cfg.compute.small_state_mb = str(src), str(tmp_path / "out"), mb
        todo = sources_to_do(ray, cfg, preflight(cfg), Resume([]))
        found.append(sorted((r["uri"], r["source_id"], r["dup_of"]) for r in todo.take_all()))
    assert found[0] == found[1] and len(found[0]) == 6
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


@pytest.mark.parametrize("point", POINTS)
def test_crash_at_any_commit_point_then_rerun_gives_every_clip_once(point: str, demo_out: Path,
                                                                    tmp_path: Path) -> None:
    """The job is killed (driver and workers, SIGKILL-like) at `point`; the re-run repairs everything."""
    expected = _clip_ids(demo_out)
    out = tmp_path / "data"
    crashed = _subprocess("--output", str(out), *TINY_SHARDS, env={"DITHAROS_FAULT": point})
    assert crashed.returncode != 0, crashed.stderr[-3000:]
    assert not (out / "manifest.json").exists() or point == "during_index"
    again = _subprocess("--output", str(out), *TINY_SHARDS)
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_exactly_once(out, expected)
    if point == "after_shard_move":
        assert "no commit record names" in again.stderr  # the stray shard was found and removed


def test_a_damaged_shard_is_noticed_and_its_clips_redone(demo_out: Path, tmp_path: Path) -> None:
    expected = _clip_ids(demo_out)
    out = tmp_path / "data"
    shutil.copytree(demo_out, out)
    victim = sorted(out.glob("shards/*/*.arrow"))[0]
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated
    summary = _run(out)
    assert 0 < summary["this_run"]["clips_written"] < len(expected)  # only what was lost
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


def test_user_errors_are_one_line_before_ray_and_leave_nothing(tmp_path: Path) -> None:
    def fails(*args: str) -> str:
        r = _subprocess(*args, timeout=120)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
        assert "Ray" not in r.stderr  # failed before Ray started
        return r.stderr

    out = tmp_path / "out"
    assert "does not exist" in fails("--input", str(tmp_path / "missing"), "--output", str(out))
    assert not out.exists()  # nothing left behind, no data_config tying the folder to settings
    (tmp_path / "file").write_text("x")
    assert "is a file" in fails("--output", str(tmp_path / "file"))
    assert f"{tmp_path / 'file'} is a file" in fails("--output", str(tmp_path / "file" / "sub"))
    assert "not writable" in fails("--output", "/proc/ditharos-out")
    listing = tmp_path / "list.csv"
    listing.write_text("path,caption\na.mp4,x\n")
    assert "no 'uri' column" in fails("--input", str(listing), "--output", str(out))
    assert "buckets.fsp" in fails("--output", str(out), "--set", "buckets.fsp=8")
    assert not out.exists()


def test_output_inside_input_is_left_out_and_an_empty_input_warns(ray_local: None, tmp_path: Path,
                                                                  sample_clips: dict[str, Path]) -> None:
    src = tmp_path / "raw"
    src.mkdir()
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("ditharos").addHandler(handler)
    try:
        empty = _run(tmp_path / "empty_out", "--input", str(src))
        assert empty["clips"] == 0 and empty["sources_processed"] == 0
        assert f"no video found in {src}: the output holds no clips" in warnings
        shutil.copy(sample_clips["carphone_pristine"], src / "carphone.mp4")
        first = _run(src / "data", "--input", str(src))
        assert any("is inside the input" in w for w in warnings)
    finally:
        logging.getLogger("ditharos").removeHandler(handler)
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
    assert by_file[bad_videos["png_as_mov"].name][0]["reason"]  # a PNG named .mov: rejected at probe
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
    assert summary["clips"] == len(set(_clip_ids(out))) == len(_clip_ids(out))


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


def test_wan_video_vae_end_to_end(ray_local: None, tmp_path: Path, sample_clips: dict[str, Path]) -> None:
    src = tmp_path / "raw"
    src.mkdir()
    shutil.copy(sample_clips["carphone_pristine"], src / "carphone.mp4")
    out = tmp_path / "data"
    main(["--input", str(src), "--output", str(out), "--set", "vae.kind=wan", "--set", "vae.preset=tiny-wan"])
    manifest = read_manifest(str(out))
    assert manifest["fingerprint"]["models"]["vae"]["class"] == "AutoencoderKLWan"
    index = read_index(str(out), manifest, ["bucket", "shard", "latent_shape"])
    for name, entry in manifest["buckets"].items():
        frames = entry["num_frames"]
        assert entry["latent_shape"][1] == 1 + (frames - 1) // 4  # 4x temporal compression
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


def test_stalled_run_exits_naming_the_stall_then_a_rerun_completes(tmp_path: Path,
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
    done = _subprocess("--input", str(src), "--output", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    ids = _clip_ids(out)
    assert len(ids) == len(set(ids)) >= 6
    assert not list((out / RECORDS_DIR).glob("*.tmp-*"))
