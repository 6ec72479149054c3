"""Checkpoints per run (fingerprint): another run never wipes them, and a fresh start that cannot
delete old checkpoints says so instead of resuming from them."""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack

import pytest
import torch

from pilot.checkpoint import KEEP_RUNS, CheckpointDeleteError, CheckpointManager, find_checkpoints
from pilot.config import GenerationParams, Stage1Config
from pilot.latents import LatentCache
from pilot.training.stage1 import run_stage1
from tests.conftest import read_only, stage1_inputs

GEN = GenerationParams(max_new_tokens=4, batch_size=16)


def _module(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    module = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    module(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return module, optimizer


def test_each_run_keeps_its_own_folder_and_only_the_oldest_runs_are_pruned(tmp_path):
    root = tmp_path / "ckpt"
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "readme.txt").write_text("not a run: never pruned")
    first, first_opt = _module(0)
    run_a = CheckpointManager(root, every=2, fingerprint="aaaa")
    for step in (2, 4, 6):
        run_a.save(step, {"m": first}, first_opt, [{"step": step}])
    assert [p.relative_to(root).as_posix() for p in run_a.list()] == ["aaaa/step-00000004", "aaaa/step-00000006"]

    # A run with other settings finds nothing to resume and leaves run A's checkpoints alone ...
    other, other_opt = _module(1)
    run_b = CheckpointManager(root, every=2, fingerprint="bbbb")
    assert run_b.restore({"m": other}, other_opt) is None
    assert len(run_a.list()) == 2
    time.sleep(0.05)  # folder mtimes order the runs
    run_b.save(2, {"m": other}, other_opt, [])
    assert len(run_a.list()) == 2 and len(run_b.list()) == 1  # KEEP_RUNS = 2: both kept
    assert KEEP_RUNS == 2

    # ... so run A, started again with its own settings, resumes where it was.
    resumed, resumed_opt = _module(2)
    restored = CheckpointManager(root, every=2, fingerprint="aaaa").restore({"m": resumed}, resumed_opt)
    assert restored.step == 6 and restored.history == [{"step": 6}]
    torch.testing.assert_close(resumed.weight, first.weight, rtol=0, atol=0)

    # A third run prunes the oldest (A) once it has saved its own first checkpoint.
    time.sleep(0.05)
    run_c = CheckpointManager(root, every=2, fingerprint="cccc")
    assert run_c.restore({"m": other}, other_opt) is None
    assert (root / "aaaa").is_dir()  # nothing pruned before run C has a checkpoint of its own
    run_c.save(2, {"m": other}, other_opt, [])
    assert sorted(p.name for p in root.iterdir()) == ["bbbb", "cccc", "notes"]
    assert [p.parent.name for p in find_checkpoints(root)] == ["bbbb", "cccc"]


class Interrupted(Exception):
    pass


def test_a_run_with_other_settings_that_stops_at_step_0_keeps_the_previous_runs_checkpoints(tiny_lm, task_table,
                                                                                           tmp_path):
    plans, site, latents = stage1_inputs(tiny_lm, task_table, tmp_path)
    val = task_table[task_table["split"] == "val"].head(4)
    config = Stage1Config(steps=6, batch_size=4, rl_weight=0, eval_every=3, checkpoint_every=2)
    directory = str(tmp_path / "ckpt")

    def stage1(config, stop_at=None, seen=None):
        def on_validation(step, _):
            if seen is not None:
                seen.append(step)
            if step == stop_at:
                raise Interrupted(f"stopped at step {step}")
        return run_stage1(tiny_lm, LatentCache(tmp_path / "cache"), plans, task_table, val, site, latents, config,
                          GEN, checkpoint_dir=directory, on_validation=on_validation)

    with pytest.raises(Interrupted):
        stage1(config, stop_at=3)  # run A is interrupted after its step-2 checkpoint
    saved = find_checkpoints(directory)
    assert [p.name for p in saved] == ["step-00000002"]

    with pytest.raises(Interrupted):  # a run with another learning rate, stopped before its first step
        stage1(config.model_copy(update={"learning_rate": 5e-4}), stop_at=0)
    assert find_checkpoints(directory) == saved

    seen: list[int] = []
    result = stage1(config, seen=seen)  # run A again: resumes from step 2, no validation at step 0
    assert seen == [3, 6]
    assert [row["step"] for row in result.history] == list(range(1, 7))


def test_a_fresh_start_that_cannot_delete_old_checkpoints_fails_naming_the_folder(tiny_lm, task_table, tmp_path):
    plans, site, latents = stage1_inputs(tiny_lm, task_table, tmp_path)
    val = task_table[task_table["split"] == "val"].head(4)
    config = Stage1Config(steps=4, batch_size=4, rl_weight=0, eval_every=4, checkpoint_every=2)
    directory = tmp_path / "ckpt"
    run_stage1(tiny_lm, LatentCache(tmp_path / "cache"), plans, task_table, val, site, latents, config, GEN,
               checkpoint_dir=str(directory))
    before = find_checkpoints(directory)
    assert [p.name for p in before] == ["step-00000002", "step-00000004"]
    files = {path: path.read_bytes() for folder in before for path in folder.iterdir()}
    seen: list[int] = []
    # The checkpoint folders refuse deletions (read-only, or owned by another user): before, the
    # failure was ignored and the "fresh" run resumed from the checkpoints it was told to drop.
    with ExitStack() as stack:
        for folder in before:
            stack.enter_context(read_only(folder))
        with pytest.raises(CheckpointDeleteError) as error:
            run_stage1(tiny_lm, LatentCache(tmp_path / "cache"), plans, task_table, val, site, latents, config, GEN,
                       checkpoint_dir=str(directory), resume=False, on_validation=lambda step, _: seen.append(step))
    assert str(error.value).startswith(f"Cannot delete old checkpoint folder '{before[0]}'")
    assert "resume: false" in str(error.value)
    assert seen == []  # it neither resumed nor trained
    assert {path: path.read_bytes() for path in files} == files  # and left the checkpoints as they were


def test_checkpoints_in_the_flat_layout_of_earlier_versions_are_resumed(tmp_path):
    root = tmp_path / "ckpt"
    module, optimizer = _module(0)
    CheckpointManager(root, every=2, fingerprint="aaaa").save(2, {"m": module}, optimizer, [])
    os.replace(root / "aaaa" / "step-00000002", root / "step-00000002")  # where earlier versions saved it
    assert json.loads((root / "step-00000002" / "state.json").read_text())["fingerprint"] == "aaaa"
    assert CheckpointManager(root, every=2, fingerprint="bbbb").restore({"m": module}, optimizer) is None
    restored = CheckpointManager(root, every=2, fingerprint="aaaa").restore({"m": module}, optimizer)
    assert restored.step == 2 and restored.path == root / "aaaa" / "step-00000002"
