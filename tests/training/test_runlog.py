"""training/runlog.py: segmented metrics / clip-id logs and TensorBoard files, local and on S3 (moto)."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path
from unittest import mock

import pyarrow.fs as pafs
import pytest

from pipeline import storage
from tests.conftest import s3fs
from training import runlog
from training.runlog import CLIPS, METRICS, MetricsDigest, RunLog, iter_rows, read_metrics, summarize


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """tag → {step: value} from TensorBoard event files (TFRecord framing + tensorboardX's Event proto),
    read as TensorBoard does: files in name order, a SessionLog START (purge_step) hides later steps."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    out: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + n])  # skip the length's CRC
            pos += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                out = {tag: {k: v for k, v in values.items() if k < event.step} for tag, values in out.items()}
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def row(step: int, loss: float = 1.0) -> dict:
    return {"step": step, "epoch": step // 4, "loss": loss, "lr": 1e-3, "tokens": 10 + step, "step_s": 0.5,
            "data_wait_s": 0.1 * (step % 2)}


def run(uri: str, steps: range, sync_every: int, steps_done: int = 0, loss: float = 1.0,
        tensorboard: bool = False) -> RunLog:
    """Rows for `steps`, synced after every `sync_every` steps (as checkpoints do), then closed."""
    log = RunLog(uri, steps_done, tensorboard)
    for step in steps:
        log.write(row(step, loss), clip_ids=[f"c{step}-{i}" for i in range(3)])
        if (step + 1) % sync_every == 0:
            log.sync()
    log.close()
    return log


def names(root: Path, kind: str) -> list[str]:
    return sorted(p.name for p in (root / kind).iterdir())


def test_segments_start_at_each_sync_and_a_resume_drops_redone_rows(tmp_path: Path) -> None:
    run(str(tmp_path), range(10), sync_every=4)
    assert names(tmp_path, METRICS) == names(tmp_path, CLIPS) == ["00000000.jsonl", "00000004.jsonl", "00000008.jsonl"]
    assert [r["step"] for r in read_metrics(str(tmp_path))] == list(range(10))
    # Resumed at step 6 (a crash after a checkpoint there): segment 8 goes, segment 4 keeps 4 and 5.
    run(str(tmp_path), range(6, 9), sync_every=4, steps_done=6, loss=0.5)
    assert names(tmp_path, METRICS) == ["00000000.jsonl", "00000004.jsonl", "00000006.jsonl", "00000008.jsonl"]
    metrics = read_metrics(str(tmp_path))
    assert [r["step"] for r in metrics] == list(range(9))
    assert [r["loss"] for r in metrics] == [1.0] * 6 + [0.5] * 3
    clips = list(iter_rows(str(tmp_path), CLIPS))
    assert [r["clip_ids"][0] for r in clips] == [f"c{s}-0" for s in range(9)]
    # Resumed at a segment's first step: nothing is rewritten, the later segments go.
    before = (tmp_path / METRICS / "00000004.jsonl").stat().st_mtime_ns
    RunLog(str(tmp_path), 6, tensorboard=False).close()
    assert names(tmp_path, METRICS) == ["00000000.jsonl", "00000004.jsonl"]
    assert (tmp_path / METRICS / "00000004.jsonl").stat().st_mtime_ns == before
    # From scratch (no checkpoint): no rows survive.
    RunLog(str(tmp_path), 0, tensorboard=False).close()
    assert read_metrics(str(tmp_path)) == [] and list(iter_rows(str(tmp_path), CLIPS)) == []


def test_legacy_single_files_are_read_and_moved_on_resume(tmp_path: Path) -> None:
    rows = [row(s) for s in range(5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "clips.jsonl").write_text("".join(json.dumps({"step": s, "clip_ids": [str(s)]}) + "\n" for s in range(5)))
    assert read_metrics(str(tmp_path)) == rows
    run(str(tmp_path), range(3, 6), sync_every=100, steps_done=3, loss=0.25)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "clips.jsonl").exists()
    assert names(tmp_path, METRICS) == ["00000000.jsonl", "00000003.jsonl"]
    assert [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path))] == [(0, 1.0), (1, 1.0), (2, 1.0),
                                                                           (3, 0.25), (4, 0.25), (5, 0.25)]
    # A crash between writing segment 0 and deleting the legacy file: the stale copy is not read twice.
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["step"] for r in read_metrics(str(tmp_path))] == list(range(6))
    RunLog(str(tmp_path), 6, tensorboard=False).close()
    assert not (tmp_path / "metrics.jsonl").exists() and len(read_metrics(str(tmp_path))) == 6


def test_unfinished_last_line_is_skipped_and_a_bad_line_is_named(tmp_path: Path) -> None:
    seg = tmp_path / METRICS / "00000000.jsonl"
    seg.parent.mkdir()
    seg.write_text(json.dumps(row(0)) + "\n" + json.dumps(row(1)) + "\n" + '{"step": 2, "lo')  # writer died mid-line
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [0, 1]
    RunLog(str(tmp_path), 2, tensorboard=False).close()  # the resume trims the unfinished line away
    assert seg.read_text().endswith("\n") and len(seg.read_text().splitlines()) == 2
    (tmp_path / METRICS / "00000002.jsonl").write_text(json.dumps(row(2)) + "\nnot json\n")
    with pytest.raises(ValueError, match=r"00000002\.jsonl: line 2 is not JSON"):
        read_metrics(str(tmp_path))
    # Debris of an interrupted atomic write is not a segment.
    (tmp_path / METRICS / "00000002.jsonl").unlink()
    (tmp_path / METRICS / f"00000002.jsonl{storage.TMP_MARK}ab12cd34").write_text("half")
    assert len(read_metrics(str(tmp_path))) == 2


def test_summary_and_digest_stream_the_rows(tmp_path: Path) -> None:
    run(str(tmp_path), range(1000), sync_every=128)
    rows = read_metrics(str(tmp_path))
    s = summarize(str(tmp_path))
    assert s["steps"] == 1000 and s["tokens"] == sum(r["tokens"] for r in rows)
    assert s["tokens_per_s"] == pytest.approx(s["tokens"] / 500.0)
    assert s["data_wait_fraction"] == pytest.approx(50.0 / 550.0)
    digest = MetricsDigest(max_points=16)
    for r in rows:
        digest.add({**r, "loss": float(r["step"])})
    points = digest.points
    assert digest.num_rows == 1000 and digest.last["step"] == 999
    assert 16 <= len(points) <= 32 and points[-1]["step"] == 999
    # Every point but the last covers the same number of consecutive steps, early ones included.
    assert len({p["rows"] for p in points[:-1]}) == 1 and points[-1]["rows"] <= points[0]["rows"]
    assert sum(p["rows"] for p in points) == 1000 and points[0]["step"] == points[0]["rows"] - 1
    assert points[0]["loss"] == pytest.approx((points[0]["rows"] - 1) / 2)  # mean of steps 0 .. rows-1
    assert sum(p["loss"] * p["rows"] for p in points) == pytest.approx(sum(range(1000)))
    assert MetricsDigest.of_run(str(tmp_path)).num_rows == 1000


def test_s3_run_dir_uploads_each_segment_once(s3_env: dict, tmp_path: Path) -> None:
    fs = s3fs()
    fs.create_dir("runlog")
    uri = "s3://runlog/run"
    puts: list[str] = []
    real_put, real_write = storage.put_file_atomic, storage.write_bytes_atomic

    def put(local: str, dst: str) -> None:
        puts.append(dst)
        real_put(local, dst)

    def write(dst: str, data: bytes) -> None:
        puts.append(dst)
        real_write(dst, data)

    with mock.patch.object(storage, "put_file_atomic", put), mock.patch.object(storage, "write_bytes_atomic", write):
        log = run(uri, range(10), sync_every=4, tensorboard=True)
        # Three syncs (steps 4, 8 and the close at 10), each putting its new segments and event file once.
        assert len(puts) == len(set(puts)) == 9, puts
        assert not list(log.local_dir.glob("**/*")) and not log.local_dir.exists()  # staging cleaned up
        assert [r["step"] for r in read_metrics(uri)] == list(range(10))
        puts.clear()
        time.sleep(1.1)  # event file names start with the second they were opened: TensorBoard's order
        run(uri, range(6, 9), sync_every=4, steps_done=6, loss=0.5, tensorboard=True)
        # The resume rewrote segment 4 (steps 4, 5) only; segments 6 and 8 and one event file are new.
        assert sorted(p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1][:8] for p in puts if "tensorboard" not in p) == [
            "clips/00000004", "clips/00000006", "clips/00000008", "metrics/00000004", "metrics/00000006",
            "metrics/00000008"]
    metrics = read_metrics(uri)
    assert [(r["step"], r["loss"]) for r in metrics] == [(s, 1.0) for s in range(6)] + [(s, 0.5) for s in range(6, 9)]
    assert [r["clip_ids"][2] for r in iter_rows(uri, CLIPS)] == [f"c{s}-2" for s in range(9)]
    # TensorBoard: one event file per sync; the resumed run's purge_step hides the redone steps' old events.
    events = tmp_path / "tb"
    events.mkdir()
    infos = fs.get_file_info(pafs.FileSelector("runlog/run/tensorboard"))
    for info in infos:
        (events / info.base_name).write_bytes(fs.open_input_stream(info.path).read())
    assert len(infos) == 3 + 2
    loss = tensorboard_scalars(events)["train/loss"]
    assert sorted(loss) == list(range(9)) and [loss[s] for s in (5, 6, 7, 8)] == [1.0, 0.5, 0.5, 0.5]


def test_segment_names_grow_past_eight_digits() -> None:
    assert runlog.segment_name(METRICS, 123_456_789) == "metrics/123456789.jsonl"
    assert runlog._SEGMENT.match("123456789.jsonl")


def test_runlog_bench_uploads_each_byte_once() -> None:
    """tests/bench/runlog.py at a small size: the uploads over a run equal what is stored (no
    segment re-uploaded), a late sync uploads only its own interval, a resume reads one segment."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "tests/bench/runlog.py", "--steps", "400", "--checkpoint-every", "50",
                          "--clip-ids", "16"], cwd=root, capture_output=True, text=True, timeout=300, check=True)
    figures = json.loads(out.stdout)
    assert figures["run"]["put_mb"] == pytest.approx(figures["stored_mb"], abs=0.02)
    assert figures["run"]["put_calls"] == 3 * 8  # metrics, clips, one event file per sync
    assert figures["last_sync"]["put_mb"] < figures["stored_mb"] / 6
    assert figures["resume"]["read_calls"] == 2 and figures["resume"]["read_mb"] < figures["stored_mb"] / 6


def test_staging_folders_of_dead_processes_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = tmp_path / f"{runlog.STAGING}{int(dead.stdout)}-abc"
    mine = tmp_path / f"{runlog.STAGING}{os.getpid()}-def"
    for folder in (gone, mine):
        (folder / "metrics").mkdir(parents=True)
        (folder / "metrics" / "00000000.jsonl").write_text("{}\n")
    with mock.patch.object(storage, "is_local", lambda uri: False):
        log = RunLog(str(tmp_path / "run"), 0, tensorboard=False)
    assert not gone.exists() and mine.exists() and log.local_dir.parent == tmp_path
    log.close()
