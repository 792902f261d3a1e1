"""`ray job submit` against a started head node (`ray start --head`), on the demo config."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.multinode]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pipeline_via_ray_job_submit(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    # Ray >= 2.5x protects the job API with a token; give this throwaway cluster its own.
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token))
    env.pop("RAY_ADDRESS", None)
    port, dash = _free_port(), _free_port()
    # --block keeps `ray start` in the foreground: stopping it stops exactly the processes it started.
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    out = tmp_path / "data"
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while True:  # wait for the job server to answer
            probe = subprocess.run([str(bin_dir / "ray"), "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert time.time() < deadline, f"head node never came up: {probe.stderr[-2000:]}"
            assert head.poll() is None, "ray start --head exited"
            time.sleep(2)
        submit = subprocess.run(
            [str(bin_dir / "ray"), "job", "submit", "--address", address,
             "--runtime-env", "cluster/runtime_env.yaml", "--",
             "python", "pipeline/run.py", "--output", str(out)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
        )
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
        text = re.sub(r"\x1b\[[0-9;]*m", "", submit.stdout + submit.stderr)
        assert re.search(r"Job '\S+' succeeded", text), text[-3000:]
        assert "=== DiTharos pipeline summary ===" in submit.stdout
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["totals"]["sources_with_clips"] == 3 and manifest["totals"]["clips"] > 0
        assert manifest["random_init"] is True
    finally:
        os.killpg(head.pid, 15)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
            head.wait()
