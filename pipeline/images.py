"""Still images as sources: probe and decode a jpg / png / webp / bmp / tiff into a 1-frame clip.

Sora-class models train on images and videos together; an image becomes one clip of one
frame in the 1-frame bucket of its aspect, with its sidecar captions, through the same
caption, VAE and writer stages as video clips. Pillow reads the header without decoding for
the probe, and applies the EXIF orientation on decode (phones store portraits as rotated
landscape pixels), so sizes and buckets are those of the picture as displayed.
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.probe import ProbeConfig, ProbeError, VideoInfo

IMAGE_EXTENSIONS = [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"]
IMAGE_CONTAINER = "image"  # VideoInfo.container of an image source
# EXIF orientations (1–8) that turn the stored pixels by 90° (5–8): width and height swap.
_TRANSPOSED = {5, 6, 7, 8}
# Pillow refuses images over ~179M pixels as a decompression bomb; probe.max_side_px bounds us first.
Image.MAX_IMAGE_PIXELS = None


def sniff_image(head: bytes) -> str | None:
    """Name of the image format these first bytes announce, or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith(b"BM") and len(head) >= 26:
        return "image/bmp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "image/tiff"
    return None


def probe_image(path: str, cfg: ProbeConfig) -> VideoInfo:
    """Size (as displayed) and format of a still image, without decoding it; ProbeError if unusable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                fmt = (im.format or "image").lower()
                width, height = im.size
                orientation = im.getexif().get(0x0112, 1)
                mode = im.mode
                frames = getattr(im, "n_frames", 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ProbeError(f"not a readable image ({e})") from None
    if orientation in _TRANSPOSED:
        width, height = height, width
    w, h = width, height
    if min(w, h) < cfg.min_side_px or max(w, h) > cfg.max_side_px:
        raise ProbeError(f"absurd dimensions {w}x{h}: each side must be in [{cfg.min_side_px}, {cfg.max_side_px}] px")
    if max(w, h) / min(w, h) > cfg.max_aspect:
        raise ProbeError(f"absurd aspect ratio {w}x{h} (> {cfg.max_aspect}:1)")
    if frames > 1:
        raise ProbeError(f"an animated {fmt.upper()} of {frames} frames (animated images are not sources; "
                         "convert it to a video)")
    return VideoInfo(duration_s=0.0, fps=0.0, fps_is_variable=False, num_frames=1, num_frames_is_exact=True,
                     width_px=w, height_px=h, codec=fmt, pix_fmt=mode, rotation_deg=0, container=IMAGE_CONTAINER,
                     has_audio=False)


def read_image(path: str) -> np.ndarray:
    """The picture as displayed: RGB uint8 (H, W, 3), EXIF orientation applied, alpha over black."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (0, 0, 0, 255))
                im = Image.alpha_composite(background, im)
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ProbeError(f"image does not decode ({e})") from None
