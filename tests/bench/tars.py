"""Benchmark listing a WebDataset tar against listing the same files loose in a folder; prints JSON.

    python tests/bench/tars.py [--members 5000] [--kb 30]

A tar of N JPEG-sized members (random bytes named .jpg, each with a .txt caption) is listed by
`pipeline.tars.list_tar` (counting the reads its 1 MiB buffer makes of the file: each is one
ranged GET on an object store) and every member is then read back by byte range, as the probe
stage does; the same files loose in a folder go through `pipeline.listing.classify` (one 4 KB
sniff read per file, one read per caption). Then the job's expansion of the tar twice over one
output: the first lists the tar and writes its tar index, the second (a resume) reads the index
instead of the tar. Local disk, page cache warm: the read counts, not the seconds, are what
carries over to an object store.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from pipeline import storage, tars  # noqa: E402
from pipeline.discover import InputConfig  # noqa: E402
from pipeline.listing import classify  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=5000)
    ap.add_argument("--kb", type=int, default=30, help="bytes per image member, KiB")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="ditharos-tars-"))
    folder = tmp / "loose"
    folder.mkdir()
    path = tmp / "shard-000.tar"
    with tarfile.open(path, "w") as t:
        for i in range(args.members):
            for name, data in ((f"{i:06d}.jpg", b"\xff\xd8\xff" + rng.bytes(args.kb * 1024 - 3)),
                               (f"{i:06d}.txt", f"caption {i}\n".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
                (folder / name).write_bytes(data)

    reads, read_bytes = [0], [0]
    readinto = tars._Raw.readinto

    def counting(self, b):
        n = readinto(self, b)
        reads[0] += 1
        read_bytes[0] += n
        return n

    tars._Raw.readinto = counting
    t = time.perf_counter()
    rows = list(tars.list_tar(InputConfig(), str(path), 0))
    list_s = time.perf_counter() - t
    list_reads, list_bytes = reads[0], read_bytes[0]
    tars._Raw.readinto = readinto
    t = time.perf_counter()
    for r in rows:
        storage.read_bytes(r["uri"])
    member_s = time.perf_counter() - t

    from pipeline.listing import listing_row
    from pipeline.discover import TAR_SNIFFED

    index_dir = str(tmp / "out" / tars.INDEX_DIR)
    expand = tars.make_expand_fn(InputConfig(), index_dir)
    tar_row = listing_row(str(path), path.stat().st_size, path.stat().st_mtime_ns, sniffed=TAR_SNIFFED)
    tars._Raw.readinto = counting
    reads[0] = read_bytes[0] = 0
    t = time.perf_counter()
    first = list(expand(tar_row))  # lists the tar, writes its index
    first_s, first_reads = time.perf_counter() - t, reads[0]
    reads[0] = 0
    t = time.perf_counter()
    again = list(expand(tar_row))  # a resume over the same output
    resume_s, resume_reads = time.perf_counter() - t, reads[0]
    tars._Raw.readinto = readinto
    assert again == first and [r["uri"] for r in first] == [r["uri"] for r in rows]
    (index_file,) = Path(index_dir).iterdir()

    files = sorted((str(p), p.stat().st_size, 0) for p in folder.iterdir())
    t = time.perf_counter()
    loose = list(classify(InputConfig(), files))
    folder_s = time.perf_counter() - t
    size = path.stat().st_size
    print(json.dumps({
        "members": args.members, "member_kib": args.kb, "tar_mib": round(size / 2**20, 1),
        "tar_listing": {"seconds": round(list_s, 3), "members_per_s": round(len(rows) / list_s),
                        "reads": list_reads, "bytes_read_over_tar": round(list_bytes / size, 3),
                        "reads_per_gib": round(list_reads / (size / 2**30))},
        "resume_listing": {"first_run": {"seconds": round(first_s, 3), "tar_reads": first_reads},
                           "resume": {"seconds": round(resume_s, 3), "tar_reads": resume_reads,
                                      "index_files_read": 1, "index_bytes": index_file.stat().st_size,
                                      "index_bytes_per_member": round(index_file.stat().st_size / len(rows), 1)}},
        "member_reads": {"seconds": round(member_s, 3), "reads": len(rows), "members_per_s": round(len(rows) / member_s)},
        "loose_folder_listing": {"seconds": round(folder_s, 3), "files_per_s": round(len(files) / folder_s),
                                 "reads": len(files), "sources": sum(r["candidate"] for r in loose)},
    }, indent=2))


if __name__ == "__main__":
    main()
