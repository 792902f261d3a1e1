"""The training loader's deterministic core: global step plan, worker share, resume.

Every worker reads the clip index and memory-maps the Arrow shards itself (nothing flows
through a driver). The data order is a property of the *global* run, never of the worker
count:

  * `training.index.ShardIndex` lists every clip as (bucket, file, row) with its token count,
    taken from the bucket's latent shape and the patch, sorted by `clip_id` (so the shard
    layout does not matter either).
  * An epoch's order is a permutation of that list (uniform, or shuffled within windows of
    shard files for remote data: `epoch_order` says why), computed a block of positions at a
    time by `training.order.ShuffledOrder` in O(shard files) memory. Runs begun before that
    (loader state format 1) keep `epoch_order`'s arrays, so they resume exactly.
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

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from training.ffd import GrowingFFD
from training.index import DataError, ShardIndex
from training.order import ArrayOrder, ShuffledOrder
from training.packing import PackedBatch, pack

log = logging.getLogger("ditharos.data")

EpochOrder = ArrayOrder | ShuffledOrder  # len() and at(lo, hi) -> clip indices
PLAN_BLOCK = 4096  # order positions computed at a time while planning (a step takes ~1-20k clips)


# ---------------------------------------------------------------------------
# Global order and step plan (no data read)
# ---------------------------------------------------------------------------


def epoch_order(num_clips: int, seed: int, epoch: int, file_of: np.ndarray | None = None,
                window_shards: int = 0, is_image: np.ndarray | None = None,
                image_fraction: float | None = None) -> np.ndarray:
    """The epoch's permutation of clip indices, whole (loader state format 1; format 2 computes the
    same kind of order on demand: training/order.py). A function of (seed, epoch) and the index only.

    window_shards = 0: one uniform permutation of all clips. Every step then reads from all
    over the dataset — right for memory-mapped local shards (only the pages read are read),
    wrong for remote ones, which a node downloads whole: with a cache smaller than the dataset
    each shard would be downloaded again for nearly every clip it holds (measured: 17× the
    dataset's bytes over 2 epochs with a cache of half of it, tests/bench/loader_scale.py).
    window_shards = W > 0 (the shuffle of WebDataset / MosaicML Streaming, made exact and
    resumable): the shard files are permuted, cut into windows of W files, and the clips of
    each window are permuted among themselves; windows follow each other. A step then reads
    from one or two windows, so a node cache holding ~2 windows downloads each shard once per
    epoch. Larger W mixes more (W · clips per shard candidates for each position).

    image_fraction = f (with `is_image`, True for clips of 1-frame buckets): the epoch is one
    pass over the video clips, with image clips mixed in at random positions so that a share f
    of the epoch's clips are images — drawn in the order above, cycled in fresh permutations
    when f asks for more images than there are (up-weighting), left out when fewer (down).
    """
    rng = np.random.Generator(np.random.PCG64([seed, epoch]))
    if window_shards <= 0 or file_of is None:
        order = rng.permutation(num_clips)
    else:
        rank = rng.permutation(int(file_of.max()) + 1 if len(file_of) else 0)  # file → its place this epoch
        window = rank[file_of] // window_shards
        order = np.lexsort((rng.random(num_clips), window))  # by window, then randomly within it
    if image_fraction is None or is_image is None:
        return order
    return mix_images(order, is_image, image_fraction, np.random.Generator(np.random.PCG64([seed, epoch, 1])))


def mix_images(order: np.ndarray, is_image: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """`order`'s video clips, in order, with image clips at random positions making up `fraction` of all."""
    images, videos = order[is_image[order]], order[~is_image[order]]
    if not len(images) or not len(videos):
        return order  # nothing to mix: an all-image or all-video dataset keeps its order
    num_images = int(round(len(videos) * fraction / (1.0 - fraction)))
    cycles = [images] + [rng.permutation(images) for _ in range(num_images // len(images))]
    draws = np.concatenate(cycles)[:num_images]
    slots = np.zeros(len(videos) + num_images, bool)
    slots[rng.choice(len(slots), num_images, replace=False)] = True
    mixed = np.empty(len(slots), order.dtype)
    mixed[slots], mixed[~slots] = draws, videos
    return mixed


ORDER_FORMAT = 2  # 2: training/order.py's computed orders; 1: epoch_order's arrays (runs begun before)


@dataclass(frozen=True)
class LoaderState:
    """Where the global order stands: the next step starts at `order(epoch)[position]`."""

    epoch: int = 0
    position: int = 0
    step: int = 0  # global steps taken so far
    order: int = ORDER_FORMAT  # how epochs are ordered: fixed for a run (a resume keeps its format)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoaderState:
        order = int(d.get("order", 1))  # states saved before the format was recorded are format 1
        if order not in (1, ORDER_FORMAT):
            raise ValueError(f"loader state has epoch-order format {order}; this version knows 1 and {ORDER_FORMAT}")
        return cls(epoch=int(d["epoch"]), position=int(d["position"]), step=int(d.get("step", 0)), order=order)


@dataclass(frozen=True)
class StepPlan:
    """One global step: which clips go into which pack (indices into ShardIndex.clips)."""

    step: int
    epoch: int
    packs: list[list[int]]  # ≤ packs_per_step packs, each ≤ token_budget tokens
    skipped: list[int]  # clips passed over because they alone exceed the budget
    state: LoaderState  # after this step


def plan_step(token_counts: np.ndarray | list[int], order: EpochOrder | np.ndarray, state: LoaderState,
              packs_per_step: int, token_budget: int) -> tuple[list[list[int]], list[int], int]:
    """Greedily take clips from `order[state.position:]` while FFD fits them in `packs_per_step` packs.

    Returns (packs as clip indices, skipped clip indices, next position). Packs are FFD's
    plan of the taken clips (`packing.plan_packs`); a step ends at the first clip that would
    need one pack more, or at the end of the order. `training.ffd` answers "does FFD still
    fit?" per clip without re-running FFD over all taken clips. The order is read PLAN_BLOCK
    positions at a time (`EpochOrder.at`), the token counts only for those clips.
    """
    tokens = np.asarray(token_counts)
    order = ArrayOrder(order) if isinstance(order, np.ndarray) else order
    ffd = GrowingFFD(token_budget, packs_per_step)
    skipped: list[int] = []
    pos, end = state.position, len(order)
    while pos < end:
        clips = order.at(pos, min(pos + PLAN_BLOCK, end))
        for clip, n in zip(clips.tolist(), tokens[clips].tolist()):  # list items: the fastest per clip
            if n > token_budget:
                skipped.append(clip)
                pos += 1
                continue
            if ffd.total + n > packs_per_step * token_budget:  # cannot fit: no need to ask FFD
                return ffd.plan(), skipped, pos
            ffd.add(clip, n)
            if not ffd.fits():
                ffd.remove_last(n)
                return ffd.plan(), skipped, pos
            pos += 1
    return ffd.plan(), skipped, pos


def epoch_orders(index: ShardIndex, state: LoaderState, seed: int, window_shards: int = 0,
                 image_fraction: float | None = None) -> Callable[[int], EpochOrder]:
    """epoch → its order, in the state's format (2: computed on demand; 1: arrays, as runs begun before)."""
    if state.order == 1:
        is_image = index.num_frames == 1
        return lambda epoch: ArrayOrder(epoch_order(len(index.num_tokens), seed, epoch, index.file_of,
                                                    window_shards, is_image, image_fraction))
    return lambda epoch: ShuffledOrder(index.by_file, index.file_videos, index.file_images, seed, epoch,
                                       window_shards, image_fraction)


def plan_steps(index: ShardIndex, state: LoaderState, seed: int, packs_per_step: int,
               token_budget: int, window_shards: int = 0, image_fraction: float | None = None) -> Iterator[StepPlan]:
    """Global step plans from `state` on, endlessly over epochs.

    Memory: the index's columns (shared by the node's workers, training/indexfile.py) and, per
    epoch, O(shard files) of order state — no array per clip (format 1 states: two)."""
    counts = index.num_tokens
    smallest = int(counts.min()) if len(counts) else 0
    if not len(counts) or smallest > token_budget:
        raise DataError(f"no clip of {index.data_uri} fits a pack of {token_budget} tokens "
                        f"(smallest has {smallest})")
    order_of = epoch_orders(index, state, seed, window_shards, image_fraction)
    epoch, order = state.epoch, order_of(state.epoch)
    while True:
        skipped: list[int] = []
        packs: list[list[int]] = []
        while not packs:  # never an empty step: an epoch whose rest is all oversized rolls on
            if state.position >= len(order):
                state = replace(state, epoch=state.epoch + 1, position=0)
            if state.epoch != epoch:
                epoch, order = state.epoch, order_of(state.epoch)
            start = state.position
            packs, more, pos = plan_step(counts, order, state, packs_per_step, token_budget)
            if not packs and start == 0 and pos >= len(order):  # a whole epoch: would roll on forever
                raise DataError(
                    f"no clip of epoch {epoch}'s order of {index.data_uri} fits a pack of {token_budget} tokens "
                    f"({len(more)} clips, all over it)" + ("" if image_fraction is None else
                    f"; with data.image_fraction={image_fraction} an epoch is the video clips and "
                    f"{'no' if image_fraction == 0 else 'some'} images: raise data.token_budget or the fraction"))
            skipped += more
            state = replace(state, position=pos)
        # The step that finishes an epoch leaves the state at the next epoch's start.
        done = pos >= len(order)
        after = replace(state, epoch=epoch + 1 if done else epoch, position=0 if done else pos, step=state.step + 1)
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
    num_tokens: int = 0  # real tokens of the whole global step (every worker knows the plan: no collective)
    num_samples: int = 0  # clips of the whole global step
    all_clip_ids: list[str] | None = None  # every clip of the global step in pack order (when asked for)


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
                 rank: int = 0, world_size: int = 1, state: LoaderState | None = None, fetch_ahead: int = 0,
                 window_shards: int = 0, pin_memory: bool = False, all_clip_ids: bool = False,
                 image_fraction: float | None = None) -> None:
        self.index = index
        self.fetch_ahead = fetch_ahead  # steps whose shards are asked for ahead (index.prefetch) before built
        self.window_shards = window_shards  # epoch_order's shuffle window (0: all clips)
        self.image_fraction = image_fraction  # epoch_order's share of 1-frame clips (None: as they come)
        self.seed = seed
        self.packs_per_step = packs_per_step
        self.token_budget = token_budget
        self.slots = worker_packs(packs_per_step, rank, world_size)
        self.state = state or LoaderState()  # after the last step yielded
        self.num_skipped = 0  # oversized clips passed over so far (this loader's steps only)
        self.pin_memory = pin_memory  # page-locked packs, for non-blocking copies to the GPU
        self.all_clip_ids = all_clip_ids  # fill Step.all_clip_ids (rank 0's per-step clip log)

    def plans(self) -> Iterator[StepPlan]:
        return plan_steps(self.index, self.state, self.seed, self.packs_per_step, self.token_budget,
                          self.window_shards, self.image_fraction)

    def build(self, plan: StepPlan) -> Step:
        """Read this worker's clips of a step from the shards and pack them."""
        batches, ids = [], []
        for members in plan.packs[self.slots]:
            clips = [self.index.clips[i] for i in members]
            latents, text, mask = zip(*(self.index.load(c) for c in clips))
            batch = pack(list(latents), list(text), self.index.patch, self.token_budget, text_mask=list(mask))
            assert batch.num_packs == 1, "a planned pack must stay one pack"
            batches.append(batch.pin_memory() if self.pin_memory else batch)
            ids.append([c.clip_id for c in clips])
        members = [i for pack in plan.packs for i in pack]
        return Step(step=plan.step, epoch=plan.epoch, packs=batches, clip_ids=ids, state=plan.state,
                    num_packs=len(plan.packs), num_skipped=len(plan.skipped),
                    num_tokens=int(self.index.num_tokens[members].sum()) if members else 0,
                    num_samples=len(members),
                    all_clip_ids=[self.index.clips[i].clip_id for i in members] if self.all_clip_ids else None)

    def files(self, plan: StepPlan) -> list[int]:
        """The shard files this worker reads for a step, in first-use order."""
        return list(dict.fromkeys(int(self.index.file_of[i]) for pack in plan.packs[self.slots] for i in pack))

    def _ahead(self) -> Iterator[StepPlan]:
        """The plans, each announced to index.prefetch `fetch_ahead` steps before it is yielded."""
        plans, window = self.plans(), collections.deque()
        while True:
            while len(window) <= self.fetch_ahead:
                plan = next(plans)  # endless: epochs roll on
                self.index.prefetch(self.files(plan))
                self.index.prefetch_clips([i for pack in plan.packs[self.slots] for i in pack])
                window.append(plan)
            yield window.popleft()

    def __iter__(self) -> Iterator[Step]:
        for plan in self._ahead():
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
