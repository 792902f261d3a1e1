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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from pipeline import storage
from pipeline.manifest import read_index, read_manifest
from pipeline.shards import SCHEMA_VERSION, ShardError
from training.packing import PackedBatch, Patch, num_patches, pack, plan_packs

log = logging.getLogger("ditharos.data")


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
    """Every clip of a dataset (optionally one split), sorted by clip_id; shards memory-mapped lazily."""

    def __init__(self, data_uri: str, manifest: dict[str, Any], files: list[str], clips: list[ClipRef],
                 patch: Patch) -> None:
        self.data_uri = data_uri
        self.manifest = manifest
        self.files = files  # paths relative to data_uri
        self.clips = clips
        self.patch = tuple(patch)
        self._tables: dict[int, pa.Table] = {}
        self._chunks: dict[tuple[int, str], tuple[np.ndarray, list[np.ndarray]]] = {}
        self._lock = threading.Lock()  # the prefetch thread and the main thread may both open files

    @classmethod
    def open(cls, data_uri: str, patch: Patch, split: str | None = "train") -> ShardIndex:
        """Read the manifest and list its clips from the clip index; `split=None` keeps every clip.

        No shard is opened here: the index (Parquet, a few columns read) says where each clip
        lives. Shards are memory-mapped when a clip is first loaded.
        """
        manifest = read_manifest(data_uri)
        index = cls(data_uri, manifest, [], [], patch)
        tokens = {}
        for bucket, spec in manifest["buckets"].items():
            try:
                tokens[bucket] = math.prod(num_patches(tuple(spec["latent_shape"]), index.patch))
            except ValueError as e:
                raise ValueError(f"bucket {bucket!r}: {e}") from None
        table = read_index(data_uri, manifest, ["clip_id", "bucket", "shard", "row"], split=split)
        table = table.sort_by([("clip_id", "ascending")])
        ids, buckets = table["clip_id"].to_pylist(), table["bucket"].to_pylist()
        shards, rows = table["shard"].to_pylist(), table["row"].to_pylist()
        file_of: dict[str, int] = {}
        for path in sorted(set(shards)):
            file_of[path] = len(index.files)
            index.files.append(path)
        index.clips = [ClipRef(c, b, file_of[f], r, tokens[b]) for c, b, f, r in zip(ids, buckets, shards, rows)]
        dupes = [a for a, b in zip(ids, ids[1:]) if a == b]
        if dupes:
            raise ShardError(f"{len(dupes)} clip id(s) appear twice in {data_uri}, e.g. {dupes[0]}")
        return index

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]["data_sha256"]

    def table(self, file: int) -> pa.Table:
        """One shard as an Arrow table, memory-mapped when local (opened once, then cached)."""
        with self._lock:
            if file not in self._tables:
                uri = storage.join(self.data_uri, self.files[file])
                fs, path = storage.resolve(uri)
                if isinstance(fs, pafs.LocalFileSystem):
                    table = pa.ipc.open_file(pa.memory_map(path)).read_all()
                else:  # object stores cannot be mapped: read the file once
                    with fs.open_input_file(path) as f:
                        table = pa.ipc.open_file(f).read_all()
                version = (table.schema.metadata or {}).get(b"ditharos.schema_version")
                if version != str(SCHEMA_VERSION).encode():
                    raise ShardError(f"{uri}: shard schema version {version!r}, this code reads {SCHEMA_VERSION}")
                self._tables[file] = table
            return self._tables[file]

    def _row(self, file: int, name: str, row: int) -> np.ndarray:
        """One row of a tensor column: a zero-copy view into the mapped shard."""
        key = (file, name)
        if key not in self._chunks:
            chunks = self.table(file).column(name).chunks
            starts = np.cumsum([0] + [len(c) for c in chunks])
            with self._lock:
                self._chunks[key] = (starts, [c.to_numpy_ndarray() for c in chunks])
        starts, arrays = self._chunks[key]
        c = int(np.searchsorted(starts, row, side="right")) - 1
        return arrays[c][row - starts[c]]

    def load(self, clip: ClipRef) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents (C, T', H', W') float32, text (77, D) float32, text_mask (77,) bool) of one clip."""
        latents = torch.from_numpy(self._row(clip.file, "latents", clip.row).astype(np.float32))
        text = torch.from_numpy(self._row(clip.file, "text_embedding", clip.row).astype(np.float32))
        mask = torch.from_numpy(self._row(clip.file, "text_mask", clip.row).astype(bool))
        return latents, text, mask


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
    plan of the taken clips; a step ends at the first clip that would need one pack more,
    or at the end of the order.
    """
    taken: list[int] = []
    skipped: list[int] = []
    plan: list[list[int]] = []
    total = 0
    pos = state.position
    while pos < len(order):
        clip = int(order[pos])
        n = token_counts[clip]
        if n > token_budget:
            skipped.append(clip)
            pos += 1
            continue
        if total + n > packs_per_step * token_budget:  # cannot fit: no need to run FFD
            break
        trial = plan_packs([token_counts[c] for c in taken + [clip]], token_budget)
        if len(trial) > packs_per_step:
            break
        taken.append(clip)
        total += n
        plan = trial
        pos += 1
    return [[taken[i] for i in p] for p in plan], skipped, pos


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
