"""Checks that run before Ray starts: every user error is one line, and nothing is left behind.

`preflight(cfg)` reads only; the one thing it may create is the output folder itself (and
only after every other check passed), which it needs to prove the output is writable.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.listing import InputError, check_input
from pipeline.records import RECORD_VERSION
from pipeline.samples import sample_clips
from pipeline.settings import PipelineConfig, data_config

DATA_CONFIG = "_state/data_config.json"
RECORD_VERSION_KEY = "_record_version"  # kept beside the settings: an output of older records is refused up front


class OutputError(ValueError):
    """The output location cannot be used for this run."""


@dataclass
class Plan:
    """What preflight found: the input's kind and the output's canonical location."""

    input_kind: str  # samples | folder | file | parquet | jsonl | csv
    input_uri: str
    output_uri: str
    exclude: str  # a prefix of the input the listing must skip (the output inside the input)
    warnings: list[str]


def preflight(cfg: PipelineConfig) -> Plan:
    warnings: list[str] = []
    if cfg.input.uri:
        kind = check_input(cfg.input.uri)
        in_uri = storage.canonical(cfg.input.uri)
    else:
        try:
            sample_clips()
        except FileNotFoundError as e:
            raise InputError(str(e)) from None
        kind, in_uri = "samples", ""
    out = _check_output(cfg.output.uri)
    exclude = ""
    if in_uri and kind == "folder" and (out == in_uri or out.startswith(in_uri.rstrip("/") + "/")):
        exclude = out
        warnings.append(f"the output {out} is inside the input {in_uri}: it is left out of the listing")
    if in_uri and (in_uri == out or in_uri.startswith(out.rstrip("/") + "/")):
        raise OutputError(f"the input {in_uri} is inside the output {out}; use an output outside the input")
    _check_settings(out, cfg)
    _check_writable(out)
    return Plan(kind, in_uri, out, exclude, warnings)


def _check_output(uri: str) -> str:
    if not uri:
        raise OutputError("no output given (--output or output.uri)")
    try:
        fs, path = storage.resolve(uri)
        info = fs.get_file_info(path)
    except (OSError, ValueError) as e:
        raise OutputError(f"output {uri!r} cannot be used: {e}") from None
    if info.type == pafs.FileType.File:
        raise OutputError(f"output {uri!r} is a file; give a folder (or a bucket prefix)")
    if not storage.is_object_store(fs):  # every parent must be a folder we can create into
        parent = path
        while parent not in ("", "/"):
            parent = parent.rsplit("/", 1)[0] or "/"
            pinfo = fs.get_file_info(parent)
            if pinfo.type == pafs.FileType.File:
                raise OutputError(f"output {uri!r} cannot be created: {parent} is a file")
            if pinfo.type == pafs.FileType.Directory:
                break
    return storage.to_uri(fs, path)


def _check_settings(out: str, cfg: PipelineConfig) -> None:
    """An output made with other data settings is refused (shards of different settings must not mix)."""
    uri = storage.join(out, DATA_CONFIG)
    try:
        exists = storage.exists(uri)
    except OSError as e:
        raise OutputError(f"output {out!r} cannot be read: {e}") from None
    if not exists:
        return
    theirs = json.loads(storage.read_bytes(uri))
    version = theirs.pop(RECORD_VERSION_KEY, None)  # absent: written before the version was kept (<= 3)
    if version != RECORD_VERSION:
        theirs_v = f"v{version}" if version else "v3 or older"
        raise OutputError(f"output {out!r} was written by another DiTharos version (commit records {theirs_v}, "
                          f"this code writes v{RECORD_VERSION}); use a new --output, or finish this one with the "
                          "version that started it")
    mine = json.loads(json.dumps(data_config(cfg)))
    if theirs != mine:
        diff = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
        raise OutputError(f"output {out!r} was made with different settings in {diff}; use a new --output "
                          "(shards of different settings must not mix)")


def _check_writable(out: str) -> None:
    probe_uri = storage.join(out, "_state", f".write-check-{uuid.uuid4().hex[:8]}")
    try:
        storage.makedirs(out)
        storage.write_bytes_atomic(probe_uri, b"")
        storage.delete_file(probe_uri)
    except OSError as e:
        raise OutputError(f"output {out!r} is not writable: {e}") from None


def record_settings(out: str, cfg: PipelineConfig) -> None:
    """Tie the output to these data settings (once the run holds the output)."""
    uri = storage.join(out, DATA_CONFIG)
    if not storage.exists(uri):
        settings = dict(data_config(cfg), **{RECORD_VERSION_KEY: RECORD_VERSION})
        storage.write_bytes_atomic(uri, json.dumps(settings, sort_keys=True).encode())
