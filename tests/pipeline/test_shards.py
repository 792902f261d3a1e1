"""pipeline/shards.py: the shard contract, written and read back with bare pyarrow."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from pipeline.shards import (
    SCALAR_COLUMNS,
    SCHEMA_VERSION,
    STORED_TENSOR_COLUMNS,
    TENSOR_COLUMNS,
    RowReader,
    ShardError,
    as_float32,
    clip_id,
    clips_table,
    column_shapes,
    read_shard,
    split_of,
    tensor,
    text_tokens,
    write_shard,
)

BUCKET = "96p_16x9_9f"
LATENT_SHAPE = (4, 5, 8, 14)  # (C, T', H', W')


def make_columns(n: int, bucket: str = BUCKET, seed: int = 0) -> dict[str, Any]:
    """Realistic shard columns for `n` clips of one bucket (plain lists and numpy arrays)."""
    rng = np.random.default_rng(seed)
    source_ids = [f"src{rng.integers(0, 2**63):029x}"[:32] for _ in range(max(1, n // 3))]
    src = [source_ids[i % len(source_ids)] for i in range(n)]
    start = [int(i * 37) for i in range(n)]
    mask = np.zeros((n, 77), dtype=bool)
    for i in range(n):
        mask[i, : 3 + i % 20] = True
    return {
        "clip_id": [clip_id(s, f, 9) for s, f in zip(src, start)],
        "source_id": src,
        "source_uri": [f"/data/in/vid é {i % 7}.mp4" for i in range(n)],
        "split": ["val" if i % 5 == 0 else "train" for i in range(n)],
        "bucket": [bucket] * n,
        "scene_index": list(rng.integers(0, 10, n)),  # numpy ints, as Ray batches hand them over
        "window_index": [i % 3 for i in range(n)],
        "start_frame": start,
        "end_frame": [f + 28 for f in start],
        "start_s": [f / 25.0 for f in start],
        "end_s": [f / 25.0 + 9 / 8 for f in start],
        "source_fps": [30000 / 1001] * n,
        "fps": [8.0] * n,
        "num_frames": [9] * n,
        "height_px": [96] * n,
        "width_px": [176] * n,
        "caption": [f"a clip number {i}" if i % 4 else "" for i in range(n)],
        "caption_source": ["sidecar" if i % 2 else "template" for i in range(n)],
        "clip_score": list(rng.uniform(10, 35, n).astype(np.float32)),
        "keyframe_jpeg": [rng.bytes(int(rng.integers(0, 300))) for _ in range(n)],
        "crop_px": [np.array([0, 0, 8 * (i % 2), 8 * (i % 2)], np.int32) for i in range(n)],  # as cut rows carry it
        "phash": list(rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)),
        "chash": list(rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)),
        "motion": list(rng.uniform(0.0, 0.3, n)),
        "max_frame_diff": list(rng.uniform(0.0, 40.0, n)),
        "sharpness": list(rng.uniform(10.0, 1000.0, n)),
        "black_fraction": [0.0] * n,
        "bright_fraction": list(rng.uniform(0.0, 0.1, n)),
        "aesthetic": list(rng.uniform(3.0, 7.0, n)),
        "text_area": list(rng.uniform(0.0, 0.05, n)),
        "latents": rng.standard_normal((n, *LATENT_SHAPE)).astype(np.float16),
        "text_embedding": rng.standard_normal((n, 77, 64)).astype(np.float16),
        "text_mask": mask,
        "image_embedding": rng.standard_normal((n, 64)).astype(np.float16),
    }


def read_bare(path: Path) -> pa.Table:
    """What a consumer with nothing but pyarrow does."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def test_write_read_round_trip_with_bare_pyarrow(tmp_path: Path) -> None:
    n = 300  # more than one 256-row record batch
    cols = make_columns(n)
    path = tmp_path / "shards" / BUCKET / "part-00000.arrow"
    info = write_shard(clips_table(BUCKET, cols), str(path))
    data = path.read_bytes()
    assert info["rows"] == n and info["bytes"] == len(data)
    assert info["sha256"] == hashlib.sha256(data).hexdigest()

    table = read_bare(path)
    assert table.num_rows == n
    assert table.column_names == list(SCALAR_COLUMNS) + list(STORED_TENSOR_COLUMNS)
    meta = table.schema.metadata
    assert meta[b"ditharos.schema_version"] == str(SCHEMA_VERSION).encode()
    assert meta[b"ditharos.bucket"] == BUCKET.encode()

    expected = {"latents": (np.float16, (n, *LATENT_SHAPE)), "image_embedding": (np.float16, (n, 64))}
    for name, (dtype, shape) in expected.items():
        arr = table.column(name).combine_chunks().to_numpy_ndarray()
        assert arr.dtype == dtype and arr.shape == shape, name
        np.testing.assert_array_equal(arr, np.asarray(cols[name]).astype(dtype), err_msg=name)
        assert table.schema.field(name).type.shape == list(shape[1:])
    # Text: each row holds exactly its caption's real tokens, in order, in the stored dtype.
    real = [cols["text_embedding"][i][cols["text_mask"][i]] for i in range(n)]
    got = text_tokens(table)
    assert [g.shape for g in got] == [r.shape for r in real] and {g.dtype for g in got} == {np.dtype(np.float16)}
    for i in range(n):
        np.testing.assert_array_equal(got[i], real[i], err_msg=f"row {i}")
    assert np.asarray(table.column("text_embedding")[n - 1].as_py(), np.float16).shape == real[-1].shape  # bare pyarrow
    assert column_shapes(table.schema) == {"image_embedding": [64], "text_embedding": [77, 64],
                                           "latents": list(LATENT_SHAPE)}
    # Stored text bytes are the real tokens', not the padded (n, 77, 64).
    text_bytes = sum(b.size for b in table.column("text_embedding").combine_chunks().buffers() if b is not None)
    real_bytes = sum(r.nbytes for r in real)
    assert real_bytes <= text_bytes < real_bytes + 16 * n + 4096 < cols["text_embedding"].nbytes

    for name, typ in SCALAR_COLUMNS.items():
        assert table.schema.field(name).type == typ, name
        got = table.column(name).to_pylist()
        if typ == pa.float32():
            np.testing.assert_allclose(got, np.asarray(cols[name], dtype=np.float64), rtol=1e-6, err_msg=name)
        else:
            assert got == [v.tolist() if isinstance(v, (np.generic, np.ndarray)) else v for v in cols[name]], name


def test_read_shard_and_tensor_helper_match_bare_read(tmp_path: Path) -> None:
    cols = make_columns(10, seed=1)
    path = tmp_path / "part-00000.arrow"
    write_shard(clips_table(BUCKET, cols), str(path))
    table = read_shard(str(path))
    assert table.equals(read_bare(path))
    np.testing.assert_array_equal(tensor(table, "latents"), cols["latents"])


def test_read_shard_rejects_wrong_schema_version(tmp_path: Path) -> None:
    table = clips_table(BUCKET, make_columns(4))
    old = table.replace_schema_metadata({**table.schema.metadata, b"ditharos.schema_version": b"0"})
    write_shard(old, str(tmp_path / "old.arrow"))
    with pytest.raises(ShardError, match=rf"old\.arrow: shard schema version b'0', this code reads {SCHEMA_VERSION}"):
        read_shard(str(tmp_path / "old.arrow"))
    write_shard(table.replace_schema_metadata(None), str(tmp_path / "bare.arrow"))
    with pytest.raises(ShardError, match="schema version None"):
        read_shard(str(tmp_path / "bare.arrow"))


def test_no_pickle_or_pandas_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "part-00000.arrow"
    write_shard(clips_table(BUCKET, make_columns(8)), str(path))
    data = path.read_bytes()
    for needle in (b"pickle", b"pandas", b"__reduce__"):
        assert needle not in data, needle
    # Tensor columns are the canonical Arrow extension type, readable without our code.
    assert b"arrow.fixed_shape_tensor" in data


def test_empty_table_is_valid(tmp_path: Path) -> None:
    cols = {k: (np.zeros((0, *np.asarray(v).shape[1:]), np.asarray(v).dtype) if k in TENSOR_COLUMNS else [])
            for k, v in make_columns(2).items()}
    write_shard(clips_table(BUCKET, cols), str(tmp_path / "empty.arrow"))
    table = read_shard(str(tmp_path / "empty.arrow"))
    assert table.num_rows == 0
    assert table.schema.field("latents").type.shape == list(LATENT_SHAPE)
    assert column_shapes(table.schema)["text_embedding"] == [77, 64] and text_tokens(table) == []


# ---------------------------------------------------------------------------
# Contract violations
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["caption", "latents", "keyframe_jpeg"])
def test_missing_column_is_named(missing: str) -> None:
    cols = make_columns(3)
    del cols[missing]
    with pytest.raises(ShardError, match=rf"lack columns \['{missing}'\]"):
        clips_table(BUCKET, cols)


@pytest.mark.parametrize("name", ["caption", "start_frame", "latents", "text_mask"])
def test_mismatched_row_counts(name: str) -> None:
    cols = make_columns(5)
    cols[name] = cols[name][:4]
    with pytest.raises(ShardError, match=rf"column '{name}' has 4 rows, expected 5"):
        clips_table(BUCKET, cols)


def test_row_from_another_bucket() -> None:
    cols = make_columns(4)
    cols["bucket"][2] = "128p_16x9_9f"
    with pytest.raises(ShardError, match=r"rows of bucket '128p_16x9_9f' in a shard of bucket '96p_16x9_9f'"):
        clips_table(BUCKET, cols)


@pytest.mark.parametrize("name", ["latents", "text_embedding"])
def test_ragged_tensor_shapes_are_a_shard_error_naming_the_column(name: str) -> None:
    cols = make_columns(3)
    rows = list(cols[name])
    rows[1] = rows[1][..., :-1]  # one clip with a different shape
    cols[name] = rows
    with pytest.raises(ShardError) as e:
        clips_table(BUCKET, cols)
    msg = str(e.value)
    assert f"column {name!r}" in msg and "shape" in msg
    assert str(tuple(rows[0].shape)) in msg and str(tuple(rows[1].shape)) in msg


def test_a_caption_without_real_tokens_is_refused_naming_the_row() -> None:
    cols = make_columns(4)
    cols["text_mask"][2] = False
    with pytest.raises(ShardError, match=r"row 2 has no real text tokens"):
        clips_table(BUCKET, cols)
    cols = make_columns(4)
    cols["text_mask"] = cols["text_mask"][:, :70]
    with pytest.raises(ShardError, match=r"text_mask \(4, 70\) does not match text_embedding \(4, 77, 64\)"):
        clips_table(BUCKET, cols)


def test_row_reader_reads_rows_of_sliced_chunks() -> None:
    """Rows of a slice (one clip's record batch, a chunk after the first) are that slice's rows."""
    cols = make_columns(9)
    table = clips_table(BUCKET, cols)
    part = table.slice(5, 3)
    for name in ("text_embedding", "latents"):
        chunk = part.column(name).combine_chunks()
        for i in range(3):
            want = (cols["text_embedding"][5 + i][cols["text_mask"][5 + i]] if name == "text_embedding"
                    else cols["latents"][5 + i])
            np.testing.assert_array_equal(RowReader(chunk)[i], want, err_msg=f"{name} row {i}")


def test_wrong_scalar_type_is_rejected() -> None:
    cols = make_columns(3)
    cols["num_frames"] = ["nine"] * 3
    with pytest.raises((ShardError, pa.ArrowInvalid, pa.ArrowTypeError)):
        clips_table(BUCKET, cols)


# ---------------------------------------------------------------------------
# Ids and splits
# ---------------------------------------------------------------------------


def test_clip_id_format() -> None:
    assert clip_id("srcabc", 42, 17) == "srcabc-0000042-17f"
    assert clip_id("srcabc", 1234567, 1) == "srcabc-1234567-1f"
    assert clip_id("srcabc", 0, 9) != clip_id("srcabc", 0, 17)
    assert re.fullmatch(r"src[0-9a-f]{29}-\d{7}-\d+f", clip_id("src" + "0" * 29, 5, 9))


def test_split_of_is_deterministic_and_respects_fraction() -> None:
    ids = [f"src{hashlib.sha256(str(i).encode()).hexdigest()[:29]}" for i in range(2000)]
    at10 = [split_of(s, 0.1) for s in ids]
    assert at10 == [split_of(s, 0.1) for s in ids]
    assert set(at10) == {"train", "val"}
    assert 150 <= at10.count("val") <= 250
    at30 = [split_of(s, 0.3) for s in ids]
    assert 520 <= at30.count("val") <= 680
    # Raising the fraction only moves sources from train to val, never back.
    assert all(b == "val" for a, b in zip(at10, at30) if a == "val")
    assert all(split_of(s, 0.0) == "train" for s in ids)


@pytest.mark.parametrize("latent_dtype", ["float16", "float32", "bfloat16"])
@pytest.mark.parametrize("where", ["local", "s3"])
def test_latents_round_trip_exactly_in_every_stored_dtype(latent_dtype: str, where: str, tmp_path: Path,
                                                          request: pytest.FixtureRequest) -> None:
    """VAE output → the stage's storage encoding → shard → read_shard + as_float32: the value the dtype holds."""
    import torch

    from pipeline.steps import store_latents

    z = torch.randn(3, *LATENT_SHAPE, generator=torch.Generator().manual_seed(7)) * 40  # spans many exponents
    cols = make_columns(3)
    cols["latents"] = [store_latents(z[i], latent_dtype) for i in range(3)]
    if where == "s3":
        request.getfixturevalue("s3_env")
        from tests.conftest import s3fs

        s3fs().create_dir(f"rt-{latent_dtype}")
        uri = f"s3://rt-{latent_dtype}/shards/{BUCKET}/part-00000.arrow"
    else:
        uri = str(tmp_path / "part-00000.arrow")
    write_shard(clips_table(BUCKET, cols), uri)
    table = read_shard(uri)
    got = as_float32(tensor(table, "latents"))
    want = z.to(getattr(torch, latent_dtype)).float().numpy()
    assert got.dtype == np.float32 and got.shape == (3, *LATENT_SHAPE)
    np.testing.assert_array_equal(got, want)
    assert np.abs(got - z.numpy()).max() <= np.abs(z.numpy()).max() * 2.0 ** -8  # a value, not a bit pattern
    field = table.schema.field("latents")
    assert (field.metadata or {}).get(b"ditharos.dtype") == (b"bfloat16" if latent_dtype == "bfloat16" else None)
