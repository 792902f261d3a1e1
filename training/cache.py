"""Node-local cache of remote shards: shared by a node's workers, filled ahead of need, bounded in bytes.

Shards on object storage (s3://, gs://) read whole (`data.remote_reads`; clip-by-clip reads are
training/clipreads.py) are downloaded into `cache_dir` once per node and then memory-mapped like
local ones. The loader knows which shards the next steps read (the
step plan is deterministic) and asks for them ahead (`prefetch`), so at steady state a step
finds its shards on local disk.

Sharing between the processes of a node is done with files only, no daemon:
  * a complete shard is `<key>.arrow` (key = hash of its URI and committed sha256, so a shard
    rewritten under the same name is a new entry); downloads go to a private `.part-*` file
    renamed into place, so a reader never sees half a shard;
  * one download per shard per node: the downloader holds `flock` on `<key>.lock`; a second
    process asking for it blocks there, then finds the finished file;
  * eviction (least recently used by mtime, touched on every use) runs under one
    cache-wide `flock` when a download needs room. A shard another process has mapped stays
    readable after its file is removed (Linux keeps unlinked mapped files), so disk in use can
    pass the bound by the evicted shards still open and the downloads in flight.

Why not fsspec's `filecache` / `simplecache`: they are per-process (no cross-process download
dedupe), have no byte bound with LRU eviction, and know nothing about what is needed next.
Cost at scale: one GET per shard per node per residency; the cache directory is scanned
(one `listdir`) only when a download must evict, i.e. O(cached shards), not O(dataset).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from pipeline import storage
from pipeline.lease import pid_alive
from pipeline.shards import missing_shard, resized_shard

CHUNK_BYTES = 8 << 20


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (created if missing), held for the block; freed if the process dies."""
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class ShardCache:
    """Remote shard URI → complete local file, downloaded at most once per node while it stays cached."""

    def __init__(self, cache_dir: str, max_bytes: int, threads: int = 4) -> None:
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.downloaded_bytes = 0  # by this process
        self.downloads = 0
        self.hits = 0  # found complete in the cache (put there by anyone)
        self.wait_s = 0.0  # time `get` callers spent waiting for a shard
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="ditharos-fetch")

    def path(self, uri: str, sha256: str) -> Path:
        return self.dir / (hashlib.sha256(f"{uri}\n{sha256}".encode()).hexdigest()[:32] + ".arrow")

    def prefetch(self, uri: str, size: int, sha256: str) -> None:
        """Start downloading a shard in the background unless it is cached or on its way."""
        with self._lock:
            if uri in self._pending:
                return
            if _complete(self.path(uri, sha256), size):
                return
            self._pending[uri] = self._pool.submit(self._fetch, uri, size, sha256)

    def get(self, uri: str, size: int, sha256: str) -> Path:
        """The local path of the complete shard, waiting for (or doing) its download."""
        start = time.perf_counter()
        with self._lock:
            pending = self._pending.get(uri)
        try:
            return pending.result() if pending is not None else self._fetch(uri, size, sha256)
        finally:
            with self._lock:
                self.wait_s += time.perf_counter() - start

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _fetch(self, uri: str, size: int, sha256: str) -> Path:
        path = self.path(uri, sha256)
        try:
            if not _touch_complete(path, size):
                with file_lock(path.with_suffix(".lock")):  # another process downloading it: wait here
                    if not _touch_complete(path, size):  # (evicted between the checks: download again)
                        self._download(uri, path, size)
                        return path
            with self._lock:  # counters are bumped from the fetch threads too
                self.hits += 1
            return path
        finally:
            with self._lock:
                self._pending.pop(uri, None)

    def _download(self, uri: str, path: Path, size: int) -> None:
        self._make_room(size)
        tmp = path.with_name(f"{path.name}.part-{os.getpid()}-{threading.get_ident()}")
        written = 0
        try:
            with open(tmp, "wb") as out:
                for chunk in storage.iter_chunks(uri, CHUNK_BYTES):
                    out.write(chunk)
                    written += len(chunk)
            if written != size:
                raise resized_shard(uri, written, size)
            os.replace(tmp, path)
        except OSError:
            if storage.file_size(uri) is None:  # object stores say "path does not exist" in their own words
                raise missing_shard(uri) from None
            raise
        finally:
            tmp.unlink(missing_ok=True)
        with self._lock:
            self.downloaded_bytes += written
            self.downloads += 1

    def _make_room(self, size: int) -> None:
        """Remove least recently used complete shards until `size` more bytes fit under max_bytes."""
        with file_lock(self.dir / ".evict.lock"):
            entries, in_flight = [], 0
            for e in os.scandir(self.dir):
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                if e.name.endswith(".arrow"):
                    entries.append((st.st_mtime, st.st_size, e.path))
                elif ".part-" in e.name:
                    if _writer_alive(e.name):
                        in_flight += st.st_size
                    else:  # left by a killed process (Ctrl-C, a restarted worker group)
                        Path(e.path).unlink(missing_ok=True)
            total = in_flight + sum(s for _, s, _ in entries)
            for _, s, p in sorted(entries):
                if total + size <= self.max_bytes:
                    break
                Path(p).unlink(missing_ok=True)
                total -= s


def _touch_complete(path: Path, size: int) -> bool:
    """Complete, and marked most recently used (False when another process just evicted it)."""
    try:
        if path.stat().st_size != size:
            return False
        os.utime(path)
        return True
    except FileNotFoundError:
        return False


def _writer_alive(part_name: str) -> bool:
    """Whether the process named in `<key>.arrow.part-<pid>-<thread>` still runs on this node."""
    try:
        pid = int(part_name.rsplit(".part-", 1)[1].split("-")[0])
    except (ValueError, IndexError):
        return False
    return pid_alive(pid)


def _complete(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False
