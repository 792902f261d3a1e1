"""The training loader's deterministic core: shard index, global step plan, worker share, resume.

Every worker reads `manifest.json` and memory-maps the Arrow shards itself (nothing flows
through a driver). The data order is a property of the *global* run, never of the worker
count:

  * `ShardIndex` lists every clip as (bucket, file, row) with its token count, taken from the
    bucket's latent shape and the patch, sorted by `clip_id` (so the shard layout does not
    matter either).
  * `epoch_order(n, seed, epoch)` is a permutation of that list.
  * A global step takes the next clips of the order while first-fit-decreasing
    (`plan_packs`) still fits them into `packs_per_step` packs of `token_budget` tokens.
    Clips larger than the budget are skipped and counted.
  * With W workers, worker r gets packs [r·P/W, (r+1)·P/W) of every step: P/W micro-batches
    of gradient accumulation, so a global step is the same computation for any W.
  * `LoaderState(epoch, position, step)` is all a checkpoint needs; a loader built from it
    yields exactly the steps an uninterrupted run would have, with any worker count.

Epoch end: the step that reaches the end of an epoch's order is kept even when it has fewer
than `packs_per_step` packs (nothing rolls over, nothing is dropped), so each epoch sees every
fitting clip exactly once. On that short step some workers may get fewer packs — possibly
none — and must still join the gradient all-reduce (normalise the loss by the step's global
token count, not by pack count).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch

from pipeline import storage
from pipeline.manifest import index_dataset, read_index, read_manifest
from pipeline.shards import ShardError, as_float32, read_shard
from pipeline.state import check_shards
from training.ffd import GrowingFFD
from training.packing import PackedBatch, Patch, num_patches, pack

log = logging.getLogger("ditharos.data")
REDO = "re-run the pipeline on this output: it notices the damage and redoes those sources"


# ---------------------------------------------------------------------------
# Shard index
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipRef:
    """Where one clip lives and how many tokens it packs into."""

    clip_id: str
    bucket: str
    file: int  # index into ShardIndex.files
    row: int
    num_tokens: int


class ShardIndex:
    """Every clip of a dataset (optionally one split), sorted by clip_id; shards opened lazily, LRU-bounded."""

    def __init__(self, data_uri: str, manifest: dict[str, Any], files: list[str], clips: list[ClipRef],
                 patch: Patch, max_open_shards: int = 512, max_open_bytes: int = 16 << 30,
                 verify: bool = False) -> None:
        self.data_uri = data_uri
        self.manifest = manifest
        self.files = files  # paths relative to data_uri
        self.clips = clips
        self.patch = tuple(patch)
        self.max_open_shards, self.max_open_bytes = max_open_shards, max_open_bytes
        self.verify = verify  # also check each shard's sha256 when it is first opened (reads it whole)
        self.file_bytes: list[int] = []  # committed size of each file (from the index)
        self.file_sha256: list[str] = []
        # file → (table, {column: (chunk starts, chunk arrays)}); views die with their table
        self._open: OrderedDict[int, tuple[pa.Table, dict[str, tuple[np.ndarray, list[np.ndarray]]]]] = OrderedDict()
        self._open_bytes = 0
        self.opened = 0  # shard opens so far (re-opens after eviction count again)
        self._lock = threading.Lock()  # the prefetch thread and the main thread may both open files

    @classmethod
    def open(cls, data_uri: str, patch: Patch, split: str | None = "train", max_open_shards: int = 512,
             max_open_bytes: int = 16 << 30, verify: bool = False) -> ShardIndex:
        """Read the manifest and list its clips from the clip index; `split=None` keeps every clip.

        No shard is opened here: the index (Parquet, a few columns read) says where each clip
        lives. Shards are memory-mapped when a clip is first loaded.
        """
        manifest = read_manifest(data_uri)
        index = cls(data_uri, manifest, [], [], patch, max_open_shards, max_open_bytes, verify)
        tokens = {}
        for bucket, spec in manifest["buckets"].items():
            try:
                tokens[bucket] = math.prod(num_patches(tuple(spec["latent_shape"]), index.patch))
            except ValueError as e:
                raise ValueError(f"bucket {bucket!r}: {e}") from None
        table = read_index(data_uri, manifest, ["clip_id", "bucket", "shard", "row", "shard_bytes", "shard_sha256"],
                           split=split)
        table = table.sort_by([("clip_id", "ascending")])
        ids, buckets = table["clip_id"].to_pylist(), table["bucket"].to_pylist()
        shards, rows = table["shard"].to_pylist(), table["row"].to_pylist()
        committed = dict(zip(shards, zip(table["shard_bytes"].to_pylist(), table["shard_sha256"].to_pylist())))
        file_of: dict[str, int] = {}
        for path in sorted(committed):
            file_of[path] = len(index.files)
            index.files.append(path)
            index.file_bytes.append(committed[path][0])
            index.file_sha256.append(committed[path][1])
        index.clips = [ClipRef(c, b, file_of[f], r, tokens[b]) for c, b, f, r in zip(ids, buckets, shards, rows)]
        dupes = [a for a, b in zip(ids, ids[1:]) if a == b]
        if dupes:
            raise ShardError(f"{len(dupes)} clip id(s) appear twice in {data_uri}, e.g. {dupes[0]}")
        return index

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]["data_sha256"]

    @property
    def num_open(self) -> int:
        return len(self._open)

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

    def _open_checked(self, file: int) -> pa.Table:
        """Open one shard after checking it is the file that was committed (size; sha256 with verify)."""
        uri = storage.join(self.data_uri, self.files[file])
        size = storage.file_size(uri)
        if size is None:
            raise ShardError(f"{uri}: shard missing (the clip index points at it); {REDO}")
        if size != self.file_bytes[file]:
            raise ShardError(f"{uri}: {size} bytes, committed with {self.file_bytes[file]} (truncated or "
                             f"overwritten); {REDO}")
        if self.verify and storage.sha256(uri) != self.file_sha256[file]:
            raise ShardError(f"{uri}: content differs from its committed sha256; {REDO} (with --verify)")
        try:
            return read_shard(uri)
        except (pa.ArrowInvalid, OSError) as e:
            raise ShardError(f"{uri}: not a readable Arrow shard ({e}); {REDO}") from None

    def table(self, file: int) -> pa.Table:
        return self._entry(file)[0]

    def _row(self, file: int, name: str, row: int) -> np.ndarray:
        """One row of a tensor column: a view into the open shard (copy it before the shard may close)."""
        table, columns = self._entry(file)
        if name not in columns:
            chunks = table.column(name).chunks
            columns[name] = (np.cumsum([0] + [len(c) for c in chunks]), [c.to_numpy_ndarray() for c in chunks])
        starts, arrays = columns[name]
        c = int(np.searchsorted(starts, row, side="right")) - 1
        return arrays[c][row - starts[c]]

    def load(self, clip: ClipRef) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents (C, T', H', W') float32, text (77, D) float32, text_mask (77,) bool) of one clip (copies)."""
        latents = torch.from_numpy(as_float32(self._row(clip.file, "latents", clip.row)))
        if not torch.isfinite(latents).all():
            raise ShardError(f"{storage.join(self.data_uri, self.files[clip.file])} row {clip.row} "
                             f"(clip {clip.clip_id}): latents hold NaN or inf; refusing to train on them")
        text = torch.from_numpy(as_float32(self._row(clip.file, "text_embedding", clip.row)))
        mask = torch.from_numpy(self._row(clip.file, "text_mask", clip.row).astype(bool))
        return latents, text, mask


def check_data(data_uri: str, split: str | None = None) -> dict[str, Any]:
    """Before any worker starts: the manifest reads, the index reads, every shard it names is there
    at its committed size. Returns the manifest; raises ShardError / ManifestError naming what is wrong.

    The index is streamed in record batches (two columns), so the launcher holds one entry per
    shard file (~100k at 100M clips), never one per clip; the shards folder is listed once
    (one LIST per 1,000 objects on object stores).
    """
    manifest = read_manifest(data_uri)
    committed: dict[str, int] = {}
    flt = (pads.field("split") == split) if split is not None else None
    for batch in index_dataset(data_uri, manifest).to_batches(columns=["shard", "shard_bytes"], filter=flt):
        committed.update(zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()))
    found = storage.list_relative(data_uri, "shards")
    # the pipeline's own check of records against the listing (files no clip names are not ours to judge)
    damaged = check_shards({p: {"path": p, "bytes": b} for p, b in committed.items()}, found).damaged
    missing = [why for p, why in damaged.items() if p not in found]
    wrong = [why for p, why in damaged.items() if p in found]
    if damaged:
        raise ShardError(f"{data_uri}: {len(missing)} shard file(s) missing and {len(wrong)} of the wrong size "
                         f"(of {len(committed)}): {'; '.join(missing[:3] + wrong[:3])}; {REDO}")
    return manifest


# ---------------------------------------------------------------------------
# Global order and step plan (no data read)
# ---------------------------------------------------------------------------


def epoch_order(num_clips: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of clip indices: a function of (seed, epoch) only."""
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(num_clips)


@dataclass(frozen=True)
class LoaderState:
    """Where the global order stands: the next step starts at `order(epoch)[position]`."""

    epoch: int = 0
    position: int = 0
    step: int = 0  # global steps taken so far

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoaderState:
        return cls(epoch=int(d["epoch"]), position=int(d["position"]), step=int(d.get("step", 0)))


@dataclass(frozen=True)
class StepPlan:
    """One global step: which clips go into which pack (indices into ShardIndex.clips)."""

    step: int
    epoch: int
    packs: list[list[int]]  # ≤ packs_per_step packs, each ≤ token_budget tokens
    skipped: list[int]  # clips passed over because they alone exceed the budget
    state: LoaderState  # after this step


def plan_step(token_counts: list[int], order: np.ndarray, state: LoaderState, packs_per_step: int,
              token_budget: int) -> tuple[list[list[int]], list[int], int]:
    """Greedily take clips from `order[state.position:]` while FFD fits them in `packs_per_step` packs.

    Returns (packs as clip indices, skipped clip indices, next position). Packs are FFD's
    plan of the taken clips (`packing.plan_packs`); a step ends at the first clip that would
    need one pack more, or at the end of the order. `training.ffd` answers "does FFD still
    fit?" per clip without re-running FFD over all taken clips.
    """
    ffd = GrowingFFD(token_budget, packs_per_step)
    skipped: list[int] = []
    pos = state.position
    while pos < len(order):
        clip = int(order[pos])
        n = token_counts[clip]
        if n > token_budget:
            skipped.append(clip)
            pos += 1
            continue
        if ffd.total + n > packs_per_step * token_budget:  # cannot fit: no need to ask FFD
            break
        ffd.add(clip, n)
        if not ffd.fits():
            ffd.remove_last(n)
            break
        pos += 1
    return ffd.plan(), skipped, pos


def plan_steps(index: ShardIndex, state: LoaderState, seed: int, packs_per_step: int,
               token_budget: int) -> Iterator[StepPlan]:
    """Global step plans from `state` on, endlessly over epochs."""
    counts = [c.num_tokens for c in index.clips]
    if not any(n <= token_budget for n in counts):
        raise ValueError(f"no clip of {index.data_uri} fits a pack of {token_budget} tokens "
                         f"(smallest has {min(counts, default=0)})")
    epoch, order = state.epoch, epoch_order(len(counts), seed, state.epoch)
    while True:
        skipped: list[int] = []
        packs: list[list[int]] = []
        while not packs:  # never an empty step: an epoch whose rest is all oversized rolls on
            if state.position >= len(order):
                state = LoaderState(state.epoch + 1, 0, state.step)
            if state.epoch != epoch:
                epoch, order = state.epoch, epoch_order(len(counts), seed, state.epoch)
            packs, more, pos = plan_step(counts, order, state, packs_per_step, token_budget)
            skipped += more
            state = LoaderState(state.epoch, pos, state.step)
        # The step that finishes an epoch leaves the state at the next epoch's start.
        done = pos >= len(order)
        after = LoaderState(epoch + 1 if done else epoch, 0 if done else pos, state.step + 1)
        yield StepPlan(step=state.step, epoch=epoch, packs=packs, skipped=skipped, state=after)
        state = after


# ---------------------------------------------------------------------------
# Worker view
# ---------------------------------------------------------------------------


@dataclass
class Step:
    """One global step as seen by one worker."""

    step: int
    epoch: int
    packs: list[PackedBatch]  # this worker's micro-batches, one pack each
    clip_ids: list[list[str]]  # per micro-batch, in the order the PackedBatch holds its samples
    state: LoaderState  # after this step: save it to resume right after
    num_packs: int  # packs in the whole global step (≤ packs_per_step)
    num_skipped: int  # clips over the budget passed over while forming the step


def worker_packs(num_packs_per_step: int, rank: int, world_size: int) -> slice:
    """Pack slots of `rank`: [r·P/W, (r+1)·P/W)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} workers")
    if num_packs_per_step % world_size:
        raise ValueError(f"packs_per_step={num_packs_per_step} is not divisible by {world_size} workers; "
                         "each worker must get the same number of micro-batches")
    share = num_packs_per_step // world_size
    return slice(rank * share, (rank + 1) * share)


class Loader:
    """This worker's steps of the global plan, built from (seed, state) and the worker's rank."""

    def __init__(self, index: ShardIndex, *, seed: int, packs_per_step: int, token_budget: int,
                 rank: int = 0, world_size: int = 1, state: LoaderState | None = None) -> None:
        self.index = index
        self.seed = seed
        self.packs_per_step = packs_per_step
        self.token_budget = token_budget
        self.slots = worker_packs(packs_per_step, rank, world_size)
        self.state = state or LoaderState()  # after the last step yielded
        self.num_skipped = 0  # oversized clips passed over so far (this loader's steps only)

    def plans(self) -> Iterator[StepPlan]:
        return plan_steps(self.index, self.state, self.seed, self.packs_per_step, self.token_budget)

    def build(self, plan: StepPlan) -> Step:
        """Read this worker's clips of a step from the shards and pack them."""
        batches, ids = [], []
        for members in plan.packs[self.slots]:
            clips = [self.index.clips[i] for i in members]
            latents, text, mask = zip(*(self.index.load(c) for c in clips))
            batch = pack(list(latents), list(text), self.index.patch, self.token_budget, text_mask=list(mask))
            assert batch.num_packs == 1, "a planned pack must stay one pack"
            batches.append(batch)
            ids.append([c.clip_id for c in clips])
        return Step(step=plan.step, epoch=plan.epoch, packs=batches, clip_ids=ids, state=plan.state,
                    num_packs=len(plan.packs), num_skipped=len(plan.skipped))

    def __iter__(self) -> Iterator[Step]:
        for plan in self.plans():
            step = self.build(plan)
            self.state = step.state
            self.num_skipped += step.num_skipped
            yield step


# ---------------------------------------------------------------------------
# Background prefetch
# ---------------------------------------------------------------------------

_END = object()


@dataclass
class _Failure:
    error: BaseException


@dataclass
class Prefetcher:
    """Builds the next `depth` steps in a thread; `wait_s` is the time the consumer spent blocked.

    The thread runs ahead of the consumer, so checkpoint `Step.state` of the step just
    trained, never the wrapped loader's own `state`.
    """

    steps: Iterator[Step]
    depth: int = 2
    wait_s: float = 0.0  # total data-wait seconds
    last_wait_s: float = 0.0  # data-wait of the latest step, for per-step metrics
    _queue: queue.Queue = field(init=False, repr=False)
    _stop: threading.Event = field(init=False, repr=False)
    _thread: threading.Thread = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"prefetch depth must be ≥ 1, got {self.depth}")
        self._queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="ditharos-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            for step in self.steps:
                if not self._put(step):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put(_Failure(e))
            return
        self._put(_END)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Step:
        start = time.perf_counter()
        item = self._queue.get()
        self.last_wait_s = time.perf_counter() - start
        self.wait_s += self.last_wait_s
        if item is _END:
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ---------------------------------------------------------------------------
# Resume safety
# ---------------------------------------------------------------------------


class FingerprintMismatch(ValueError):
    """A checkpoint's data order was defined on other shards than the ones given now."""


def check_fingerprint(saved: str, manifest: dict[str, Any], allow_mismatch: bool = False) -> None:
    """Raise unless `saved` equals the manifest's data fingerprint (or the mismatch is allowed)."""
    current = manifest["fingerprint"]["data_sha256"]
    if saved == current:
        return
    message = (f"checkpoint was trained on data {saved} but the shards given have fingerprint {current}; "
               "its loader position does not apply to them")
    if not allow_mismatch:
        raise FingerprintMismatch(message + " (set data.allow_fingerprint_mismatch=true to resume anyway)")
    log.warning("%s — resuming anyway (data.allow_fingerprint_mismatch)", message)
