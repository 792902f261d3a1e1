"""pipeline/datacard.py and pipeline/inspect.py pieces: bins, folded reasons, the stable example sample, the SVG."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.datacard import NUM_BINS, _Smallest, bin_counts, bin_edges, clip_hash, fold_reason
from pipeline.inspect import histogram_svg


def test_bins_keep_every_value_and_put_outliers_and_zero_in_the_end_bins() -> None:
    values = np.array([0.0, 1e-9, 0.01, 0.5, 50.0, 1e6, np.nan])
    counts = bin_counts("motion", values)
    assert counts.sum() == len(values) - 1 and counts.shape == (NUM_BINS,)  # NaN: never measured, not counted
    assert counts[0] == 2 and counts[-1] == 2  # 0 and 1e-9 below the axis; 50 and 1e6 above it
    edges = bin_edges("motion")
    assert edges[0] == pytest.approx(1e-4) and edges[-1] == pytest.approx(10.0)
    k = np.searchsorted(edges, 0.01, side="right") - 1
    assert counts[k] >= 1  # 0.01 lands in its own bin
    assert bin_counts("black_fraction", np.array([0.0, 0.5, 1.0])).tolist().count(1) == 3


def test_reasons_fold_their_numbers() -> None:
    a = fold_reason("decoding stopped after 31 frame(s); clips before that were kept: PyAV failed after frame 31")
    b = fold_reason("decoding stopped after 4 frame(s); clips before that were kept: PyAV failed after frame 4")
    assert a == b and "N frame(s)" in a
    assert fold_reason("stream ended at 2.50 s but declares 1e+03 s") == "stream ended at N s but declares N s"
    assert fold_reason("perceptual copy of src91028f9d6c72cc8137d8bd05678bd-0000076-17f: 2 of 64 middle-frame hash "
                       "bits differ") == "perceptual copy of CLIP: N of N middle-frame hash bits differ"


def test_the_example_sample_does_not_depend_on_batching() -> None:
    ids = [f"src{i:05d}-0000000-9f" for i in range(500)]
    table = pa.table({"clip_id": ids, "n": list(range(500))})
    hashes = np.array([clip_hash(c) for c in ids], np.int64)
    whole = _Smallest(7)
    whole.offer(table, hashes)
    pieces = _Smallest(7)
    for start in range(0, 500, 37):  # uneven batches, as a dataset scan hands them over
        pieces.offer(table.slice(start, 37), hashes[start:start + 37])
    assert whole.values() == pieces.values() and len(whole.values()) == 7
    expected = sorted(ids, key=clip_hash)[:7]
    assert [r["clip_id"] for r in whole.values()] == expected


def test_histogram_svg_draws_stacked_bars_and_threshold_marks() -> None:
    edges = bin_edges("sharpness").tolist()
    svg = histogram_svg(edges, True, [("kept", [1] * NUM_BINS, "#00f"), ("filtered", [2] + [0] * (NUM_BINS - 1), "#f00")],
                        [(15.0, "min 15")], "sharpness")
    assert svg.count("<rect") == NUM_BINS + 1 and "min 15" in svg and 'stroke-dasharray' in svg
    assert "<title>filtered: 2</title>" in svg  # hover tells the count
