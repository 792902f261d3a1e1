"""Still images as sources: found in folders (by extension or bytes), probed, cut into 1-frame clips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.discover import InputConfig
from pipeline.images import probe_image, read_image, sniff_image
from pipeline.listing import classify, listing_row
from pipeline.probe import ProbeConfig, ProbeError
from pipeline.settings import PipelineConfig
from pipeline.steps import make_cut_fn, make_probe_fn
from tests.pipeline.test_filters import texture
from tests.pipeline.test_steps import probed


def save(path: Path, pixels: np.ndarray, orientation: int | None = None, **kw) -> Path:
    im = Image.fromarray(pixels)
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    im.save(path, **kw)
    return path


def files_of(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())


def test_images_are_candidates_with_their_sidecars(tmp_path: Path) -> None:
    pic = texture(120, 200)
    save(tmp_path / "beach.jpg", pic)
    (tmp_path / "beach.txt").write_text("waves on a sandy beach\n")
    save(tmp_path / "logo.png", pic)
    save(tmp_path / "night.webp", pic)
    save(tmp_path / "scan.data", pic, format="PNG")  # a PNG by its bytes, not its name
    (tmp_path / "notes.md").write_text("not a picture")
    rows = {Path(r["uri"]).name: r for r in classify(InputConfig(), files_of(tmp_path))}
    assert {n for n, r in rows.items() if r["candidate"]} == {"beach.jpg", "logo.png", "night.webp", "scan.data"}
    assert json.loads(rows["beach.jpg"]["sidecars"]) == ["waves on a sandy beach"]
    assert rows["scan.data"]["sniffed"] == "image/png" and not rows["notes.md"]["candidate"]
    no_images = InputConfig(image_extensions=[], sniff_images=False)
    assert not any(r["candidate"] for r in classify(no_images, files_of(tmp_path)))


def test_probe_reads_the_displayed_size_and_names_what_is_wrong(tmp_path: Path) -> None:
    pic = texture(120, 200)
    info = probe_image(str(save(tmp_path / "a.jpg", pic)), ProbeConfig())
    assert (info.width_px, info.height_px, info.num_frames, info.codec) == (200, 120, 1, "jpeg")
    portrait = save(tmp_path / "phone.jpg", pic, orientation=6)  # stored landscape, shown rotated 90°
    assert (probe_image(str(portrait), ProbeConfig()).width_px, probe_image(str(portrait), ProbeConfig()).height_px) \
        == (120, 200)
    assert read_image(str(portrait)).shape == (200, 120, 3)
    assert sniff_image((tmp_path / "a.jpg").read_bytes()[:16]) == "image/jpeg"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    with pytest.raises(ProbeError, match="not a readable image"):
        probe_image(str(broken), ProbeConfig())
    with pytest.raises(ProbeError, match="absurd dimensions 200x8"):
        probe_image(str(save(tmp_path / "strip.png", pic[:8])), ProbeConfig())
    frames = [Image.fromarray(pic), Image.fromarray(pic[::-1].copy())]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:])
    with pytest.raises(ProbeError, match="animated WEBP of 2 frames"):
        probe_image(str(tmp_path / "anim.webp"), ProbeConfig())
    rgba = np.dstack([pic, np.full(pic.shape[:2], 0, np.uint8)])  # fully transparent
    assert read_image(str(save(tmp_path / "clear.png", rgba))).max() == 0  # composited over black


def test_an_image_is_one_frame_clip_in_its_aspects_1_frame_bucket(tmp_path: Path) -> None:
    cfg = PipelineConfig()
    path = save(tmp_path / "wide.png", texture(270, 480, sigma=1.0))  # 16:9
    row = probed(path, cfg)
    assert not row["reason"] and json.loads(row["info"])["container"] == "image"
    out = list(make_cut_fn(cfg)(row))
    clips = [r for r in out if r["kind"] == "clip"]
    assert len(clips) == 1 and clips[0]["bucket"].endswith("16x9_1f"), [r["bucket"] for r in clips]
    c = clips[0]
    assert c["frames"].shape == (1, c["height_px"], c["width_px"], 3) and c["num_frames"] == 1
    assert c["source_fps"] == 0.0 and c["start_frame"] == 0 and c["end_frame"] == 1
    assert c["sharpness"] > 15 and c["motion"] == 0.0  # scored like any clip; motion needs 2 frames
    source = json.loads(out[-1]["record_json"])
    assert source["num_clips"] == 1 and source["duration_s"] == 0.0
    # Its sidecar caption rides the clip row to the caption stage and wins against the templates.
    from pipeline.steps import CaptionStage
    from tests.pipeline.test_steps import as_batch

    row = make_probe_fn(cfg)(dict(listing_row(str(path), path.stat().st_size, 0, sidecars=["gravel in the sun"]),
                                  source_id="", dup_of=""))
    (clip,) = [r for r in make_cut_fn(cfg)(row) if r["kind"] == "clip"]
    assert json.loads(clip["sidecars"]) == ["gravel in the sun"]
    only = load_config(PipelineConfig, overrides=['caption.templates=["{}"]', 'caption.vocabulary=["gravel in the sun"]'])
    captioned = CaptionStage(only)(as_batch([clip]))  # two equal candidates: the sidecar wins the tie
    assert list(captioned["caption"]) == ["gravel in the sun"] and list(captioned["caption_source"]) == ["sidecar"]
    # A bucket spec without 1-frame clips cannot take images: said plainly, at probe.
    videos_only = load_config(PipelineConfig, overrides=["buckets.num_frames=[9, 17]"])
    row = probed(path, videos_only)
    assert row["stage"] == "bucket" and "buckets.num_frames has no 1" in row["reason"]


def test_a_png_named_mov_is_an_image(tmp_path: Path) -> None:
    path = save(tmp_path / "picture.mov", texture(240, 320), format="PNG")
    row = probed(path, PipelineConfig())
    assert not row["reason"] and json.loads(row["info"])["codec"] == "png"
