"""pipeline/dedupe.py: exact duplicates per size group, deterministic survivors, committed files first."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.dedupe import dedupe_block
from pipeline.discover import content_id
from pipeline.listing import listing_row


def block(rows: list[dict]) -> dict[str, np.ndarray]:
    names = list(rows[0])
    out = {}
    for k in names:
        arr = np.empty(len(rows), dtype=object)
        arr[:] = [r[k] for r in rows]
        out[k] = arr
    return out


def listed(path: Path, committed_id: str = "", partial: bool = False, num_clips: int = 0) -> dict:
    st = path.stat()
    return dict(listing_row(str(path), st.st_size, st.st_mtime_ns), committed_id=committed_id, partial=partial,
                num_clips=num_clips)


def result(rows: list[dict]) -> dict[str, dict]:
    out = dedupe_block(block(rows))
    return {str(u): {"source_id": s, "dup_of": d} for u, s, d in zip(out["uri"], out["source_id"], out["dup_of"])}


def test_smallest_uri_survives_and_unique_sizes_are_not_hashed(tmp_path: Path) -> None:
    a, b, c = tmp_path / "b.mp4", tmp_path / "a.mp4", tmp_path / "c.mp4"
    a.write_bytes(b"same bytes")
    b.write_bytes(b"same bytes")
    c.write_bytes(b"other size!")
    d = tmp_path / "d.mp4"
    d.write_bytes(b"diff bytes")  # same size as a/b, other content: not a duplicate
    got = result([listed(p) for p in (a, b, c, d)])
    sid = content_id(str(a))
    assert got[str(b)] == {"source_id": sid, "dup_of": ""}  # a.mp4 < b.mp4
    assert got[str(a)] == {"source_id": sid, "dup_of": str(b)}
    assert got[str(d)]["dup_of"] == "" and got[str(d)]["source_id"] == content_id(str(d))
    assert got[str(c)] == {"source_id": "", "dup_of": ""}  # unique size: hashed later by the probe
    # the order rows arrive in does not matter
    assert result([listed(p) for p in (d, c, a, b)]) == got


def test_committed_files_survive_and_are_not_redone(tmp_path: Path) -> None:
    old, new, renamed = tmp_path / "m.mp4", tmp_path / "z.mp4", tmp_path / "a_renamed.mp4"
    for p in (old, new, renamed):
        p.write_bytes(b"x" * 64)
    sid = content_id(str(old))
    committed = dict(listed(old), committed_id=sid, num_clips=2)  # what the records say of m.mp4
    got = result([committed, listed(old), listed(new), listed(renamed)])
    assert str(old) not in got  # listed and committed unchanged: done
    assert got[str(renamed)]["dup_of"] == str(old)  # smaller URI, but m.mp4 was committed first
    assert got[str(new)]["dup_of"] == str(old)
    # a committed file only touched since (new mtime, same bytes) is not redone ...
    touched = dict(listed(old), mtime_ns=listed(old)["mtime_ns"] + 1)
    assert result([committed, touched]) == {}
    # ... one rewritten with other bytes of the same size is a new source
    old.write_bytes(b"y" * 64)
    got = result([committed, listed(old)])
    assert got[str(old)] == {"source_id": content_id(str(old)), "dup_of": ""} and content_id(str(old)) != sid


def test_non_candidates_and_empty_files_pass_through(tmp_path: Path) -> None:
    e1, e2 = tmp_path / "e1.mp4", tmp_path / "e2.mp4"
    e1.write_bytes(b"")
    e2.write_bytes(b"")
    txt = dict(listing_row(str(tmp_path / "n.txt"), 0, 1, candidate=False, reason="not a video: text file"),
               committed_id="", partial=False, num_clips=0)
    got = result([listed(e1), listed(e2), txt])
    assert all(v == {"source_id": "", "dup_of": ""} for v in got.values()) and len(got) == 3


def test_a_partly_committed_source_survives_its_copies_listed_or_not(tmp_path: Path) -> None:
    """An interrupted run committed some clips of b.mp4. A copy with a smaller URI appearing before
    the resume must not become the survivor: its clips (ids from the content) would be committed
    a second time under its URI."""
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    for p in (a, b):
        p.write_bytes(b"y" * 64)
    sid = content_id(str(b))
    part = dict(listed(b), committed_id=sid, partial=True)
    got = result([part, listed(a), listed(b)])
    assert got[str(b)] == {"source_id": sid, "dup_of": ""}  # to do again: its other clips are missing
    assert got[str(a)] == {"source_id": sid, "dup_of": str(b)}
    got = result([part, listed(a)])  # b moved away: a is still its copy, not a new source
    assert got == {str(a): {"source_id": sid, "dup_of": str(b)}}
    b.write_bytes(b"z" * 64)  # b rewritten with other bytes of the same size: a is a source of its own
    got = result([part, listed(a), listed(b)])
    assert got[str(a)]["dup_of"] == "" and got[str(b)]["dup_of"] == ""


def test_a_copy_without_clips_never_outranks_a_partly_committed_source(tmp_path: Path) -> None:
    """c.mp4 was rejected as a copy of a.mp4 (complete, 0 clips); a.mp4 was committed in part. The
    resume must cut a.mp4 again, not take it for a copy of c.mp4 (that would close it). A copy
    that does hold the content's clips (x.mp4) does outrank it: a.mp4 cut again would repeat them."""
    a, c, x = tmp_path / "a.mp4", tmp_path / "c.mp4", tmp_path / "x.mp4"
    for p in (a, c):
        p.write_bytes(b"w" * 64)
    sid = content_id(str(a))
    rows = [dict(listed(c), committed_id=sid), dict(listed(a), committed_id=sid, partial=True, num_clips=3),
            listed(a), listed(c)]
    assert result(rows) == {str(a): {"source_id": sid, "dup_of": ""}}  # c.mp4: done
    x.write_bytes(b"w" * 64)
    got = result(rows + [dict(listed(x), committed_id=sid, num_clips=3), listed(x)])
    assert got == {str(a): {"source_id": sid, "dup_of": str(x)}}
