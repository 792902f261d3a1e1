"""Which clips a dataset holds and where: the columnar clip list, lazily opened shards, launch checks.

`ShardIndex.open` reads the pipeline's clip index (Parquet, a few columns) — never a shard —
and keeps one row per clip in numpy / Arrow columns: at 1M clips that is ~60 MB, where a
Python object per clip was ~600 MB and several seconds to build. Shards are opened (memory-
mapped when local, through `pipeline.shards.read_shard`, the one shard reader) the first time
one of their clips is loaded, checked against their committed size (and sha256 with verify),
and kept in an LRU bounded by count and bytes, so 100k+ shard files stay far from Linux's
default `vm.max_map_count` of 65,530.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline import storage
from pipeline.manifest import INDEX_SCHEMA, ManifestError, read_manifest, stream_index
from pipeline.shards import REDO, RowReader, ShardError, as_float32, missing_shard, read_shard, resized_shard
from pipeline.state import check_shards
from training.cache import ShardCache
from training.clipreads import ClipLoc, ClipReads
from training.indexfile import load_or_build
from training.packing import Patch, num_patches

class DataError(ValueError):
    """The data cannot be trained on as configured; retrying the workers would fail the same way."""


# Raised by a worker, these stop the run (training/train.py) instead of restarting the workers.
DATA_ERRORS = (ShardError, ManifestError, DataError)
# What ShardIndex keeps of the index besides its own columns, when asked (eval's real clips).
SCALAR_COLUMNS = ("split", "caption", "width_px", "height_px", "num_frames", "clip_score")


@dataclass(frozen=True)
class ClipRef:
    """Where one clip lives and how many tokens it packs into."""

    clip_id: str
    bucket: str
    file: int  # index into ShardIndex.files
    row: int
    num_tokens: int
    position: int = -1  # in the index (ClipList order); -1: made elsewhere


class ClipList(Sequence):
    """`index.clips[i]` → ClipRef, made on demand from the columns (no object per clip is kept)."""

    def __init__(self, index: ShardIndex) -> None:
        self._index = index

    def __len__(self) -> int:
        return len(self._index.num_tokens)

    def __getitem__(self, i: int | slice) -> ClipRef | list[ClipRef]:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        x = self._index
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"clip {i} of {len(self)}")
        return ClipRef(x.clip_ids[i].as_py(), x.bucket_names[x.bucket_code[i]], int(x.file_of[i]), int(x.row_of[i]),
                       int(x.num_tokens[i]), i if i >= 0 else i + len(self))

    def __iter__(self) -> Iterator[ClipRef]:
        return (self[i] for i in range(len(self)))


class ShardIndex:
    """Every clip of a dataset (optionally one split), sorted by clip_id; shards opened lazily, LRU-bounded."""

    def __init__(self, data_uri: str, manifest: dict[str, Any], patch: Patch, max_open_shards: int = 512,
                 max_open_bytes: int = 16 << 30, verify: bool = False) -> None:
        self.data_uri = data_uri
        self.manifest = manifest
        self.patch = tuple(patch)
        self.max_open_shards, self.max_open_bytes = max_open_shards, max_open_bytes
        self.verify = verify  # also check each shard's sha256 when it is first opened (reads it whole)
        # One entry per clip, sorted by clip_id:
        self.clip_ids: pa.Array = pa.array([], pa.string())
        self.bucket_code = np.zeros(0, np.int32)  # → bucket_names
        self.file_of = np.zeros(0, np.int32)  # → files
        self.row_of = np.zeros(0, np.int64)
        self.num_tokens = np.zeros(0, np.int64)
        self.num_frames = np.zeros(0, np.int64)  # 1 = an image (or a 1-frame clip of a video)
        # Remote data only: each clip's record batch byte range (-1: not in the index, older data)
        self.batch_offset = np.zeros(0, np.int64)
        self.batch_bytes = np.zeros(0, np.int64)
        self.scalars: pa.Table | None = None  # SCALAR_COLUMNS asked for at open, same row order
        self.by_file = np.zeros(0, np.int64)  # clip indices grouped by file, videos first (training/order.py)
        self.bucket_names: list[str] = []
        # One entry per shard file, sorted by path (relative to data_uri):
        self.files: list[str] = []
        self.file_bytes: list[int] = []  # committed size
        self.file_sha256: list[str] = []
        self.file_videos = np.zeros(0, np.int64)  # clips of more than one frame in each file
        self.file_images = np.zeros(0, np.int64)  # 1-frame clips in each file
        # file → (table, {column: (chunk starts, chunk arrays)}); views die with their table
        self._open: OrderedDict[int, tuple[pa.Table, dict[str, tuple[np.ndarray, list[np.ndarray]]]]] = OrderedDict()
        self._open_bytes = 0
        self._verified: set[int] = set()  # files whose sha256 matched (a re-open after eviction skips it)
        self.opened = 0  # shard opens so far (re-opens after eviction count again)
        self.cache: ShardCache | None = None  # remote shards through a node-local cache (use_cache)
        self.clip_reads: ClipReads | None = None  # remote clips one by one, by range (use_clip_reads)
        self._lock = threading.Lock()  # the prefetch thread and the main thread may both open files
        self._shared_lock: IO | None = None  # held while the columns map a node's shared file (indexfile.py)

    @classmethod
    def open(cls, data_uri: str, patch: Patch, split: str | None = "train", max_open_shards: int = 512,
             max_open_bytes: int = 16 << 30, verify: bool = False, scalars: bool = False,
             shared_dir: str | None = None) -> ShardIndex:
        """Read the manifest and list its clips from the clip index; `split=None` keeps every clip.

        No shard is opened here. `scalars=True` also keeps SCALAR_COLUMNS (eval's real clips).
        `shared_dir`: a node-local folder where the node's workers share one memory-mapped copy of
        the columns (training/indexfile.py) instead of each building its own.
        """
        manifest = read_manifest(data_uri)
        index = cls(data_uri, manifest, patch, max_open_shards, max_open_bytes, verify)
        index.bucket_names = sorted(manifest["buckets"])
        tokens = np.zeros(len(index.bucket_names), np.int64)
        for i, bucket in enumerate(index.bucket_names):
            try:
                tokens[i] = math.prod(num_patches(tuple(manifest["buckets"][bucket]["latent_shape"]), index.patch))
            except ValueError as e:
                raise ValueError(f"bucket {bucket!r}: {e}") from None
        remote = not storage.is_local(data_uri)

        def build() -> tuple[pa.Table, pa.Table]:
            clips, files, order, cols = _sorted_tables(data_uri, manifest, split, index.bucket_names, tokens, remote,
                                                       scalars)
            if scalars:
                schema = pa.schema([INDEX_SCHEMA.field(c) for c in SCALAR_COLUMNS])
                index.scalars = pa.Table.from_batches(cols.scalar_batches, schema).take(order)
            return clips, files

        if shared_dir is not None and not scalars:
            key = hashlib.sha256(json.dumps([SHARED_FORMAT, index.fingerprint, storage.canonical(data_uri), split,
                                             list(index.patch), remote]).encode()).hexdigest()[:32]
            clips, files, index._shared_lock = load_or_build(Path(shared_dir), key, build)
        else:
            clips, files = build()
        index._assign(clips, files, remote)
        del clips, files
        # Arrow's allocator keeps the decoded batches' pages for reuse; a worker holds this index
        # for the whole run, so hand them back (1M clips: +325 -> +200 MB of RSS when built here).
        pa.default_memory_pool().release_unused()
        return index

    def _assign(self, clips: pa.Table, files: pa.Table, remote: bool) -> None:
        """Columns from `_sorted_tables`' tables: numpy views of them, no copy (mapped or not)."""
        def one(name: str) -> pa.Array:  # combine_chunks copies even a single chunk
            column = clips[name]
            return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()

        def col(name: str) -> np.ndarray:
            return one(name).to_numpy(zero_copy_only=False)

        self.clip_ids = one("clip_id")
        self.bucket_code, self.file_of, self.row_of = col("bucket_code"), col("file_of"), col("row")
        self.num_frames, self.num_tokens = col("num_frames"), col("num_tokens")
        if remote:
            self.batch_offset, self.batch_bytes = col("batch_offset"), col("batch_bytes")
        self.by_file = col("by_file")
        self.files = files["path"].to_pylist()
        self.file_bytes = files["bytes"].to_pylist()
        self.file_sha256 = files["sha256"].to_pylist()
        self.file_videos, self.file_images = (files[c].to_numpy() for c in ("videos", "images"))

    @property
    def clips(self) -> ClipList:
        return ClipList(self)

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]["data_sha256"]

    @property
    def num_open(self) -> int:
        return len(self._open)

    def smallest_clip(self) -> ClipRef:
        """The clip with the fewest tokens (ties: the smallest clip_id, i.e. the first)."""
        return self.clips[int(np.argmin(self.num_tokens))]

    def _entry(self, file: int) -> tuple[pa.Table, dict]:
        """The open shard (`pipeline.shards.read_shard`: mapped when local), opening it and closing the LRU ones."""
        with self._lock:
            if file in self._open:
                self._open.move_to_end(file)
                return self._open[file]
        table = self._open_checked(file)  # outside the lock: may be slow
        with self._lock:
            if file not in self._open:
                self._open[file] = (table, {})
                self._open_bytes += table.nbytes
                self.opened += 1
                while len(self._open) > 1 and (len(self._open) > self.max_open_shards
                                               or self._open_bytes > self.max_open_bytes):
                    _, (old, _) = self._open.popitem(last=False)  # its map closes with its last reference
                    self._open_bytes -= old.nbytes
            return self._open[file]

    def use_cache(self, cache: ShardCache | None) -> None:
        """Read remote shards through a node-local cache (local data never goes through one)."""
        self.cache = cache if not storage.is_local(self.data_uri) else None

    def use_clip_reads(self, reads: ClipReads | None) -> None:
        """Read remote clips one record batch at a time (a shard without that layout: through the cache)."""
        self.clip_reads = reads if not storage.is_local(self.data_uri) else None

    def prefetch_clips(self, clips: list[int]) -> None:
        """Start fetching these clips (indices into `clips`) by range; no-op without clip reads."""
        if self.clip_reads is None:
            return
        for i in clips:
            self.clip_reads.prefetch(self._loc_of(self.clips[int(i)]))

    def _loc_of(self, clip: ClipRef) -> ClipLoc:
        f, i = clip.file, clip.position
        ranged = i >= 0 and len(self.batch_offset)
        return ClipLoc(f, storage.join(self.data_uri, self.files[f]), self.file_bytes[f], clip.row, clip.clip_id,
                       clip.bucket, int(self.batch_offset[i]) if ranged else -1,
                       int(self.batch_bytes[i]) if ranged else 0)

    def prefetch(self, files: list[int]) -> None:
        """Start fetching these shards into the cache (no-op without one, or when open/cached, or
        when their clips are read one by one)."""
        if self.cache is None:
            return
        if self.clip_reads is not None:
            files = [f for f in files if f in self.clip_reads.whole_files]
        for f in files:
            if f not in self._open:
                self.cache.prefetch(storage.join(self.data_uri, self.files[f]), self.file_bytes[f],
                                    self.file_sha256[f])

    def _open_checked(self, file: int) -> pa.Table:
        """Open one shard after checking it is the file that was committed (size; sha256 with verify)."""
        uri = storage.join(self.data_uri, self.files[file])
        if self.cache is not None:
            return self._open_cached(file, uri)
        size = storage.file_size(uri)
        if size is None:
            raise missing_shard(uri)
        if size != self.file_bytes[file]:
            raise resized_shard(uri, size, self.file_bytes[file])
        self._verify(file, uri, uri)
        try:
            return read_shard(uri)
        except (pa.ArrowInvalid, OSError) as e:
            raise ShardError(f"{uri}: not a readable Arrow shard ({e}); {REDO}") from None

    def _verify(self, file: int, path: str, uri: str) -> None:
        """With verify: the bytes at `path` (the shard or its cached copy) hash to the committed sha256;
        checked once per file per process."""
        if self.verify and file not in self._verified:
            if storage.sha256(path) != self.file_sha256[file]:
                raise ShardError(f"{uri}: content differs from its committed sha256; {REDO} (found by data.verify)")
            self._verified.add(file)

    def _open_cached(self, file: int, uri: str) -> pa.Table:
        """A remote shard from the node cache (downloaded whole, size-checked), memory-mapped from there."""
        for attempt in range(2):
            try:
                local = self.cache.get(uri, self.file_bytes[file], self.file_sha256[file])
                try:
                    self._verify(file, str(local), uri)
                except ShardError:
                    local.unlink(missing_ok=True)  # not this shard: never served from the cache again
                    raise
                return read_shard(str(local))
            except FileNotFoundError:  # evicted by another worker between get and open: fetch again
                if attempt:
                    raise
            except (pa.ArrowInvalid, OSError) as e:
                raise ShardError(f"{uri}: not a readable Arrow shard ({e}); {REDO}") from None
        raise AssertionError("unreachable")

    def table(self, file: int) -> pa.Table:
        return self._entry(file)[0]

    def _row(self, file: int, name: str, row: int) -> np.ndarray:
        """One row of a tensor column: a view into the open shard (copy it before the shard may close)."""
        table, columns = self._entry(file)
        if name not in columns:
            chunks = table.column(name).chunks
            columns[name] = (np.cumsum([0] + [len(c) for c in chunks]), [RowReader(c) for c in chunks])
        starts, readers = columns[name]
        c = int(np.searchsorted(starts, row, side="right")) - 1
        return readers[c][row - starts[c]]

    def _values(self, clip: ClipRef, names: tuple[str, ...]) -> list[np.ndarray]:
        """One clip's values of tensor columns: from its own record batch with clip reads (one lookup),
        else its open shard."""
        if self.clip_reads is not None and clip.file not in self.clip_reads.whole_files:
            batch = self.clip_reads.get(self._loc_of(clip))
            if batch is not None:
                return [RowReader(batch.column(batch.schema.get_field_index(n)))[0] for n in names]
        return [self._row(clip.file, n, clip.row) for n in names]

    def _finite(self, clip: ClipRef, stored: np.ndarray) -> torch.Tensor:
        """Stored latents → float32 (a copy); non-finite values are refused naming file and row."""
        latents = torch.from_numpy(as_float32(stored))
        if not torch.isfinite(latents).all():
            raise ShardError(f"{storage.join(self.data_uri, self.files[clip.file])} row {clip.row} "
                             f"(clip {clip.clip_id}): latents hold NaN or inf; refusing to use them")
        return latents

    def latents(self, clip: ClipRef) -> torch.Tensor:
        """A clip's latents (C, T', H', W') float32 (a copy); non-finite values are refused naming file and row."""
        return self._finite(clip, self._values(clip, ("latents",))[0])

    def load(self, clip: ClipRef) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents (C, T', H', W') float32, text (n, D) float32, text_mask (n,) bool) of one clip (copies).

        Shards store only the caption's real tokens (pipeline.shards), so the mask is all true; it
        stays in the signature for packers that pad (the Wan backbone pads to its 512 tokens)."""
        latents, text = self._values(clip, ("latents", "text_embedding"))
        return (self._finite(clip, latents), torch.from_numpy(as_float32(text)),
                torch.ones(text.shape[0], dtype=torch.bool))


SHARED_FORMAT = 2  # of the tables below; part of the shared file's key


def _sorted_tables(data_uri: str, manifest: dict[str, Any], split: str | None, bucket_names: list[str],
                   tokens: np.ndarray, remote: bool, scalars: bool) -> tuple[pa.Table, pa.Table, pa.Array, _Columns]:
    """(clips, files, order, columns): the clip columns sorted by clip_id — the order every worker
    agrees on — and the shard files sorted by path. Each column is taken in that order on its
    own, and each unsorted column goes as soon as its sorted one is made, so the peak holds the
    ids twice, not the whole index twice (peak at 10M clips +2.1 GB, was +2.8 GB)."""
    extra = ([c for c in SCALAR_COLUMNS if c != "num_frames"] if scalars else []) + (
        ["batch_offset", "batch_bytes"] if remote else [])
    cols = _read_columns(data_uri, manifest, split, bucket_names, extra)
    # Take would concatenate the chunks into a copy of its own while they live: combine them
    # once and let them go first (a third copy of the ids fewer at the peak).
    ids = cols.ids.combine_chunks()
    cols.ids = None
    order = pc.sort_indices(ids)
    ids = ids.take(order)
    same = pc.equal(ids[1:], ids[:-1]) if len(ids) > 1 else pa.array([], pa.bool_())
    if pc.any(same).as_py():
        first = ids[int(np.flatnonzero(same.to_numpy(zero_copy_only=False))[0])].as_py()
        raise ShardError(f"{pc.sum(same).as_py()} clip id(s) appear twice in {data_uri}, e.g. {first}")
    at = order.to_numpy()

    def take(name: str) -> np.ndarray:
        column = getattr(cols, name)[at]
        setattr(cols, name, None)
        return column

    bucket_code, file_of, num_frames = take("bucket_code"), take("file_of"), take("num_frames")
    clips = {"clip_id": ids, "bucket_code": bucket_code, "file_of": file_of, "row": take("row"),
             "num_frames": num_frames, "num_tokens": tokens[bucket_code]}
    if remote:
        clips.update({c: cols.extra.pop(c)[at] for c in ("batch_offset", "batch_bytes")})
    clips["by_file"], videos, images = group_by_file(file_of, num_frames, len(cols.files))
    files = pa.table({"path": pa.array(cols.files, pa.string()), "bytes": pa.array(cols.file_bytes, pa.int64()),
                      "sha256": pa.array(cols.file_sha256, pa.string()), "videos": videos, "images": images})
    return pa.table(clips), files, order, cols


def group_by_file(file_of: np.ndarray, num_frames: np.ndarray, num_files: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(by_file, videos, images): clip indices grouped by file, each file's videos (more than one
    frame) before its images, in index order within each; and each file's counts of the two —
    the populations training/order.py orders (int32 indices below 2^31 clips: 4 bytes a clip)."""
    image = num_frames == 1
    by_file = np.lexsort((image, file_of))
    return (by_file.astype(np.int32) if len(by_file) < 2**31 else by_file,
            np.bincount(file_of[~image], minlength=num_files).astype(np.int64),
            np.bincount(file_of[image], minlength=num_files).astype(np.int64))


@dataclass
class _Columns:
    """The clip index's columns a ShardIndex keeps, in index order (before sorting by clip_id)."""

    ids: pa.ChunkedArray | None  # these five: None once sorted (_sorted_tables)
    bucket_code: np.ndarray | None
    file_of: np.ndarray | None  # → files, sorted by path
    row: np.ndarray | None
    num_frames: np.ndarray | None
    extra: dict[str, np.ndarray]
    scalar_batches: list[pa.RecordBatch]
    files: list[str]
    file_bytes: list[int]
    file_sha256: list[str]


def _read_columns(data_uri: str, manifest: dict[str, Any], split: str | None, bucket_names: list[str],
                  extra: list[str]) -> _Columns:
    """One streamed pass over the clip index (record batches): ids and small integer columns per
    clip, the shard path as a code into the sorted file list, each file's committed size and
    sha256 — never the index's strings per clip beyond the ids (a shard path is ~60 bytes; 6 GB
    at 100M clips)."""
    numeric = [c for c in extra if c in ("batch_offset", "batch_bytes")]
    scalar = [c for c in extra if c not in numeric]
    columns = ["clip_id", "bucket", "shard", "row", "num_frames", "shard_bytes", "shard_sha256", *extra]
    buckets = pa.array(bucket_names, pa.string())
    code_of: dict[str, int] = {}  # shard path → code, in order of first appearance
    committed: list[tuple[int, str]] = []
    ids, bucket, files, rows, frames, scalars = [], [], [], [], [], []
    more: dict[str, list[np.ndarray]] = {c: [] for c in numeric}
    # One batch decoded at a time: threaded scans decode row groups ahead of the loop and held
    # ~4x the live memory (220 vs 57 MB at 1M clips), for no faster open (tests/bench/loader_scale.py).
    for batch in stream_index(data_uri, manifest, columns, split, use_threads=False):
        if not batch.num_rows:
            continue
        codes = pc.index_in(batch["bucket"], value_set=buckets)
        if codes.null_count:
            raise ShardError(f"{data_uri}: the clip index names bucket(s) the manifest does not, e.g. "
                             f"{batch['bucket'].filter(pc.is_null(codes))[0].as_py()!r}")
        paths, first, inverse = np.unique(batch["shard"].to_numpy(zero_copy_only=False), return_index=True,
                                          return_inverse=True)
        shard_bytes, shard_sha = batch["shard_bytes"].to_numpy(), batch["shard_sha256"]
        batch_codes = np.empty(len(paths), np.int32)
        for i, (path, row) in enumerate(zip(paths.tolist(), first.tolist())):
            if path not in code_of:
                code_of[path] = len(code_of)
                committed.append((int(shard_bytes[row]), shard_sha[row].as_py()))
            batch_codes[i] = code_of[path]
        ids.append(batch["clip_id"].cast(pa.large_string()))  # > 2 GiB of ids past ~48M clips
        bucket.append(codes.to_numpy().astype(np.int32))
        files.append(batch_codes[inverse.reshape(-1)])
        rows.append(batch["row"].to_numpy().astype(np.int64))
        frames.append(batch["num_frames"].to_numpy().astype(np.int64))
        for c in numeric:
            more[c].append(pc.fill_null(batch[c], -1 if c == "batch_offset" else 0).to_numpy().astype(np.int64))
        if scalar:
            scalars.append(batch.select(list(SCALAR_COLUMNS)))
    names = list(code_of)
    by_name = sorted(range(len(names)), key=names.__getitem__)
    sorted_code = np.empty(len(names), np.int32)
    sorted_code[by_name] = np.arange(len(names), dtype=np.int32)

    def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    file_codes = cat(files, np.int32)
    return _Columns(ids=pa.chunked_array(ids, pa.large_string()), bucket_code=cat(bucket, np.int32),
                    file_of=sorted_code[file_codes] if len(file_codes) else file_codes, row=cat(rows, np.int64),
                    num_frames=cat(frames, np.int64), extra={c: cat(v, np.int64) for c, v in more.items()},
                    scalar_batches=scalars, files=[names[i] for i in by_name],
                    file_bytes=[committed[i][0] for i in by_name], file_sha256=[committed[i][1] for i in by_name])


def per_file(data_uri: str, manifest: dict[str, Any], split: str | None, columns: list[str]) -> dict[str, tuple]:
    """shard path → (the given per-file columns) from the clip index, streamed in record batches:
    memory is one entry per shard file (~100k at 100M clips), never one per clip."""
    out: dict[str, tuple] = {}
    for batch in stream_index(data_uri, manifest, ["shard", *columns], split):
        if not batch.num_rows:
            continue
        paths, first = np.unique(batch.column(0).to_numpy(zero_copy_only=False), return_index=True)
        values = [batch.column(i + 1).take(pa.array(first)).to_pylist() for i in range(len(columns))]
        out.update(zip(paths.tolist(), zip(*values)))
    return out


def check_data(data_uri: str, split: str | None = None) -> dict[str, Any]:
    """Before any worker starts: the manifest reads, the index reads, every shard it names is there
    at its committed size. Returns the manifest; raises ShardError / ManifestError naming what is wrong.

    The index is streamed in record batches (two columns), so the launcher holds one entry per
    shard file (~100k at 100M clips), never one per clip; the shards folder is listed once
    (one LIST per 1,000 objects on object stores).
    """
    manifest = read_manifest(data_uri)
    committed = {p: v[0] for p, v in per_file(data_uri, manifest, split, ["shard_bytes"]).items()}
    found = storage.list_relative(data_uri, "shards")
    # the pipeline's own check of records against the listing (files no clip names are not ours to judge)
    if not committed:
        raise DataError(f"{data_uri}: the clip index holds no clips"
                        + (f" of split {split!r} (splits are set by the pipeline's output.val_fraction: "
                           "train, val)" if split is not None else ""))
    damaged = check_shards({p: {"path": p, "bytes": b} for p, b in committed.items()}, found).damaged
    missing = [why for p, why in damaged.items() if p not in found]
    wrong = [why for p, why in damaged.items() if p in found]
    if damaged:
        raise ShardError(f"{data_uri}: {len(missing)} shard file(s) missing and {len(wrong)} of the wrong size "
                         f"(of {len(committed)}): {'; '.join(missing[:3] + wrong[:3])}; {REDO}")
    return manifest
