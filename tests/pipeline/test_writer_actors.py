"""The router's hand-off to shard writers when a writer is unavailable or lost (no cluster needed:
the writers are stand-ins, the exceptions are Ray's own)."""

from __future__ import annotations

import types
import zlib

import numpy as np
import pytest
import ray.exceptions as rex

from pipeline import writer_actors
from pipeline.writer_actors import hand_off, writer_of


class FakeWriter:
    """Answers each append with the next scripted outcome (None = accepted)."""

    def __init__(self, script: list) -> None:
        self.script = list(script)
        self.received: list[list[str]] = []  # every batch that reached the actor, re-sends included
        self.append = types.SimpleNamespace(remote=self._remote)

    def _remote(self, part: dict):
        outcome = self.script.pop(0) if self.script else None
        if outcome is None:
            self.received.append(list(part["clip_id"]))
        return outcome


def fake_ray() -> types.SimpleNamespace:
    def get(outcome):
        if outcome is not None:
            raise outcome
        return None
    return types.SimpleNamespace(get=get, exceptions=rex)


def part(*ids: str) -> dict:
    return {"kind": np.array(["clip"] * len(ids)), "clip_id": np.array(ids)}


def unavailable() -> Exception:
    return rex.ActorUnavailableError("node lost", b"\x01" * 16)


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    monkeypatch.setattr(writer_actors.time, "sleep", lambda s: None)


def test_unavailable_writer_is_retried_until_it_answers() -> None:
    flaky, fine = FakeWriter([unavailable(), unavailable()]), FakeWriter([])
    dropped = hand_off(fake_ray(), [flaky, fine], {0: part("a", "b"), 1: part("c")}, wait_s=60)
    assert dropped == 0
    assert flaky.received == [["a", "b"]]  # delivered once it answered, after two failed tries
    assert fine.received == [["c"]]        # the healthy writer got its rows exactly once


def test_dead_writer_rows_are_dropped_and_counted() -> None:
    dead, fine = FakeWriter([rex.ActorDiedError()]), FakeWriter([])
    dropped = hand_off(fake_ray(), [dead, fine], {0: part("a", "b", "c"), 1: part("d")}, wait_s=60)
    assert dropped == 3 and dead.received == [] and fine.received == [["d"]]


def test_writer_unavailable_past_the_wait_is_dropped() -> None:
    gone = FakeWriter([unavailable()] * 100)
    assert hand_off(fake_ray(), [gone], {0: part("a", "b")}, wait_s=0) == 2
    assert gone.received == []


def test_other_errors_are_not_swallowed() -> None:
    broken = FakeWriter([ValueError("bucket 'x': rows of another shape")])
    with pytest.raises(ValueError, match="another shape"):
        hand_off(fake_ray(), [broken], {0: part("a")}, wait_s=60)


class Flushing:
    """A writer whose flush answers with the scripted outcomes, then its stats."""

    def __init__(self, script: list, stats: dict) -> None:
        self.script, self.stats, self.calls = list(script), stats, 0
        self.flush = types.SimpleNamespace(remote=self._remote)

    def _remote(self):
        self.calls += 1
        return self.script.pop(0) if self.script else ("stats", self.stats)


def test_the_flush_waits_for_a_restarting_writer_and_counts_a_lost_one_as_nothing() -> None:
    def get(outcome):
        if isinstance(outcome, Exception):
            raise outcome
        return outcome[1]

    ray = types.SimpleNamespace(get=get, exceptions=rex)
    restarting = Flushing([unavailable(), unavailable()], {"clips": 3})
    dead, fine = Flushing([rex.ActorDiedError()], {"clips": 9}), Flushing([], {"clips": 2})
    stats = writer_actors.flush_writers(ray, [restarting, dead, fine], wait_s=60)
    assert stats == [{"clips": 3}, {}, {"clips": 2}]  # in writer order, the lost one as nothing committed
    assert (restarting.calls, dead.calls, fine.calls) == (3, 1, 1)  # only the unavailable one is called again
    gone = Flushing([unavailable()] * 100, {"clips": 1})
    assert writer_actors.flush_writers(ray, [gone, fine], wait_s=0) == [{}, {"clips": 2}]


def test_rows_route_by_bucket_and_source_stably() -> None:
    batch = {"kind": np.array(["clip", "clip", "source", "reject"]),
             "bucket": np.array(["b1", "b1", "", ""]), "source_id": np.array(["s1", "s1", "s1", "s2"]),
             "source_uri": np.array(["u1", "u1", "u1", "u2"])}
    got = writer_of(batch, 7)
    assert got[0] == got[1] == zlib.crc32(b"b1|s1") % 7  # one source's clips of a bucket share a writer
    assert got[2] == zlib.crc32(b"|u1") % 7 and got[3] == zlib.crc32(b"|u2") % 7


def test_writers_spread_over_nodes_with_writer_resources_else_stay_on_the_drivers_node() -> None:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.settings import PipelineConfig

    made: list[dict] = []

    class Handle:
        progress = types.SimpleNamespace(remote=lambda: "ref")

        def remote(self, *args):
            made.append({"args": args})
            return self

    def remote(**options):
        made.append(options)
        return lambda cls: Handle()

    placed = [True]

    def wait(refs, num_returns, timeout):
        assert num_returns == len(refs) and timeout == cfg.compute.stall_timeout_s
        return (refs, []) if placed[0] else (refs[:1], refs[1:])

    ray = types.SimpleNamespace(remote=remote, wait=wait, get_runtime_context=lambda: types.SimpleNamespace(
        get_node_id=lambda: "ab" * 28))
    cfg = PipelineConfig()
    cfg.compute.writer_actors = 3
    writer_actors.start_writers(ray, cfg, "/out", "run")
    here = made[0]["scheduling_strategy"]
    assert isinstance(here, NodeAffinitySchedulingStrategy) and here.soft and "resources" not in made[0]
    assert len(made) == 1 + 3 and made[0]["num_cpus"] == 0
    made.clear()
    cfg.compute.writer_resources = {"cpu_node": 0.001}
    writer_actors.start_writers(ray, cfg, "/out", "run")
    assert made[0]["resources"] == {"cpu_node": 0.001} and made[0]["scheduling_strategy"] == "SPREAD"
    assert made[0]["num_cpus"] == 0 and made[0]["max_restarts"] == writer_actors.WRITER_RESTARTS
    assert [m["args"][1] for m in made[1:]] == ["run-w000", "run-w001", "run-w002"]
    placed[0] = False  # no node offers the resources: a clear error instead of waiting forever
    with pytest.raises(writer_actors.Stalled, match=r"2 of 3 shard writers found no place .*writer_resources"):
        writer_actors.start_writers(ray, cfg, "/out", "run")
