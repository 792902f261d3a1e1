"""The shard contract between pipeline, training and eval — defined once, versioned.

A shard is an Arrow IPC file `shards/<bucket>/part-00000.arrow` holding clips of one
bucket. Latents and image embeddings are `arrow.fixed_shape_tensor` columns (one shape
per bucket), so bare pyarrow reads them zero-copy with `to_numpy_ndarray()`; no pickle
anywhere. The caption's text states are stored *ragged*: only each caption's real tokens, as a
list of D-wide token vectors per row (`list<fixed_size_list<float16, D>>`), the encoder's token
limit in the field metadata. Padding to the limit is the model's business at load time: umT5
states padded to 512 tokens would cost 4 MiB a clip (400 TB at 100M clips) where a typical
caption's real tokens cost ~10× less. `clips_table` builds a shard table from plain column
arrays (the stream's padded states + mask) and checks every shape; `read_shard` memory-maps
one back (reads it whole from object stores), `RowReader` gives one row of any tensor column
as a zero-copy numpy view, and `as_float32` turns stored values (float16 / float32 /
bfloat16 bits) into float32. Training, eval and the tests read shards through these, nowhere else.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from pipeline import storage

# 2: clip index + commit records, manifest without file lists; 3: index has shard sizes + sha256;
# 4: curation scores and border crop in shards and index; 5: text_area score;
# 6: text states ragged (real tokens only), no text_mask column; chash colour signature
SCHEMA_VERSION = 6

# Scalar columns: name → arrow type. Tensor columns follow in TENSOR_COLUMNS.
SCALAR_COLUMNS: dict[str, pa.DataType] = {
    "clip_id": pa.string(),  # f"{source_id}-{start_frame:07d}-{num_frames}f", unique and stable
    "source_id": pa.string(),  # sha256 of the source bytes (see pipeline.discover.content_id)
    "source_uri": pa.string(),
    "split": pa.string(),  # "train" or "val", by hash of source_id (held-out clips for eval)
    "bucket": pa.string(),
    "scene_index": pa.int32(),
    "window_index": pa.int32(),
    "start_frame": pa.int64(),  # source frame index, inclusive
    "end_frame": pa.int64(),  # source frame index, exclusive
    "start_s": pa.float64(),  # source time of the first sampled frame
    "end_s": pa.float64(),  # start_s + num_frames / fps
    "source_fps": pa.float32(),
    "fps": pa.float32(),  # bucket (target) fps
    "num_frames": pa.int32(),
    "height_px": pa.int32(),
    "width_px": pa.int32(),
    "caption": pa.string(),
    "caption_source": pa.string(),  # "sidecar" or "template" (or a future captioner's name)
    "clip_score": pa.float32(),  # CLIP cosine × 100 between the clip and its caption
    "keyframe_jpeg": pa.binary(),  # middle frame, for data cards and eyeballing
    # black bars cut off the source before bucketing, display px (top, bottom, left, right)
    "crop_px": pa.list_(pa.int32()),
    "phash": pa.int64(),  # 64-bit DCT perceptual hash of the temporal mean frame (pipeline/neardup.py)
    "chash": pa.int64(),  # the mean frame's Cr / Cb per quadrant, 8 bytes (pipeline/neardup.py)
}
# Curation scores: frame scores (pipeline/quality.py) and model scores (pipeline/aesthetic.py); see pipeline/filters.py
# for what each means and its default range. Columns of the shards, the clip index and of
# `filter` rejects.
SCORE_COLUMNS: dict[str, pa.DataType] = {
    "motion": pa.float32(),  # mean optical flow, frame widths per second
    "max_frame_diff": pa.float32(),  # largest mean |Δ luma| between sampled frames, 0–255 (frozen: ~0)
    "sharpness": pa.float32(),  # variance of the Laplacian of luma at the bucket's size
    "black_fraction": pa.float32(),  # share of sampled frames that are black
    "bright_fraction": pa.float32(),  # share of pixels blown out (luma >= 250)
}
FRAME_SCORE_COLUMNS = tuple(SCORE_COLUMNS)  # measured on frames in the cut stage; the rest by models
SCORE_COLUMNS["aesthetic"] = pa.float32()  # LAION-style head on the CLIP image embedding (caption stage)
SCORE_COLUMNS["text_area"] = pa.float32()  # share of the frame in detected text boxes (caption stage)
SCALAR_COLUMNS.update(SCORE_COLUMNS)
# Tensor columns of the stream (caption and VAE stages → writers): fixed shapes, per bucket / per model;
# text_embedding (L, D) padded to the encoder's limit L, text_mask (L,) its real tokens.
TENSOR_COLUMNS = ("image_embedding", "text_embedding", "text_mask", "latents")
TEXT_COLUMN = "text_embedding"  # stored ragged: each row's real tokens (n, D) only, no mask
STORED_TENSOR_COLUMNS = ("image_embedding", TEXT_COLUMN, "latents")
MAX_TOKENS_KEY = b"ditharos.max_tokens"  # the text field's encoder token limit L

class ShardError(ValueError):
    """Rows that do not fit the shard contract."""


# What a reader of a damaged or missing shard tells the user to do.
REDO = "re-run the pipeline on this output: it notices the damage and redoes those sources"


def clip_id(source_id: str, start_frame: int, num_frames: int) -> str:
    return f"{source_id}-{start_frame:07d}-{num_frames}f"


def split_of(source_id: str, val_fraction: float) -> str:
    """Deterministic train/val split by source (all clips of a source on one side)."""
    h = int(hashlib.sha256(source_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if h < val_fraction else "train"


def shard_schema(bucket: str, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype]) -> pa.Schema:
    """The schema of one bucket's shards: scalar columns + tensor columns (text ragged, the rest fixed).

    `shapes` / `dtypes` are the stream's: text_embedding (L, D) stores as lists of D-wide tokens.
    """
    fields = [pa.field(n, t, nullable=False) for n, t in SCALAR_COLUMNS.items()]
    for name in STORED_TENSOR_COLUMNS:
        value_type = pa.from_numpy_dtype(np.dtype(dtypes[name]))
        meta = {"ditharos.dtype": "bfloat16"} if np.dtype(dtypes[name]) == np.uint16 else {}  # see as_float32
        if name == TEXT_COLUMN:
            limit, width = shapes[name]
            typ, meta = pa.list_(pa.list_(value_type, int(width))), {**meta, MAX_TOKENS_KEY.decode(): str(int(limit))}
        else:
            typ = pa.fixed_shape_tensor(value_type, list(shapes[name]))
        fields.append(pa.field(name, typ, nullable=False, metadata=meta or None))
    meta = {"ditharos.schema_version": str(SCHEMA_VERSION), "ditharos.bucket": bucket}
    return pa.schema(fields, metadata=meta)


def column_shapes(schema: pa.Schema) -> dict[str, list[int]]:
    """The stored tensor columns' per-row shapes: fixed ones as stored, text as (token limit, D)."""
    out = {}
    for name in STORED_TENSOR_COLUMNS:
        field = schema.field(name)
        if name == TEXT_COLUMN:
            out[name] = [int((field.metadata or {})[MAX_TOKENS_KEY]), field.type.value_type.list_size]
        else:
            out[name] = list(field.type.shape)
    return out


def _text_tokens(bucket: str, states: np.ndarray, mask: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """(n, L, D) padded states + (n, L) masks → each row's real tokens as a list<fixed_size_list> array."""
    if mask.shape != states.shape[:2]:
        raise ShardError(f"bucket {bucket!r}: text_mask {mask.shape} does not match text_embedding {states.shape}")
    keep = mask.astype(bool)
    counts = keep.sum(axis=1)
    if len(counts) and counts.min() == 0:
        raise ShardError(f"bucket {bucket!r}: row {int(np.argmin(counts))} has no real text tokens "
                         "(an encoder always emits at least its end token)")
    flat = np.ascontiguousarray(states[keep])  # (Σ n_i, D), rows in order
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    width = states.shape[2]
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), value_type), width)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), tokens)


def clips_table(bucket: str, columns: dict[str, Any]) -> pa.Table:
    """Build one bucket's shard table from column arrays (lists or numpy), checking shapes."""
    missing = [c for c in list(SCALAR_COLUMNS) + list(TENSOR_COLUMNS) if c not in columns]
    if missing:
        raise ShardError(f"shard rows for bucket {bucket!r} lack columns {missing}")
    n = len(columns["clip_id"])
    arrays, shapes, dtypes, stacks = {}, {}, {}, {}
    for name in TENSOR_COLUMNS:
        try:
            stacked = np.ascontiguousarray(np.stack(list(columns[name])) if n else np.asarray(columns[name]))
        except ValueError:  # np.stack on rows of different shapes
            seen = sorted({tuple(np.shape(v)) for v in columns[name]})
            raise ShardError(f"column {name!r} has rows of different shapes {seen}; "
                             f"a shard of bucket {bucket!r} needs one shape") from None
        if stacked.shape[0] != n:
            raise ShardError(f"column {name!r} has {stacked.shape[0]} rows, expected {n}")
        shapes[name], dtypes[name], stacks[name] = stacked.shape[1:], stacked.dtype, stacked
    if len(shapes[TEXT_COLUMN]) != 2:
        raise ShardError(f"column {TEXT_COLUMN!r} has rows of shape {shapes[TEXT_COLUMN]}; expected (tokens, width)")
    schema = shard_schema(bucket, shapes, dtypes)
    for name in STORED_TENSOR_COLUMNS:
        typ = schema.field(name).type
        if name == TEXT_COLUMN:
            arrays[name] = _text_tokens(bucket, stacks[name], stacks["text_mask"], typ.value_type.value_type)
        elif n:
            arrays[name] = pa.FixedShapeTensorArray.from_numpy_ndarray(stacks[name])
        else:  # from_numpy_ndarray refuses empty arrays
            arrays[name] = pa.ExtensionArray.from_storage(typ, pa.array([], typ.storage_type))
    for name, typ in SCALAR_COLUMNS.items():
        values = list(columns[name])
        if len(values) != n:
            raise ShardError(f"column {name!r} has {len(values)} rows, expected {n}")
        arrays[name] = pa.array(values, type=typ)
    bad = [b for b in columns["bucket"] if b != bucket]
    if bad:
        raise ShardError(f"rows of bucket {bad[0]!r} in a shard of bucket {bucket!r}")
    return pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema)


# One clip per record batch. A reader on object storage can then fetch one clip with one range
# request (`read_clip`) instead of its whole shard, which is what a uniform order over remote
# data needs. Cost: ~2 KB of batch metadata per clip (< 1% of a clip's latents, ~3% of an
# image's); a local reader maps the file either way.
ROWS_PER_BATCH = 1


def table_bytes(table: pa.Table) -> bytes:
    """Serialise as an Arrow IPC *file* (random access, memory-mappable)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=ROWS_PER_BATCH)
    return sink.getvalue().to_pybytes()


def write_shard(table: pa.Table, uri: str) -> dict[str, Any]:
    """Atomically write a shard; return {path, rows, bytes, sha256}."""
    data = table_bytes(table)
    storage.write_bytes_atomic(uri, data)
    return {"uri": uri, "rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_shard(uri: str) -> pa.Table:
    """Read a shard (memory-mapped when local) and check its schema version."""
    fs, path = storage.resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return open_reader(uri, pa.memory_map(path)).read_all()
    with fs.open_input_file(path) as f:
        return open_reader(uri, f).read_all()


def missing_shard(uri: str) -> ShardError:
    """The error for a shard the clip index points at that is not there."""
    return ShardError(f"{uri}: shard missing (the clip index points at it); {REDO}")


def resized_shard(uri: str, size: int, committed: int) -> ShardError:
    """The error for a shard whose size is not the committed one."""
    return ShardError(f"{uri}: {size} bytes, committed with {committed} (truncated or overwritten); {REDO}")


def open_reader(uri: str, source: Any) -> pa.ipc.RecordBatchFileReader:
    """The Arrow file reader of a shard opened as `source` (reads its footer only), version-checked."""
    try:
        reader = pa.ipc.open_file(source)
    except (pa.ArrowInvalid, OSError) as e:
        raise ShardError(f"{uri}: not a readable Arrow shard ({e}); {REDO}") from None
    version = (reader.schema.metadata or {}).get(b"ditharos.schema_version")
    if version != str(SCHEMA_VERSION).encode():
        raise ShardError(f"{uri}: shard schema version {version!r}, this code reads {SCHEMA_VERSION}")
    return reader


def read_clip(reader: pa.ipc.RecordBatchFileReader, uri: str, row: int, clip_id: str) -> pa.RecordBatch | None:
    """Row `row` of a shard as its own record batch (one ranged read), or None when the shard's
    layout does not hold one clip per batch (written before ROWS_PER_BATCH): read it whole then.

    The batch must hold exactly the clip the index names; anything else is a damaged shard.
    """
    if reader.num_record_batches <= row:
        return None
    try:
        batch = reader.get_batch(row)
    except (pa.ArrowInvalid, OSError) as e:
        raise ShardError(f"{uri}: record batch {row} unreadable ({e}); {REDO}") from None
    return _the_clip(batch, uri, row, clip_id) if batch.num_rows == 1 else None


def decode_clip(message: pa.Buffer, schema: pa.Schema, uri: str, row: int, clip_id: str) -> pa.RecordBatch:
    """A clip's record batch from the bytes of its IPC message (the clip index's batch_offset /
    batch_bytes range of the shard), decoded with its bucket's schema; it must hold that clip."""
    try:
        batch = pa.ipc.read_record_batch(pa.ipc.read_message(message), schema)
    except (pa.ArrowInvalid, OSError) as e:
        raise ShardError(f"{uri}: the bytes of row {row} are not its record batch ({e}); {REDO}") from None
    if batch.num_rows != 1:
        raise ShardError(f"{uri}: the record batch of row {row} holds {batch.num_rows} rows, not one clip; {REDO}")
    return _the_clip(batch, uri, row, clip_id)


def _the_clip(batch: pa.RecordBatch, uri: str, row: int, clip_id: str) -> pa.RecordBatch:
    found = batch.column(batch.schema.get_field_index("clip_id"))[0].as_py()
    if found != clip_id:
        raise ShardError(f"{uri}: row {row} holds clip {found!r}, the clip index says {clip_id!r}; {REDO}")
    return batch


def read_columns(uri: str, columns: list[str]) -> pa.Table:
    """Some columns of a shard, reading only their buffers (ranged reads on object stores).

    What a data card or a caption audit needs (keyframes, captions) without moving the latents:
    a 512 MB shard's keyframes are a few MB of it.
    """
    fs, path = storage.resolve(uri)
    src = pa.memory_map(path) if isinstance(fs, pafs.LocalFileSystem) else fs.open_input_file(path)
    with src:
        schema = open_reader(uri, src).schema
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise ShardError(f"{uri}: no column(s) {missing}; the shard has {schema.names}")
        options = pa.ipc.IpcReadOptions(included_fields=[schema.get_field_index(c) for c in columns])
        return pa.ipc.open_file(src, options=options).read_all()


def tensor(table: pa.Table, name: str) -> np.ndarray:
    """A fixed-shape tensor column as one numpy array (N, *shape) of the stored dtype — zero-copy when possible."""
    return table.column(name).combine_chunks().to_numpy_ndarray()


class RowReader:
    """Rows of one stored tensor column (one Arrow chunk) as numpy views of the stored dtype, zero-copy:
    a fixed-shape row as its shape, a text row as its real tokens (n, D)."""

    def __init__(self, array: pa.Array) -> None:
        if isinstance(array.type, pa.FixedShapeTensorType):
            self.fixed, self.offsets = array.to_numpy_ndarray(), None
        else:  # list<fixed_size_list<T, D>>: offsets index the (unsliced) token vectors
            width = array.type.value_type.list_size
            self.fixed = None
            self.offsets = array.offsets.to_numpy()
            self.tokens = array.values.flatten().to_numpy().reshape(-1, width)

    def __getitem__(self, i: int) -> np.ndarray:
        if self.fixed is not None:
            return self.fixed[i]
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]


def text_tokens(table: pa.Table | pa.RecordBatch) -> list[np.ndarray]:
    """Every row's real text tokens (n_i, D) of the stored dtype (views; copy before the source closes)."""
    column = table.column(TEXT_COLUMN)
    rows = []
    for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        reader = RowReader(chunk)
        rows.extend(reader[i] for i in range(len(chunk)))
    return rows


def as_float32(values: np.ndarray) -> np.ndarray:
    """Stored tensor values → float32, exactly.

    numpy has no bfloat16, so bfloat16 latents are stored as their raw bits in uint16 (the
    field says `ditharos.dtype: bfloat16`); a bfloat16 is the top half of a float32, so the
    bits shifted up 16 are its float32 value. uint16 is used for nothing else.
    """
    if values.dtype == np.uint16:
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)
