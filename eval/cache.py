"""What one night computes from the data alone, kept in the run dir for the next nights.

The eval set's real clips (the plan), their decoded features and scores, and the data card
depend only on the data (its manifest's `data_sha256`), the eval settings that choose them and
the code. On a corpus of 10^8 clips each costs a pass over the clip index (the data card reads
every score and caption column; the plan and the reals task read the split column and open
the held-out split) and the reals cost a VAE decode + I3D pass over up to 2,048 clips. A night
whose data did not change now does none of that: it reads three small files written by the
first night that saw that data.

Entries live at `RUN/eval/cache/<name>-<key>.json`, `key` = sha256 of everything the value
depends on (always including `code_version()`, so a code change recomputes). They are
written atomically and read as a miss (with a warning) when unreadable: a cache can cost a
recomputation, never a wrong number. Deleting the folder is always safe.

A cached file is JSON; `bytes` values (JPEG keyframes, picture strips) are stored as base64.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from pipeline import storage
from pipeline.logs import get_logger
from pipeline.version import code_version

log = get_logger("eval")
CACHE_DIR = "cache"


def cache_dir(run_uri: str) -> str:
    from eval.history import EVAL_DIR  # eval.history imports the plan, which imports this module

    return storage.join(run_uri, EVAL_DIR, CACHE_DIR)


def cache_key(**parts: Any) -> str:
    """sha256 (hex) of `parts` and the code version, as canonical JSON."""
    body = json.dumps({**parts, "code_version": code_version()}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def _encode(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            return base64.b64decode(value["$bytes"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _uri(directory: str, name: str, key: str) -> str:
    return storage.join(directory, f"{name}-{key[:32]}.json")


def load(directory: str, name: str, key: str) -> Any | None:
    """The value saved under (name, key), or None (missing, unreadable, or saved for another key)."""
    uri = _uri(directory, name, key)
    if not storage.exists(uri):
        return None
    try:
        body = json.loads(storage.read_bytes(uri))
    except (OSError, ValueError) as e:
        log.warning("eval cache %s unreadable (%s): recomputing", uri, e)
        return None
    if not isinstance(body, dict) or body.get("key") != key:
        log.warning("eval cache %s was saved for another key: recomputing", uri)
        return None
    return _decode(body["value"])


def save(directory: str, name: str, key: str, value: Any) -> None:
    storage.write_bytes_atomic(_uri(directory, name, key), json.dumps({"key": key, "value": _encode(value)}).encode())


__all__ = ["CACHE_DIR", "cache_dir", "cache_key", "load", "save"]
