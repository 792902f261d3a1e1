"""What counts as a source (by extension and by sniffed content), sidecar captions, content ids.

A file is a candidate when its extension says video or image, OR its first bytes look like a
video container or an image — a mislabelled file is sniffed, not trusted. Sidecar captions (`<stem>.txt`,
one caption per line, or `<stem>.json` with "caption"/"captions") belong to the video they
sit beside. The source id is a hash of the bytes, so a renamed copy is the same source.
`pipeline/listing.py` applies these to folders and listing files at corpus scale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from pipeline import storage
from pipeline.images import IMAGE_EXTENSIONS, sniff_image

VIDEO_EXTENSIONS = [
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".ts", ".mts", ".m2ts",
    ".mpg", ".mpeg", ".wmv", ".asf", ".ogv", ".3gp", ".y4m", ".ivf",
]
SIDECAR_EXTENSIONS = (".txt", ".json")
SNIFF_BYTES = 4096
TAR_SNIFFED = "application/x-tar"  # `sniffed` of a listing row that is a WebDataset tar still to expand


@dataclass
class InputConfig:
    """Where sources come from and which files count as videos."""

    uri: str = ""  # local folder or pyarrow.fs URI; "" = the bundled sample clips
    extensions: list[str] = field(default_factory=lambda: list(VIDEO_EXTENSIONS))
    sniff_content: bool = True  # also take files whose bytes look like a video container
    # Still images become 1-frame clips (pipeline/images.py); [] and sniff_images: false = videos only.
    image_extensions: list[str] = field(default_factory=lambda: list(IMAGE_EXTENSIONS))
    sniff_images: bool = True  # also take files whose bytes look like an image (a PNG named .dat)
    use_sidecars: bool = True
    max_sidecar_bytes: int = 65536
    # A .tar is a WebDataset shard: each image / video in it is a source, with its key's captions
    # (pipeline/tars.py). false: a .tar is a `discover` reject like any other non-video file.
    tars: bool = True


def sniff_container(head: bytes) -> str | None:
    """Name of the container format these first bytes announce, or None."""
    if len(head) >= 12 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "mp4/mov"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska/webm"
    if head.startswith(b"RIFF") and head[8:12] in (b"AVI ", b"AVIX"):
        return "avi"
    if head.startswith(b"FLV"):
        return "flv"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"\x00\x00\x01\xba") or head.startswith(b"\x00\x00\x01\xb3"):
        return "mpeg-ps"
    if head.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"):
        return "asf"
    if head.startswith(b"YUV4MPEG2"):
        return "y4m"
    if head.startswith(b"DKIF"):
        return "ivf"
    # MPEG-TS: sync byte 0x47 every 188 bytes.
    if len(head) >= 188 * 3 and all(head[i * 188] == 0x47 for i in range(3)):
        return "mpeg-ts"
    return None


def media_extensions(cfg: InputConfig) -> set[str]:
    """The extensions that make a file a candidate (video or image), lower case."""
    return {e.lower() for e in cfg.extensions} | {e.lower() for e in cfg.image_extensions}


def sniffs(cfg: InputConfig, suffix: str, exts: set[str]) -> bool:
    """Whether a file (or tar member) with this suffix has its first SNIFF_BYTES read to classify it."""
    return cfg.sniff_content or cfg.sniff_images or suffix in exts


def sniffed_media(cfg: InputConfig, suffix: str, exts: set[str], head: bytes) -> str:
    """What a file's first bytes say it is (a container or an image format), "" when neither: a
    candidate is one whose suffix is in `exts` or whose bytes say so."""
    return (sniff_container(head) if cfg.sniff_content or suffix in exts else None) or (
        sniff_image(head) if cfg.sniff_images or suffix in exts else None) or ""


def is_tar(uri: str, cfg: InputConfig) -> bool:
    """Whether `uri` is a WebDataset tar to expand (a plain .tar; a tar member is not one)."""
    return cfg.tars and uri.lower().endswith(".tar") and storage.member_span(uri) is None


def is_image(uri: str, sniffed: str, cfg: InputConfig) -> bool:
    """Whether a candidate is a still image: by its bytes when sniffed, else by its extension."""
    if sniffed:
        return sniffed.startswith("image/")
    return PurePosixPath(uri).suffix.lower() in {e.lower() for e in cfg.image_extensions}


def sniff_other(head: bytes) -> str:
    """A short human name for what a non-video file looks like (for reject reasons)."""
    known = {
        b"\x89PNG": "PNG image", b"\xff\xd8\xff": "JPEG image", b"GIF8": "GIF image",
        b"%PDF": "PDF document", b"PK\x03\x04": "ZIP archive", b"ID3": "MP3 audio",
        b"fLaC": "FLAC audio",
    }
    for magic, name in known.items():
        if head.startswith(magic):
            return name
    if not head:
        return "empty file"
    try:
        head.decode("utf-8")
        return "text file"
    except UnicodeDecodeError:
        return "unrecognised binary data"


def read_sidecar(uri: str, max_bytes: int) -> list[str]:
    return parse_sidecar(uri, storage.read_bytes(uri, max_bytes))


def parse_sidecar(name: str, data: bytes) -> list[str]:
    """Captions in a sidecar's bytes: one per line, or a .json's "caption" / "captions"."""
    text = data.decode("utf-8", errors="replace")
    if name.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return []
        if not isinstance(data, dict):
            return []
        caps = data.get("captions") or ([data["caption"]] if "caption" in data else [])
        return [str(c).strip() for c in caps if str(c).strip()]
    return [line.strip() for line in text.splitlines() if line.strip()]


CONTENT_ID_PREFIX = "src"  # + the first 29 hex digits of the bytes' sha256: 32 characters


def content_id(uri: str) -> str:
    """Stable source id: sha256 of the file's bytes (first 32 characters with the prefix)."""
    return CONTENT_ID_PREFIX + storage.sha256(uri)[:29]
