"""Epoch orders computed a block at a time, in O(shard files) memory — never a permutation of every clip.

An epoch's order used to be a NumPy permutation of all N clips, built by every training worker
at every epoch start, plus the token counts as a Python list: at 100M clips ~4.5 GB per worker
(7 GB at the epoch-start peak, ~35 s), 8 workers a node (tests/bench/epoch_order.py). Here the
order is a function: `ShuffledOrder.at(lo, hi)` gives the clip indices of positions [lo, hi),
from three small pieces —

  * `Permutation(n, key)`: a keyed pseudo-random bijection of [0, n) (a Feistel network with
    cycle-walking, the construction of format-preserving encryption and of Grain's
    `index_shuffle`). Grain has one, but only as a private, one-index-per-call C++ binding that
    brings Grain's dependencies; this one is vectorised NumPy over a block of positions.
  * `_Stream`: one population's clips (videos, or images) grouped by shard file
    (`ShardIndex.by_file`, shared by the node's workers): the epoch's file permutation cut into
    windows of W files, each window's clips in a `Permutation` of their own — the windowed
    shuffle of `training.data.epoch_order` (see there why), with O(files) state.
  * `_image_blocks`: which slots of a mixed epoch are images — a uniformly random subset of
    exactly the asked size, drawn as hypergeometric splits down a tree of BLOCK-slot blocks
    (O(slots / BLOCK) counts), then positions within each block on demand.

Everything is a function of (seed, epoch, index) only, so any worker count and any resume
position see the same order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

# Feistel rounds. Luby–Rackoff's 4 hold for wide halves; on small domains (a 16-clip window has
# 2-bit halves) pairs of outputs stay visibly dependent at 4-6 rounds and not at 8
# (tests/training/test_order.py: chi-square of where two clips land, 239 d.o.f.: 4 rounds ~480-1600, 8 ~235-250).
ROUNDS = 8
BLOCK = 4096  # image-mix slots whose positions are drawn together
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # splitmix64's finaliser
_HYPERGEOMETRIC_MAX = 10**9  # NumPy's limit on each of ngood, nbad
_VIDEOS, _IMAGES, _FILES, _WINDOW, _SLOTS, _BLOCK = 1, 2, 3, 4, 5, 6  # key tags: one random stream each


def _mix(z: np.ndarray) -> np.ndarray:
    """A 64-bit bijective hash (uint64 arrays wrap on overflow, as intended here)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class Permutation:
    """A keyed pseudo-random bijection of [0, n): a balanced Feistel network on the smallest even
    number of bits that covers n; values that land ≥ n are encrypted again until they fall in range
    (cycle-walking: the domain is < 4n, so < 4 rounds of walking on average).

    Feistel rounds on halves of ≥ 2 bits are even permutations, so when n is a power of 4 (no
    walking) only even orders occur: half of all orders, which no statistic of a data order sees."""

    def __init__(self, n: int, key: Sequence[int]) -> None:
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        self.half = np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        self.keys = np.random.SeedSequence([int(k) for k in key]).generate_state(ROUNDS, np.uint64)

    def _encrypt(self, x: np.ndarray, tweak: np.ndarray | None) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            key = k if tweak is None else _mix(k ^ tweak)  # per element: one permutation per tweak
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << self.half) | right

    def __call__(self, x: np.ndarray, tweak: np.ndarray | None = None) -> np.ndarray:
        """The images of `x` (values in [0, n)) as int64. `tweak` (one int ≥ 0 per value) picks one
        of many independent permutations per value — the image cycles of an epoch in one call."""
        x = np.asarray(x, np.int64)
        if len(x) and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"positions outside [0, {self.n})")
        t = None if tweak is None else _mix(np.asarray(tweak, np.int64).astype(np.uint64) + _M2)
        y = self._encrypt(x.astype(np.uint64), t)
        walk = np.flatnonzero(y >= self.n)
        while len(walk):  # ends: x's cycle under the cipher comes back to x < n
            y[walk] = self._encrypt(y[walk], None if t is None else t[walk])
            walk = walk[y[walk] >= self.n]
        return y.astype(np.int64)


class _Cache(OrderedDict):
    """The last few objects built by key (a block spans at most a few windows / cycles)."""

    def get_or(self, key: object, make: callable) -> object:
        if key not in self:
            self[key] = make()
            while len(self) > 8:
                self.popitem(last=False)
        return self[key]


class _Stream:
    """A population's clips in one epoch's order: files permuted and cut into windows of
    `window_files` files, each window's clips permuted among themselves; windows follow each other.
    window_files ≤ 0 (or ≥ the file count): one window, a uniform permutation of the population."""

    def __init__(self, members: np.ndarray, start: np.ndarray, count: np.ndarray, window_files: int,
                 key: tuple[int, ...]) -> None:
        self.members, self.start, self.key = members, start, key
        num_files = len(count)
        windowed = 0 < window_files < num_files
        # Keys end in a non-zero tag: NumPy's SeedSequence ignores trailing zeros, so (…, 0) and
        # (…, 0, 0) would seed the same stream.
        self.place = (np.random.Generator(np.random.PCG64([*key, _FILES])).permutation(num_files) if windowed
                      else np.arange(num_files))  # place → file
        self.cum = np.concatenate([[0], np.cumsum(count[self.place])]).astype(np.int64)  # clips before each place
        step = window_files if windowed else max(num_files, 1)
        self.edges = np.append(self.cum[0:num_files:step], self.cum[-1])  # window w: [edges[w], edges[w+1])
        self._perms = _Cache()

    def __len__(self) -> int:
        return int(self.cum[-1])

    def at(self, positions: np.ndarray, cycle: np.ndarray | None = None) -> np.ndarray:
        """Clip indices at these positions of the stream; each `cycle` (one per position) permutes
        within the windows anew (the same files, the same windows)."""
        window = np.searchsorted(self.edges, positions, side="right") - 1
        target = np.empty_like(positions)
        for w in np.unique(window).tolist():
            sel = window == w
            lo, size = int(self.edges[w]), int(self.edges[w + 1] - self.edges[w])
            perm = self._perms.get_or(w, lambda: Permutation(size, (*self.key, _WINDOW, w)))
            target[sel] = lo + perm(positions[sel] - lo, None if cycle is None else cycle[sel])
        place = np.searchsorted(self.cum, target, side="right") - 1
        file = self.place[place]
        return self.members[self.start[file] + (target - self.cum[place])].astype(np.int64)


def _hypergeometric(rng: np.random.Generator, good: np.ndarray, bad: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    """Goods among `drawn` of good+bad (elementwise); past NumPy's 10^9 limit a clipped binomial
    (the two agree closely at that size; the total stays exact either way)."""
    big = (good >= _HYPERGEOMETRIC_MAX) | (bad >= _HYPERGEOMETRIC_MAX)
    out = np.empty(len(good), np.int64)
    ok = ~big
    if ok.any():
        out[ok] = rng.hypergeometric(good[ok], bad[ok], drawn[ok])
    if big.any():
        g, b, d = good[big], bad[big], drawn[big]
        out[big] = np.clip(rng.binomial(d, g / (g + b)), np.maximum(0, d - b), np.minimum(d, g))
    return out


def _image_blocks(num_slots: int, num_images: int, rng: np.random.Generator) -> np.ndarray:
    """Images in each BLOCK of `num_slots` slots, for a uniformly random choice of `num_images` slots:
    the count of a node of the block tree is split between its halves by a hypergeometric draw."""
    num_blocks = -(-num_slots // BLOCK)
    out = np.zeros(num_blocks, np.int64)
    lo, hi, good = np.array([0]), np.array([num_blocks]), np.array([num_images])
    while len(lo):
        leaf = hi - lo == 1
        out[lo[leaf]] = good[leaf]
        lo, hi, good = lo[~leaf], hi[~leaf], good[~leaf]
        if not len(lo):
            break
        mid = (lo + hi) // 2
        slots = np.minimum(hi * BLOCK, num_slots) - lo * BLOCK
        left = _hypergeometric(rng, good, slots - good, mid * BLOCK - lo * BLOCK)
        lo, hi, good = np.concatenate([lo, mid]), np.concatenate([mid, hi]), np.concatenate([left, good - left])
    return out


class ShuffledOrder:
    """One epoch's order of an index's clips (`ShardIndex.by_file`, `file_videos`, `file_images`).

    image_fraction None: every clip once, windowed as above. image_fraction = f: the epoch is one
    pass over the video clips with image clips at uniformly random slots making up a share f of
    the epoch — drawn from the images' own windowed order, in fresh permutations ("cycles") when f
    asks for more images than there are (up-weighting), the first of them only when fewer (down).
    """

    def __init__(self, by_file: np.ndarray, file_videos: np.ndarray, file_images: np.ndarray, seed: int,
                 epoch: int, window_files: int = 0, image_fraction: float | None = None) -> None:
        self.seed, self.epoch = seed, epoch
        file_videos, file_images = np.asarray(file_videos, np.int64), np.asarray(file_images, np.int64)
        both = file_videos + file_images
        start = np.concatenate([[0], np.cumsum(both)[:-1]]).astype(np.int64)  # each file's first clip
        num_videos, self.num_images = int(file_videos.sum()), int(file_images.sum())
        self.mixed = image_fraction is not None and num_videos > 0 and self.num_images > 0
        if not self.mixed:  # nothing to mix: every clip once
            self.videos = _Stream(by_file, start, both, window_files, (seed, epoch, _VIDEOS))
            self.length, self.num_draws = len(self.videos), 0
            return
        self.videos = _Stream(by_file, start, file_videos, window_files, (seed, epoch, _VIDEOS))
        # within a file's group its images follow its videos
        self.images = _Stream(by_file, start + file_videos, file_images, window_files, (seed, epoch, _IMAGES))
        self.num_draws = int(round(num_videos * image_fraction / (1.0 - image_fraction)))
        self.length = num_videos + self.num_draws
        per_block = _image_blocks(self.length, self.num_draws,
                                  np.random.Generator(np.random.PCG64([seed, epoch, _SLOTS])))
        self.images_before = np.concatenate([[0], np.cumsum(per_block)]).astype(np.int64)
        self._blocks = _Cache()

    def __len__(self) -> int:
        return self.length

    def _is_image(self, block: int) -> np.ndarray:
        """Which slots of a block hold images (bool, BLOCK or fewer for the last block)."""
        def make() -> np.ndarray:
            size = min(BLOCK, self.length - block * BLOCK)
            count = int(self.images_before[block + 1] - self.images_before[block])
            mask = np.zeros(size, bool)
            rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch, _BLOCK, block]))
            mask[rng.choice(size, count, replace=False)] = True
            return mask
        return self._blocks.get_or(block, make)

    def _image(self, draws: np.ndarray) -> np.ndarray:
        """Clip indices of image draws j = 0, 1, ...: cycle j // images, position j % images in it.
        The cycles share the images' files and windows and differ by the permutations' tweak, so
        a block of few up-weighted images (many cycles) is one vectorised call, not one per cycle."""
        cycle = draws // self.num_images
        return self.images.at(draws - cycle * self.num_images, cycle)

    def at(self, lo: int, hi: int) -> np.ndarray:
        """Clip indices (int64) at positions [lo, hi) of the epoch."""
        if not 0 <= lo <= hi <= self.length:
            raise IndexError(f"positions [{lo}, {hi}) outside the epoch's {self.length}")
        positions = np.arange(lo, hi, dtype=np.int64)
        if not self.mixed:
            return self.videos.at(positions)
        block = positions // BLOCK
        is_image = np.empty(len(positions), bool)
        images_before = np.empty(len(positions), np.int64)  # image slots before each position
        for b in np.unique(block).tolist():
            sel = block == b
            mask = self._is_image(b)
            within = positions[sel] - b * BLOCK
            is_image[sel] = mask[within]
            images_before[sel] = self.images_before[b] + np.concatenate([[0], np.cumsum(mask)])[within]
        out = np.empty(len(positions), np.int64)
        out[is_image] = self._image(images_before[is_image])
        out[~is_image] = self.videos.at(positions[~is_image] - images_before[~is_image])
        return out


class ArrayOrder:
    """An order held whole (format 1 of the loader state, and tests): `at` slices it."""

    def __init__(self, order: np.ndarray) -> None:
        self.order = np.asarray(order)

    def __len__(self) -> int:
        return len(self.order)

    def at(self, lo: int, hi: int) -> np.ndarray:
        return self.order[lo:hi].astype(np.int64)
