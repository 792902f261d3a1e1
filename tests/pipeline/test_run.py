"""End-to-end pipeline runs on local Ray: sample clips, resume, and a corpus of odd and bad inputs."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.buckets import BucketConfig, all_buckets
from pipeline.run import main

pytestmark = pytest.mark.slow


def _run(out: Path, *extra: str) -> dict:
    return main(["--output", str(out), *extra])


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _clip_ids(out: Path) -> list[str]:
    ids = []
    for f in sorted(out.glob("shards/*/*.arrow")):
        ids += pa.ipc.open_file(pa.memory_map(str(f))).read_all().column("clip_id").to_pylist()
    return ids


@pytest.fixture(scope="module")
def demo_out(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    _run(out)
    return out


def test_demo_shards_read_back_with_bare_pyarrow(demo_out: Path) -> None:
    manifest = _manifest(demo_out)
    assert manifest["random_init"] is True
    assert manifest["fingerprint"]["models"]["clip"]["weights"] == "random-init"
    assert manifest["totals"]["inputs"] == 3 and manifest["totals"]["sources_with_clips"] == 3
    specs = {b.name: b for b in all_buckets(BucketConfig())}
    total = 0
    for name, entry in manifest["buckets"].items():
        spec = specs[name]
        for f in entry["files"]:
            table = pa.ipc.open_file(pa.memory_map(str(demo_out / f["path"]))).read_all()
            assert table.num_rows == f["rows"]
            latents = table.column("latents").combine_chunks().to_numpy_ndarray()
            # Tiny image VAE: 4 channels, frame-wise (T' = T), 8x spatial.
            assert latents.shape[1:] == (4, spec.num_frames, spec.height_px // 8, spec.width_px // 8)
            assert latents.dtype == np.float16 and np.isfinite(latents).all() and latents.std() > 0
            text = table.column("text_embedding").combine_chunks().to_numpy_ndarray()
            mask = table.column("text_mask").combine_chunks().to_numpy_ndarray()
            assert text.shape[1:] == (77, 64) and mask.shape[1:] == (77,)
            assert (mask.sum(axis=1) >= 3).all()  # SOT + ≥1 word + EOT
            assert set(table.column("bucket").to_pylist()) == {name}
            assert all(c for c in table.column("caption").to_pylist())
            assert all(j[:2] == b"\xff\xd8" for j in table.column("keyframe_jpeg").to_pylist())
            total += table.num_rows
    assert total == manifest["totals"]["clips"] > 0
    ids = _clip_ids(demo_out)
    assert len(ids) == len(set(ids))
    # bikes.mp4 is 2.35:1 → the 2.39:1 buckets; its 6 scenes each give a clip.
    bikes = [n for n in manifest["buckets"] if "2_39x1" in n]
    assert sum(manifest["buckets"][n]["rows"] for n in bikes) >= 6
    assert (demo_out / "config.yaml").is_file() and (demo_out / "rejects.parquet").is_file()


def test_rerun_skips_complete_sources_and_keeps_manifest(demo_out: Path) -> None:
    before = (demo_out / "manifest.json").read_bytes()
    stamps = {f: f.stat().st_mtime_ns for f in demo_out.glob("shards/*/*.arrow")}
    _run(demo_out)
    assert (demo_out / "manifest.json").read_bytes() == before
    assert {f: f.stat().st_mtime_ns for f in demo_out.glob("shards/*/*.arrow")} == stamps


def test_interrupted_run_resumes_to_the_same_dataset(demo_out: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    _run(out, "--set", "compute.sources_per_commit=1")
    ids = sorted(_clip_ids(out))
    assert ids == sorted(_clip_ids(demo_out))
    # Simulate a crash after the last batch's files moved but before its journal line landed,
    # with a half-written staging area and no manifest yet.
    journal = out / "_state" / "journal.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:-1]) + "\n")
    (out / "manifest.json").unlink()
    (out / "_staging" / "batch-x" / "shards").mkdir(parents=True)
    (out / "_staging" / "batch-x" / "shards" / "junk.arrow").write_bytes(b"partial")
    summary = _run(out, "--set", "compute.sources_per_commit=1")
    assert sorted(_clip_ids(out)) == ids
    assert summary["clips"] == len(ids)
    assert not (out / "_staging").exists()


def test_changed_data_settings_on_same_output_are_refused(demo_out: Path) -> None:
    with pytest.raises(Exception, match="different settings"):
        _run(demo_out, "--set", "buckets.fps=12")


def test_config_error_lists_valid_keys(ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        _run(tmp_path / "x", "--set", "buckets.fsp=8")
    assert "buckets.fsp" in str(e.value) and "num_frames" in str(e.value)


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

    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    by_file: dict[str, list[dict]] = {}
    for r in rejects:
        by_file.setdefault(Path(r["source_uri"]).name, []).append(r)
    sources = {Path(s["uri"]).name: s for line in (out / "_state/journal.jsonl").read_text().splitlines()
               for s in json.loads(line)["sources"]}
    # Every odd-but-valid video yields clips.
    for name, p in odd_videos.items():
        assert sources[p.name]["clips"] > 0, (name, by_file.get(p.name))
    # Every bad input has a reject row with a clear reason; good inputs are unaffected.
    expect = {
        "corrupt": "not a readable media container", "corrupt_header": "not a readable media container",
        "truncated": "not a readable media container", "empty": "empty file", "audio_only": "no video stream",
        "not_video": "text file", "one_frame": "frame", "absurd_dims": "absurd",
    }
    for key, text in expect.items():
        name = bad_videos[key].name
        assert name in by_file and any(text in r["reason"] for r in by_file[name]), (key, by_file.get(name))
    assert sources[bad_videos["truncated_stream"].name]["clips"] > 0
    png = by_file[bad_videos["png_as_mov"].name][0]["reason"]
    assert png  # a PNG named .mov: a one-frame "video", rejected at probe
    dupes = [r for r in rejects if r["stage"] == "dedupe"]
    assert len(dupes) == 1 and "same content as" in dupes[0]["reason"]
    # Every input is accounted for: clips or reject rows.
    manifest = _manifest(out)
    names = {p.name for p in list(odd_videos.values()) + list(bad_videos.values())} | {"carphone.mp4",
                                                                                     "renamed copy.mp4"}
    accounted = {n for n, s in sources.items() if s["clips"] > 0} | set(by_file)
    assert names <= accounted
    assert manifest["totals"]["inputs"] == len(names)
    assert manifest["totals"]["ignored_files"] == 1  # README.md; the sidecar .txt is not ignored
    assert summary["clips"] == len(set(_clip_ids(out)))


def test_wan_video_vae_end_to_end(ray_local: None, tmp_path: Path, sample_clips: dict[str, Path]) -> None:
    src = tmp_path / "raw"
    src.mkdir()
    shutil.copy(sample_clips["carphone_pristine"], src / "carphone.mp4")
    out = tmp_path / "data"
    main(["--input", str(src), "--output", str(out), "--set", "vae.kind=wan", "--set", "vae.preset=tiny-wan"])
    manifest = _manifest(out)
    assert manifest["fingerprint"]["models"]["vae"]["class"] == "AutoencoderKLWan"
    for name, entry in manifest["buckets"].items():
        frames = entry["num_frames"]
        assert entry["latent_shape"][1] == 1 + (frames - 1) // 4  # 4x temporal compression
        table = pa.ipc.open_file(pa.memory_map(str(out / entry["files"][0]["path"]))).read_all()
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


def test_stalled_batch_is_cancelled_then_a_rerun_completes(ray_local: None, tmp_path: Path,
                                                            sample_clips: dict[str, Path]) -> None:
    from pipeline.run import BatchStalled

    src = tmp_path / "raw"
    src.mkdir()
    shutil.copy(sample_clips["bikes"], src / "bikes.mp4")
    out = tmp_path / "data"
    # Starting the batch's actors alone takes longer than 0.1 s: every attempt is cancelled as stalled.
    t0 = time.monotonic()
    with pytest.raises(BatchStalled):
        main(["--input", str(src), "--output", str(out), "--set", "compute.stall_timeout_s=0.1",
              "--set", "compute.commit_retries=1"])
    assert time.monotonic() - t0 < 120
    assert not list(out.glob("shards/*/*.arrow")) and not (out / "manifest.json").exists()
    summary = main(["--input", str(src), "--output", str(out)])
    ids = _clip_ids(out)
    assert summary["clips"] == len(ids) == len(set(ids)) >= 6
