"""Exact-duplicate sources, decided per file size on the cluster (no driver, no all-pairs).

Identical bytes have identical sizes, so the job groups listing rows by `size_bytes` (a Ray
Data shuffle of small rows) and only files that share a size with another are hashed here; a
file with a unique size goes on unhashed (the probe step hashes it for its source id while
reading it anyway). Within a group, per content hash, the survivor is deterministic:

  * a source already committed by an earlier run (its id comes from the commit records), else
  * the smallest URI.

Every other copy becomes a `dedupe` reject naming the survivor. At 10M sources with sizes
spread over 1e9 values, ~5e4 accidental size collisions cost ~1e5 extra file reads.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.discover import content_id

Batch = dict[str, np.ndarray]


def dedupe_block(batch: Batch) -> Batch:
    """Rows of whole size groups → the listing rows still to process, each with source_id / dup_of.

    Three kinds of input row share the columns (`pipeline.run.committed_rows`):
      * listing rows: `committed_id` == "";
      * a source committed complete by an earlier run: `committed_id` = its source id (uri,
        size and mtime as committed), `partial` false. A listing row with its (uri, mtime) is
        done and dropped; otherwise it only takes part as the survivor of its content;
      * a source an interrupted run committed in part: `committed_id` = its source id, `partial`
        true. Its listing row is to do (its committed clips are skipped by id: see
        `pipeline.state.attach_skip_ids`), and it survives among copies of its content, even
        when not listed now (moved): a copy under another URI is its duplicate, so the clips
        committed under its URI are never committed again under the copy's.
    Rows that are not video candidates pass through untouched.
    """
    n = len(batch["uri"])
    rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]
    groups: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(int(r["size_bytes"]), []).append(r)
    out: list[dict[str, Any]] = []
    for size, group in sorted(groups.items()):
        out += _dedupe_group(group, size)
    names = [k for k in batch if k not in ("committed_id", "partial", "num_clips")] + ["source_id", "dup_of"]
    return _columns(out, names)


def _dedupe_group(group: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    earlier = [r for r in group if str(r.get("committed_id") or "")]
    committed = [r for r in earlier if not bool(r.get("partial"))]
    partial = [r for r in earlier if bool(r.get("partial"))]
    done_keys = {(str(r["uri"]), int(r["mtime_ns"])) for r in committed}
    todo = [dict(r, source_id="", dup_of="") for r in group if not str(r.get("committed_id") or "")
            and (str(r["uri"]), int(r["mtime_ns"])) not in done_keys]
    candidates = [r for r in todo if bool(r["candidate"]) and size > 0]
    listed = {str(r["uri"]) for r in candidates}
    moved = [r for r in partial if str(r["uri"]) not in listed]  # its content may be listed under another URI
    if not candidates or len(candidates) + len(committed) + len(moved) < 2:
        return todo
    hashed: dict[str, str] = {}
    for r in candidates:
        try:
            hashed[str(r["uri"])] = content_id(str(r["uri"]))
        except OSError:
            pass  # unreadable: the probe step says so
    # survivors: a complete committed copy that holds clips, then a partly committed one (listed
    # with that content, unreadable now, or not listed), then a complete one without clips (a
    # duplicate rejected earlier, or a source too short to cut), then the smallest URI
    by_uri = sorted(committed, key=lambda r: str(r["uri"]))
    survivors: dict[str, str] = {}
    for r in by_uri:
        if int(r.get("num_clips") or 0) > 0:
            survivors.setdefault(str(r["committed_id"]), str(r["uri"]))
    for r in sorted(partial, key=lambda r: str(r["uri"])):
        sid = str(r["committed_id"])
        if hashed.get(str(r["uri"]), sid) == sid:
            survivors.setdefault(sid, str(r["uri"]))
    for r in by_uri:
        survivors.setdefault(str(r["committed_id"]), str(r["uri"]))
    for uri in sorted(hashed):
        survivors.setdefault(hashed[uri], uri)
    committed_here = {(str(r["committed_id"]), str(r["uri"])) for r in committed}
    out = []
    for r in todo:
        sid = hashed.get(str(r["uri"]))
        if sid is not None:
            r["source_id"] = sid
            if survivors[sid] != str(r["uri"]):
                r["dup_of"] = survivors[sid]
            elif (sid, str(r["uri"])) in committed_here:
                continue  # this very file, committed before and only touched since: nothing to redo
        out.append(r)
    return out


def _columns(rows: list[dict[str, Any]], names: list[str]) -> Batch:
    names = list(dict.fromkeys(names))
    out = {}
    for name in names:
        arr = np.empty(len(rows), dtype=object)
        arr[:] = [r.get(name) for r in rows]
        out[name] = arr
    return out
