"""Rank 0's run log — per-step metrics, the clip ids of each step, TensorBoard — and its readers.

Layout in the run dir (local/NFS path or s3:// / gs:// URI):

    metrics/NNNNNNNN.jsonl     one row per step (loss, lr, tokens/s, MFU, data wait, memory, ...)
    clips/NNNNNNNN.jsonl       {"step", "epoch", "clip_ids"} per step (run.log_clip_ids)
    tensorboard/events.out.tfevents.*

NNNNNNNN is the step of a segment's first row; a segment holds the steps before the next
segment's first. `sync()` (every checkpoint, and the end) closes the open segments and a new
one starts with the next row, so segment boundaries follow checkpoints.

Why segments: object stores cannot append, and at production size the log is large — 500k
steps × 2,048 clip ids is ~25 GB of clip ids, 1,000 checkpoints. One growing file re-uploaded
at each checkpoint costs quadratic bytes (~12 TB), and a resume that reads and rewrites it
holds it in memory. Here every byte is uploaded once (a closed segment is put and its local
staging copy deleted), a resume deletes the segments it will redo and rewrites at most one
(the last one before the resumed step), and readers stream one segment at a time.

Runs from before this layout have one `metrics.jsonl` / `clips.jsonl`: readers take it as the
segment at step 0, and the first resume moves it there.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pipeline import storage
from pipeline.lease import pid_alive

METRICS = "metrics"
CLIPS = "clips"
KINDS = (METRICS, CLIPS)
LEGACY = {METRICS: "metrics.jsonl", CLIPS: "clips.jsonl"}
TB_DIR = "tensorboard"
TB_SCALARS = ("loss", "grad_norm", "lr", "tokens_per_s", "clips_per_s", "mfu", "data_wait_fraction",
              "peak_memory_gb")
_SEGMENT = re.compile(r"^(\d{8,})\.jsonl$")  # skips debris such as half-written `*.tmp-*` files


def segment_name(kind: str, first_step: int) -> str:
    return f"{kind}/{first_step:08d}.jsonl"


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def segments(run_uri: str, kind: str) -> list[tuple[int, str]]:
    """(first step, uri) of each segment of `kind`, in step order; the legacy file counts as step 0."""
    found = {}
    for rel in storage.list_relative(run_uri, kind):
        match = _SEGMENT.match(rel.rsplit("/", 1)[-1])
        if match and rel.count("/") == 1:
            found[int(match[1])] = storage.join(run_uri, rel)
    legacy = storage.join(run_uri, LEGACY[kind])
    if 0 not in found and storage.exists(legacy):
        found[0] = legacy
    return sorted(found.items())


def parse_lines(data: bytes, uri: str) -> list[tuple[dict[str, Any], bytes]]:
    """The (row, raw line) pairs of a JSON-lines file. A last line without its newline is a write
    the writer did not finish (a crash, or a reader racing a local writer): skipped."""
    lines = data.split(b"\n")
    out = []
    for number, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            out.append((json.loads(line), line + b"\n"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{uri}: line {number} is not JSON ({e.msg}): {line[:80]!r}") from None
    return out


def iter_rows(run_uri: str, kind: str = METRICS) -> Iterator[dict[str, Any]]:
    """A run's rows of `kind` in step order, one segment in memory at a time."""
    for _, uri in segments(run_uri, kind):
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:  # deleted by a resume since the listing: its rows are being redone
            continue
        for row, _ in parse_lines(data, uri):
            yield row


def read_metrics(run_uri: str) -> list[dict[str, Any]]:
    """All metrics rows of a run (empty when there are none yet): for small runs and tests;
    `summarize` and `MetricsDigest` read a long run in bounded memory."""
    return list(iter_rows(run_uri, METRICS))


def summarize(run_uri: str) -> dict[str, Any]:
    """The training summary's figures from the metrics rows, streamed."""
    steps = tokens = 0
    step_s = wait_s = 0.0
    first, last = [], []
    for row in iter_rows(run_uri, METRICS):
        steps += 1
        tokens += row["tokens"]
        step_s += row["step_s"]
        wait_s += row["data_wait_s"]
        if len(first) < 5:
            first.append(row["loss"])
        last = (last + [row["loss"]])[-5:]
    return {"steps": steps, "tokens": tokens,
            "loss_first5": sum(first) / max(1, len(first)), "loss_last5": sum(last) / max(1, len(last)),
            "tokens_per_s": tokens / max(1e-9, step_s), "data_wait_fraction": wait_s / max(1e-9, wait_s + step_s)}


@dataclass
class MetricsDigest:
    """A run's metrics for reports in bounded memory: the row count, the last row, and the loss
    curve as at most 2·max_points points, each the mean of `stride` consecutive rows (lr at
    the last of them); the stride doubles whenever the points reach 2·max_points, so every point
    covers the same number of rows, whatever the run's length."""

    num_rows: int = 0
    last: dict[str, Any] | None = None
    max_points: int = 2000
    stride: int = 1
    _done: list[dict[str, Any]] = field(default_factory=list, repr=False)
    _open: list[float] = field(default_factory=list, repr=False)  # [loss sum, rows] of the point being filled
    _open_row: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def of_run(cls, run_uri: str, max_points: int = 2000) -> MetricsDigest:
        digest = cls(max_points=max_points)
        for row in iter_rows(run_uri, METRICS):
            digest.add(row)
        return digest

    @property
    def points(self) -> list[dict[str, Any]]:
        """{"step", "loss", "lr", "rows"} per point, in step order; the last may hold fewer rows."""
        tail = []
        if self._open:
            total, n = self._open
            tail = [{"step": self._open_row["step"], "loss": total / n, "lr": self._open_row.get("lr"), "rows": n}]
        return self._done + tail

    def add(self, row: dict[str, Any]) -> None:
        self.num_rows += 1
        self.last = row
        if row.get("loss") is None:
            return
        total, n = self._open or (0.0, 0)
        self._open, self._open_row = [total + row["loss"], n + 1], row
        if n + 1 < self.stride:
            return
        self._done.append({"step": row["step"], "loss": (total + row["loss"]) / self.stride, "lr": row.get("lr"),
                           "rows": self.stride})
        self._open = []
        if len(self._done) >= 2 * self.max_points:  # halve: each pair of equal points becomes one
            self._done = [{"step": b["step"], "loss": (a["loss"] + b["loss"]) / 2, "lr": b["lr"], "rows": a["rows"] * 2}
                          for a, b in zip(self._done[0::2], self._done[1::2])]
            self.stride *= 2


# ---------------------------------------------------------------------------
# Resume: drop the rows of steps that will be redone
# ---------------------------------------------------------------------------


def truncate(run_uri: str, kind: str, steps_done: int) -> None:
    """Keep only rows of steps < steps_done: delete the segments that start at or after it, rewrite
    at most the one before (rows in a segment precede the next segment's first step). A legacy
    single file becomes segment 0 first. Idempotent, so a crash part-way is finished by the next
    resume."""
    legacy = storage.join(run_uri, LEGACY[kind])
    first_uri = storage.join(run_uri, segment_name(kind, 0))
    if storage.exists(legacy):
        if not storage.exists(first_uri):  # written before the legacy file goes: never both lost
            storage.write_bytes_atomic(first_uri, storage.read_bytes(legacy))
        storage.delete_file(legacy)
    found = segments(run_uri, kind)
    for first, uri in found:
        if first >= steps_done:
            storage.delete_file(uri)
    before = [uri for first, uri in found if first < steps_done]
    if not before:
        return
    uri = before[-1]
    rows = parse_lines(data := storage.read_bytes(uri), uri)
    kept = b"".join(line for row, line in rows if row["step"] < steps_done)
    if kept != data:
        storage.write_bytes_atomic(uri, kept) if kept else storage.delete_file(uri)


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


STAGING = "ditharos-run-"  # + pid: a remote run dir's local staging folder, in the temp folder


def remove_dead_staging() -> None:
    """Staging folders of rank-0 processes that died (killed, a worker group restarted): whatever
    they held was either uploaded or belongs to steps a resume redoes."""
    for folder in Path(tempfile.gettempdir()).glob(f"{STAGING}*-*"):
        pid = folder.name[len(STAGING):].split("-")[0]
        if not (pid.isdigit() and pid_alive(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)


class _Segment:
    """The open segment of one kind: a local file (in the run dir, or staged for an object store)."""

    def __init__(self, path: Path, uri: str, remote: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.uri, self.remote = path, uri, remote
        self.file: TextIO = path.open("a")

    def close(self) -> None:
        """Close; for an object store upload once (atomic: the object appears complete) and drop the copy."""
        self.file.close()
        if self.remote:
            storage.put_file_atomic(str(self.path), self.uri)
            self.path.unlink()


class RunLog:
    """Rank 0's metrics / clips / TensorBoard writer for a (possibly remote) run dir."""

    def __init__(self, run_uri: str, steps_done: int, tensorboard: bool) -> None:
        self.run_uri = run_uri
        self.remote = not storage.is_local(run_uri)
        # Local/NFS: write in the run dir itself; object store: a local staging folder.
        if self.remote:
            remove_dead_staging()
            self.local_dir = Path(tempfile.mkdtemp(prefix=f"{STAGING}{os.getpid()}-"))
        else:
            self.local_dir = Path(storage.resolve(run_uri)[1])
        self.local_dir.mkdir(parents=True, exist_ok=True)
        for kind in KINDS:
            truncate(run_uri, kind, steps_done)
        self._open: dict[str, _Segment] = {}
        self.tensorboard = tensorboard
        self._tb = None
        # purge_step (first writer only) hides events of steps ≥ steps_done an interrupted run wrote.
        self._purge_step = steps_done or None

    def _append(self, kind: str, step: int, row: dict[str, Any]) -> None:
        seg = self._open.get(kind)
        if seg is None:
            name = segment_name(kind, step)
            seg = self._open[kind] = _Segment(self.local_dir / name, storage.join(self.run_uri, name), self.remote)
        seg.file.write(json.dumps(row) + "\n")
        seg.file.flush()

    def write(self, row: dict[str, Any], clip_ids: list[str] | None = None) -> None:
        step = row["step"]
        self._append(METRICS, step, row)
        if clip_ids is not None:
            self._append(CLIPS, step, {"step": step, "epoch": row["epoch"], "clip_ids": clip_ids})
        if self.tensorboard:
            self._scalars(row)

    def _scalars(self, row: dict[str, Any]) -> None:
        if self._tb is None:
            from tensorboardX import SummaryWriter  # ships with ray[train]

            # Remote: one event file per segment (a closed file is uploaded once), named by its first step.
            suffix = f".{row['step']:08d}" if self.remote else ""
            self._tb = SummaryWriter(str(self.local_dir / TB_DIR), purge_step=self._purge_step, filename_suffix=suffix)
            self._purge_step = None
        for key in TB_SCALARS:
            value = row.get(key)
            if value is not None and math.isfinite(value):
                self._tb.add_scalar(f"train/{key}", value, row["step"])

    def sync(self) -> None:
        """Close the open segments — uploading them when the run dir is remote — so the stored log
        covers every step written so far; the next row starts new segments."""
        for seg in self._open.values():
            seg.close()
        self._open.clear()
        if self._tb is None:
            return
        if not self.remote:
            self._tb.flush()
            return
        self._tb.close()
        self._tb = None
        for path in sorted(p for p in (self.local_dir / TB_DIR).rglob("*") if p.is_file()):
            rel = path.relative_to(self.local_dir).as_posix()
            storage.put_file_atomic(str(path), storage.join(self.run_uri, rel))
            path.unlink()

    def close(self) -> None:
        self.sync()
        if self._tb is not None:
            self._tb.close()
        if self.remote:
            shutil.rmtree(self.local_dir, ignore_errors=True)
