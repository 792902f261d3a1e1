"""Fixtures for pipeline integration tests: one local Ray for the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A real local Ray instance (2 CPUs, like CI), shared by the integration tests."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh instance, never a cluster another test (or user) left running.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
