"""Ray Data blocks with no rows, which have no columns: dropped before a hash shuffle.

Ray Data hands a block with no rows (a folder task that listed nothing, an empty group-by
partition) to no map stage, so it keeps no columns, or its producer's; a hash shuffle's reduce
then fails on it (`ArrowInvalid: Schema at index 1 was different` when concatenating, seen at
2,000 sources; `Invalid sort key column: No match for FieldRef.Name(_part)` when sorting, seen
in the near-duplicate pass's final group-by). Used by the pipeline's dedupe (run.py) and the
distributed near-duplicate pass. The driver holds one ref per block, not the rows.
"""

from __future__ import annotations

import pyarrow as pa


def non_empty_blocks(ray, ds, empty: pa.Schema | None = None):
    """`ds` materialized without its blocks of no rows; when no block has rows, a one-block
    Dataset of `empty` (typed, no rows), or None without one."""
    refs = [e.ref for bundle in ds.materialize().iter_internal_ref_bundles() for e in bundle.blocks
            if e.metadata.num_rows is None or e.metadata.num_rows > 0]
    if refs:
        return ray.data.from_arrow_refs(refs)
    return ray.data.from_arrow(empty.empty_table()) if empty is not None else None
