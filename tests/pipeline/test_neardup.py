"""pipeline/neardup.py: perceptual hashes survive re-encoding and resizing, bands find every near pair,
SemDedup finds planted copies, and the survivor does not depend on how the work is split."""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa

from pipeline.neardup import (
    DedupConfig,
    _hash_small,
    assign,
    band_keys,
    bit_tables,
    clip_chash,
    clip_phash,
    color_delta,
    expected_recall,
    hamming,
    kmeans,
    phash,
    semdedup_cluster,
    survivor_key,
)
from pipeline.samples import sample_dir


def frame_of(name: str, index: int = 10) -> np.ndarray:
    cap = cv2.VideoCapture(str(sample_dir() / name))
    for _ in range(index + 1):
        ok, bgr = cap.read()
    assert ok
    return bgr[..., ::-1].copy()


def test_phash_survives_resizing_and_reencoding_and_separates_other_content() -> None:
    a = frame_of("bikes.mp4")
    small = cv2.resize(a, (a.shape[1] // 2, a.shape[0] // 2), interpolation=cv2.INTER_AREA)
    ok, jpg = cv2.imencode(".jpg", np.ascontiguousarray(a[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 25])
    reencoded = cv2.imdecode(jpg, cv2.IMREAD_COLOR)[..., ::-1]
    brighter = np.clip(a.astype(np.int16) + 12, 0, 255).astype(np.uint8)
    h = phash(a)
    for copy in (small, reencoded, brighter):
        assert hamming(np.int64(h), np.int64(phash(copy))) <= 6
        assert color_delta(clip_chash(a[None]), clip_chash(copy[None])) <= 3  # measured 0-2
    # Another hue with the same luma layout: pHash cannot tell; the colour signature can.
    ycc = cv2.cvtColor(a, cv2.COLOR_RGB2YCrCb)
    ycc[..., 1], ycc[..., 2] = 190, 80  # a strong red tint over the same luma (a generated scene in another hue)
    hued = cv2.cvtColor(ycc, cv2.COLOR_YCrCb2RGB)
    assert hamming(np.int64(h), np.int64(phash(hued))) <= 6
    assert color_delta(clip_chash(a[None]), clip_chash(hued[None])) > 3 * DedupConfig().max_color_delta
    for other in (frame_of("bigbuckbunny.mp4"), frame_of("carphone_pristine.mp4"), frame_of("bikes.mp4", 200)):
        assert hamming(np.int64(h), np.int64(phash(other))) > 12
    assert -(2**63) <= h < 2**63  # fits the int64 column


def all_frames(name: str) -> np.ndarray:
    cap = cv2.VideoCapture(str(sample_dir() / name))
    out = []
    while (got := cap.read())[0]:
        out.append(got[1][..., ::-1].copy())
    return np.stack(out)  # (T, H, W, 3) RGB


def test_the_clip_hash_survives_a_trim_where_the_middle_frame_does_not() -> None:
    """A trimmed copy's windows start k frames off the original's: its clips are the same shots shifted."""
    bikes = all_frames("bikes.mp4")  # 25 fps, fast motion: the hard case
    window, stride, limit = 51, 3, DedupConfig().max_distance  # ~17 frames at 8 fps, like a 17f bucket
    for k in (4, 6):  # 0.16 s and 0.24 s trimmed off
        clip_d, mid_d = [], []
        for i in range(0, len(bikes) - window - k, 10):
            a, b = bikes[i:i + window:stride], bikes[i + k:i + k + window:stride]
            clip_d.append(int(hamming(np.int64(clip_phash(a)), np.int64(clip_phash(b)))))
            mid_d.append(int(hamming(np.int64(phash(a[len(a) // 2])), np.int64(phash(b[len(b) // 2])))))
        assert np.mean(np.array(clip_d) <= limit) >= 0.85, clip_d  # measured 1.0 and 0.9
        assert np.mean(np.array(mid_d) <= limit) <= 0.4, mid_d  # measured 0.25 and 0.15: why not the middle frame
    # Unrelated clips stay far apart; so do windows 2.4 s apart in one video.
    clips = [v[i:i + window:stride] for v in (bikes, all_frames("bigbuckbunny.mp4"),
                                              all_frames("carphone_pristine.mp4")) for i in (0, 60)]
    hashes = np.array([clip_phash(c) for c in clips], np.int64)
    d = hamming(hashes[:, None], hashes[None, :])
    video = np.repeat(np.arange(3), 2)
    assert (d[video[:, None] != video[None, :]] > 2 * limit).all(), d  # measured >= 22
    assert (d[(video[:, None] == video[None, :]) & ~np.eye(6, dtype=bool)] > limit).all(), d  # 2.4 s on: >= 12
    # A one-frame clip (a still image) hashes its frame: its luma area-resized to 32 x 32, as written out here.
    small = cv2.resize(cv2.cvtColor(clips[0][0], cv2.COLOR_RGB2GRAY).astype(np.float32), (32, 32),
                       interpolation=cv2.INTER_AREA)
    assert clip_phash(clips[0][:1]) == phash(clips[0][0]) == _hash_small(small)
    mean = np.mean([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in clips[0]], axis=0, dtype=np.float64)  # (H, W)
    expected = _hash_small(cv2.resize(mean.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA))
    assert hamming(np.int64(clip_phash(clips[0])), np.int64(expected)) <= 1  # the mean frame's (float rounding)
    assert hamming(np.int64(clip_phash(clips[0])), np.int64(phash(clips[0][0]))) > 1  # not its first frame's


def test_bit_tables_find_near_pairs_as_often_as_the_formula_says() -> None:
    rng = np.random.default_rng(0)
    n = 3000
    base = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
    tables = bit_tables(20, 16, seed=0)
    assert tables.shape == (20, 16) and np.array_equal(tables, bit_tables(20, 16, seed=0))
    assert all(len(set(row)) == 16 for row in tables.tolist())  # 16 distinct bits per table
    for d in (0, 3, 6, 9):
        flips = np.zeros(n, np.uint64)
        for i in range(n):  # exactly d random bits flipped
            for bit in rng.choice(64, d, replace=False):
                flips[i] |= np.uint64(1) << np.uint64(int(bit))
        copies = (base.view(np.uint64) ^ flips).view(np.int64)
        assert (hamming(base, copies) == d).all()
        ka, kb = band_keys(base, tables), band_keys(copies, tables)
        assert ((ka >> 56) == np.arange(20)).all()  # the table index is part of the key: tables never collide
        found = (ka == kb).any(axis=1).mean()
        expected = expected_recall(d, 16, 20)
        assert abs(found - expected) < 4 * np.sqrt(expected * (1 - expected) / n) + 1e-9, (d, found, expected)
    assert expected_recall(0, 16, 20) == 1.0 and expected_recall(4, 16, 20) > 0.999
    assert expected_recall(6, 16, 20) > 0.97
    # unrelated hashes (32 bits apart on average) almost never share a key
    assert (band_keys(base, tables) == band_keys(np.roll(base, 1), tables)).any(axis=1).mean() < 0.01


def test_the_best_copy_survives_whatever_the_input_order() -> None:
    from pipeline.neardup import DedupConfig
    from pipeline.neardup_pass import best_pairs, key_rows, perceptual_pairs
    from tests.datasets import cand_table

    rng = np.random.default_rng(1)
    h = rng.integers(-(2**63), 2**63 - 1, 5, dtype=np.int64)
    h[1] = h[0] ^ np.int64(0b101)  # 2 bits from clip a
    h[2] = h[0] ^ np.int64(0b1110000)  # 3 bits from a, 5 from b
    ids = ["a", "b", "c", "d", "e"]
    pixels, sharp = [100, 400, 100, 1, 1], [50.0, 10.0, 5.0, 1.0, 1.0]  # b: most pixels
    cfg = DedupConfig(max_distance=4)
    tables = bit_tables(cfg.tables, cfg.bits, cfg.seed)

    def decide(order: list[int]) -> dict[str, str]:
        cands = cand_table([ids[i] for i in order], [f"s{i}" for i in order], h[order],
                           [pixels[i] for i in order], [sharp[i] for i in order])
        found = best_pairs(perceptual_pairs(key_rows(cands, tables, 1), cfg))
        return dict(zip(found["clip_id"].to_pylist(), found["duplicate_of"].to_pylist()))

    results = [decide(list(p)) for p in (range(5), [4, 2, 0, 3, 1], [1, 3, 0, 2, 4])]
    assert results[0] == results[1] == results[2] == {"a": "b", "c": "a"}  # c is 5 bits from b: only near a
    # groups decided apart (a with c, a with b) merge to the same answer
    split = best_pairs(pa.concat_tables([perceptual_pairs(key_rows(cand_table(
        [ids[i] for i in part], [f"s{i}" for i in part], h[part], [pixels[i] for i in part],
        [sharp[i] for i in part]), tables, 1), cfg) for part in ([0, 2], [0, 1])]))
    assert dict(zip(split["clip_id"].to_pylist(), split["duplicate_of"].to_pylist())) == results[0]
    assert survivor_key("b", 400, 10.0) < survivor_key("a", 100, 50.0) < survivor_key("c", 100, 5.0)


def test_semdedup_finds_planted_copies_in_clusters() -> None:
    rng = np.random.default_rng(2)
    base = rng.standard_normal((600, 32)).astype(np.float32)
    copies = base[:50] + 0.02 * rng.standard_normal((50, 32)).astype(np.float32)  # 50 near-copies
    x = np.concatenate([base, copies])
    ids = [f"c{i:04d}" for i in range(len(x))]
    keys = [survivor_key(c, 10, 1.0) for c in ids]
    centroids = kmeans(x[rng.permutation(len(x))[:300]], k=8, seed=0)
    assert centroids.shape == (8, 32) and np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    label = assign(x, centroids)
    assert np.array_equal(kmeans(x[:300], 8, 0), kmeans(x[:300], 8, 0))  # seeded
    found = {}
    for j in range(8):
        members = np.flatnonzero(label == j)
        found.update({c: o for c, o, _ in semdedup_cluster([ids[i] for i in members], x[members],
                                                           [keys[i] for i in members], eps=0.01, block=64)})
    planted = {ids[600 + i]: ids[i] for i in range(50)}
    caught = {k: v for k, v in found.items() if k in planted}
    assert len(caught) >= 45 and all(planted[k] == v for k, v in caught.items())  # copy → its original
    assert set(found) <= set(planted)  # no distinct embedding is called a copy
