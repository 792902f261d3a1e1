"""Input listing at corpus scale: folders listed by parallel tasks, or a listing file.

Two ways in, both ending as rows `{uri, size_bytes, mtime_ns, sniffed, sidecars, source_meta,
candidate, reason}` that stream into the job (the driver never holds the corpus):

* **A folder or prefix** (local, s3://, gs://). The driver lists only its top level; each
  sub-folder becomes one task that lists its subtree recursively, classifies files (video by
  extension, or by sniffing the first bytes) and attaches sidecar captions from the same
  folder. A flat prefix of millions of objects is one task: index such corpora with a listing
  file instead. Object-store cost: one LIST request per 1,000 objects, plus one 4 KB ranged
  GET per file whose extension is not a video's (when sniffing is on).
* **A listing file** (`.parquet`, `.jsonl`, `.csv`): one row per source with a `uri` column
  (absolute, or relative to the listing file's folder), optional `caption` (a string or a
  list of strings) and optional `size_bytes` / `mtime_ns`; every other column is kept as the
  source's metadata (JSON in the clip index). Rows without a size are stat-ed by the task that
  handles them. Read by Ray Data in parallel blocks.

Non-video files in a folder become rows with `candidate=False` and the reason; the job
commits them as `discover` rejects, so a re-run skips them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline import storage
from pipeline.discover import (SIDECAR_EXTENSIONS, SNIFF_BYTES, TAR_SNIFFED, InputConfig, is_tar, media_extensions,
                               read_sidecar, sniff_other, sniffed_media, sniffs)

Row = dict[str, Any]
LISTING_SUFFIXES = (".parquet", ".jsonl", ".csv")
LISTING_KNOWN = ("uri", "caption", "size_bytes", "mtime_ns")


class InputError(ValueError):
    """The input cannot be read as a folder of videos or a listing file."""


def listing_format(uri: str) -> str | None:
    """'parquet' | 'jsonl' | 'csv' when `uri` names a listing file, else None (a folder or a video)."""
    suffix = PurePosixPath(uri.rstrip("/")).suffix.lower()
    return suffix.lstrip(".") if suffix in LISTING_SUFFIXES else None


def check_input(uri: str) -> str:
    """Before Ray starts: the input exists and is usable. Returns 'folder', 'file' or the listing format."""
    try:
        fs, path = storage.resolve(uri)
        info = fs.get_file_info(path)
    except (OSError, ValueError) as e:
        raise InputError(f"input {uri!r} cannot be read: {e}") from None
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input {uri!r} does not exist")
    if info.type == pafs.FileType.Directory:
        return "folder"
    fmt = listing_format(uri)
    if fmt is None:
        return "file"
    columns = listing_columns(uri, fmt)
    if "uri" not in columns:
        raise InputError(f"listing file {uri!r} has no 'uri' column (columns: {columns}); "
                         f"a listing needs 'uri' and may have {list(LISTING_KNOWN[1:])} and any metadata")
    return fmt


def listing_columns(uri: str, fmt: str) -> list[str]:
    """Column names of a listing file, from its schema / first line / header only."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            fs, path = storage.resolve(uri)
            return list(pq.read_schema(path, filesystem=fs).names)
        head = storage.read_bytes(uri, 1 << 16).decode("utf-8", errors="replace")
        first = head.splitlines()[0] if head.strip() else ""
        if fmt == "jsonl":
            row = json.loads(first) if first else {}
            if not isinstance(row, dict):
                raise InputError(f"listing file {uri!r}: each line must be a JSON object, got {first[:80]!r}")
            return list(row)
        return [c.strip() for c in first.split(",")] if first else []
    except (OSError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"listing file {uri!r} cannot be read as {fmt}: {e}") from None


# ---------------------------------------------------------------------------
# Folders: the driver lists the top level, tasks list subtrees
# ---------------------------------------------------------------------------


def folder_tasks(uri: str, exclude: str = "") -> list[Row]:
    """One task per top-level sub-folder (recursive) plus one for the top level's own files."""
    fs, root = storage.resolve(uri)
    tasks = [{"prefix": storage.to_uri(fs, root), "recursive": False}]
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.type == pafs.FileType.Directory and not _excluded(storage.to_uri(fs, info.path), exclude):
            tasks.append({"prefix": storage.to_uri(fs, info.path), "recursive": True})
    return tasks


def list_folder(cfg: InputConfig, uri: str, exclude: str = "") -> list[Row]:
    """Every listing row of a folder in this process: for small folders (eval sets, tests)."""
    list_fn = make_list_fn(cfg, exclude)
    return [row for task in folder_tasks(uri, exclude) for row in list_fn(task)]


def _excluded(uri: str, exclude: str) -> bool:
    return bool(exclude) and (uri == exclude or uri.startswith(exclude.rstrip("/") + "/"))


def make_list_fn(cfg: InputConfig, exclude: str = "") -> Callable[[Row], Iterator[Row]]:
    """Task row {prefix, recursive} → listing rows for every file below it."""

    def list_prefix(task: Row) -> Iterator[Row]:
        fs, path = storage.resolve(task["prefix"])
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=bool(task["recursive"])))
        files = sorted((storage.to_uri(fs, i.path), i.size, i.mtime_ns or -1) for i in infos
                       if i.type == pafs.FileType.File and not _excluded(storage.to_uri(fs, i.path), exclude)
                       and storage.TMP_MARK not in i.base_name)
        yield from classify(cfg, files)

    return list_prefix


def classify(cfg: InputConfig, files: list[tuple[str, int, int]]) -> Iterator[Row]:
    """(uri, size, mtime_ns) of the files of whole folders → listing rows, sidecars attached."""
    exts = media_extensions(cfg)
    videos, others = [], []
    for uri, size, mtime in files:
        if is_tar(uri, cfg):  # expanded into its members by a task of its own (pipeline/tars.py)
            yield listing_row(uri, size, mtime, sniffed=TAR_SNIFFED)
            continue
        suffix = PurePosixPath(uri).suffix.lower()
        head = storage.read_bytes(uri, SNIFF_BYTES) if sniffs(cfg, suffix, exts) and size else b""
        sniffed = sniffed_media(cfg, suffix, exts, head)
        if suffix in exts or sniffed:
            videos.append((uri, size, mtime, sniffed))
        else:
            others.append((uri, size, mtime, head))
    by_stem: dict[str, list[str]] = {}
    if cfg.use_sidecars:
        for uri, *_ in others:
            if PurePosixPath(uri).suffix.lower() in SIDECAR_EXTENSIONS:
                by_stem.setdefault(str(PurePosixPath(uri).with_suffix("")), []).append(uri)
    used: set[str] = set()
    for uri, size, mtime, sniffed in videos:
        captions: list[str] = []
        for side in sorted(by_stem.get(str(PurePosixPath(uri).with_suffix("")), [])):
            captions += read_sidecar(side, cfg.max_sidecar_bytes)
            used.add(side)
        yield listing_row(uri, size, mtime, sniffed=sniffed, sidecars=captions)
    for uri, size, mtime, head in others:
        if uri not in used:
            yield listing_row(uri, size, mtime, candidate=False,
                              reason=f"not a video: {sniff_other(head) if size else 'empty file'}")


# The columns of listing_row, typed: every block of the listing is cast to it, so an empty block
# (a folder with no files, an empty shuffle partition) cannot carry null-typed columns into a
# shuffle, whose reduce step concatenates blocks and needs one schema.
LISTING_SCHEMA = pa.schema([("uri", pa.string()), ("size_bytes", pa.int64()), ("mtime_ns", pa.int64()),
                            ("sniffed", pa.string()), ("sidecars", pa.string()), ("source_meta", pa.string()),
                            ("candidate", pa.bool_()), ("reason", pa.string())])


def listing_row(uri: str, size_bytes: int, mtime_ns: int, *, sniffed: str = "", sidecars: list[str] = (),
                source_meta: dict[str, Any] | None = None, candidate: bool = True, reason: str = "") -> Row:
    return {"uri": uri, "size_bytes": int(size_bytes), "mtime_ns": int(mtime_ns), "sniffed": sniffed,
            "sidecars": json.dumps(list(sidecars)), "source_meta": json.dumps(source_meta or {}, sort_keys=True),
            "candidate": candidate, "reason": reason}


# ---------------------------------------------------------------------------
# Listing files: Ray Data reads the rows; this turns each into a listing row
# ---------------------------------------------------------------------------


def make_listing_row_fn(listing_uri: str, cfg: InputConfig) -> Callable[[Row], Row]:
    """A listing-file record → listing row (relative URIs resolved, size/mtime stat-ed if absent;
    a .tar is marked for expansion into its members)."""
    base = storage.canonical(listing_uri).rsplit("/", 1)[0]

    def to_row(rec: Row) -> Row:
        raw = rec.get("uri")
        if raw is None or str(raw).strip() == "":
            return listing_row(f"{listing_uri}#<row without uri>", -1, -1, candidate=False,
                               reason="listing row has an empty 'uri'")
        uri = str(raw).strip()
        if "://" not in uri and not uri.startswith("/"):
            uri = storage.join(base, uri)
        captions = rec.get("caption")
        if captions is None or (isinstance(captions, float) and captions != captions):  # None / NaN
            captions = []
        elif isinstance(captions, str):
            captions = [captions]
        captions = [str(c).strip() for c in captions if str(c).strip()]
        meta = {k: _plain(v) for k, v in rec.items() if k not in LISTING_KNOWN}
        size, mtime = rec.get("size_bytes"), rec.get("mtime_ns")
        member = storage.member_span(uri)  # a tar member named by its URI (an earlier output's source_uri)
        if size is None or size != size:
            try:
                fs, path = storage.resolve(member[0] if member else uri)
                info = fs.get_file_info(path)
            except (OSError, ValueError) as e:
                return listing_row(uri, -1, -1, candidate=False, reason=f"cannot read file: {e}")
            if info.type != pafs.FileType.File:
                return listing_row(uri, -1, -1, candidate=False, reason="listed file does not exist")
            size, mtime = (member[2] if member else info.size), info.mtime_ns or -1
        mtime = -1 if mtime is None or mtime != mtime else int(mtime)
        if is_tar(uri, cfg):
            return listing_row(uri, int(size), mtime, sniffed=TAR_SNIFFED, source_meta=meta)
        return listing_row(uri, int(size), mtime, sidecars=captions, source_meta=meta)

    return to_row


def _plain(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, float) and v != v:
        return None
    return v
