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
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import PurePosixPath

from pipeline import storage
from pipeline.discover import (SIDECAR_EXTENSIONS, SNIFF_BYTES, TAR_SNIFFED, InputConfig, parse_sidecar,
                                sniff_container)
from pipeline.images import sniff_image
from pipeline.listing import Row, listing_row

READ_BUFFER = 1 << 20  # bytes per read of a tar being listed (one ranged GET on an object store)


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


def list_tar(cfg: InputConfig, uri: str, mtime_ns: int, meta: dict | None = None) -> Iterator[Row]:
    """Listing rows of a tar's members (module doc); a damaged tar keeps the members before the
    damage and adds a `discover` reject naming it."""
    media = {e.lower() for e in cfg.extensions} | {e.lower() for e in cfg.image_extensions}
    fs, path = storage.resolve(uri)
    listed = 0
    try:
        with fs.open_input_file(path) as raw, io.BufferedReader(_Raw(raw), READ_BUFFER) as buffered, \
                tarfile.open(fileobj=buffered, mode="r:") as tar:
            group: list[tarfile.TarInfo] = []
            for member in tar:
                if group and sample_key(member.name)[0] != sample_key(group[0].name)[0]:
                    yield from _sample_rows(cfg, uri, mtime_ns, tar, group, media, meta or {})
                    listed += len(group)
                    group = []
                if member.isfile():
                    group.append(member)
            if group:
                yield from _sample_rows(cfg, uri, mtime_ns, tar, group, media, meta or {})
    except (tarfile.TarError, OSError, EOFError) as e:
        yield listing_row(uri, -1, mtime_ns, candidate=False,
                          reason=f"damaged tar: unreadable after {listed} members ({e}); the members before "
                                 "the damage are sources")


def _sample_rows(cfg: InputConfig, uri: str, mtime_ns: int, tar: tarfile.TarFile, group: list[tarfile.TarInfo],
                 media: set[str], meta: dict) -> Iterator[Row]:
    """The listing rows of one sample (members of one key): its media with the key's captions;
    `meta` is the tar's own metadata (a listing file's extra columns)."""
    key = sample_key(group[0].name)[0]
    captions: list[str] = []
    found, others = [], []
    for m in group:
        suffix = PurePosixPath(m.name).suffix.lower()
        if cfg.use_sidecars and suffix in SIDECAR_EXTENSIONS:
            captions += parse_sidecar(m.name, tar.extractfile(m).read(cfg.max_sidecar_bytes))
            continue
        sniffed = ""
        if suffix not in media and (cfg.sniff_content or cfg.sniff_images) and m.size:
            head = tar.extractfile(m).read(SNIFF_BYTES)
            sniffed = (sniff_container(head) if cfg.sniff_content else None) or (
                sniff_image(head) if cfg.sniff_images else None) or ""
        (found if suffix in media or sniffed else others).append((m, sniffed))
    for m, sniffed in found:
        yield listing_row(storage.member_uri(uri, m.offset_data, m.size, m.name), m.size, mtime_ns,
                          sniffed=sniffed, sidecars=captions, source_meta={**meta, "tar": uri, "key": key})
    for m, _ in others:
        yield listing_row(storage.member_uri(uri, m.offset_data, m.size, m.name), m.size, mtime_ns,
                          candidate=False, reason=f"not a video or image: tar member {m.name!r}")


def make_expand_fn(cfg: InputConfig):
    """Listing row → itself, or the rows of its members when it is a tar still to expand."""

    def expand(row: Row) -> Iterator[Row]:
        if row["sniffed"] != TAR_SNIFFED:
            yield row
            return
        yield from list_tar(cfg, row["uri"], int(row["mtime_ns"]), json.loads(row["source_meta"] or "{}"))

    return expand
