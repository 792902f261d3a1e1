"""Video sets for eval jobs: a folder of video files or a .npy uint8 array [N, T, H, W, 3].

`open_videos(path, num_frames)` checks everything it can up front (the path exists, the
array's dtype and shape, every file probes as a decodable video, the frame counts agree)
and then yields the videos one at a time as uint8 (T, H, W, 3), so a large set never has
to sit in memory. Frame counts are explicit: without `num_frames` every video must have
the same number of frames (FVD; CLIP-score may ask for `same_length=False`); with it each
video is cut to its first `num_frames` frames and a shorter one is an error. Folder videos are decoded at their own size (FVD and
CLIP-score resize them themselves) with the pipeline's decoder; sidecar captions
(`<stem>.txt` / `<stem>.json`, as in the pipeline) come along as prompts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.decode import DecodeError, iter_frames
from pipeline.discover import InputConfig
from pipeline.listing import list_folder
from pipeline.probe import ProbeConfig, ProbeError, VideoInfo, probe


class VideoInputError(ValueError):
    """Input an eval job cannot use; the message names the file and what is wrong."""


@dataclass
class VideoSet:
    """Videos to score, read lazily: a .npy array or files probed up front."""

    source: str
    names: list[str]
    num_frames: int | None  # frames each video yields; None: its own length (open_videos(same_length=False))
    cut: bool = False  # True: each video is cut to its first num_frames; False: each must have exactly that many
    array: np.ndarray | None = None  # (N, T, H, W, 3) uint8, memory-mapped; None for a folder
    infos: list[VideoInfo] = field(default_factory=list)  # per file, folders only
    captions: list[list[str]] = field(default_factory=list)  # sidecar captions per file, folders only

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.array is not None:
            for video in self.array:
                yield np.array(video[: self.num_frames])  # (T, H, W, 3), read into memory
            return
        for name, info in zip(self.names, self.infos):
            yield read_video(name, info, self.num_frames, exact=not self.cut)


def _frame_count_error(name: str, count: int, first: str, first_count: int) -> VideoInputError:
    return VideoInputError(
        f"{name} has {count} frames but {first} has {first_count}: all videos must have the same "
        f"frame count; pass --num-frames K to cut each to its first K frames"
    )


def read_video(path: str, info: VideoInfo, num_frames: int | None = None, exact: bool = False) -> np.ndarray:
    """Decode a probed file → uint8 (T, H, W, 3): its first `num_frames` frames (all if None).

    `exact`: the file must hold exactly `num_frames` frames (no silent cutting).
    """
    frames = []
    try:
        for _, _, frame in iter_frames(path, info.height_px, info.width_px, codec=info.codec,
                                       rotation_cw=info.rotation_deg):
            frames.append(frame)
            if len(frames) == num_frames and not exact:
                break
    except DecodeError as e:
        raise VideoInputError(f"{path}: cannot decode: {e}") from None
    if not frames:
        raise VideoInputError(f"{path}: no frames decoded")
    if num_frames is not None and len(frames) != num_frames:
        raise VideoInputError(
            f"{path}: has {len(frames)} frames, expected {num_frames}" + (
                "; all videos must have the same frame count (pass --num-frames K to cut each to its "
                "first K frames)" if exact else "")
        )
    return np.stack(frames)  # (T, H, W, 3)


def _open_npy(path: Path, num_frames: int | None) -> VideoSet:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise VideoInputError(f"{path}: not a plain numpy array file ({e})") from None
    if array.dtype != np.uint8 or array.ndim != 5 or array.shape[-1] != 3:
        raise VideoInputError(
            f"{path}: expected uint8 [N, T, H, W, 3] videos with values 0..255, got {array.dtype} {list(array.shape)}"
        )
    if len(array) == 0:
        raise VideoInputError(f"{path}: holds no videos (N = 0)")
    count = array.shape[1]
    if num_frames is not None and count < num_frames:
        raise VideoInputError(f"{path}: videos have {count} frames, fewer than --num-frames {num_frames}")
    names = [f"{path.name}[{i}]" for i in range(len(array))]
    return VideoSet(str(path), names, num_frames or count, cut=num_frames is not None, array=array)


def _open_folder(path: Path, num_frames: int | None, same_length: bool) -> VideoSet:
    candidates = sorted((r for r in list_folder(InputConfig(), str(path)) if r["candidate"]), key=lambda r: r["uri"])
    if not candidates:
        raise VideoInputError(f"{path}: no video files in this folder")
    cfg = ProbeConfig(min_frames=1)
    infos = []
    for c in candidates:
        try:
            infos.append(probe(c["uri"], cfg))
        except ProbeError as e:
            raise VideoInputError(f"{c['uri']}: {e}") from None
    names = [c["uri"] for c in candidates]
    counts = [info.num_frames for info in infos]
    captions = [json.loads(c["sidecars"]) for c in candidates]
    if num_frames is None and not same_length:
        return VideoSet(str(path), names, None, infos=infos, captions=captions)
    if num_frames is None:
        # header counts are exact for most containers; decoding re-checks every video anyway
        exact = [(n, k) for n, k, info in zip(names, counts, infos) if info.num_frames_is_exact]
        for name, count in exact[1:]:
            if count != exact[0][1]:
                raise _frame_count_error(name, count, *exact[0])
        count = len(read_video(names[0], infos[0]))  # the decoder's count is the authority
        return VideoSet(str(path), names, count, infos=infos, captions=captions)
    for name, count, info in zip(names, counts, infos):
        if info.num_frames_is_exact and count < num_frames:
            raise VideoInputError(f"{name}: has only {count} frames, fewer than --num-frames {num_frames}")
    return VideoSet(str(path), names, num_frames, cut=True, infos=infos, captions=captions)


def open_videos(path: str | Path, num_frames: int | None = None, same_length: bool = True) -> VideoSet:
    """A folder of video files or a .npy uint8 [N, T, H, W, 3] array, checked, read lazily.

    `same_length=False` (CLIP-score) lets folder videos keep their own lengths when `num_frames` is None.
    """
    path = Path(path)
    if num_frames is not None and num_frames < 1:
        raise VideoInputError(f"num_frames must be >= 1, got {num_frames}")
    if not path.exists():
        raise VideoInputError(f"{path} does not exist")
    if path.is_dir():
        return _open_folder(path, num_frames, same_length)
    if path.suffix == ".npy":
        return _open_npy(path, num_frames)
    raise VideoInputError(f"{path}: expected a folder of video files or a .npy uint8 [N, T, H, W, 3] array")


__all__ = ["VideoInputError", "VideoSet", "open_videos", "read_video"]
