"""pipeline/lease.py: one live run per output; dead claims expire; simultaneous claims agree."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from pipeline.lease import LEASES_DIR, LeaseHeld, acquire


def test_second_run_is_refused_while_the_first_is_live(tmp_path: Path) -> None:
    first = acquire(str(tmp_path), "runA", ttl_s=60)
    with pytest.raises(LeaseHeld, match=r"being written by run runA \(pid \d+ on "):
        acquire(str(tmp_path), "runB", ttl_s=60)
    assert [p.name for p in (tmp_path / LEASES_DIR).iterdir()] == [first.name]  # the loser left nothing
    assert first.heartbeat()
    first.release()
    second = acquire(str(tmp_path), "runB", ttl_s=60)  # free again
    assert second.heartbeat()


def test_a_claim_of_a_dead_process_on_this_host_expires_at_once(tmp_path: Path) -> None:
    leases = tmp_path / LEASES_DIR
    leases.mkdir(parents=True)
    stale = leases / f"{1:020d}-crashed.json"
    stale.write_text(json.dumps({"run_id": "crashed", "host": socket.gethostname(), "pid": 2**22 + 12345}))
    lease = acquire(str(tmp_path), "next", ttl_s=3600)
    assert not stale.exists() and lease.heartbeat()


def test_a_claim_not_refreshed_for_ttl_expires(tmp_path: Path) -> None:
    leases = tmp_path / LEASES_DIR
    leases.mkdir(parents=True)
    old = leases / f"{1:020d}-elsewhere.json"
    old.write_text(json.dumps({"run_id": "elsewhere", "host": "another-host", "pid": 1}))
    with pytest.raises(LeaseHeld, match="run elsewhere"):  # another host's claim: live until it ages
        acquire(str(tmp_path), "next", ttl_s=3600)
    past = time.time() - 120
    os.utime(old, (past, past))
    lease = acquire(str(tmp_path), "next", ttl_s=60)
    assert not old.exists()
    lease.release()


def test_simultaneous_claims_agree_on_the_smallest(tmp_path: Path) -> None:
    """Both claims exist when each lists: the earlier name wins, the later one is refused."""
    leases = tmp_path / LEASES_DIR
    leases.mkdir(parents=True)
    early = leases / f"{1:020d}-early.json"  # written an instant before ours, owner alive (this process)
    early.write_text(json.dumps({"run_id": "early", "host": socket.gethostname(), "pid": os.getpid()}))
    with pytest.raises(LeaseHeld, match="run early"):
        acquire(str(tmp_path), "late", ttl_s=60)


def test_heartbeat_reports_a_lost_lease(tmp_path: Path) -> None:
    lease = acquire(str(tmp_path), "runA", ttl_s=60)
    (tmp_path / LEASES_DIR / lease.name).unlink()  # another run judged us dead
    assert not lease.heartbeat()
