"""A node-local copy of a ShardIndex's columns, memory-mapped by every worker of the node.

Each training worker needs the whole clip index (its step plan is global). Built per worker,
that is one private copy per GPU — ~210 MB of RSS per 1M clips, ~20 GB per worker at 100M
clips, 8 workers a node — and one read of the index per worker. Here the first worker of a node
builds the sorted columns under an exclusive flock and writes them as uncompressed Arrow IPC
files; every worker then memory-maps them, so the node holds one copy in its page cache and reads
the index once. A file is written under a temporary name and renamed, clip columns last: a crash
leaves no half file, and the next worker builds it again.

A worker keeps a shared flock on the key's lock file for as long as it maps the files, so the
clean-up of other data's stale files (by the next build on the node) never removes files in
use. Building takes an exclusive flock on a second file, held only while building: a worker
never waits for an exclusive lock on the file others hold shared for the whole run (converting
that shared lock to exclusive deadlocked when two workers found the index missing at once —
the builder took its shared lock back first and kept it). A folder that cannot hold the files or the lock (full, read-only, no flock) costs memory,
not the run: that worker keeps its own copy, with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pyarrow as pa

from pipeline.logs import get_logger

log = get_logger("training")

STALE_S = 7 * 86400  # files of other data unused (unlocked, unopened) this long go with the next build


def load_or_build(folder: Path, key: str, build: Callable[[], tuple[pa.Table, pa.Table]]
                  ) -> tuple[pa.Table, pa.Table, IO | None]:
    """(clips, files, lock): the tables memory-mapped from `folder` — built by `build` first if no
    worker has — and the lock file to keep open while they are in use (None: a private copy).
    Errors of `build` itself are the caller's; the folder's only cost the sharing."""
    clips_path, files_path = folder / f"index-{key}.clips.arrow", folder / f"index-{key}.files.arrow"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f"index-{key}.lock", "a+b")  # noqa: SIM115 — held for the index's lifetime
        fcntl.flock(lock, fcntl.LOCK_SH)
    except OSError as e:  # read-only or missing disk, no flock on this filesystem
        _warn(folder, e)
        return (*build(), None)
    try:
        if not clips_path.is_file():
            with open(folder / f"index-{key}.build", "a+b") as builder:
                fcntl.flock(builder, fcntl.LOCK_EX)  # one builder per node; the others wait here, briefly
                if not clips_path.is_file():
                    clips, files = build()
                    try:
                        _write(files_path, files)
                        _write(clips_path, clips)  # last: its presence says both are complete
                    except OSError as e:  # a full disk
                        _warn(folder, e)
                        lock.close()
                        return clips, files, None
                    del clips, files
                    _remove_stale(folder, key)
        with contextlib.suppress(OSError):
            os.utime(clips_path)  # in use, so not stale (mapping a file does not touch its times)
        return _map(clips_path), _map(files_path), lock
    except BaseException:
        lock.close()
        raise


def _warn(folder: Path, error: OSError) -> None:
    log.warning("could not share the clip index through %s (%s): this worker keeps its own copy in memory",
                folder, error)


def _write(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _map(path: Path) -> pa.Table:
    """Zero-copy: the columns point into the mapped file (pages shared by every process mapping it)."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def _remove_stale(folder: Path, keep: str) -> None:
    """Data files of other keys untouched for STALE_S whose lock nobody holds (no worker maps them)."""
    now = time.time()
    for lock_path in folder.glob("index-*.lock"):
        other = lock_path.name[len("index-"):-len(".lock")]
        clips_path = folder / f"index-{other}.clips.arrow"
        if other == keep:
            continue
        try:
            if now - clips_path.stat().st_mtime < STALE_S:
                continue
        except FileNotFoundError:
            pass
        try:
            with open(lock_path, "a+b") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held (shared) by every worker mapping them
                clips_path.unlink(missing_ok=True)  # first: without it the pair reads as incomplete
                (folder / f"index-{other}.files.arrow").unlink(missing_ok=True)
                (folder / f"index-{other}.build").unlink(missing_ok=True)
        except (BlockingIOError, OSError):
            continue
