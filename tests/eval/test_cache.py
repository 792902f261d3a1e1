"""eval/cache.py: exact round trips (bytes included), misses on another key or a damaged file."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from eval import cache


def test_values_round_trip_exactly_and_keys_separate(tmp_path: Path) -> None:
    d = str(tmp_path / "cache")
    value = {"jpeg": b"\xff\xd8\x00raw", "nested": [{"f": 0.1 + 0.2, "n": None}, [1, 2]], "s": "ü"}
    k1, k2 = cache.cache_key(what="x", data_sha256="a"), cache.cache_key(what="x", data_sha256="b")
    assert k1 != k2 and k1 == cache.cache_key(data_sha256="a", what="x")  # order of parts does not matter
    assert cache.load(d, "card", k1) is None
    cache.save(d, "card", k1, value)
    assert cache.load(d, "card", k1) == value  # 0.30000000000000004 stays exactly that
    assert cache.load(d, "card", k2) is None  # another data version: a miss, not the old card
    assert cache.load(d, "other", k1) is None


def test_a_damaged_entry_is_a_miss_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "cache"
    key = cache.cache_key(what="y")
    cache.save(str(d), "card", key, {"a": 1})
    (entry,) = d.glob("card-*.json")
    entry.write_text('{"key": "' + key + '", "value": {"a"')  # cut short
    logging.getLogger("ditharos").propagate = True
    try:
        with caplog.at_level(logging.WARNING):
            assert cache.load(str(d), "card", key) is None
    finally:
        logging.getLogger("ditharos").propagate = False
    assert "unreadable" in caplog.text
