"""Data-parallel training on CPU: 2 torchrun processes (gloo) train what 1 process trains.

Each test starts real ``torchrun`` processes running tests/jobs/distributed_job.py on a tiny student;
every wait is bounded, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from pilot.checkpoint import find_checkpoints
from pilot.distributed import World, per_device_batch, shard, shard_positions
from tests.conftest import same_code_env, stage1_inputs

JOB = Path(__file__).parent / "jobs" / "distributed_job.py"
STAGE1_STEPS = 8
LORA_STEPS = 6
TIMEOUT_S = 180


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tokenizer, task_table):
    from pilot.models import build_causal_lm

    folder = tmp_path_factory.mktemp("distributed")
    torch.manual_seed(0)
    student = build_causal_lm(tokenizer, family="llama", hidden_size=32, num_layers=2, num_heads=2, seed=0)
    student.save(folder / "student")
    task_table.to_parquet(folder / "tasks.parquet")
    plans, _, _ = stage1_inputs(student, task_table, folder)   # writes folder/cache
    plans.to_parquet(folder / "plans.parquet")
    return folder


def launch(what: str, workdir: Path, out: Path, steps: int, processes: int) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               str(JOB), what, str(workdir), str(out), str(steps)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**same_code_env(), "OMP_NUM_THREADS": "1"})


def finish(job: subprocess.Popen) -> str:
    try:
        output, _ = job.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s:\n{job.communicate()[0][-4000:]}")
    assert job.returncode == 0, output[-4000:]
    return output


def trained(out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(out / "weights.safetensors"), json.loads((out / "history.json").read_text())


def assert_same_training(one: Path, two: Path, names: list[str]) -> None:
    weights_one, record_one = trained(one)
    weights_two, record_two = trained(two)
    assert (record_one["processes"], record_two["processes"]) == (1, 2)
    history_one, history_two = record_one["history"], record_two["history"]
    assert [row["step"] for row in history_one] == [row["step"] for row in history_two]
    for row_one, row_two in zip(history_one, history_two):
        assert row_two.keys() == row_one.keys()
        for name in (name for name in names if name in row_one):
            assert row_two[name] == pytest.approx(row_one[name], rel=1e-4, abs=2e-5), (name, row_one["step"])
    assert record_two["validation"] == record_one["validation"]
    assert weights_one.keys() == weights_two.keys()
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=1e-4, atol=1e-5)


def test_shards_partition_a_global_batch_whatever_the_number_of_processes():
    batch = list(range(10, 17))
    for size in (1, 2, 3):
        parts = [shard(batch, World(rank, size)) for rank in range(size)]
        assert sorted(x for part in parts for x in part) == batch
        assert max(len(part) for part in parts) == per_device_batch(len(batch), size)
        assert [batch[p] for p in shard_positions(len(batch), World(size - 1, size))] == parts[-1]


def test_stage1_with_two_processes_trains_the_losses_and_weights_of_one(workdir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    finish(launch("stage1", workdir, one, STAGE1_STEPS, 1))
    finish(launch("stage1", workdir, two, STAGE1_STEPS, 2))
    assert_same_training(one, two, ["alignment", "contrastive", "lm", "latent_rl", "rl_reward", "total",
                                    "grad_norm"])
    history = trained(one)[1]["history"]
    assert history[-1]["alignment"] < history[0]["alignment"]       # it trained
    assert any(row["latent_rl"] != 0 for row in history)              # latent RL steps are among those compared


def test_lora_with_two_processes_trains_the_losses_and_weights_of_one(workdir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    finish(launch("lora", workdir, one, LORA_STEPS, 1))
    finish(launch("lora", workdir, two, LORA_STEPS, 2))
    assert_same_training(one, two, ["lm", "total", "grad_norm"])
    history = trained(one)[1]["history"]
    assert history[-1]["lm"] < history[0]["lm"]


def test_a_killed_rank_fails_the_run_clearly_and_it_resumes_with_another_number_of_processes(workdir, tmp_path):
    reference, run = tmp_path / "reference", tmp_path / "run"
    steps = 12
    finish(launch("stage1", workdir, reference, steps, 1))

    job = launch("stage1", workdir, run, steps, 2)
    deadline = time.time() + TIMEOUT_S
    while not any(p.name >= "step-00000004" for p in find_checkpoints(run / "checkpoints")):
        assert job.poll() is None, f"the run ended before a rank could be killed:\n{job.communicate()[0][-3000:]}"
        assert time.time() < deadline, "no checkpoint appeared in time"
        time.sleep(0.05)
    victim = next(p for p in psutil.Process(job.pid).children(recursive=True)
                  if p.environ().get("RANK") == "1")
    victim.send_signal(signal.SIGKILL)
    try:
        output, _ = job.communicate(timeout=90)   # the survivor must not wait forever for its peer
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail("the run hung after one of its processes was killed")
    assert job.returncode != 0
    assert "ChildFailedError" in output and "Signal 9 (SIGKILL)" in output, output[-3000:]
    assert not (run / "weights.safetensors").exists()
    saved = find_checkpoints(run / "checkpoints")
    assert saved and max(int(p.name.split("-")[1]) for p in saved) < steps

    output = finish(launch("stage1", workdir, run, steps, 1))   # resumed by one process
    assert "Resumed from checkpoint" in output
    weights_resumed, record_resumed = trained(run)
    weights_reference, record_reference = trained(reference)
    for name, tensor in weights_reference.items():
        torch.testing.assert_close(weights_resumed[name], tensor, rtol=1e-4, atol=1e-5)
    for row_resumed, row_reference in zip(record_resumed["history"], record_reference["history"]):
        assert row_resumed["total"] == pytest.approx(row_reference["total"], rel=1e-4, abs=1e-6)
