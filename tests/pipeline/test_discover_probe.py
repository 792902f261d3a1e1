"""pipeline/discover.py, pipeline/listing.py and pipeline/probe.py on real sample clips and generated corpora."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.discover import (
    SNIFF_BYTES,
    InputConfig,
    content_id,
    sniff_container,
    sniff_other,
)
from pipeline.listing import InputError, check_input, list_folder
from pipeline.probe import ProbeConfig, ProbeError, VideoInfo, check_bounds, probe
from tests import media


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(SNIFF_BYTES)


# ---------------------------------------------------------------------------
# Sniffing
# ---------------------------------------------------------------------------


def test_sniff_container_recognises_real_files(
    sample_clips: dict[str, Path], odd_videos: dict[str, Path], bad_videos: dict[str, Path]
) -> None:
    assert sniff_container(_head(sample_clips["bikes"])) == "mp4/mov"
    assert sniff_container(_head(odd_videos["grayscale"])) == "matroska/webm"  # .mkv
    assert sniff_container(_head(odd_videos["vp9_webm"])) == "matroska/webm"
    assert sniff_container(_head(odd_videos["mjpeg_avi"])) == "avi"
    assert sniff_container(_head(bad_videos["truncated_stream"])) == "mpeg-ts"
    assert sniff_container(_head(odd_videos["mislabelled"])) == "mp4/mov"  # .dat by name


def test_sniff_container_rejects_non_videos(bad_videos: dict[str, Path]) -> None:
    for key in ("not_video", "png_as_mov", "empty", "corrupt", "corrupt_header"):
        assert sniff_container(_head(bad_videos[key])) is None, key
    # One 0x47 sync byte is not MPEG-TS; it must repeat every 188 bytes.
    assert sniff_container(b"G" + b"\x00" * 600) is None


def test_sniff_other_names_what_a_file_is(bad_videos: dict[str, Path]) -> None:
    assert sniff_other(_head(bad_videos["png_as_mov"])) == "PNG image"
    assert sniff_other(_head(bad_videos["not_video"])) == "text file"
    assert sniff_other(b"") == "empty file"
    assert sniff_other(b"\xff\xd8\xff\xe0rest") == "JPEG image"
    assert sniff_other(_head(bad_videos["corrupt"])) == "unrecognised binary data"


# ---------------------------------------------------------------------------
# Discovery and sidecars
# ---------------------------------------------------------------------------


@pytest.fixture
def input_dir(tmp_path: Path, odd_videos: dict[str, Path], bad_videos: dict[str, Path]) -> Path:
    """A folder of videos, sidecars, mislabelled and non-video files."""
    root = tmp_path / "input"
    (root / "sub").mkdir(parents=True)
    shutil.copy(odd_videos["weird_name"], root / "alpha.mp4")
    shutil.copy(odd_videos["vp9_webm"], root / "beta.webm")
    shutil.copy(odd_videos["mjpeg_avi"], root / "sub" / "gamma.avi")
    shutil.copy(odd_videos["mislabelled"], root / "mystery.dat")
    shutil.copy(bad_videos["not_video"], root / "notes.mp4")
    shutil.copy(bad_videos["png_as_mov"], root / "picture.mov")
    (root / "alpha.txt").write_text("a red car\n\n  a blue sky  \n")
    (root / "beta.json").write_text(json.dumps({"captions": ["first", " ", "second"]}))
    (root / "sub" / "gamma.json").write_text(json.dumps({"caption": "only one"}))
    (root / "sub" / "alpha.txt").write_text("wrong folder: belongs to no video\n")
    (root / "README.md").write_text("# dataset\n")
    (root / "orphan.json").write_text("{}")
    return root


def discover(cfg: InputConfig, uri: str, exclude: str = "") -> tuple[list[dict], list[str]]:
    """What the job's listing stage yields for a folder: every task's rows, split by candidacy."""
    if not Path(uri).exists():
        raise FileNotFoundError(f"input {uri!r} does not exist")
    rows = list_folder(cfg, uri, exclude)
    cands = [dict(r, sidecar_captions=json.loads(r["sidecars"]), sniffed=r["sniffed"] or None)
             for r in rows if r["candidate"]]
    return cands, [r["uri"] for r in rows if not r["candidate"]]


def _rel(root: Path, uris: list[str]) -> set[str]:
    return {Path(u).relative_to(root.resolve()).as_posix() for u in uris}


def test_discover_finds_candidates_by_extension_and_content(input_dir: Path) -> None:
    cands, ignored = discover(InputConfig(), str(input_dir))
    by_name = {Path(c["uri"]).name: c for c in cands}
    assert set(by_name) == {"alpha.mp4", "beta.webm", "gamma.avi", "mystery.dat", "notes.mp4", "picture.mov"}
    assert by_name["mystery.dat"]["sniffed"] == "mp4/mov"  # found by content
    assert by_name["beta.webm"]["sniffed"] == "matroska/webm"
    # An extension-only candidate that looks like nothing: probe will say why.
    assert by_name["notes.mp4"]["sniffed"] is None
    assert by_name["picture.mov"]["sniffed"] == "image/png"  # a PNG, whatever its name: an image source
    assert by_name["alpha.mp4"]["size_bytes"] == (input_dir / "alpha.mp4").stat().st_size
    assert by_name["alpha.mp4"]["mtime_ns"] == (input_dir / "alpha.mp4").stat().st_mtime_ns
    assert _rel(input_dir, ignored) == {"README.md", "orphan.json", "sub/alpha.txt"}


def test_sidecars_attach_to_their_video_only(input_dir: Path) -> None:
    cands, ignored = discover(InputConfig(), str(input_dir))
    caps = {Path(c["uri"]).name: c["sidecar_captions"] for c in cands}
    assert caps["alpha.mp4"] == ["a red car", "a blue sky"]
    assert caps["beta.webm"] == ["first", "second"]
    assert caps["gamma.avi"] == ["only one"]
    assert caps["mystery.dat"] == [] and caps["notes.mp4"] == []
    assert not _rel(input_dir, ignored) & {"alpha.txt", "beta.json", "sub/gamma.json"}


def test_sidecars_off_and_sniffing_off(input_dir: Path) -> None:
    cands, ignored = discover(InputConfig(use_sidecars=False), str(input_dir))
    assert all(c["sidecar_captions"] == [] for c in cands)
    assert {"alpha.txt", "beta.json", "sub/gamma.json"} <= _rel(input_dir, ignored)
    cands, ignored = discover(InputConfig(sniff_content=False), str(input_dir))
    assert "mystery.dat" not in {Path(c["uri"]).name for c in cands}
    assert "mystery.dat" in _rel(input_dir, ignored)


def test_missing_input_and_bad_listing_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        check_input(str(tmp_path / "nowhere"))
    (tmp_path / "l.jsonl").write_text("[1, 2]\n")
    with pytest.raises(InputError, match="each line must be a JSON object"):
        check_input(str(tmp_path / "l.jsonl"))
    (tmp_path / "l.csv").write_text("path,caption\n")
    with pytest.raises(InputError, match="no 'uri' column \\(columns: \\['path', 'caption'\\]\\)"):
        check_input(str(tmp_path / "l.csv"))
    (tmp_path / "ok.csv").write_text("uri,caption\n")
    assert check_input(str(tmp_path / "ok.csv")) == "csv" and check_input(str(tmp_path)) == "folder"


def test_the_output_inside_the_input_is_not_listed(input_dir: Path) -> None:
    out = input_dir / "sub" / "data"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "x.mp4").write_bytes(b"not listed")
    cands, ignored = discover(InputConfig(), str(input_dir), exclude=str(out.resolve()))
    assert not [u for u in [c["uri"] for c in cands] + ignored if "/data/" in u]
    assert "gamma.avi" in {Path(c["uri"]).name for c in cands}  # the rest of sub/ still is


def test_content_id_follows_bytes_not_names(tmp_path: Path, odd_videos: dict[str, Path]) -> None:
    src = odd_videos["weird_name"]
    copy = tmp_path / "renamed copy.mkv"
    shutil.copy(src, copy)
    a, b = content_id(str(src)), content_id(str(copy))
    assert a == b and a.startswith("src") and len(a) == 32
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    assert content_id(str(copy)) != a
    assert content_id(str(odd_videos["portrait"])) != a


# ---------------------------------------------------------------------------
# Probe: good inputs
# ---------------------------------------------------------------------------


def test_probe_sample_clips(sample_clips: dict[str, Path]) -> None:
    cfg = ProbeConfig()
    bikes = probe(str(sample_clips["bikes"]), cfg)
    assert (bikes.width_px, bikes.height_px, bikes.num_frames) == (640, 272, 250)
    assert bikes.fps == pytest.approx(25.0) and bikes.duration_s == pytest.approx(10.0)
    assert not bikes.fps_is_variable and bikes.num_frames_is_exact
    assert (bikes.codec, bikes.rotation_deg, bikes.has_audio) == ("h264", 0, False)
    assert "mp4" in bikes.container

    bunny = probe(str(sample_clips["bigbuckbunny"]), cfg)
    assert (bunny.width_px, bunny.height_px) == (1280, 720)
    assert bunny.has_audio and not bunny.fps_is_variable

    car = probe(str(sample_clips["carphone_pristine"]), cfg)
    assert (car.width_px, car.height_px) == (176, 144)
    assert car.fps == pytest.approx(30000 / 1001, rel=1e-4)
    assert not car.fps_is_variable
    assert json.loads(json.dumps(car.to_row())) == car.to_row()  # a JSON-safe row


def test_probe_flags_variable_frame_rate_only_for_vfr(odd_videos: dict[str, Path]) -> None:
    cfg = ProbeConfig()
    vfr = probe(str(odd_videos["vfr"]), cfg)
    assert vfr.fps_is_variable
    assert vfr.num_frames == 80 and vfr.fps == pytest.approx(20.0, rel=0.05)
    for name in ("weird_name", "vp9_webm", "mjpeg_avi", "hevc_10bit"):
        assert not probe(str(odd_videos[name]), cfg).fps_is_variable, name


def test_probe_odd_valid_videos(odd_videos: dict[str, Path]) -> None:
    cfg = ProbeConfig()
    assert probe(str(odd_videos["portrait"]), cfg).width_px == 180
    assert probe(str(odd_videos["odd_dims"]), cfg).height_px == 202
    assert probe(str(odd_videos["hevc_10bit"]), cfg).pix_fmt == "yuv420p10le"
    assert probe(str(odd_videos["grayscale"]), cfg).pix_fmt == "gray"
    assert probe(str(odd_videos["mislabelled"]), cfg).codec == "h264"
    vp9 = probe(str(odd_videos["vp9_webm"]), cfg)
    assert vp9.num_frames == 100 and not vp9.num_frames_is_exact  # WebM has no frame count
    if "av1" in odd_videos:
        assert probe(str(odd_videos["av1"]), cfg).num_frames == 100


# ---------------------------------------------------------------------------
# Probe: bad inputs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("corrupt", "not a readable media container"),
        ("corrupt_header", "not a readable media container"),
        ("truncated", "not a readable media container"),
        ("empty", "not a readable media container"),
        ("not_video", "not a readable media container"),
        ("audio_only", "no video stream (streams: audio)"),
        ("png_as_mov", "a still image, not a video (PNG image"),
        ("one_frame", "only 1 frame(s): a video needs at least 2"),
        ("absurd_dims", f"absurd dimensions {media.ABSURD_WIDTH}x{media.ABSURD_HEIGHT}"),
    ],
)
def test_probe_rejects_bad_inputs_with_specific_reason(bad_videos: dict[str, Path], key: str, expected: str) -> None:
    with pytest.raises(ProbeError) as e:
        probe(str(bad_videos[key]), ProbeConfig())
    assert expected in str(e.value)


def test_truncated_stream_probes_as_its_decodable_prefix(bad_videos: dict[str, Path]) -> None:
    # MPEG-TS has no index: the cut-off file is a shorter but valid video (the cut step keeps it).
    info = probe(str(bad_videos["truncated_stream"]), ProbeConfig())
    assert info.container == "mpegts" and not info.num_frames_is_exact
    assert 0 < info.num_frames < media.TRUNC_NUM_FRAMES
    assert info.duration_s < media.TRUNC_NUM_FRAMES / media.FPS


def _info(**kw: object) -> VideoInfo:
    base = dict(duration_s=4.0, fps=25.0, fps_is_variable=False, num_frames=100, num_frames_is_exact=True,
                width_px=256, height_px=144, codec="h264", pix_fmt="yuv420p", rotation_deg=0,
                container="mp4", has_audio=False)
    return VideoInfo(**{**base, **kw})


def test_check_bounds_reasons() -> None:
    cfg = ProbeConfig()
    check_bounds(_info(), cfg)
    with pytest.raises(ProbeError, match=r"absurd dimensions 20x144"):
        check_bounds(_info(width_px=20), cfg)
    with pytest.raises(ProbeError, match=r"absurd dimensions 9000x144"):
        check_bounds(_info(width_px=9000), cfg)
    with pytest.raises(ProbeError, match=r"absurd aspect ratio 1200x144"):
        check_bounds(_info(width_px=1200), cfg)
    with pytest.raises(ProbeError, match=r"only 1 frame"):
        check_bounds(_info(num_frames=1), cfg)
    with pytest.raises(ProbeError, match=r"max_duration_s"):
        check_bounds(_info(duration_s=7 * 3600.0), cfg)


def test_probe_fn_reasons_name_what_the_file_is(bad_videos: dict[str, Path]) -> None:
    from pipeline.settings import PipelineConfig
    from pipeline.steps import make_probe_fn

    from pipeline.config import load_config

    probe_row = make_probe_fn(PipelineConfig())
    videos_only = make_probe_fn(load_config(PipelineConfig, overrides=["input.image_extensions=[]",
                                                                       "input.sniff_images=false"]))

    def reason(key: str, sniffed: str | None = None, fn=probe_row) -> str:
        p = bad_videos[key]
        row = fn({"uri": str(p), "size_bytes": p.stat().st_size, "sniffed": sniffed, "sidecars": "[]"})
        assert row["info"] == ""
        return row["reason"]

    assert "text file" in reason("not_video")
    assert "a still image, not a video (PNG image" in reason("png_as_mov", fn=videos_only)
    p = bad_videos["png_as_mov"]  # with images on (the default), a PNG named .mov is an image source
    row = probe_row({"uri": str(p), "size_bytes": p.stat().st_size, "sniffed": None, "sidecars": "[]"})
    assert row["reason"] == "" and json.loads(row["info"])["container"] == "image"
    assert "empty file" in reason("empty")
    assert "unrecognised binary data" in reason("corrupt")
    assert "mp4/mov (damaged)" in reason("truncated", sniffed="mp4/mov")
    assert "no video stream" in reason("audio_only")


# ---------------------------------------------------------------------------
# Rotation
# ---------------------------------------------------------------------------


def write_rotated(path: Path, frames: list[np.ndarray], ccw_deg: int) -> Path:
    """H.264 mp4 of `frames` (coded as given) with a display matrix rotating them `ccw_deg` CCW."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options=media.X264)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.set_display_rotation(ccw_deg)
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


@pytest.mark.parametrize(("ccw_deg", "expected_cw"), [(90, 270), (-90, 90), (180, 180)])
def test_probe_reports_display_size_and_rotation(tmp_path: Path, ccw_deg: int, expected_cw: int) -> None:
    coded = list(media.scene_frames(96, 64, 10, 5, seed=3))  # coded 96 wide, 64 tall
    path = write_rotated(tmp_path / f"rot{ccw_deg}.mp4", coded, ccw_deg)
    info = probe(str(path), ProbeConfig())
    # FFmpeg's display matrix angle is counter-clockwise; probe reports the clockwise turn.
    assert info.rotation_deg == expected_cw
    if expected_cw in (90, 270):
        assert (info.width_px, info.height_px) == (64, 96)
    else:
        assert (info.width_px, info.height_px) == (96, 64)
