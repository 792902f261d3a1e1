"""The `ray up` YAMLs (cluster/aws.yaml, cluster/gcp.yaml): Ray's schema, the security rules, and that
the checker (cluster/check.py) really fails on broken copies."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from cluster.check import check, load, schema_errors, security_errors

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [ROOT / "cluster" / "aws.yaml", ROOT / "cluster" / "gcp.yaml"]


@pytest.fixture(params=CONFIGS, ids=lambda p: p.name)
def config(request: pytest.FixtureRequest) -> dict:
    return load(request.param)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_passes_schema_ray_validation_and_security(path: Path) -> None:
    assert check(path) == []


def test_config_shape(config: dict) -> None:
    types = config["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "gpu_worker"} and config["head_node_type"] == "head"
    assert types["head"]["resources"]["CPU"] == 0, "the head must not run pipeline or training tasks"
    assert types["cpu_worker"]["resources"]["cpu_node"] > 0 and "GPU" not in types["cpu_worker"]["resources"]
    assert types["gpu_worker"]["resources"]["GPU"] == 8 and types["gpu_worker"]["resources"]["gpu_node"] == 8
    for name, kind in (("head", "head"), ("cpu_worker", "cpu"), ("gpu_worker", "gpu")):
        assert types[name]["labels"]["ditharos.io/node-kind"] == kind
    for name in ("cpu_worker", "gpu_worker"):
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"]
    assert config["max_workers"] >= types["cpu_worker"]["max_workers"] + types["gpu_worker"]["max_workers"]
    run_options = " ".join(config["docker"]["run_options"])
    assert "DITHAROS_STORAGE=" in run_options and "RAY_AUTH_MODE=token" in run_options
    assert config["file_mounts"]["/home/ray/ditharos"] == "."
    assert any("pip install" in c and "/home/ray/ditharos" in c for c in config["setup_commands"])
    assert ".venv" in config["rsync_exclude"] and "runs" in config["rsync_exclude"]
    # Ray on the nodes is the client's Ray (job submission and the autoscaler need them to match).
    assert config["docker"]["image"] == f"rayproject/ray:{version('ray')}-py311-gpu"
    assert any(f"ray[default,data,train]=={version('ray')}" in c for c in config["setup_commands"])


def test_gpu_instance_types() -> None:
    aws, gcp = (load(p)["available_node_types"]["gpu_worker"]["node_config"] for p in CONFIGS)
    assert aws["InstanceType"] == "p5.48xlarge" and gcp["machineType"] == "a3-highgpu-8g"


def test_model_fetch_command_runs(tmp_path: Path) -> None:
    """The setup command that copies $DITHAROS_STORAGE/models to /models (run here against a folder)."""
    command = next(c for c in load(CONFIGS[0])["setup_commands"] if "copy_files" in c)
    assert all(command in load(p)["setup_commands"] for p in CONFIGS)
    assert "copy_files(src, '/models')" in command
    command = command.replace("copy_files(src, '/models')", f"copy_files(src, {str(tmp_path / 'models')!r})")
    store = tmp_path / "store"
    # `python` is the image's, with this project installed: here, this interpreter.
    env = dict(os.environ, DITHAROS_STORAGE=str(store), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    missing = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 0 and "no weights at" in missing.stdout, missing.stderr
    (store / "models" / "open_clip").mkdir(parents=True)
    (store / "models" / "open_clip" / "ViT-L-14.pt").write_bytes(b"weights")
    fetched = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=120)
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "models" / "open_clip" / "ViT-L-14.pt").read_bytes() == b"weights"


# ------------------------------------------------ the checker is not a no-op: broken copies fail


def _aws() -> dict:
    return copy.deepcopy(load(CONFIGS[0]))


def _gcp() -> dict:
    return copy.deepcopy(load(CONFIGS[1]))


def _open(port: int, cidr: str = "0.0.0.0/0", key: str = "IpRanges", field: str = "CidrIp") -> dict:
    return {"IpProtocol": "tcp", "FromPort": port, "ToPort": port, key: [{field: cidr}]}


def _with_security_group(cfg: dict, *rules: dict) -> dict:
    cfg["provider"]["security_group"] = {"GroupName": "ditharos", "IpPermissions": list(rules)}
    return cfg


def _head_start(cfg: dict, old: str, new: str) -> dict:
    cfg["head_start_ray_commands"] = [c.replace(old, new) for c in cfg["head_start_ray_commands"]]
    return cfg


BROKEN = {
    "dashboard 8265 open to the world": (lambda: _with_security_group(_aws(), _open(8265)), "0.0.0.0/0"),
    "GCS 6379 open to the world": (lambda: _with_security_group(_aws(), _open(6379)), "ports 6379-6379"),
    "client 10001 open over IPv6": (
        lambda: _with_security_group(_aws(), _open(10001, "::/0", "Ipv6Ranges", "CidrIpv6")), "::/0"),
    "SSH open to the world": (lambda: _with_security_group(_aws(), _open(22)), "ports 22-22"),
    "all ports open to the world": (
        lambda: _with_security_group(_aws(), {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}),
        "protocol -1"),
    "node type without a security group": (
        lambda: (lambda c: c["available_node_types"]["gpu_worker"]["node_config"].pop("SecurityGroupIds") and c)(
            _aws()), "has no SecurityGroupIds"),
    "dashboard on 0.0.0.0": (
        lambda: _head_start(_aws(), "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"), "binds to 0.0.0.0"),
    "dashboard host left to the default": (
        lambda: _head_start(_aws(), "--dashboard-host=127.0.0.1", ""), "bind the dashboard to loopback"),
    "dashboard on :: with a space": (
        lambda: _head_start(_gcp(), "--dashboard-host=127.0.0.1", "--dashboard-host ::"), "binds to ::"),
    "docker publishes the dashboard": (
        lambda: (lambda c: c["docker"]["run_options"].append("-p 8265:8265") or c)(_aws()), "publishes ports"),
    "gcp worker with a public IP": (
        lambda: (lambda c: c["available_node_types"]["cpu_worker"]["node_config"]["networkInterfaces"][0].update(
            accessConfigs=[{"name": "External NAT", "type": "ONE_TO_ONE_NAT"}]) or c)(_gcp()), "public IP"),
    "gcp node type on Ray's default network": (
        lambda: (lambda c: c["available_node_types"]["gpu_worker"]["node_config"].pop("networkInterfaces") and c)(
            _gcp()), "sets no networkInterfaces"),
    "gcp firewall rule open to the world": (
        lambda: (lambda c: c.setdefault("metadata", {}).update(
            firewall=[{"allowed": [{"IPProtocol": "tcp", "ports": ["8265"]}], "sourceRanges": ["0.0.0.0/0"]}]) or c)(
            _gcp()), "sourceRanges"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_checker_rejects_broken_copy(case: str, tmp_path: Path) -> None:
    make, expected = BROKEN[case]
    broken = make()
    errors = security_errors(broken)
    assert any(expected in e for e in errors), errors
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    assert check(path), "check() must fail a file that breaks a security rule"


def test_schema_errors_are_reported() -> None:
    cfg = _aws()
    cfg["max_wrokers"] = 3  # a typo: the schema allows no unknown top-level keys
    cfg["available_node_types"]["cpu_worker"]["resources"]["cpu_node"] = 0.5  # must be an integer
    errors = schema_errors(cfg)
    assert any("max_wrokers" in e for e in errors) and any("cpu_node" in e for e in errors), errors
    assert schema_errors(_aws()) == []


def test_checker_names_unusable_files_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cluster.check import main

    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "broken.yaml").write_text("cluster_name: [unclosed\n")
    paths = [str(tmp_path / n) for n in ("missing.yaml", "empty.yaml", "list.yaml", "broken.yaml")]
    assert main(paths) == 1
    out = capsys.readouterr().out
    assert "missing.yaml: 1 problem(s)\n  - file not found" in out
    assert "the file is empty: a cluster config is a YAML mapping" in out
    assert "the file is a list, not a mapping" in out
    assert "cannot read as YAML" in out and "Traceback" not in out
