"""Single clips of remote shards by range request, fetched ahead of need, held in bounded memory.

A uniform order over remote data (`data.shuffle_window_shards: 0`) reads a few clips from
each of very many shards per step; downloading whole shards for that reads each 512 MB file
~once per clip it holds (`download_amplification` 8.5 in tests/bench/loader_scale.py). Shards
hold one clip per record batch (`pipeline.shards.ROWS_PER_BATCH`) and the clip index records
each batch's byte range, so a clip is **one ranged GET** of exactly its bytes, decoded with its
bucket's schema (`pipeline.shards.decode_clip`; the schema is read from one shard footer per
bucket — every shard of a bucket has it: an output refuses other data settings). The loader
announces the clips of the next steps (`prefetch`); a thread pool fetches them into an
in-memory LRU bounded in bytes, which the step builder then reads (`get`).

Data without byte ranges in its index (written before record version 5) is read per shard
footer (a HEAD and two ranged GETs per shard opened, `max_open` kept open) and then one GET
per batch; a shard with many clips per batch is read whole through the node cache instead
(`whole_files`). Cost at 100M clips: 100M GETs per epoch (≈ $40 at $0.4 per million S3
GETs) against whole shards' 0.1M GETs, but no shard-sized download per clip; shuffle windows
stay the cheaper choice when the training recipe allows them. No node-local disk is used:
each worker reads only its own clips, which no other worker reads in the same epoch.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline import storage
from pipeline.shards import REDO, ShardError, decode_clip, missing_shard, open_reader, read_clip, resized_shard

Key = tuple[int, int]  # (file, row)


@dataclass(frozen=True)
class ClipLoc:
    """Where one clip's bytes are: its shard (index, URI, committed size), row, and byte range."""

    file: int
    uri: str
    size: int
    row: int
    clip_id: str
    bucket: str
    offset: int = -1  # the record batch message's first byte; -1: not in the index (older data)
    nbytes: int = 0


class _Counted:
    """A file object that counts the reads (= ranged GETs on object storage) and bytes read."""

    def __init__(self, f: Any, owner: ClipReads) -> None:
        self.f, self.owner = f, owner

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        with self.owner._lock:
            self.owner.requests += 1
            self.owner.downloaded_bytes += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()

    @property
    def closed(self) -> bool:
        return self.f.closed

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


class ClipReads:
    """A remote dataset's clips → their record batches, fetched ahead by range, LRU-bounded in bytes."""

    def __init__(self, max_bytes: int, threads: int = 8, max_open: int = 512, max_handles: int = 65536) -> None:
        # max_open footered readers (older data); max_handles shards open for ranged reads (~1 KB each)
        self.max_bytes, self.max_open, self.max_handles = max_bytes, max_open, max_handles
        self.requests = 0  # reads issued (shard opens, footers, batches)
        self.downloaded_bytes = 0
        self.fetched = 0  # clips fetched
        self.wait_s = 0.0  # time `get` callers waited
        self.whole_files: set[int] = set()  # layout without one clip per batch: read whole instead
        self._batches: OrderedDict[Key, pa.RecordBatch] = OrderedDict()
        self._bytes = 0
        self._readers: OrderedDict[int, tuple[pa.ipc.RecordBatchFileReader, _Counted, threading.Lock]] = OrderedDict()
        self._schemas: dict[str, pa.Schema] = {}  # bucket → its shards' schema
        self._handles: OrderedDict[int, Any] = OrderedDict()  # file → NativeFile for read_at
        self._pending: dict[Key, Future] = {}
        self._opening: dict[Any, threading.Lock] = {}  # readers/handles/schemas being made: one maker each
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="ditharos-clip")

    def prefetch(self, loc: ClipLoc) -> None:
        """Start fetching one clip unless it is held, on its way, or in a shard read whole."""
        key = (loc.file, loc.row)
        with self._lock:
            if loc.file in self.whole_files or key in self._batches or key in self._pending:
                return
            self._pending[key] = self._pool.submit(self._fetch, loc)

    def get(self, loc: ClipLoc) -> pa.RecordBatch | None:
        """The clip's record batch (waiting for or doing its fetch); None when its shard must be read whole."""
        key = (loc.file, loc.row)
        start = time.perf_counter()
        with self._lock:
            if key in self._batches:
                self._batches.move_to_end(key)
                return self._batches[key]
            pending = self._pending.get(key)
        try:
            return pending.result() if pending is not None else self._fetch(loc)
        finally:
            with self._lock:
                self.wait_s += time.perf_counter() - start

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._readers.clear()
            self._handles.clear()

    def _fetch(self, loc: ClipLoc) -> pa.RecordBatch | None:
        key = (loc.file, loc.row)
        try:
            if loc.offset >= 0:
                batch = decode_clip(self._read_range(loc), self._schema(loc), loc.uri, loc.row, loc.clip_id)
            else:
                reader, lock = self._reader(loc.file, loc.uri, loc.size)
                with lock:  # one file position per reader
                    batch = read_clip(reader, loc.uri, loc.row, loc.clip_id)
            with self._lock:
                if batch is None:
                    self.whole_files.add(loc.file)
                    return None
                self.fetched += 1
                if key not in self._batches:
                    self._batches[key] = batch
                    self._bytes += batch.nbytes
                    while len(self._batches) > 1 and self._bytes > self.max_bytes:
                        _, old = self._batches.popitem(last=False)
                        self._bytes -= old.nbytes
                return batch
        finally:
            with self._lock:
                self._pending.pop(key, None)

    def _read_range(self, loc: ClipLoc) -> pa.Buffer:
        """The clip's bytes: one ranged GET through the shard's open handle (`read_at` is thread-safe)."""
        data = self._handle(loc).read_at(loc.nbytes, loc.offset)
        if len(data) != loc.nbytes:
            raise ShardError(f"{loc.uri}: bytes {loc.offset}+{loc.nbytes} of row {loc.row} are past its end; {REDO}")
        with self._lock:
            self.requests += 1
            self.downloaded_bytes += len(data)
        return data

    def _handle(self, loc: ClipLoc) -> Any:
        """The shard opened for ranged reads (a HEAD, once): size-checked, kept in an LRU of max_handles."""
        with self._lock:
            if loc.file in self._handles:
                self._handles.move_to_end(loc.file)
                return self._handles[loc.file]
            opening = self._opening.setdefault(("handle", loc.file), threading.Lock())
        with opening:
            with self._lock:
                if loc.file in self._handles:
                    return self._handles[loc.file]
            f = self._open(loc.uri, loc.size)
            with self._lock:
                self._handles[loc.file] = f
                while len(self._handles) > self.max_handles:
                    self._handles.popitem(last=False)
                self._opening.pop(("handle", loc.file), None)
            return f

    def _open(self, uri: str, size: int) -> Any:
        """A remote shard opened for random access (the store answers a HEAD), checked against its committed size."""
        fs, path = storage.resolve(uri)
        try:
            f = fs.open_input_file(path)
        except FileNotFoundError:
            raise missing_shard(uri) from None
        with self._lock:
            self.requests += 1
        if f.size() != size:  # a footer or byte range of another file would misplace every batch
            raise resized_shard(uri, f.size(), size)
        return f

    def _schema(self, loc: ClipLoc) -> pa.Schema:
        """The bucket's schema, from the footer of the first of its shards this process reads."""
        schema = self._schemas.get(loc.bucket)
        if schema is None:
            with self._lock:
                opening = self._opening.setdefault(("schema", loc.bucket), threading.Lock())
            with opening:  # one footer read per bucket, however many threads ask first
                if loc.bucket not in self._schemas:
                    self._schemas[loc.bucket] = self._reader(loc.file, loc.uri, loc.size)[0].schema
                schema = self._schemas[loc.bucket]
        return schema

    def _reader(self, file: int, uri: str, size: int) -> tuple[pa.ipc.RecordBatchFileReader, threading.Lock]:
        """The open reader of a shard: opened once (HEAD + footer) even when several threads ask at once."""
        with self._lock:
            opening = self._opening.setdefault(file, threading.Lock())
        with opening:
            with self._lock:
                if file in self._readers:
                    self._readers.move_to_end(file)
                    reader, _, lock = self._readers[file]
                    return reader, lock
            f = _Counted(self._open(uri, size), self)
            reader = open_reader(uri, f)
            entry = (reader, f, threading.Lock())
            with self._lock:
                self._readers[file] = entry
                while len(self._readers) > self.max_open:
                    self._readers.popitem(last=False)  # closed when the last thread using it lets go
                self._opening.pop(file, None)
            return reader, entry[2]
