"""pipeline/tars.py + storage's member URIs: a WebDataset tar's images and videos are sources with
their key's captions, read back by byte range; listing is buffered; a damaged tar keeps what was good."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import storage, tars
from pipeline.discover import TAR_SNIFFED, InputConfig, content_id
from pipeline.listing import classify, listing_row
from pipeline.config import load_config
from pipeline.settings import PipelineConfig
from pipeline.steps import make_cut_fn, make_probe_fn


def picture(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (240, 320)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.kron(rng.integers(0, 255, (size[0] // 8, size[1] // 8, 3), np.uint8), np.ones((8, 8, 1), np.uint8))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def sample_tar(path: Path, video: bytes) -> tuple[Path, dict[str, bytes]]:
    members = [("000000.jpg", picture(0)), ("000000.txt", b"a red car\nthe car, parked\n"),
               ("000001.png", picture(1, "PNG")), ("000001.json", json.dumps({"caption": "blocks"}).encode()),
               ("000001.cls", b"3"), ("clips/000002.mp4", video), ("clips/000002.txt", b"a man in a car\n"),
               ("000003.data", picture(3))]  # a JPEG without its extension: sniffed
    return write_tar(path, members), dict(members)


def test_a_tar_s_media_are_sources_with_their_key_s_captions(tmp_path: Path, sample_clips: dict[str, Path]) -> None:
    video = sample_clips["carphone_pristine"].read_bytes()
    path, data = sample_tar(tmp_path / "shard-000.tar", video)
    rows = list(tars.list_tar(InputConfig(), str(path), 7, {"split": "train"}))
    by_name = {storage.member_span(r["uri"])[3]: r for r in rows}
    assert list(by_name) == ["000000.jpg", "000001.png", "clips/000002.mp4", "000003.data", "000001.cls"]
    assert [by_name[n]["candidate"] for n in by_name] == [True, True, True, True, False]
    assert json.loads(by_name["000000.jpg"]["sidecars"]) == ["a red car", "the car, parked"]
    assert json.loads(by_name["000001.png"]["sidecars"]) == ["blocks"]
    assert json.loads(by_name["clips/000002.mp4"]["sidecars"]) == ["a man in a car"]
    assert by_name["000003.data"]["sniffed"] == "image/jpeg"
    assert json.loads(by_name["clips/000002.mp4"]["source_meta"]) == {"split": "train", "tar": str(path),
                                                                    "key": "clips/000002"}
    assert "tar member '000001.cls'" in by_name["000001.cls"]["reason"]
    for name, row in by_name.items():  # each member reads back as exactly its bytes, by byte range
        assert row["size_bytes"] == len(data[name]) and row["mtime_ns"] == 7
        assert storage.read_bytes(row["uri"]) == data[name]
        assert storage.read_bytes(row["uri"], 5) == data[name][:5]
        with storage.local_copy(row["uri"]) as local:
            assert Path(local).read_bytes() == data[name] and Path(local).suffix == Path(name).suffix
    # The same bytes loose in a folder are the same source (exact duplicates across tars and folders).
    loose = tmp_path / "loose.mp4"
    loose.write_bytes(video)
    assert content_id(by_name["clips/000002.mp4"]["uri"]) == content_id(str(loose))
    assert content_id(by_name["clips/000002.mp4"]["uri"]) == "src" + hashlib.sha256(video).hexdigest()[:29]
    # A folder listing marks the tar for expansion (one task per tar); tars: false makes it a reject.
    (listed,) = classify(InputConfig(), [(str(path), path.stat().st_size, 7)])
    assert listed["sniffed"] == TAR_SNIFFED and listed["candidate"]
    (off,) = classify(InputConfig(tars=False), [(str(path), path.stat().st_size, 7)])
    assert not off["candidate"] and off["sniffed"] != TAR_SNIFFED
    assert list(tars.make_expand_fn(InputConfig())(listed)) == list(tars.list_tar(InputConfig(), str(path), 7))


def test_members_are_probed_and_cut_like_files(tmp_path: Path, sample_clips: dict[str, Path]) -> None:
    path, _ = sample_tar(tmp_path / "shard-000.tar", sample_clips["carphone_pristine"].read_bytes())
    cfg = PipelineConfig()
    rows = {storage.member_span(r["uri"])[3]: r for r in tars.list_tar(cfg.input, str(path), 7)}
    probe, cut = make_probe_fn(cfg), make_cut_fn(cfg)
    image = probe(dict(rows["000000.jpg"], source_id="", dup_of=""))
    assert not image["reason"] and json.loads(image["info"])["num_frames"] == 1
    clips = [c for c in cut(image) if c["kind"] == "clip"]
    assert len(clips) == 1 and clips[0]["frames"].shape[0] == 1 and json.loads(clips[0]["sidecars"]) == [
        "a red car", "the car, parked"]
    video = probe(dict(rows["clips/000002.mp4"], source_id="", dup_of=""))
    assert not video["reason"] and json.loads(video["info"])["codec"] == "h264"
    from tests.pipeline.test_steps import probed

    loose = tmp_path / "carphone.mp4"
    loose.write_bytes(sample_clips["carphone_pristine"].read_bytes())
    want = [c["clip_id"].split("-", 1)[1] for c in make_cut_fn(cfg)(probed(loose, cfg)) if c["kind"] == "clip"]
    got = [c for c in cut(video) if c["kind"] == "clip"]
    assert len(got) == len(want) > 1  # the member cuts as the same file does
    assert all(c["source_id"] == video["source_id"] for c in got)


def test_listing_reads_a_tar_through_the_buffer_and_skips_large_members(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    reads = []
    readinto = tars._Raw.readinto
    monkeypatch.setattr(tars._Raw, "readinto", lambda self, b: reads.append(len(b)) or readinto(self, b))
    small = write_tar(tmp_path / "small.tar", [(f"{i:06d}.jpg", bytes(3000)) for i in range(700)])
    assert sum(r["candidate"] for r in tars.list_tar(InputConfig(sniff_images=False), str(small), 0)) == 700
    size = small.stat().st_size  # 700 members of ~3.5 KB: ~2.5 MiB in a few 1 MiB reads, not 1,400 small ones
    assert len(reads) <= size // tars.READ_BUFFER + 3
    reads.clear()
    big = write_tar(tmp_path / "big.tar", [(f"{i:06d}.mp4", bytes(8 << 20)) for i in range(3)])
    assert len(list(tars.list_tar(InputConfig(sniff_content=False), str(big), 0))) == 3
    assert sum(reads) < big.stat().st_size / 2  # the 8 MiB videos are skipped, not read


def test_a_damaged_tar_keeps_the_members_before_the_damage(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "shard.tar", [(f"{i:06d}.jpg", picture(i)) for i in range(4)])
    whole = list(tars.list_tar(InputConfig(), str(path), 0))
    assert all(r["candidate"] for r in whole) and len(whole) == 4  # a whole tar: no reject
    third = storage.member_span(whole[2]["uri"])
    cuts = {"inside a member's bytes": third[1] + 100,
            "at a header (an interrupted writer)": third[1] - tarfile.BLOCKSIZE}
    for case, cut_at in cuts.items():
        broken = tmp_path / "broken.tar"
        broken.write_bytes(path.read_bytes()[:cut_at])
        rows = list(tars.list_tar(InputConfig(), str(broken), 0))
        good = [r for r in rows if r["candidate"]]
        assert [storage.member_span(r["uri"])[3] for r in good] == ["000000.jpg", "000001.jpg"], case
        assert all(storage.read_bytes(r["uri"]) == picture(i) for i, r in enumerate(good))
        (bad,) = [r for r in rows if not r["candidate"]]
        assert bad["uri"] == str(broken) and bad["reason"].startswith("damaged tar: "), case
        assert bad["reason"].endswith("the 2 media members before the damage are sources"), (case, bad["reason"])
    corrupt = bytearray(path.read_bytes())  # a corrupt header checksum in the middle
    corrupt[third[1] - tarfile.BLOCKSIZE + 148:third[1] - tarfile.BLOCKSIZE + 156] = b"0000000\x00"
    (tmp_path / "corrupt.tar").write_bytes(bytes(corrupt))
    rows = list(tars.list_tar(InputConfig(), str(tmp_path / "corrupt.tar"), 0))
    assert sum(r["candidate"] for r in rows) == 2 and "no end-of-archive block" in rows[-1]["reason"]
    # A member whose bytes the tar no longer holds: a clear read error, not a short file.
    with pytest.raises(OSError, match="ends before its member"):
        storage.read_bytes(storage.member_uri(str(broken), cut_at - 100, 5000, "000002.jpg"))
    assert storage.member_span(f"{broken}#12/x.jpg") is None  # not a member's address: a path like any other


def test_a_tar_is_read_once_per_output_later_runs_read_its_index(tmp_path: Path, caplog,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_tar(tmp_path / "shard.tar", [("000000.jpg", picture(0)), ("000000.txt", b"a red car\n"),
                                               ("000001.png", picture(1, "PNG")), ("000001.cls", b"3")])
    stat = path.stat()
    row = listing_row(str(path), stat.st_size, stat.st_mtime_ns, sniffed=TAR_SNIFFED, source_meta={"split": "a"})
    index_dir = str(tmp_path / "out" / tars.INDEX_DIR)
    expand = tars.make_expand_fn(InputConfig(), index_dir)
    listed = list(tars.list_tar(InputConfig(), str(path), stat.st_mtime_ns, {"split": "a"}))
    assert list(expand(row)) == listed and len(listed) == 3
    (index,) = Path(index_dir).iterdir()
    assert Path(tars.index_uri(index_dir, InputConfig(), row)) == index
    # Later runs read the index, not the tar: its bytes overwritten under the same size and mtime list as before.
    path.write_bytes(b"\x01" * stat.st_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert list(expand(row)) == listed
    assert list(tars.make_expand_fn(InputConfig())(row))[-1]["reason"].startswith("damaged tar")  # no index: read
    # A changed tar (mtime), other source metadata or other input settings: listed again, indexed anew.
    for other, cfg in [({**row, "mtime_ns": stat.st_mtime_ns + 1}, InputConfig()),
                       ({**row, "size_bytes": stat.st_size + 10240}, InputConfig()),
                       ({**row, "source_meta": '{"split": "b"}'}, InputConfig()),
                       (row, InputConfig(use_sidecars=False))]:
        again = list(tars.make_expand_fn(cfg, index_dir)(other))
        assert again[-1]["reason"].startswith("damaged tar: ") and not any(r["candidate"] for r in again)
    assert len(list(Path(index_dir).iterdir())) == 5  # damage in the tar's bytes is the tar's: indexed
    # A tar of unknown mtime (a listing file may leave it out) is never indexed: listed every run.
    assert list(tars.make_expand_fn(InputConfig(), index_dir)({**row, "mtime_ns": -1}))[-1]["reason"].startswith(
        "damaged tar")
    assert len(list(Path(index_dir).iterdir())) == 5
    # A failed read (here: no file) is not indexed: the next run reads the tar again.
    gone = listing_row(str(tmp_path / "late.tar"), stat.st_size, stat.st_mtime_ns, sniffed=TAR_SNIFFED)
    (failed,) = tars.make_expand_fn(InputConfig(), index_dir)(gone)
    assert not failed["candidate"] and "damaged tar" in failed["reason"]
    assert len(list(Path(index_dir).iterdir())) == 5
    write_tar(tmp_path / "late.tar", [("000000.jpg", picture(0))])
    assert [r["candidate"] for r in tars.make_expand_fn(InputConfig(), index_dir)(gone)] == [True]
    # An unreadable index: a warning, the tar listed again and the index rewritten.
    late = Path(tars.index_uri(index_dir, InputConfig(), gone))
    late.write_bytes(b"not parquet")
    with caplog.at_level("WARNING", logger="pipeline.tars"):
        assert [r["candidate"] for r in tars.make_expand_fn(InputConfig(), index_dir)(gone)] == [True]
    assert "unreadable" in caplog.text and tars.read_index(str(late))[0]["candidate"]
    # The index is a cache: a failed write is a warning, the rows are the listing's.
    def refused(uri, data):
        raise OSError("SlowDown: please reduce your request rate")

    monkeypatch.setattr(tars.storage, "write_bytes_atomic", refused)
    other = listing_row(str(tmp_path / "late.tar"), stat.st_size, stat.st_mtime_ns + 5, sniffed=TAR_SNIFFED)
    with caplog.at_level("WARNING", logger="pipeline.tars"):
        assert [r["candidate"] for r in tars.make_expand_fn(InputConfig(), index_dir)(other)] == [True]
    assert "not written (SlowDown" in caplog.text


def test_odd_tars(tmp_path: Path) -> None:
    """Keys out of order, captions twice, links, an upper-case name, a tar of no files."""
    with tarfile.open(tmp_path / "ODD.TAR", "w") as t:
        for name, data in [("a.jpg", picture(0)), ("b.jpg", picture(1)), ("a.txt", b"a cat\n"),
                           ("a.json", json.dumps({"caption": "a cat"}).encode()), ("b.txt", b"a dog\n")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("c.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        t.addfile(link)
    rows = {storage.member_span(r["uri"])[3]: r for r in tars.list_tar(InputConfig(), str(tmp_path / "ODD.TAR"), 0)}
    assert json.loads(rows["a.jpg"]["sidecars"]) == ["a cat"]  # found after b.jpg, said twice: once
    assert json.loads(rows["b.jpg"]["sidecars"]) == ["a dog"]
    assert not rows["c.jpg"]["candidate"] and "is a link" in rows["c.jpg"]["reason"]
    assert storage.read_bytes(rows["b.jpg"]["uri"]) == picture(1)  # .TAR members read back too
    assert storage.member_span(rows["b.jpg"]["uri"])[0] == str(tmp_path / "ODD.TAR")
    with tarfile.open(tmp_path / "dirs.tar", "w") as t:
        d = tarfile.TarInfo("images")
        d.type = tarfile.DIRTYPE
        t.addfile(d)
    (only,) = tars.list_tar(InputConfig(), str(tmp_path / "dirs.tar"), 0)
    assert not only["candidate"] and only["reason"] == "a tar that holds no files"
    # A listing file may name members (an earlier output's source_uri): sized from the address.
    from pipeline.listing import make_listing_row_fn

    row = make_listing_row_fn(str(tmp_path / "list.jsonl"), InputConfig())({"uri": rows["b.jpg"]["uri"]})
    assert row["candidate"] and row["size_bytes"] == len(picture(1)) and row["mtime_ns"] > 0


def test_member_keys_follow_webdataset() -> None:
    assert tars.sample_key("000042.jpg") == ("000042", "jpg")
    assert tars.sample_key("a/b/000042.seg.png") == ("a/b/000042", "seg.png")
    assert tars.sample_key("x") == ("x", "")
    row = listing_row("/d/x.tar", 10, 0, sniffed=TAR_SNIFFED)
    assert storage.member_span(row["uri"]) is None


def test_the_job_expands_each_tar_in_a_task_of_its_own(ray_local: None, tmp_path: Path) -> None:
    import ray

    from pipeline.run import expand_tars

    paths = [write_tar(tmp_path / f"shard-{i}.tar", [(f"{k:06d}.jpg", picture(10 * i + k)) for k in range(2)])
             for i in range(3)]
    rows = [listing_row(str(p), p.stat().st_size, 0, sniffed=TAR_SNIFFED) for p in paths]
    rows.append(listing_row("/videos/a.mp4", 5, 0))
    ds = ray.data.from_items(rows, override_num_blocks=1)  # as one folder's listing task makes them: one block
    out = expand_tars(ds, PipelineConfig()).materialize()
    members = [r["uri"] for p in paths for r in tars.list_tar(InputConfig(), str(p), 0)]
    assert sorted(r["uri"] for r in out.take_all()) == sorted(members + ["/videos/a.mp4"])
    assert out.num_blocks() >= 4  # each tar's members in a block of their own, and the rest
    off = load_config(PipelineConfig, None, ["input.tars=false"])
    assert sorted(r["uri"] for r in expand_tars(ds, off).take_all()) == sorted(r["uri"] for r in rows)
