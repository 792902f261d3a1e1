"""One writer per output: a lease in `_state/leases/` that works on object stores too.

Object stores have no lock and pyarrow exposes no create-if-absent, so the lease is an
election over a strongly consistent listing (local filesystems, S3 and GCS all are):

  1. write my claim `_state/leases/<start_ns>-<run_id>.json` (host, pid);
  2. list the claims; a claim is dead when its file's modification time (the store's clock) is
     older than mine by more than `ttl_s`, or when it names a process on this host that no
     longer exists; dead claims are deleted;
  3. the live claim with the smallest name holds the lease; if that is not mine, I delete
     mine and refuse to run, naming the holder.

Two runs that start together both see both claims and agree on the winner. The holder
re-writes its claim every ttl_s / 4 (`heartbeat`), so a run whose owner died frees the output
ttl_s later (at once on the same host). Cost: a few requests per heartbeat, nothing per source.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipeline import storage

LEASES_DIR = "_state/leases"


class LeaseHeld(RuntimeError):
    """Another live run holds the output."""


@dataclass
class Lease:
    out_uri: str
    run_id: str
    name: str
    ttl_s: float

    @property
    def uri(self) -> str:
        return storage.join(self.out_uri, LEASES_DIR, self.name)

    def heartbeat(self) -> bool:
        """Refresh the claim; False when it is gone (another run judged us dead: stop writing)."""
        if storage.file_size(self.uri) is None:
            return False
        storage.write_bytes_atomic(self.uri, _claim(self.run_id))
        return True

    def release(self) -> None:
        if storage.file_size(self.uri) is not None:
            storage.delete_file(self.uri)


def _claim(run_id: str) -> bytes:
    return json.dumps({"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid()}).encode()


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire(out_uri: str, run_id: str, ttl_s: float) -> Lease:
    """Claim the output or raise LeaseHeld naming the live run that has it."""
    name = f"{time.time_ns():020d}-{run_id}.json"
    lease = Lease(out_uri, run_id, name, ttl_s)
    storage.write_bytes_atomic(lease.uri, _claim(run_id))
    fs, root = storage.resolve(storage.join(out_uri, LEASES_DIR))
    infos = [i for i in fs.get_file_info(pafs.FileSelector(root)) if i.type == pafs.FileType.File
             and i.base_name.endswith(".json") and storage.TMP_MARK not in i.base_name]
    mine = next((i for i in infos if i.base_name == name), None)
    if mine is None:
        raise RuntimeError(f"lease claim {lease.uri} vanished right after it was written")
    live = []
    for info in infos:
        if info.base_name == name:
            live.append(info.base_name)
            continue
        if _dead(fs, info, mine.mtime_ns, ttl_s):
            try:
                fs.delete_file(info.path)
            except (FileNotFoundError, OSError):
                pass  # another run cleared it first
            continue
        live.append(info.base_name)
    holder = min(live)
    if holder != name:
        lease.release()
        try:
            who = json.loads(storage.read_bytes(storage.join(out_uri, LEASES_DIR, holder)))
            desc = f"run {who.get('run_id')} (pid {who.get('pid')} on {who.get('host')})"
        except (OSError, ValueError):
            desc = f"claim {holder}"
        raise LeaseHeld(f"output {out_uri!r} is being written by {desc}; wait for it to finish, or use another "
                        f"--output (a dead run's claim expires {ttl_s:.0f} s after its last heartbeat)")
    return lease


def _dead(fs: pafs.FileSystem, info: pafs.FileInfo, now_ns: int, ttl_s: float) -> bool:
    if now_ns - (info.mtime_ns or 0) > ttl_s * 1e9:
        return True
    try:
        with fs.open_input_stream(info.path) as f:
            claim = json.loads(f.read())
    except (OSError, ValueError):
        return False  # being written right now: live
    return claim.get("host") == socket.gethostname() and not pid_alive(int(claim.get("pid", -1)))
