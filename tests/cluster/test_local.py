"""The local multi-node harness (cluster/local.py): nodes and resources, node loss, replacement, teardown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from cluster.local import NODE_KIND_LABEL, LocalCluster, main, running

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.multinode]

# A driver that places one task with worker-2's own resource and reports where it ran.
PINNED_TASK = """
import ray
ray.init()
@ray.remote(num_cpus=0.5, resources={"worker-2": 0.5})
def where():
    return ray.get_runtime_context().get_node_labels()["ditharos.io/node-name"]
print("RAN_ON", ray.get(where.remote()))
"""


def _gone(procs: list[psutil.Process]) -> bool:
    return not running(procs)


def test_up_kill_replace_down(tmp_path: Path) -> None:
    root = tmp_path / "cluster"
    decoy = subprocess.Popen(["sleep", "300"])  # not ours to stop: must survive down()
    cluster = LocalCluster(root, workers=2, cpus_per_worker=1)
    cluster.up()
    try:
        nodes = {n["name"]: n for n in cluster.alive_nodes()}
        assert sorted(nodes) == ["head", "worker-1", "worker-2"]
        assert nodes["head"]["resources"].get("CPU", 0) == 0 and nodes["head"]["resources"]["head_node"] == 1
        assert nodes["head"]["labels"][NODE_KIND_LABEL] == "head"
        for name in ("worker-1", "worker-2"):
            res = nodes[name]["resources"]
            assert (res["CPU"], res["cpu_node"], res[name]) == (1, 1, 1), res
            assert nodes[name]["labels"][NODE_KIND_LABEL] == "cpu"
        state = json.loads((root / "state.json").read_text())
        assert [n["name"] for n in state["nodes"]] == ["head", "worker-1", "worker-2"]
        assert state["address"] == cluster.address and all(n["pid"] > 0 for n in state["nodes"])

        # A client with env() joins with the token, and custom resources steer placement.
        run = subprocess.run([sys.executable, "-c", PINNED_TASK], env=cluster.env(), cwd=ROOT,
                             capture_output=True, text=True, timeout=180)
        assert "RAN_ON worker-2" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]

        # The long-lived core processes of the other nodes; their Ray worker processes come and go
        # on their own (idle workers are reaped), so they prove nothing either way.
        survivors = [p for p in map(psutil.Process, cluster.pids("head") + cluster.pids("worker-2"))
                     if p.name() in ("raylet", "gcs_server")]
        assert len(survivors) == 3, survivors  # head: gcs_server + raylet; worker-2: raylet
        doomed = [psutil.Process(p) for p in cluster.pids("worker-1")]
        killed = cluster.kill_worker("worker-1")
        assert {p.pid for p in doomed} <= set(killed)
        assert _gone(doomed) and not cluster.pids("worker-1")
        assert running(survivors) == survivors, "killing worker-1 hit another node"
        assert sorted(n["name"] for n in cluster.wait_for_nodes(2)) == ["head", "worker-2"]

        replacement = cluster.add_worker()
        assert replacement.name == "worker-3"
        nodes = {n["name"]: n for n in cluster.wait_for_nodes(3)}
        assert sorted(nodes) == ["head", "worker-2", "worker-3"]
        assert nodes["worker-3"]["resources"]["cpu_node"] == 1

        # `status` from another process reads the same state file.
        out = subprocess.run([sys.executable, "cluster/local.py", "status", "--dir", str(root)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60).stdout
        assert "worker-1" in out and "killed" in out and "worker-3" in out, out
        ours = [psutil.Process(p) for p in cluster.pids()]
        temp_dir = Path(cluster.state.temp_dir)
    finally:
        cluster.down()
    try:
        assert ours and _gone(ours), [p.pid for p in running(ours)]
        assert not (root / "state.json").exists() and not temp_dir.exists()
        assert decoy.poll() is None, "down() stopped a process it did not start"
    finally:
        decoy.kill()
        decoy.wait()


def test_cli_up_status_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "cli"
    assert main(["up", "--dir", str(root), "--workers", "1"]) == 0
    try:
        cluster = LocalCluster.attach(root)
        assert sorted(n["name"] for n in cluster.alive_nodes()) == ["head", "worker-1"]
        ours = [psutil.Process(p) for p in cluster.pids()]
        assert main(["env", "--dir", str(root)]) == 0
        exports = capsys.readouterr().out
        assert f"export RAY_ADDRESS={cluster.address}" in exports and "RAY_AUTH_MODE=token" in exports
        with pytest.raises(RuntimeError, match="still running"):
            LocalCluster(root).up()
    finally:
        assert main(["down", "--dir", str(root)]) == 0
    assert _gone(ours)
    assert main(["down", "--dir", str(root)]) == 0  # a second down is a no-op
