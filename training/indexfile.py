"""A node-local copy of a ShardIndex's columns, memory-mapped by every worker of the node.

Each training worker needs the whole clip index (its step plan is global). Built per worker,
that is one private copy per GPU — ~210 MB of RSS per 1M clips, ~20 GB per worker at 100M
clips, 8 workers a node — and one read of the index per worker. Here the first worker of a node
builds the sorted columns under a file lock and writes them as uncompressed Arrow IPC files;
every worker then memory-maps them, so the node holds one copy in its page cache and reads the
index once. A file is written under a temporary name and renamed, clip columns last: a crash
leaves no half file, and the next worker builds it again. A disk that cannot take the files
(full, read-only) costs memory, not the run: that worker keeps its own copy, with a warning.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from pipeline.logs import get_logger
from training.cache import file_lock

log = get_logger("training")

STALE_S = 7 * 86400  # index files of other data left this long unused are removed by the next build


def load_or_build(folder: Path, key: str, build: Callable[[], tuple[pa.Table, pa.Table]]) -> tuple[pa.Table, pa.Table]:
    """(clips, files) tables memory-mapped from `folder`, built by `build` first if no worker has."""
    folder.mkdir(parents=True, exist_ok=True)
    clips_path, files_path = folder / f"index-{key}.clips.arrow", folder / f"index-{key}.files.arrow"
    with file_lock(folder / f"index-{key}.lock"):
        if not clips_path.is_file():
            clips, files = build()
            try:
                _write(files_path, files)
                _write(clips_path, clips)  # last: its presence says both are complete
            except OSError as e:  # a full or read-only disk: train on a private copy rather than not at all
                log.warning("could not write the node's shared clip index to %s (%s): this worker keeps its "
                            "own copy in memory", folder, e)
                return clips, files
            del clips, files
            _remove_stale(folder, key)
    return _map(clips_path), _map(files_path)


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
    """Index files of other keys unused for STALE_S (a process that still maps one keeps its pages)."""
    now = time.time()
    for entry in folder.glob("index-*"):
        if keep in entry.name:
            continue
        try:
            if now - entry.stat().st_atime > STALE_S and now - entry.stat().st_mtime > STALE_S:
                entry.unlink()
        except FileNotFoundError:
            pass
