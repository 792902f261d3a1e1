"""WebDataset shards as input: every image or video inside a `.tar` is a source of its own.

Image corpora (LAION-style, DataComp, most video datasets re-shared as WebDataset too) ship as
tars of ~1 GB holding ~10k samples, a sample being the members that share a key — the member
name up to the first dot of its base name: `000042.jpg` + `000042.txt` + `000042.json`. Here a
tar expands into one listing row per image/video member, addressed as a byte range of the tar
(`storage.member_uri`), with its key's `.txt` / `.json` captions as sidecars and `{"tar", "key"}`
as source metadata; a member that is neither media nor caption becomes a `discover` reject, as a
stray file in a folder does. From there a member is any source: hashed, probed, cut (an image
to a 1-frame clip), deduplicated, and read back by one ranged read of its own bytes.

Cost. Listing a tar reads its headers through a 1 MiB read-ahead buffer: for small members
(images, ~100 KB) that is the whole tar once in 1 MiB ranged GETs (~1,000 per GB tar); a large
member (a video) is skipped by a seek, costing one buffer fill per member. At 100M images in 10k
tars: ~10 TB read once for listing plus one ranged GET per member per stage that reads it. Each
tar is one task (`run.py` spreads them one per block), so listing scales with the cluster and the
driver never sees a member. Why the standard library's `tarfile`: it is the reference reader of
the format (ustar, GNU and pax long names, sparse headers), and it reports each member's data
offset, which is all the byte-range addressing needs. Compressed tars (`.tar.gz`) cannot be
addressed by byte range and are not taken; WebDataset shards are plain tars.

The tar index. A job writes each tar's listing, once read, to `_state/tar_index/<digest>.parquet`
in its output (the digest covers the tar's URI, size, mtime, source metadata and the `input`
settings that shape a listing), and every later run over that output — a resume, a run with
more sources — reads that one small file instead of the tar: at 100M images in 10k tars, a
resume reads 10k index files (tens of bytes per member compressed, captions included: ~1-10 GB)
instead of ~10 TB in ~10M ranged GETs. A tar that changed (size or mtime) is listed again under
a new digest; the old file stays (small) until the output is deleted. A tar listed without a
size or an mtime (a listing file may give neither) is not indexed: it is listed on every run.
A listing cut short by a failed read (an I/O error, which may be transient) is not indexed, so
the next run reads the tar again; damage in the tar's bytes is (it will read the same next
time). The index is written atomically (one PUT on an object store), so a crash leaves a tar
either indexed whole or not at all; a failed write is a warning (the index is a cache).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.discover import (SIDECAR_EXTENSIONS, SNIFF_BYTES, InputConfig, media_extensions, parse_sidecar,
                                sniffed_media, sniffs)
from pipeline.listing import LISTING_SCHEMA, Row, listing_row
from pipeline.logs import get_logger

READ_BUFFER = 1 << 20  # bytes per read of a tar being listed (one ranged GET on an object store)
INDEX_DIR = "_state/tar_index"  # in the job's output: one listing per tar (module doc)
# Bump when what a listing row holds changes (the row's fields, member_uri's form, how a member is
# classified beyond the constants in index_uri's key): index files of older versions are then not read.
INDEX_VERSION = 1
log = get_logger(__name__)


def sample_key(name: str) -> tuple[str, str]:
    """WebDataset's (key, extension) of a member name: the base name splits at its first dot."""
    path = PurePosixPath(name)
    stem, _, ext = path.name.partition(".")
    return str(path.parent / stem) if str(path.parent) != "." else stem, ext.lower()


class _Raw(io.RawIOBase):
    """A pyarrow input file as the raw stream under io.BufferedReader (which does the read-ahead)."""

    def __init__(self, f) -> None:
        self.f = f

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        b[:len(data)] = data
        return len(data)


class _Scan:
    """What one pass over a tar's headers found: media members, non-media members (with why) and
    captions by key. Caption and sniff bytes are read when their header is met (they follow it,
    inside the read-ahead buffer), so keys need not be contiguous and nothing is read twice."""

    def __init__(self, cfg: InputConfig) -> None:
        self.cfg = cfg
        self.media = media_extensions(cfg)
        self.found: list[tuple[tarfile.TarInfo, str]] = []  # (member, sniffed)
        self.others: list[tuple[tarfile.TarInfo, str]] = []  # (member, reject reason)
        self.captions: dict[str, list[str]] = {}

    def add(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        if m.isdir():
            return
        if not m.isfile() or m.issparse():  # a link or a sparse file: its bytes are not at offset_data
            kind = "a sparse file" if m.issparse() else "a link" if m.islnk() or m.issym() else "not a regular file"
            self.others.append((m, f"tar member {m.name!r} is {kind}, not stored bytes"))
            return
        cfg, suffix = self.cfg, PurePosixPath(m.name).suffix.lower()
        if cfg.use_sidecars and suffix in SIDECAR_EXTENSIONS:
            new = parse_sidecar(m.name, tar.extractfile(m).read(cfg.max_sidecar_bytes))
            have = self.captions.setdefault(sample_key(m.name)[0], [])
            have += [c for c in new if c not in have]  # img2dataset writes the caption in .txt and .json
            return
        # as a loose file is classified (discover.py); the bytes follow the header, in the buffer
        head = tar.extractfile(m).read(SNIFF_BYTES) if sniffs(cfg, suffix, self.media) and m.size else b""
        sniffed = sniffed_media(cfg, suffix, self.media, head)
        if suffix in self.media or sniffed:
            self.found.append((m, sniffed))
        else:
            self.others.append((m, f"not a video or image: tar member {m.name!r}"))

    def intact(self, size: int) -> list[tuple[tarfile.TarInfo, str]]:
        """The media members whose bytes lie inside the first `size` bytes of the tar."""
        return [(m, sniffed) for m, sniffed in self.found if m.offset_data + m.size <= size]

    def rows(self, uri: str, mtime_ns: int, meta: dict, size: int) -> Iterator[Row]:
        """The rows of the intact media members (see `intact`) and of the other members."""
        for m, sniffed in self.intact(size):
            key = sample_key(m.name)[0]
            yield listing_row(storage.member_uri(uri, m.offset_data, m.size, m.name), m.size, mtime_ns,
                              sniffed=sniffed, sidecars=self.captions.get(key, []),
                              source_meta={**meta, "tar": uri, "key": key})
        for m, reason in self.others:
            yield listing_row(storage.member_uri(uri, m.offset_data, m.size, m.name), m.size, mtime_ns,
                              candidate=False, reason=reason)


def list_tar(cfg: InputConfig, uri: str, mtime_ns: int, meta: dict | None = None) -> Iterator[Row]:
    """Listing rows of a tar's members (module doc): its media with their key's captions, other
    members as rejects. A damaged tar keeps the members whose bytes precede the damage and adds
    a `discover` reject for the tar naming it; so does a tar that holds no files."""
    yield from scan_tar(cfg, uri, mtime_ns, meta)[0]


def scan_tar(cfg: InputConfig, uri: str, mtime_ns: int, meta: dict | None = None) -> tuple[list[Row], bool]:
    """`list_tar`'s rows, and whether they are the tar's own (True) or a failed read's (an I/O
    error, perhaps transient: not to be remembered in the index)."""
    scan = _Scan(cfg)
    fs, path = storage.resolve(uri)
    size, problem, lasting = 0, "", True  # size: the tar's bytes, once it opens
    try:
        with fs.open_input_file(path) as raw, io.BufferedReader(_Raw(raw), READ_BUFFER) as buffered:
            size = raw.size()
            with tarfile.open(fileobj=buffered, mode="r:") as tar:
                for member in tar:
                    scan.add(tar, member)
                # tarfile ends quietly at a header it cannot read past the first (an interrupted
                # writer, a corrupt block): a whole tar ends with zero blocks.
                buffered.seek(tar.offset)
                if buffered.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
                    problem = f"no end-of-archive block at byte {tar.offset} (cut short or a corrupt header)"
    except (tarfile.TarError, EOFError) as e:
        problem = str(e) or type(e).__name__
    except OSError as e:
        problem, lasting = str(e) or type(e).__name__, False
    rows = list(scan.rows(uri, mtime_ns, meta or {}, size))
    if problem:
        rows.append(listing_row(uri, -1, mtime_ns, candidate=False, reason=f"damaged tar: {problem}; the "
                                f"{len(scan.intact(size))} media members before the damage are sources"))
    elif not scan.found and not scan.others:
        rows.append(listing_row(uri, size, mtime_ns, candidate=False, reason="a tar that holds no files"))
    return rows, lasting


def index_uri(index_dir: str, cfg: InputConfig, row: Row) -> str:
    """Where the tar index keeps the listing of the tar a listing row names (module doc)."""
    key = {"version": INDEX_VERSION, "uri": row["uri"], "size_bytes": int(row["size_bytes"]),
           "mtime_ns": int(row["mtime_ns"]), "source_meta": row["source_meta"] or "{}",
           "input": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "uri"},  # input.uri: not in a row
           "sidecars": sorted(SIDECAR_EXTENSIONS), "sniff_bytes": SNIFF_BYTES, "buffer": READ_BUFFER}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return storage.join(index_dir, f"{digest}.parquet")


def read_index(uri: str) -> list[Row] | None:
    """A tar's indexed listing, or None when there is none (or it cannot be read: listed again)."""
    fs, path = storage.resolve(uri)
    try:
        table = pq.read_table(path, filesystem=fs)
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowException) as e:
        log.warning("tar index %s unreadable (%s): the tar is listed again", uri, e)
        return None
    if table.schema.remove_metadata() != LISTING_SCHEMA:
        log.warning("tar index %s has columns %s, not a listing's: the tar is listed again", uri, table.schema.names)
        return None
    return table.to_pylist()


def write_index(uri: str, rows: list[Row]) -> None:
    """Store a tar's listing; the index is a cache, so a failed write is a warning, not a failed job."""
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=LISTING_SCHEMA), buf, compression="zstd")
    try:
        storage.write_bytes_atomic(uri, buf.getvalue())
    except OSError as e:
        log.warning("tar index %s not written (%s): the next run lists that tar again", uri, e)


def make_expand_fn(cfg: InputConfig, index_dir: str | None = None):
    """A tar's listing row (`sniffed` TAR_SNIFFED; run.expand_tars picks them) → its members' rows,
    from the tar index in `index_dir` when the tar was listed before (module doc)."""

    def expand(row: Row) -> Iterator[Row]:
        meta = json.loads(row["source_meta"] or "{}")
        # Without a size and an mtime (a listing file may give neither) a rewritten tar could not
        # be told from the indexed one: such tars are listed on every run.
        if index_dir is None or int(row["size_bytes"]) < 0 or int(row["mtime_ns"]) < 0:
            yield from list_tar(cfg, row["uri"], int(row["mtime_ns"]), meta)
            return
        where = index_uri(index_dir, cfg, row)
        rows = read_index(where)
        if rows is None:
            rows, lasting = scan_tar(cfg, row["uri"], int(row["mtime_ns"]), meta)
            if lasting:
                write_index(where, rows)
        yield from rows

    return expand
