"""Near-duplicate clips: perceptual hashes and SemDedup, as pure functions a distributed pass groups.

Two kinds of copies beyond identical bytes (pipeline/dedupe.py):
* **perceptual** — a re-encoded, resized or slightly trimmed copy. Each clip carries `phash`,
  the 64-bit DCT hash of its temporal mean frame (`clip_phash`). A trimmed copy's windows start
  a few frames off the original's (until its first scene cut re-aligns them): on the sample
  clips a 6-frame (0.24 s) shift moves the middle frame's hash by a median 4-14 bits (max 38 on
  bikes.mp4) but the mean frame's by 2-4 (max 10), while unrelated clips stay >= 22 bits apart
  for both. Two clips are copies within `max_distance` differing bits *and* alike in colour:
  pHash sees luma only, so two generated shots of the same layout in different hues (a smooth
  gradient and a square) hashed 2 bits apart and one was dropped as a copy of the other. Each
  clip also carries `chash`, its mean frame's chroma (YCrCb Cr and Cb, 0–255) in each quadrant,
  8 bytes; a copy's may differ by at most `max_color_delta` in every byte. Resizing, re-encoding,
  a brightness shift or a trim move these means by a few units; another hue by tens.
  Candidates are found without all pairs by bit-sampling LSH: each of L tables keys a hash by
  k of its bits (a seeded sample), and clips sharing a key in any table are compared. Two hashes
  d bits apart share a table's key with chance C(64-d, k) / C(64, k), so with k = 16, L = 20
  pairs 4 bits apart are found 99.9% of the time, 6 bits apart 97.2% (`expected_recall`). Why not
  the exact pigeonhole split (d + 1 bands, one must match): 7 bands of 9 bits put N / 512 clips
  in every group, 7 N^2 / 1,024 comparisons in all (6.8e13 at 100M clips); 16-bit keys put N / 65,536
  in a group (L · N^2 / 2^17 = 1.5e12 comparisons at 100M clips; tests/bench/dedup.py measures
  the rate).
* **semantic** — the same shot re-framed, re-graded or watermarked (SemDedup, Abbas et al.
  2023): k-means over the CLIP image embeddings, then within each cluster a clip is a copy of
  another whose cosine similarity exceeds `1 - eps`.

Which copy survives is fixed by a rank every clip carries (`survivor_key`: most pixels × frames,
then the sharper, then the smaller clip id), and the decision is local: a clip is dropped when a
*better-ranked* near neighbour exists, naming the best such neighbour. No connected components,
no driver state: each group decides alone and a clip's decisions from several groups merge by
taking the best-ranked neighbour — every step is a Ray Data map or group-by.

Why our own pHash and not `imagehash`: that needs PIL images, scipy and PyWavelets per call;
this is the same algorithm (32×32 luma DCT, 8×8 low frequencies against their median) in a few
OpenCV calls on the frames the cut stage already holds.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

HASH_BITS = 64
SEMANTIC_MODES = ("auto", "on", "off")


@dataclass
class DedupConfig:
    """Near-duplicate removal over the whole output, run when the clip index is built.

    Not a data setting: the shards do not change, only which of their clips the index lists
    (dropped ones become `near_dup` rejects naming the clip they copy). Changing it rebuilds the
    index and changes the output's data_sha256, so a training run never resumes on another clip set.
    """

    perceptual: bool = True
    # Differing bits (of 64) between two clips' pHash for them to be copies. A half-size,
    # JPEG-q25 or +12-luma copy of a sample frame differs in <= 6; other shots of the same video
    # differ in >= 13, unrelated frames in ~32 on average.
    max_distance: int = 6
    # Largest difference of any quadrant's mean Cr / Cb (0-255) between copies. A half-size,
    # JPEG-q25 or +12-luma copy of a sample frame moves them by <= 3 (tests/pipeline/test_neardup.py);
    # a hue change that leaves the luma layout alone, by tens.
    max_color_delta: int = 12
    # The candidate search (module doc): each clip emits `tables` rows to the group-by, and a
    # group holds ~clips / 2^bits of them. 16 x 20: recall 0.999 at 4 bits, 0.972 at 6.
    tables: int = 20
    bits: int = 16
    # SemDedup over the caption stage's CLIP image embeddings. "auto": only with real CLIP
    # weights — a random-init CLIP puts unrelated sample clips at cosine similarity up to 0.997,
    # where any threshold drops nearly everything.
    semantic: str = "auto"
    eps: float = 0.05  # copies: cosine similarity > 1 - eps (SemDedup's LAION runs used 0.03-0.1)
    cluster_size: int = 10_000  # mean clips per k-means cluster: k = ceil(clips / cluster_size)
    # A cluster larger than this is split by a k-means of its own inside its group (work and
    # memory per group stay O(max_cluster^2) and O(max_cluster * dim)).
    max_cluster: int = 50_000
    kmeans_sample: int = 50_000  # clips (chosen by hash of clip id) k-means is fitted on (one Ray task)
    # Clips of one source are not compared: consecutive windows of one long shot look alike by
    # construction and are not copies. True also drops repeats inside a video (a looped intro).
    same_source: bool = False
    seed: int = 0

    def validate(self) -> None:
        if not 0 <= self.max_distance < 32:
            raise ValueError(f"dedup.max_distance={self.max_distance} must be in [0, 31]")
        if not 0 <= self.max_color_delta <= 255:
            raise ValueError(f"dedup.max_color_delta={self.max_color_delta} must be in [0, 255]")
        if not (1 <= self.tables <= 127 and 1 <= self.bits <= 56):
            raise ValueError(f"dedup.tables={self.tables} and dedup.bits={self.bits} must be in [1, 127] and "
                             "[1, 56] (the key packs the table index above the bits)")
        if self.semantic not in SEMANTIC_MODES:
            raise ValueError(f"dedup.semantic={self.semantic!r}: use one of {list(SEMANTIC_MODES)}")
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"dedup.eps={self.eps} must be in (0, 1)")
        for name in ("cluster_size", "max_cluster", "kmeans_sample"):
            if getattr(self, name) < 2:
                raise ValueError(f"dedup.{name}={getattr(self, name)} must be >= 2")

    def semantic_on(self, clip_weights: str) -> bool:
        return self.semantic == "on" or (self.semantic == "auto" and clip_weights != "random-init")


# ---------------------------------------------------------------------------
# Perceptual hashes
# ---------------------------------------------------------------------------


def phash(frame: np.ndarray) -> int:
    """64-bit DCT perceptual hash of an RGB uint8 frame (H, W, 3), as a signed int64 value: the
    hash of a one-frame clip (a still image's)."""
    return clip_phash(frame[None])


def clip_phash(frames: np.ndarray) -> int:
    """pHash of a clip's temporal mean frame: (T, H, W, 3) uint8 → signed int64 value.

    The frames' luma is summed into one float32 (H, W) frame and that mean is area-resized once:
    an area resize to 32 x 32 takes OpenCV's general (non-integer factor) path, 1.5 ms for a
    720p frame against 0.3 ms to convert and add one (6x less on production clips). Until
    2026-12 each frame was resized and the small lumas averaged (rounded per frame): the same
    hash on 48 of 51 sample windows, 2 bits apart on the rest — far inside dedup.max_distance.
    """
    total = np.zeros(frames.shape[1:3], np.float32)  # (H, W)
    for f in frames:
        cv2.accumulate(cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY), total)
    return _hash_small(cv2.resize(total * np.float32(1.0 / len(frames)), (32, 32), interpolation=cv2.INTER_AREA))


def _hash_small(small: np.ndarray) -> int:
    """(32, 32) float32 luma → 64-bit hash: signs of the 8 x 8 lowest DCT terms against their median."""
    low = cv2.dct(np.ascontiguousarray(small, np.float32))[:8, :8].reshape(-1)  # (64,) lowest frequencies
    bits = low > np.median(low[1:])  # the DC term (overall brightness) does not set the threshold
    value = int(np.packbits(bits).view(">u8")[0])
    return value - (1 << 64) if value >= 1 << 63 else value  # int64 column


def clip_chash(frames: np.ndarray) -> int:
    """Colour signature of a clip's mean frame: (T, H, W, 3) uint8 → int64 of 8 bytes, the mean Cr
    and Cb (YCrCb, 0–255) of each quadrant (top-left, top-right, bottom-left, bottom-right).

    Means over a quadrant are read from every 8th pixel of every frame (a strided view, no copy
    of the clip): the subsample's mean differs from the full mean by well under one unit.
    """
    sub = np.asarray(frames)[:, ::8, ::8].astype(np.float32)  # (T, H/8, W/8, 3)
    h, w = sub.shape[1] // 2, sub.shape[2] // 2
    quads = [sub[:, :max(h, 1), :max(w, 1)], sub[:, :max(h, 1), w:], sub[:, h:, :max(w, 1)], sub[:, h:, w:]]
    rgb = np.array([[q.reshape(-1, 3).mean(axis=0) for q in quads]], np.float32) / 255.0  # (1, 4, 3)
    ycc = cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)[0]  # (4, 3) Y, Cr, Cb in [0, 1]
    values = np.clip(np.rint(ycc[:, 1:] * 255.0), 0, 255).astype(np.uint8).reshape(-1)  # (8,)
    return int(values.view(">i8")[0])


def color_delta(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Largest byte difference between int64 colour signatures (broadcasting)."""
    x = np.asarray(a, np.int64)[..., None].view(np.uint8).astype(np.int16)
    y = np.asarray(b, np.int64)[..., None].view(np.uint8).astype(np.int16)
    return np.abs(x - y).max(axis=-1)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Differing bits between int64 hashes (broadcasting)."""
    x = np.bitwise_xor(np.asarray(a, np.int64), np.asarray(b, np.int64)).view(np.uint64)
    return np.unpackbits(x[..., None].view(np.uint8), axis=-1).sum(axis=-1)


def bit_tables(num_tables: int, bits: int, seed: int) -> np.ndarray:
    """(num_tables, bits) bit positions, each row a seeded sample of the 64 (sorted)."""
    rng = np.random.default_rng(seed)
    return np.stack([np.sort(rng.choice(HASH_BITS, bits, replace=False)) for _ in range(num_tables)])


def band_keys(hashes: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """(N, L) group keys of N hashes for L bit tables: table index in the top byte, its sampled bits below."""
    u = np.asarray(hashes, np.int64).view(np.uint64)
    keys = np.empty((len(u), len(tables)), np.int64)
    for t, positions in enumerate(tables):
        bits = (u[:, None] >> positions.astype(np.uint64)[None, :]) & np.uint64(1)  # (N, k)
        weights = np.uint64(1) << np.arange(len(positions), dtype=np.uint64)
        keys[:, t] = (bits * weights).sum(axis=1).astype(np.int64) | (t << 56)
    return keys


def expected_recall(distance: int, bits: int, num_tables: int) -> float:
    """Chance that two hashes `distance` bits apart share a key of at least one of the tables."""
    same = math.comb(HASH_BITS - distance, bits) / math.comb(HASH_BITS, bits)  # all k sampled bits agree
    return 1.0 - (1.0 - same) ** num_tables


# ---------------------------------------------------------------------------
# Survivors
# ---------------------------------------------------------------------------


def survivor_key(clip_id: str, pixels: int, sharpness: float) -> tuple:
    """Sort key: the first of a group of copies survives (most pixels·frames, sharper, smaller id)."""
    return (-int(pixels), -float(np.round(sharpness, 3)), clip_id)  # np.round: as the vectorised ranks


# ---------------------------------------------------------------------------
# SemDedup
# ---------------------------------------------------------------------------


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def kmeans(sample: np.ndarray, k: int, seed: int, iters: int = 20) -> np.ndarray:
    """(k, D) unit centroids of spherical k-means on a sample (k-means++ seeding, seeded)."""
    x = normalise(sample)
    rng = np.random.default_rng(seed)
    k = min(k, len(x))
    centroids = [x[rng.integers(len(x))]]
    closest = 1.0 - x @ centroids[0]
    for _ in range(1, k):  # k-means++: far points are likelier seeds
        p = np.maximum(closest, 0.0) ** 2
        pick = rng.choice(len(x), p=p / p.sum()) if p.sum() > 0 else rng.integers(len(x))
        centroids.append(x[pick])
        closest = np.minimum(closest, 1.0 - x @ x[pick])
    c = np.stack(centroids)
    for _ in range(iters):
        label = assign(x, c)
        for j in range(k):
            members = x[label == j]
            if len(members):
                c[j] = members.sum(axis=0)
        c = normalise(c)
    return c


def assign(embeddings: np.ndarray, centroids: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """(N,) index of each embedding's nearest centroid by cosine, in chunks (memory O(chunk · k))."""
    x = normalise(embeddings)
    return np.concatenate([np.argmax(x[i:i + chunk] @ centroids.T, axis=1) for i in range(0, len(x), chunk)]
                          or [np.zeros(0, np.int64)])


def semdedup_cluster(ids: list[str], embeddings: np.ndarray, keys: list[tuple], eps: float,
                     block: int = 4096, sources: np.ndarray | None = None) -> Iterator[tuple[str, str, float]]:
    """Copies within one cluster: (clip, best-ranked member it copies, their cosine similarity).

    A copy has cosine similarity > 1 - eps to a better-ranked member (never one of the same
    entry of `sources`, when given).

    The similarity matrix is computed in row blocks (memory O(block · cluster size)); a cluster
    of n members costs n² / 2 dot products, so choose k for clusters of ≲ 50k clips.
    """
    order = sorted(range(len(ids)), key=lambda i: keys[i])
    x = normalise(embeddings[order])  # best-ranked first: a better neighbour is an earlier row
    src = None if sources is None else np.asarray(sources)[order]
    for start in range(0, len(order), block):
        sims = x[start:start + block] @ x[:start + block].T  # (b, start + b)
        close = sims > 1.0 - eps
        rows = np.arange(sims.shape[0])
        close[rows, start + rows] = False  # itself
        for r in np.flatnonzero(close.any(axis=1)):
            i = start + int(r)
            hits = np.flatnonzero(close[r, :i])
            if src is not None:
                hits = hits[src[hits] != src[i]]
            if len(hits):
                j = int(hits[0])  # the best-ranked copy
                yield ids[order[i]], ids[order[j]], float(sims[r, j])
