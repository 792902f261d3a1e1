"""The launcher's resource check: workers placed whole on nodes, a clear refusal, waiting for growth."""

from __future__ import annotations

import pytest

from training.preflight import check_resources, worker_bundle, workers_that_fit
from training.settings import ScalingConfig


class FakeRay:
    """ray.nodes() of a cluster whose nodes may grow after some polls (an autoscaler)."""

    def __init__(self, *stages: list[dict[str, float]]) -> None:
        self.stages, self.polls = stages, 0

    def nodes(self) -> list[dict]:
        stage = self.stages[min(self.polls, len(self.stages) - 1)]
        self.polls += 1
        return [{"Alive": True, "Resources": r} for r in stage] + [{"Alive": False, "Resources": {"CPU": 64.0}}]


def test_workers_are_placed_whole_on_one_node_each() -> None:
    cpu4 = {"CPU": 4.0}
    assert workers_that_fit([{"CPU": 8.0}, {"CPU": 3.0}], cpu4) == 2  # 3 + 3 CPUs would be 6 but no node has 4 left
    assert workers_that_fit([{"CPU": 16.0, "GPU": 2.0}, {"CPU": 16.0}], {"CPU": 4.0, "GPU": 1.0}) == 2
    assert workers_that_fit([], cpu4) == 0
    assert worker_bundle(ScalingConfig(num_workers=3, use_gpu=True, cpus_per_worker=2)) == {"CPU": 2.0, "GPU": 1.0}


def test_a_cluster_that_cannot_hold_the_workers_is_refused_with_what_it_has() -> None:
    with pytest.raises(RuntimeError, match=r"num_workers=100 needs 100 × \{'CPU': 1.0\} but the cluster "
                                           r"\(1 node\(s\), 2 CPU\) holds 2 such worker\(s\); lower"):
        check_resources(FakeRay([{"CPU": 2.0}]), ScalingConfig(num_workers=100))
    check_resources(FakeRay([{"CPU": 2.0}]), ScalingConfig(num_workers=2))  # fits: returns


def test_an_autoscaling_cluster_is_waited_for_up_to_resource_wait_s() -> None:
    grows = FakeRay([{"CPU": 2.0}], [{"CPU": 2.0}], [{"CPU": 2.0}, {"CPU": 8.0}])
    check_resources(grows, ScalingConfig(num_workers=6, resource_wait_s=5), poll_s=0.01)
    assert grows.polls == 3
    with pytest.raises(RuntimeError, match=r"holds 2 such worker\(s\) after waiting 0.05 s"):
        check_resources(FakeRay([{"CPU": 2.0}]), ScalingConfig(num_workers=6, resource_wait_s=0.05), poll_s=0.01)
