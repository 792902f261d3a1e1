"""Local folders and `pyarrow.fs` URIs (s3://, gs://, file://) behind one small API.

Everything that touches input or output goes through here, so the pipeline runs the
same on a laptop folder and on a bucket. Writes are atomic: a temp file in the same
directory, then a rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow.fs as pafs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """URI or local path → (filesystem, path inside it). Local paths become absolute."""
    if not uri:
        raise ValueError("empty path/URI")
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    return pafs.FileSystem.from_uri(uri)


def canonical(uri: str) -> str:
    """The one spelling of a location: absolute local path, or scheme://path."""
    return to_uri(*resolve(uri))


def is_local(uri: str) -> bool:
    return isinstance(resolve(uri)[0], pafs.LocalFileSystem)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with '/'."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """Inverse of `resolve` for the filesystems we use."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    return f"{fs.type_name}://{path}"


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def list_relative(root: str, sub: str) -> dict[str, int]:
    """Files below `root`/`sub` (recursive) as {path relative to root: size}; {} when there is none."""
    uri = join(root, sub)
    if not exists(uri):
        return {}
    base = canonical(root).rstrip("/") + "/"
    return {u[len(base):]: size for u, size in list_files(uri)}


def list_files(uri: str) -> list[tuple[str, int]]:
    """All regular files below `uri` (recursive), as (uri, size_bytes), sorted."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {uri!r} does not exist")
    if info.type == pafs.FileType.File:
        return [(to_uri(fs, path), info.size)]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = [(to_uri(fs, i.path), i.size) for i in infos if i.type == pafs.FileType.File]
    return sorted(files)


# A member of a tar (a WebDataset shard, pipeline/tars.py) is a source of its own, addressed as
# `<tar uri>#<offset>+<size>/<member name>`: bytes [offset, offset + size) of the tar. The name
# comes last so the URI keeps the member's extension. Every read below takes such a URI and
# reads only that range (one ranged GET on an object store), never the whole tar.
_MEMBER = re.compile(r"(.*?\.tar)#(\d+)\+(\d+)/(.+)", re.IGNORECASE | re.DOTALL)


def member_span(uri: str) -> tuple[str, int, int, str] | None:
    """(tar uri, offset, size, member name) of a tar member's URI; None for any other URI (a
    path that merely contains ".tar#" is a path)."""
    match = _MEMBER.fullmatch(uri)
    if match is None:
        return None
    return match[1], int(match[2]), int(match[3]), match[4]


def member_uri(tar_uri: str, offset: int, size: int, name: str) -> str:
    return f"{tar_uri}#{offset}+{size}/{name}"


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    if member_span(uri):
        return b"".join(iter_chunks(uri, max_bytes=max_bytes))
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read(max_bytes) if max_bytes is not None else f.read()


def iter_chunks(uri: str, chunk_bytes: int = 8 << 20, max_bytes: int | None = None) -> Iterator[bytes]:
    """The bytes of a file or tar member, `chunk_bytes` at a time (a member's first `max_bytes`)."""
    if member := member_span(uri):
        tar, offset, size, _ = member
        end = offset + (size if max_bytes is None else min(size, max_bytes))
        fs, path = resolve(tar)
        with fs.open_input_file(path) as f:
            while offset < end:
                chunk = f.read_at(min(chunk_bytes, end - offset), offset)
                if not chunk:
                    raise OSError(f"{tar} ends before its member {member[3]!r} does (truncated tar?)")
                offset += len(chunk)
                yield chunk
        return
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        while chunk := f.read(chunk_bytes):
            yield chunk


TMP_MARK = ".tmp-"  # in the name of every half-written file (debris once its writer died)


def sha256(uri: str) -> str:
    """sha256 hex digest of a file's bytes (local path or URI), read in 8 MB chunks."""
    h = hashlib.sha256()
    for chunk in iter_chunks(uri):
        h.update(chunk)
    return h.hexdigest()


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write so readers never see a partial file.

    Local and other filesystems: a temp file in the same folder, then a rename. Object stores
    (S3, GCS): one direct PUT, which is atomic there — the object appears only when complete —
    while a "rename" would be a server-side copy plus a delete.
    """
    fs, path = resolve(uri)
    if is_object_store(fs):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    fs.create_dir(os.path.dirname(path), recursive=True)
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def put_file_atomic(local_path: str, uri: str) -> None:
    """Place a finished local file at `uri` atomically (rename / copy + rename / one upload)."""
    fs, path = resolve(uri)
    if is_object_store(fs):  # multipart upload: the object appears only when complete
        pafs.copy_files(local_path, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        return
    fs.create_dir(os.path.dirname(path), recursive=True)
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    if isinstance(fs, pafs.LocalFileSystem):
        shutil.copyfile(local_path, tmp)  # the local temp dir may be on another filesystem
    else:
        pafs.copy_files(local_path, tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    fs.move(tmp, path)


def is_object_store(fs: pafs.FileSystem) -> bool:
    return fs.type_name in ("s3", "gcs")


def delete_file(uri: str) -> None:
    fs, path = resolve(uri)
    fs.delete_file(path)


def file_size(uri: str) -> int | None:
    """Size in bytes, or None when there is no such file."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def move(src_uri: str, dst_uri: str) -> None:
    fs, src = resolve(src_uri)
    _, dst = resolve(dst_uri)
    fs.create_dir(os.path.dirname(dst), recursive=True)
    fs.move(src, dst)


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


@contextlib.contextmanager
def local_copy(uri: str, hasher: Any = None) -> Iterator[str]:
    """A local file path for `uri`: the path itself when local, else a streamed temp copy (a tar
    member's bytes are always copied out). `hasher` (a hashlib object) is fed the bytes on the
    way — for a remote file, the same single read that makes the copy."""
    member = member_span(uri)
    if member is None:
        fs, path = resolve(uri)
        if isinstance(fs, pafs.LocalFileSystem):
            if hasher is not None:
                for chunk in iter_chunks(uri):
                    hasher.update(chunk)
            yield path
            return
    tmpdir = tempfile.mkdtemp(prefix="ditharos-src-")
    local = os.path.join(tmpdir, "source" + PurePosixPath(member[3] if member else uri).suffix)
    try:
        with open(local, "wb") as dst:
            for chunk in iter_chunks(uri):
                dst.write(chunk)
                if hasher is not None:
                    hasher.update(chunk)
        yield local
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
