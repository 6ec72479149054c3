"""Data-parallel training on CPU: 2 torchrun processes (gloo) train what 1 process trains.

Each test starts real ``torchrun`` processes running tests/jobs/distributed_job.py on a tiny student;
every wait is bounded, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pytest
import torch
from safetensors.torch import load_file

from pilot.checkpoint import find_checkpoints
from pilot.distributed import World, my_batches, per_device_batch, shard, shard_positions
from tests.conftest import make_project, run, same_code_env, stage1_inputs

JOB = Path(__file__).parent / "jobs" / "distributed_job.py"
STAGE1_STEPS = 8
LORA_STEPS = 6
STAGE2_STEPS = 4
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


def test_batches_are_one_process_batches_dealt_round_robin():
    for size in (1, 2, 3):
        parts = [my_batches(10, 3, World(rank, size)) for rank in range(size)]
        dealt = sorted((b for part in parts for b in part), key=lambda b: b.start)
        assert dealt == [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]   # one process's cut, each once
        assert parts[0][0] == range(0, 3) and (size == 1 or parts[1][0] == range(3, 6))


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


def test_stage2_with_two_processes_and_greedy_rollouts_trains_the_losses_and_weights_of_one(workdir, tmp_path):
    """With the same replies (greedy rollouts), every stage-2 term is the one-process term, self-supervision
    included (weighted by the tokens of each rank's right replies). Sampled rollouts differ: each rank
    samples with its own seed (docs/distributed.md)."""
    one, two = tmp_path / "one", tmp_path / "two"
    finish(launch("stage2", workdir, one, STAGE2_STEPS, 1))
    finish(launch("stage2", workdir, two, STAGE2_STEPS, 2))
    assert_same_training(one, two, ["policy", "kl", "self_supervision", "anchor", "entropy", "total",
                                    "rewards/mean", "completion_length"])
    history = trained(one)[1]["history"]
    assert all(row["self_supervision"] > 0 for row in history)      # right replies in every step's batch
    assert history[-1]["anchor"] > 0                                 # it moved off the stage-1 guidance


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


# ------------------------------------------------------------------------------ the Kedro launcher
TINY_DATA = """data:
  val_per_task: 4
  test_per_task: 4
  ood_per_task: 2
  tasks:
    - name: chain_sum
      size: 48
      kwargs: {min_terms: 3, max_terms: 4, min_digits: 1, max_digits: 1}
      ood_kwargs: {min_terms: 5, max_terms: 6}
    - name: basic_arithmetic
      size: 48
      kwargs: {min_terms: 3, max_terms: 3, min_digits: 1, max_digits: 1, operators: ["+", "-"], allow_negation: false}
"""
# Batches of 16 and shards of 32 rows: several generation batches and three cache shards, so the two
# processes get unequal shares (one takes two shards, the other one) and a round with nothing for rank 1.
LAUNCH_PARAMS = {"generation": {"batch_size": 16}, "latents": {"shard_size": 32},
                 "stage1": {"training": {"steps": 4, "batch_size": 8, "rl_every": 2, "rl_batch": 2,
                                         "eval_every": 2, "checkpoint_every": 2}}}
LAUNCH_PIPELINES = "plans,latents,stage1"


def _flat(params: dict, prefix: str = "") -> list[str]:
    return [item for key, value in params.items()
            for item in (_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}={value}"])]


def _runs(project: Path) -> list[str]:
    with sqlite3.connect(project / "mlflow.db") as db:
        return [row[0] for row in db.execute("SELECT run_uuid FROM runs ORDER BY start_time")]


def _metric_keys(project: Path, run_id: str) -> set[str]:
    with sqlite3.connect(project / "mlflow.db") as db:
        return {row[0] for row in db.execute("SELECT DISTINCT key FROM metrics WHERE run_uuid = ?", (run_id,))}


def test_the_kedro_launcher_runs_plans_latents_and_stage1_as_one_run_with_one_process_outputs(tmp_path, monkeypatch):
    """torchrun --nproc-per-node 2 -m pilot.framework.launch: one MLflow run, every output written once
    and equal to a one-process `kedro run` of the same pipelines (plans and cache exactly)."""
    (tmp_path / "one").mkdir()
    one = make_project(tmp_path / "one")
    (one / "conf" / "test" / "parameters_data.yml").write_text(TINY_DATA)
    try:
        run(one, monkeypatch, "data")
        run(one, monkeypatch, "base", params={"base": {"student": {"training": {"steps": 20}},
                                                        "teacher": {"training": {"steps": 20}}}})
        two = tmp_path / "two" / "project"
        shutil.copytree(one, two)   # the same data, base models and MLflow store so far
        (two / "conf" / "test" / "mlflow.yml").write_text(f"server:\n  mlflow_tracking_uri: sqlite:///{two / 'mlflow.db'}\n")
        runs_before = _runs(two)

        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                   "-m", "pilot.framework.launch", "--env", "test", "--pipelines", LAUNCH_PIPELINES,
                   "--params", ",".join(_flat(LAUNCH_PARAMS)), "--timeout-s", "120"]
        job = subprocess.Popen(command, cwd=two, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**same_code_env(), "OMP_NUM_THREADS": "1", "KEDRO_DISABLE_TELEMETRY": "1"})
        try:
            for pipeline in LAUNCH_PIPELINES.split(","):   # the same pipelines in one process, meanwhile
                run(one, monkeypatch, pipeline, params=LAUNCH_PARAMS)
        finally:
            output = finish(job)
    finally:
        mlflow.set_tracking_uri(None)

    new_runs = [r for r in _runs(two) if r not in runs_before]
    assert len(new_runs) == 1, output[-3000:]                   # rank 0's run only
    logged = _metric_keys(two, new_runs[0])   # every pipeline's metrics, in that one run
    assert {"plans.train_chain_sum_kept_fraction", "latents.cache_examples", "stage1.total"} <= logged, sorted(logged)
    with sqlite3.connect(two / "mlflow.db") as db:
        processes = db.execute("SELECT value FROM params WHERE run_uuid = ? AND key = 'distributed.processes'",
                               (new_runs[0],)).fetchall()
    assert processes == [("2",)]                                 # the run says how many processes trained it

    plans_one = pd.read_parquet(one / "data/04_feature/teacher_plans.parquet")
    plans_two = pd.read_parquet(two / "data/04_feature/teacher_plans.parquet")
    assert len(plans_two) == len(plans_one) > 32                  # several generation batches
    pd.testing.assert_frame_equal(plans_two.drop(columns="teacher_seconds"), plans_one.drop(columns="teacher_seconds"))

    cache_one, cache_two = one / "data/05_model_input/latent_cache", two / "data/05_model_input/latent_cache"
    shards = sorted(p.name for p in cache_one.iterdir())
    assert sorted(p.name for p in cache_two.iterdir()) == shards   # no stray temp file from another rank
    assert len([name for name in shards if name.startswith("shard-")]) == 3
    manifest_one, manifest_two = (json.loads((c / "manifest.json").read_text()) for c in (cache_one, cache_two))
    assert manifest_two["fingerprint"] == manifest_one["fingerprint"] and manifest_two["ids"] == manifest_one["ids"]
    assert manifest_two["computed_shards"] == 3
    for name in (n for n in shards if n.startswith("shard-")):
        tensors_one, tensors_two = load_file(cache_one / name), load_file(cache_two / name)
        assert tensors_two.keys() == tensors_one.keys()
        for key, tensor in tensors_one.items():
            torch.testing.assert_close(tensors_two[key], tensor, rtol=0, atol=0)

    weights_one = load_file(one / "data/06_models/hypernet_stage1/hypernet.safetensors")
    weights_two = load_file(two / "data/06_models/hypernet_stage1/hypernet.safetensors")
    assert weights_two.keys() == weights_one.keys()
    for key, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[key], tensor, rtol=1e-4, atol=1e-5)
