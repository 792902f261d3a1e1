"""The KubeRay manifests (cluster/kuberay/): kinds and API versions, nothing exposed, and every script,
config and override their entrypoints name exists and loads."""

from __future__ import annotations

import re
import shlex
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "cluster" / "kuberay"
IMAGE_DIR = "/home/ray/ditharos"  # where cluster/Dockerfile puts the repo
EXPOSING_KINDS = {"Ingress", "Route", "Gateway", "HTTPRoute", "IngressRoute"}


def _docs() -> list[dict]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _rayjobs() -> list[dict]:
    """The RayJobs applied directly and the one the nightly CronJob creates (kept in a ConfigMap)."""
    jobs = [d for d in _docs() if d["kind"] == "RayJob"]
    for doc in _docs():
        if doc["kind"] == "ConfigMap":
            for text in doc.get("data", {}).values():
                embedded = yaml.safe_load(text)
                if isinstance(embedded, dict) and embedded.get("kind") == "RayJob":
                    jobs.append(embedded)
    return jobs


def _one(kind: str) -> dict:
    (doc,) = [d for d in _docs() if d["kind"] == kind]
    return doc


def _walk(node: object):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def test_manifests_parse_with_the_right_kinds() -> None:
    docs = _docs()
    assert all({"apiVersion", "kind", "metadata"} <= set(d) for d in docs)
    for doc in docs:
        if doc["kind"] in ("RayCluster", "RayJob"):
            assert doc["apiVersion"] == "ray.io/v1", doc["metadata"]
        if doc["kind"] == "CronJob":
            assert doc["apiVersion"] == "batch/v1"
    assert len([d for d in docs if d["kind"] == "RayCluster"]) == 1
    assert {j["metadata"]["labels"]["ditharos.io/job"] for j in _rayjobs()} == {"pipeline", "train", "nightly-eval"}
    assert all(j["apiVersion"] == "ray.io/v1" for j in _rayjobs())
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"ditharos"}


def test_nothing_is_exposed_outside_the_kubernetes_cluster() -> None:
    docs = _docs()
    assert not [d["kind"] for d in docs if d["kind"] in EXPOSING_KINDS]
    for doc in docs:
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP"
        for node in _walk(doc):
            assert not node.get("hostNetwork") and "hostPort" not in node, node
            assert node.get("serviceType", "ClusterIP") == "ClusterIP", node
    cluster = _one("RayCluster")
    assert cluster["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert cluster["spec"]["authOptions"]["mode"] == "token"


def test_raycluster_node_groups() -> None:
    spec = _one("RayCluster")["spec"]
    assert spec["rayVersion"] == version("ray"), "the image's Ray must match the client's"
    assert spec["headGroupSpec"]["resources"]["CPU"] == "0" and spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for name, group in groups.items():
        assert group["labels"]["ditharos.io/node-kind"] == name
        assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    (gpu,) = groups["gpu"]["template"]["spec"]["containers"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert "nvidia.com/gpu" not in str(groups["cpu"]["template"])


def test_images_match_the_dockerfile_and_the_client_ray() -> None:
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert f"WORKDIR {IMAGE_DIR}" in dockerfile and f"rayproject/ray:{version('ray')}-py311-gpu" in dockerfile
    images = {n["image"] for d in _docs() + _rayjobs() for n in _walk(d) if "image" in n and "ditharos" in n["image"]}
    assert len(images) == 1, images


def _entrypoint_args(job: dict) -> list[str]:
    # $DITHAROS_STORAGE is expanded by the submitter's shell; any URI stands in for it here.
    return shlex.split(job["spec"]["entrypoint"].replace("$DITHAROS_STORAGE", "s3://bucket/ditharos"))


@pytest.mark.parametrize("job", _rayjobs(), ids=lambda j: j["metadata"]["labels"]["ditharos.io/job"])
def test_rayjob_runs_a_repo_script_with_the_repo_as_working_dir(job: dict) -> None:
    spec = job["spec"]
    cluster = _one("RayCluster")
    assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    args = _entrypoint_args(job)
    assert args[0] == "python" and args[1].endswith(".py")
    assert (ROOT / args[1]).is_file(), f"{args[1]} (entrypoint of {job['metadata']}) is not in the repo"
    if "--config" in args:
        assert (ROOT / args[args.index("--config") + 1]).is_file()
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == IMAGE_DIR
    local = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    assert set(local["excludes"]) <= set(runtime_env["excludes"])
    if "$DITHAROS_STORAGE" in spec["entrypoint"]:
        (submitter,) = spec["submitterPodTemplate"]["spec"]["containers"]
        assert {"configMapRef": {"name": "ditharos-env"}} in submitter["envFrom"]
        env = [d for d in _docs() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "ditharos-env"]
        assert "DITHAROS_STORAGE" in env[0]["data"]


def _overrides(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == "--set"]


def test_pipeline_rayjob_config_loads() -> None:
    from pipeline.settings import PipelineConfig

    (job,) = [j for j in _rayjobs() if j["metadata"]["labels"]["ditharos.io/job"] == "pipeline"]
    args = _entrypoint_args(job)
    assert args[1:4] == ["pipeline/run.py", "--config", "pipeline/configs/production.yaml"]
    sets = _overrides(args) + [f"input.uri={args[args.index('--input') + 1]}",
                               f"output.uri={args[args.index('--output') + 1]}"]
    cfg = load_config(PipelineConfig, ROOT / "pipeline/configs/production.yaml", sets)
    assert cfg.output.uri == "s3://bucket/ditharos/data"


def test_training_rayjob_config_loads() -> None:
    from training.settings import TrainConfig

    (job,) = [j for j in _rayjobs() if j["metadata"]["labels"]["ditharos.io/job"] == "train"]
    args = _entrypoint_args(job)
    assert args[1:4] == ["training/train.py", "--config", "training/configs/production.yaml"]
    cfg = load_config(TrainConfig, ROOT / args[args.index("--config") + 1], _overrides(args))
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers == 8 and cfg.model.name == "DiT-XL/2-hd128"
    assert cfg.data.uri == "s3://bucket/ditharos/data" and cfg.run.dir.startswith("s3://bucket/ditharos/")


def test_nightly_eval_rayjob_config_loads() -> None:
    from eval.settings import NightlyConfig

    (job,) = [j for j in _rayjobs() if j["metadata"]["labels"]["ditharos.io/job"] == "nightly-eval"]
    args = _entrypoint_args(job)
    assert args[1] == "eval/nightly.py" and "--latest" in args
    (train,) = [j for j in _rayjobs() if j["metadata"]["labels"]["ditharos.io/job"] == "train"]
    run_dir = next(s.split("=", 1)[1] for s in _overrides(_entrypoint_args(train)) if s.startswith("run.dir="))
    assert args[args.index("--run") + 1] == run_dir, "the nightly eval must read the training RayJob's run"
    load_config(NightlyConfig, ROOT / args[args.index("--config") + 1], _overrides(args))


def test_nightly_eval_cronjob_creates_the_rayjob() -> None:
    cron = _one("CronJob")
    assert len(cron["spec"]["schedule"].split()) == 5 and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    template = next(
        d for d in _docs() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"])
    (key,) = template["data"]
    assert container["command"][:3] == ["kubectl", "create", "-f"]
    assert container["command"][3] == f"{mount['mountPath']}/{key}"
    rayjob = yaml.safe_load(template["data"][key])
    assert rayjob["kind"] == "RayJob" and rayjob["metadata"]["generateName"]
    assert re.search(r"\beval/nightly\.py\b", rayjob["spec"]["entrypoint"])
    # The CronJob's ServiceAccount may create RayJobs, and nothing else.
    binding = _one("RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                    "namespace": "ditharos"}]
    role = _one("Role")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]}]
