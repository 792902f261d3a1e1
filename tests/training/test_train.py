"""training/train.py end to end on local Ray: DeepSpeed ZeRO on 1-2 CPU workers, DiT-tiny on the demo shards.

Covers checkpoints, exact resume (same and other worker count), restarts after a killed
worker, ZeRO-1/3 and the refusals (changed run settings, other shards).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

from tests.training.test_runlog import tensorboard_scalars
from training.runlog import CLIPS, METRICS, iter_rows

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = str(REPO / "training/configs/demo.yaml")


@pytest.fixture(scope="module")
def demo_data(demo_pipeline_output: Path) -> Path:
    return demo_pipeline_output  # read-only: tests that damage shards copy it first


def train(data: Path, run_dir: Path, *overrides: str) -> dict:
    from training.train import main

    args = ["--config", DEMO_CONFIG, "--set", f"data.uri={data}", "--set", f"run.dir={run_dir}"]
    for o in overrides:
        args += ["--set", o]
    return main(args)


def rows(run_dir: Path, kind: str = METRICS) -> list[dict]:
    return list(iter_rows(str(run_dir), kind))


def resume_two_ways(data: Path, tmp_path: Path, *settings: str) -> tuple[Path, Path, Path]:
    """Run 4 steps whole; run 2, stop, and resume to 4 on the same 2 workers (every loss and grad norm
    equal, bit for bit) and, from a copy of the stopped run, on 1 worker (DeepSpeed's universal
    format: equal up to the reduction order). Returns the run dirs (whole, resumed on 2, on 1)."""
    whole, split, one = tmp_path / "whole", tmp_path / "split", tmp_path / "one"
    train(data, whole, "run.max_steps=4", *settings)
    train(data, split, "run.max_steps=2", *settings)
    shutil.copytree(split, one)  # the same stopped run, resumed two ways
    resumed = train(data, split, "run.max_steps=4", *settings)
    assert resumed["resumed_from"].endswith("checkpoint-00000002")
    ref, got = rows(whole), rows(split)
    assert [r["step"] for r in got] == [0, 1, 2, 3]
    assert [(r["loss"], r["grad_norm"]) for r in got] == [(r["loss"], r["grad_norm"]) for r in ref]
    assert ref[3]["loss"] != ref[1]["loss"]
    train(data, one, "run.max_steps=4", "scaling.num_workers=1", *settings)
    got1 = rows(one)
    assert [r["workers"] for r in got1] == [2, 2, 1, 1]
    for a, b in zip(ref[2:], got1[2:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    return whole, split, one


def test_zero2_on_demo_shards_loss_decreases(demo_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    steps = 40
    summary = train(demo_data, run_dir, f"run.max_steps={steps}", "run.log_every=20", "run.checkpoint_every=10",
                    "run.keep_checkpoints=2", "optim.zero_stage=2", f"optim.total_steps={steps}",
                    "scaling.num_workers=2")
    metrics = rows(run_dir)
    assert [r["step"] for r in metrics] == list(range(steps))
    first = sum(r["loss"] for r in metrics[:5]) / 5
    last = sum(r["loss"] for r in metrics[-5:]) / 5
    assert 0.5 < first < 2.0, first  # zero-init output layer: the loss starts near E|noise - x0|^2
    assert last < 0.7 * first, (first, last)
    for r in metrics:
        assert r["lr"] > 0 and r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["clips_per_s"] > 0
        assert 0 <= r["data_wait_fraction"] < 1 and r["peak_memory_gb"] > 0.1 and r["grad_norm"] > 0
        assert r["mfu"] is None  # no peak FLOP/s is known for a CPU
    # Every step trained the same global batch sizes on both workers: the epoch covers all clips.
    assert metrics[0]["packs"] == 2 and {r["epoch"] for r in metrics} >= {0, 1}
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["uri"] == str(demo_data) and saved["run"]["max_steps"] == steps
    assert saved["optim"]["zero_stage"] == 2 and saved["scaling"]["num_workers"] == 2
    assert summary["steps"] == steps and summary["loss_last5"] == pytest.approx(last)
    # keep_checkpoints=2: only the last two of steps 10, 20, 30, 40 remain, each complete.
    kept = sorted(p.name for p in run_dir.glob("checkpoint-*"))
    assert kept == ["checkpoint-00000030", "checkpoint-00000040"]
    final = run_dir / "checkpoint-00000040"
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["steps_done"] == steps and state["world_size"] == 2 and state["weights"] == "ema.safetensors"
    assert state["data_fingerprint"] == json.loads((demo_data / "manifest.json").read_text())[
        "fingerprint"]["data_sha256"]
    ds = final / "deepspeed" / "state"
    assert {p.name for p in ds.glob("zero_pp_rank_*_optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert yaml.safe_load((final / "config.yaml").read_text()) == saved
    # The EMA lags the weights: loadable without DeepSpeed, same keys as the model, not equal to it.
    from safetensors.torch import load_file

    ema = load_file(str(final / "ema.safetensors"))
    module = __import__("torch").load(ds / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert set(ema) == set(module)
    assert any(not ema[k].equal(module[k].float()) for k in ema)
    # TensorBoard events with our scalars.
    tb = tensorboard_scalars(run_dir / "tensorboard")
    assert sorted(tb["train/loss"]) == list(range(steps))
    # Clip ids: epoch 0 trains every clip exactly once.
    clips = rows(run_dir, CLIPS)
    epoch0 = [c for r in clips if r["epoch"] == 0 for c in r["clip_ids"]]
    assert len(epoch0) == len(set(epoch0)) == 12


def test_resume_is_exact_and_elastic(demo_data: Path, tmp_path: Path) -> None:
    """Stop after step 6, relaunch: steps 7-10 equal an uninterrupted run's, also on 1 worker."""
    common = ["run.checkpoint_every=3", "optim.total_steps=10", "run.log_every=5"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(demo_data, whole, "run.max_steps=10", *common)
    first = train(demo_data, split, "run.max_steps=6", *common)
    assert first["checkpoint"].endswith("checkpoint-00000006")
    one_worker = tmp_path / "one_worker"
    shutil.copytree(split, one_worker)  # the same stopped run, resumed two ways
    resumed = train(demo_data, split, "run.max_steps=10", *common)
    assert resumed["resumed_from"].endswith("checkpoint-00000006")

    ref = rows(whole)
    got = rows(split)
    assert [r["step"] for r in got] == list(range(10))  # rows of redone steps are not duplicated
    for a, b in zip(ref, got):
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"]), a["step"]
    assert rows(split, CLIPS) == rows(whole, CLIPS)

    # Elastic: 1 worker continues the 2-worker run on exactly the next clips.
    train(demo_data, one_worker, "run.max_steps=10", "scaling.num_workers=1", *common)
    got1 = rows(one_worker)
    assert [r["workers"] for r in got1] == [2] * 6 + [1] * 4
    clips_ref, clips1 = rows(whole, CLIPS), rows(one_worker, CLIPS)
    assert clips1 == clips_ref
    by_epoch: dict[int, list[str]] = {}
    for r in clips1:
        by_epoch.setdefault(r["epoch"], []).extend(r["clip_ids"])
    for epoch, ids in by_epoch.items():
        assert len(ids) == len(set(ids)), f"epoch {epoch} repeats a clip"
    complete = [e for e in by_epoch if e + 1 in by_epoch]
    assert complete and all(len(by_epoch[e]) == 12 for e in complete)  # no clip skipped
    for a, b in zip(ref[6:], got1[6:]):  # other reduction order: equal up to float rounding
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)

    # Relaunching a finished run trains nothing more and keeps its metrics.
    again = train(demo_data, split, "run.max_steps=10", *common)
    assert again["resumed_from"].endswith("checkpoint-00000010") and rows(split) == got


def test_resume_refusals(demo_data: Path, tmp_path: Path) -> None:
    """Settings that define the run, and other shards, are refused before anything starts."""
    run_dir = tmp_path / "run"
    train(demo_data, run_dir, "run.max_steps=2", "optim.total_steps=10", "optim.warmup_steps=1")
    with pytest.raises(SystemExit, match=r"model\.name.*cannot change"):
        train(demo_data, run_dir, "run.max_steps=4", "optim.total_steps=10", "optim.warmup_steps=1",
              "model.name=DiT-S/2")
    with pytest.raises(SystemExit, match=r"data\.seed"):
        train(demo_data, run_dir, "run.max_steps=4", "optim.total_steps=10", "optim.warmup_steps=1", "data.seed=1")
    # Same files, another manifest fingerprint: the saved data position means nothing there.
    other = tmp_path / "other"
    shutil.copytree(demo_data, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["fingerprint"]["data_sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match="data.allow_fingerprint_mismatch=true"):
        train(other, run_dir, "run.max_steps=4", "optim.total_steps=10", "optim.warmup_steps=1")
    # Damaged data: one line naming the file, before any worker starts (no retries, no tracebacks).
    shutil.rmtree(other)
    shutil.copytree(demo_data, other)
    victim = sorted(other.glob("shards/*/*.arrow"))[0]
    size = victim.stat().st_size
    victim.write_bytes(victim.read_bytes()[:1000])
    rel = victim.relative_to(other)
    with pytest.raises(SystemExit, match=rf"0 shard file\(s\) missing and 1 of the wrong size .*{rel} has 1000 bytes, "
                                         rf"committed with {size}; re-run the pipeline"):
        train(other, tmp_path / "run2")
    victim.unlink()
    with pytest.raises(SystemExit, match=rf"1 shard file\(s\) missing .*{rel} is missing"):
        train(other, tmp_path / "run2")
    (other / "manifest.json").unlink()
    with pytest.raises(SystemExit, match="no manifest.json"):
        train(other, tmp_path / "run2")
    assert not (tmp_path / "run2").exists()  # refused before the run dir was made
    assert len(rows(run_dir)) == 2  # the refused relaunches touched nothing


# ZeRO-2 (the default) is resumed exactly and elastically above. ZeRO-1 runs DeepSpeed's same
# optimizer class and checkpoint files as ZeRO-2 (DeepSpeedZeroOptimizer, zero_pp_rank_* states);
# its EMA on the fp32 master fragments is held by test_ema and the gpu-check dry run, so it is left
# out here (3 launches, ~80 s of a suite that must fit CI's 90 minutes).
@pytest.mark.parametrize("stage", [3])
def test_zero_stage_smoke(demo_data: Path, tmp_path: Path, stage: int) -> None:
    """ZeRO-3 trains, checkpoints and resumes exactly on the same workers and on fewer."""
    common = [f"optim.zero_stage={stage}", "run.checkpoint_every=2", "optim.total_steps=6", "optim.warmup_steps=1"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(demo_data, whole, "run.max_steps=4", *common)
    train(demo_data, split, "run.max_steps=2", *common)
    train(demo_data, split, "run.max_steps=4", *common)
    ref, got = rows(whole), rows(split)
    assert [r["step"] for r in got] == [0, 1, 2, 3]
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in got)
    state = json.loads((split / "checkpoint-00000004" / "trainer_state.json").read_text())
    assert state["zero_stage"] == stage
    if stage == 3:  # partitioned weights and optimizer state, resumed on 1 worker (universal format)
        one = tmp_path / "one"
        train(demo_data, one, "run.max_steps=2", *common)
        train(demo_data, one, "run.max_steps=4", "scaling.num_workers=1", *common)
        got1 = rows(one)
        assert [r["workers"] for r in got1] == [2, 2, 1, 1]
        for a, b in zip(ref, got1):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)


def _rank_pid(log_text: str, rank: int) -> int | None:
    """The PID of a training worker rank, from Ray Train's worker-group listing in the driver log."""
    found = re.findall(rf"pid=(\d+)\) world_rank={rank},", log_text)
    return int(found[-1]) if found else None


def test_killed_worker_restores_from_checkpoint(demo_data: Path, tmp_path: Path) -> None:
    """SIGKILL one training worker mid-run: Ray Train restarts the group from the last checkpoint."""
    run_dir = tmp_path / "run"
    steps = 30
    env = dict(os.environ, RAY_ADDRESS="local", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(REPO / "training/train.py"), "--config", DEMO_CONFIG,
           "--set", f"data.uri={demo_data}", "--set", f"run.dir={run_dir}", "--set", f"run.max_steps={steps}",
           "--set", "run.checkpoint_every=4", "--set", f"optim.total_steps={steps}", "--set", "run.log_every=10",
           "--set", "run.max_failures=2"]
    log_path = tmp_path / "train.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    killed = None
    try:
        deadline = time.monotonic() + 300
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            done = len(rows(run_dir))
            pid = _rank_pid(log_path.read_text(), rank=1)
            if done >= 6 and pid is not None:  # past the step-4 checkpoint, before the end
                worker = psutil.Process(pid)
                # Only a process of our own subprocess' local Ray, never anything else on the machine.
                assert worker.pid in {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
                killed = done
                worker.send_signal(signal.SIGKILL)
            time.sleep(0.05)
        assert killed is not None and killed < steps, "the run ended before a worker could be killed"
        assert proc.wait(timeout=400) == 0, log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log_path.read_text()
    assert "resumed from" in text, text[-4000:]
    metrics = rows(run_dir)
    assert [r["step"] for r in metrics] == list(range(steps))  # each step once, none lost
    assert (run_dir / f"checkpoint-{steps:08d}" / "trainer_state.json").is_file()


def launch(demo: Path, run_dir: Path, *overrides: str, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """training/train.py as a user starts it (its own local Ray), output in run_dir.parent/train.log."""
    env = dict(os.environ, RAY_ADDRESS="local", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(REPO / "training/train.py"), "--config", DEMO_CONFIG, "--set", f"data.uri={demo}",
           "--set", f"run.dir={run_dir}", *[a for o in overrides for a in ("--set", o)], *extra]
    log = (run_dir.parent / f"{run_dir.name}.log").open("w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def finish(proc: subprocess.Popen, timeout_s: float) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def poison_latents(data: Path) -> list[Path]:
    """Every shard's latents set to NaN, same byte size (the committed size still matches)."""
    import numpy as np
    import pyarrow as pa

    from pipeline.shards import read_shard, table_bytes

    shards = sorted(data.glob("shards/*/*.arrow"))
    for path in shards:
        table = read_shard(str(path))
        col = table.column("latents").combine_chunks()
        values = col.to_numpy_ndarray().copy()
        values[...] = 0x7FC0 if values.dtype == np.uint16 else np.nan  # bfloat16 bits or a float NaN
        poisoned = table.set_column(table.schema.get_field_index("latents"), table.schema.field("latents"),
                                    pa.FixedShapeTensorArray.from_numpy_ndarray(values).cast(col.type))
        data_bytes = table_bytes(poisoned)
        assert len(data_bytes) == path.stat().st_size
        path.write_bytes(data_bytes)
    return shards


def test_data_errors_in_workers_stop_the_run_once_with_one_line(demo_data: Path, tmp_path: Path) -> None:
    """Damage only a worker can see (NaN latents at the committed size) is not retried as a worker failure."""
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    shards = poison_latents(data)
    run_dir = tmp_path / "run"
    assert finish(launch(data, run_dir, "run.max_failures=3", "run.max_steps=3"), 300) == 1
    text = (tmp_path / "run.log").read_text()
    last = text.strip().splitlines()[-1]
    assert re.match(r"error: .*shards/.*\.arrow row \d+ \(clip .*\): latents hold NaN or inf", last), text[-3000:]
    # One worker group (2 workers) ran: a restart would start new worker processes.
    assert 1 <= len(set(re.findall(r"RayTrainWorker pid=(\d+)", text))) <= 2, text[-3000:]
    assert rows(run_dir) == []
    # With --verify the same shards fail their recorded checksum first.
    run2 = tmp_path / "run2"
    assert finish(launch(data, run2, "run.max_steps=3", extra=("--verify",)), 300) == 1
    last = (tmp_path / "run2.log").read_text().strip().splitlines()[-1]
    assert re.match(r"error: .*\.arrow: content differs from its committed sha256", last), last
    assert any(p.name in last for p in shards)


def test_too_many_workers_are_refused_before_training(demo_data: Path, tmp_path: Path) -> None:
    proc = launch(demo_data, tmp_path / "run", "scaling.num_workers=100", "data.packs_per_step=100")
    assert finish(proc, 120) == 1
    last = (tmp_path / "run.log").read_text().strip().splitlines()[-1]
    assert re.match(r"error: scaling.num_workers=100 needs 100 × \{'CPU': 1.0\} but the cluster \(1 node\(s\), "
                    r"\d+ CPU\) holds \d+ such worker\(s\)", last), last


def test_ctrl_c_stops_the_run_and_a_relaunch_resumes(demo_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    common = ("run.checkpoint_every=2", "optim.total_steps=40", "run.log_every=1")
    proc = launch(demo_data, run_dir, "run.max_steps=40", *common)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and len(rows(run_dir)) < 3:
        time.sleep(0.1)
    assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
    os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground process
    assert finish(proc, 120) == 1  # it once ignored Ctrl-C and retried forever; Ray gets 20 s to stop
    text = (tmp_path / "run.log").read_text()
    last = text.strip().splitlines()[-1]
    # Ray stopped in time, or the watchdog left after 20 s and printed the stacks of the hang.
    assert last.startswith("interrupted: workers stopped") or "Timeout (0:00:20)!" in text, text[-3000:]
    assert "interrupted: stopping the workers" in text and "Traceback" not in text.split("interrupted:")[0][-2000:]
    assert 3 <= len(rows(run_dir)) < 40
    assert finish(launch(demo_data, run_dir, "run.max_steps=40", *common), 300) == 0
    assert "resumed from" in (tmp_path / "run.log").read_text()
    assert [r["step"] for r in rows(run_dir)] == list(range(40))


LEAVE = """
import ctypes, sys, threading
sys.path[0] = {repo!r}
from training.train import leave_after_interrupt
hang = ctypes.PyDLL(None).sleep  # a C call that keeps the GIL, as a stuck ray.shutdown() can
leave_after_interrupt({shutdown}, grace_s=2)
"""


@pytest.mark.parametrize("shutdown", ["lambda: None", "lambda: hang(600)", "threading.Event().wait"])
def test_an_interrupt_leaves_with_status_1_even_when_ray_shutdown_hangs(shutdown: str) -> None:
    code = LEAVE.format(repo=str(REPO), shutdown=shutdown)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert "interrupted: stopping the workers (at most 2 s)" in lines, proc.stderr[-3000:]
    if shutdown == "lambda: None":
        assert lines[-1].startswith("interrupted: workers stopped; launch the same command again"), lines
    else:  # the watchdog's stacks show where it hung; it did not wait for the 600 s call
        assert "Timeout (0:00:02)!" in proc.stderr and "leave_after_interrupt" in proc.stderr, proc.stderr[-3000:]
        assert "workers stopped" not in proc.stderr
        assert time.monotonic() - t0 < 100


def test_a_damaged_newest_checkpoint_is_skipped_by_the_workers_too(demo_data: Path, tmp_path: Path) -> None:
    """One ZeRO optimizer file of the newest checkpoint lost: launcher and workers both resume the older one."""
    run_dir = tmp_path / "run"
    common = ("run.checkpoint_every=2", "optim.total_steps=10", "optim.warmup_steps=1")
    assert finish(launch(demo_data, run_dir, "run.max_steps=4", *common), 300) == 0
    first = rows(run_dir)
    (run_dir / "checkpoint-00000004" / "deepspeed" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert finish(launch(demo_data, run_dir, "run.max_steps=6", "run.max_failures=0", *common), 300) == 0
    text = (tmp_path / "run.log").read_text()
    assert "checkpoint-00000004 is incomplete or damaged" in text and "resuming from" in text, text[-3000:]
    assert "resumed from" in text and "checkpoint-00000002: step 2" in text, text[-3000:]
    again = rows(run_dir)
    assert [r["step"] for r in again] == list(range(6))
    assert [r["loss"] for r in again[2:4]] == [r["loss"] for r in first[2:4]]  # 2-3 redone, exactly


def ours_and_diffusers(sampler, transformer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, T, H, W) outputs for one seeded clip: DiTharos's packed forward of the sampler's model, and
    diffusers' dense forward of `transformer` with the text zero-padded as WanPipeline pads it."""
    from training.packing import pack, unpack
    from training.wan import WAN_TEXT_LEN

    g = torch.Generator().manual_seed(0)
    latent = torch.randn(sampler.vae.latent_channels, 2, 4, 6, generator=g)
    text = torch.randn(5, sampler.encoder.text_width, generator=g)
    batch = pack([latent], [text], (1, 2, 2), budget=12)
    t = torch.tensor([0.4])
    padded = torch.cat([text, text.new_zeros(WAN_TEXT_LEN - len(text), text.shape[1])])
    with torch.no_grad():
        ours = unpack(sampler.model(batch.tokens, t, batch), batch)[0]
        theirs = transformer.eval()(latent[None], t * 1000, padded[None], return_dict=False)[0][0]
    return ours, theirs


def test_wan_backbone_trains_resumes_exactly_and_records_itself(demo_data: Path, tmp_path: Path) -> None:
    """model.kind: wan (a random-init tiny Wan preset), fully fine-tuned, through the same loop: ZeRO-3
    on 2 workers (the LoRA tests run ZeRO-2 and ZeRO-3), exact and elastic resume, a checkpoint whose
    weights load into diffusers' WanTransformer3DModel as they are, the sampler on it, and the export."""
    from diffusers import WanTransformer3DModel

    from training import checkpoint as ckpt
    from training.backbone import build
    from training.sample import SamplerError, load_sampler
    from training.settings import ModelConfig
    from training.wan import PackedWan

    wan = ["model.kind=wan", "model.preset=tiny-wan", "optim.zero_stage=3", "run.checkpoint_every=2",
           "optim.total_steps=6", "optim.warmup_steps=1", "run.activation_checkpointing=true"]
    whole, split, _ = resume_two_ways(demo_data, tmp_path, *wan)
    assert json.loads((whole / "summary.json").read_text())["model"] == "wan:tiny-wan"
    assert all(0 < r["loss"] < 10 and r["grad_norm"] > 0 and r["mfu"] is None for r in rows(split))

    checkpoint = split / "checkpoint-00000004"
    state, tensors = ckpt.load_weights(str(checkpoint))
    assert state.model["kind"] == "wan" and state.model["source"] == "random-init:tiny-wan" and state.zero_stage == 3
    model = WanTransformer3DModel(**state.model["config"])
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items()}, strict=True)
    torch.manual_seed(0)  # run.seed: the initial weights every worker built
    config = state.model["config"]
    init = build(ModelConfig(kind="wan", preset="tiny-wan"), config["in_channels"], config["text_dim"]).module
    moved = [not torch.equal(tensors[k], v) for k, v in init.state_dict().items()]
    assert sum(moved) > 0.9 * len(moved)  # training (through the EMA) moved nearly every tensor

    # Sampling (and so the nightly eval) loads the same backbone from the record, EMA weights in place.
    sampler = load_sampler(str(checkpoint), "cpu")
    assert isinstance(sampler.model, PackedWan)
    assert all(torch.equal(p, tensors[f"model.{n}"]) for n, p in sampler.model.model.named_parameters())
    videos = sampler.generate(["a dog", "a cat"], 64, 32, 3, steps=2, guidance_scale=3.0, seed=5)
    assert videos.shape == (2, 3, 32, 64, 3) and videos.dtype == np.uint8 and videos[0].std() > 0
    assert not np.array_equal(videos[0], videos[1])
    with pytest.raises(SamplerError, match="multiples of"):
        sampler.generate(["a dog"], 63, 32, 3)

    # Export to diffusers: from_pretrained gives the EMA weights, whose dense forward equals ours packed.
    from training.export import export

    record = export(str(split), tmp_path / "export")  # a run dir: its latest checkpoint
    assert record["checkpoint"] == str(checkpoint) and record["ema"] and record["random_init"]
    exported = WanTransformer3DModel.from_pretrained(str(tmp_path / "export" / "transformer"))
    torch.testing.assert_close(*ours_and_diffusers(sampler, exported), rtol=1e-5, atol=1e-5)


def test_wan_lora_trains_only_the_adapter_resumes_exactly_and_elastically_and_exports(demo_data: Path,
                                                                                       tmp_path: Path) -> None:
    """model.lora_rank on the tiny Wan preset: only LoRA factors train and are checkpointed; a 2-worker
    run resumes exactly on 2 workers and elastically on 1; the export loads with diffusers'
    WanPipeline.load_lora_weights on the same base and gives DiTharos's own packed forward."""
    from diffusers import WanPipeline

    from training import checkpoint as ckpt
    from training.backbone import _wan_base
    from training.sample import load_sampler

    lora = ["model.kind=wan", "model.preset=tiny-wan", "model.lora_rank=4", "model.lora_alpha=8",
            "run.checkpoint_every=2", "optim.total_steps=6", "optim.warmup_steps=1", "optim.lr=0.01",
            "run.activation_checkpointing=true"]
    # On 2 workers the adapter (loaded with the frozen base left out) and its optimizer state come
    # back exactly; on 1 through the universal format.
    _, split, _ = resume_two_ways(demo_data, tmp_path, *lora)

    checkpoint = split / "checkpoint-00000004"
    state, tensors = ckpt.load_weights(str(checkpoint))
    assert state.model["lora"] == {"rank": 4, "alpha": 8.0, "targets": list(state.model["lora"]["targets"])}
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)  # the adapter only
    assert any(v.abs().max() > 0 for k, v in tensors.items() if ".lora_B." in k)  # trained away from B = 0
    sampler = load_sampler(str(checkpoint), "cpu")  # base rebuilt from its seed, the adapter loaded
    widths = (sampler.vae.latent_channels, sampler.clip.text_width)
    saved = sum(f.stat().st_size for f in (checkpoint / ckpt.DEEPSPEED_DIR).rglob("*model_states.pt"))
    full = sum(v.numel() for v in _wan_base("random-init:tiny-wan", *widths, seeded=True).state_dict().values()) * 4
    assert saved < full  # DeepSpeed's module file leaves the frozen base out
    from training.export import export

    record = export(str(checkpoint), tmp_path / "export")
    assert record["lora"].endswith("lora/pytorch_lora_weights.safetensors") and record["base_seed"] == 0
    base = _wan_base("random-init:tiny-wan", *widths, seeded=True)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=base)
    pipe.load_lora_weights(str(tmp_path / "export" / "lora"))
    ours, theirs = ours_and_diffusers(sampler, pipe.transformer)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    pipe.transformer.disable_lora()
    _, plain = ours_and_diffusers(sampler, pipe.transformer)
    assert (ours - plain).abs().max() > 1e-4  # the adapter changes the output: it was applied


def test_wan_lora_under_zero3_resumes_exactly_and_elastically(demo_data: Path, tmp_path: Path) -> None:
    """LoRA with ZeRO-3: the frozen base partitioned with the adapter; the adapter's partitions and
    their optimizer state come back exactly on 2 workers and through the universal format on 1."""
    from training import checkpoint as ckpt

    lora = ["model.kind=wan", "model.preset=tiny-wan", "model.lora_rank=4", "model.lora_alpha=8",
            "optim.zero_stage=3", "run.checkpoint_every=2", "optim.total_steps=6", "optim.warmup_steps=1",
            "optim.lr=0.01"]
    whole, _, one = resume_two_ways(demo_data, tmp_path, *lora)
    state, tensors = ckpt.load_weights(str(one / "checkpoint-00000004"))
    assert state.zero_stage == 3 and state.world_size == 1 and tensors and all(".lora_" in k for k in tensors)
    _, ref_tensors = ckpt.load_weights(str(whole / "checkpoint-00000004"))
    assert tensors.keys() == ref_tensors.keys()
    for k in tensors:  # the EMA of the adapter, carried across the worker-count change
        torch.testing.assert_close(tensors[k], ref_tensors[k], rtol=1e-4, atol=1e-6)


def test_wan_lora_zero3_on_umt5_and_wan_vae_shards_end_to_end(ray_local: None, tmp_path: Path,
                                                              sample_clips: dict[str, Path]) -> None:
    """The whole Wan chain: the pipeline with the umT5 text encoder and the Wan VAE → a LoRA fine-tune
    of the tiny Wan under ZeRO-3 on 2 workers → the sampler, which rebuilds the text encoder and the
    VAE from the data's manifest. The shards hold each caption's real umT5 tokens only."""
    from pipeline.run import main as pipeline_main
    from pipeline.manifest import read_index, read_manifest
    from pipeline.shards import column_shapes, read_shard, text_tokens
    from pipeline.text_encoder import read_null_text
    from training import checkpoint as ckpt
    from training.sample import load_sampler
    from training.wan import PackedWan

    src = tmp_path / "raw"
    src.mkdir()
    shutil.copy(sample_clips["carphone_pristine"], src / "carphone.mp4")
    shutil.copy(sample_clips["bikes"], src / "bikes.mp4")  # FVD needs >= 2 clips of >= 10 frames
    data = tmp_path / "data"
    pipeline_main(["--input", str(src), "--output", str(data), "--set", "vae.kind=wan", "--set", "vae.preset=tiny-wan",
                   "--set", "text_encoder.kind=umt5", "--set", "text_encoder.preset=tiny-umt5"])
    manifest = read_manifest(str(data))
    assert manifest["fingerprint"]["models"]["text_encoder"]["kind"] == "umt5"
    index = read_index(str(data), manifest, ["shard", "caption", "clip_bytes", "latent_shape"])
    table = read_shard(str(data / index["shard"][0].as_py()))
    assert column_shapes(table.schema)["text_embedding"] == [512, 32]  # the limit is recorded, not stored
    tokens = text_tokens(table)
    captions = table.column("caption").to_pylist()
    assert all(t.shape == (len(c.encode()) + 1, 32) for t, c in zip(tokens, captions))  # ByT5 bytes + </s>
    row = index.to_pylist()[0]
    assert row["clip_bytes"] < 512 * 32 * 2  # less than the padded text alone

    lora = ["model.kind=wan", "model.preset=tiny-wan", "model.lora_rank=4", "model.lora_alpha=8",
            "optim.zero_stage=3", "optim.total_steps=3", "optim.warmup_steps=1", "optim.lr=0.01",
            "run.checkpoint_every=3", "run.max_steps=3"]
    run = tmp_path / "run"
    summary = train(data, run, *lora)
    assert summary["model"].startswith("wan:tiny-wan")
    got = rows(run)
    assert [r["step"] for r in got] == [0, 1, 2] and all(0 < r["loss"] < 10 and r["grad_norm"] > 0 for r in got)
    state, tensors = ckpt.load_weights(str(run / "checkpoint-00000003"))
    assert state.model["lora"]["rank"] == 4 and tensors and all(".lora_" in k for k in tensors)
    assert any(v.abs().max() > 0 for k, v in tensors.items() if ".lora_B." in k)  # ZeRO-3 gathered trained factors

    sampler = load_sampler(str(run / "checkpoint-00000003"), "cpu")
    assert isinstance(sampler.model, PackedWan) and sampler.encoder is not None  # umT5 from the manifest
    # The null caption (training's dropped captions, sampling's unconditional branch) is umT5's "":
    null = read_null_text(str(data), manifest)
    states, mask = sampler.encoder.text_tokens([""])
    assert null.shape == (1, 32)  # </s> alone
    torch.testing.assert_close(torch.from_numpy(null.astype(np.float32)),
                               states[0][mask[0]].half().float())
    assert torch.equal(sampler.model.null_text[1:], torch.from_numpy(null.astype(np.float32)))
    assert not sampler.model.null_text[0].any()  # the zero padding row
    frames = 1 + 4 * ((row["latent_shape"][1] - 1))  # the Wan VAE's 4k+1 frames
    videos = sampler.generate(["a man talking in a car"], 64, 32, frames, steps=2, guidance_scale=3.0, seed=1)
    assert videos.shape == (1, frames, 32, 64, 3) and videos.std() > 0

    # The nightly eval on that run: the same sampler path, FVD against the umT5 data's clips.
    from eval.nightly import main as nightly

    night = nightly(["--run", str(run), "--set", "sampling.steps=2", "--set", "reals.max_clips=2",
                     "--set", "report.strip_videos=1"])
    assert night["errors"] == [] and [r["checkpoint"] for r in night["evaluated"]] == ["checkpoint-00000003"]
    from eval.history import read_history

    row = read_history(str(run))[0]
    assert np.isfinite(row["fvd"]) and row["fvd"] > 0 and row["clip_score"] >= 0
    assert row["random_init"] is True and (row["num_frames"] - 1) % 4 == 0  # the Wan VAE's 4k+1 frames
