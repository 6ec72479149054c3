"""Threads that degrade gracefully: the default (`threads: null`) uses the cores other processes leave
free, so it is as fast as every core on an idle machine and about as fast as one thread when another
job keeps a core busy.

Measured in full by ``benchmarks/threads.py`` (BENCHMARKS.md, "Threads: idle and under load").
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from pilot.runtime import CoreShare, available_cores, configure_threads, others_running, share_cores
from tests.conftest import same_code_env

# The environment a user's shell gives `kedro run`: no OpenMP settings (the suite's own
# OMP_NUM_THREADS=1 would hide what the default does).
BARE = {k: v for k, v in same_code_env().items() if not k.startswith(("OMP_", "GOMP_", "KMP_"))}

# A small training loop (an MLP, AdamW) in a process that loads the project's settings first, as
# `kedro run` does; timed with one thread and with the default (`threads: null`), in turns.
WORKLOAD = """
import json, time
import pilot.settings  # noqa: F401
import torch
from pilot.runtime import configure_threads
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(128, 512), torch.nn.GELU(), torch.nn.Linear(512, 128))
optimizer = torch.optim.AdamW(model.parameters())
batch = torch.randn(256, 128)
def steps(count):
    started = time.perf_counter()
    for _ in range(count):
        optimizer.zero_grad()
        model(batch).square().mean().backward()
        optimizer.step()
    return time.perf_counter() - started
times = {"1": [], "null": []}
for round in range(4):
    for threads in times:
        configure_threads(None if threads == "null" else int(threads))
        steps(5)
        times[threads].append(steps(40))
print(json.dumps(times))
"""


@pytest.mark.slow
@pytest.mark.alone  # under `make test`'s two workers: measured with the other worker paused, as on its own
@pytest.mark.skipif(available_cores() < 2, reason="one core: the default is one thread")
def test_the_default_threads_beside_a_busy_job_are_not_much_slower_than_one_thread():
    """With spinning OpenMP threads this was 17-30x slower on the project's 2-core machine."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        done = subprocess.run([sys.executable, "-c", WORKLOAD], capture_output=True, text=True, env=BARE, timeout=600)
    finally:
        busy.kill()
        busy.wait()
    assert done.returncode == 0, done.stderr[-2000:]
    times = json.loads(done.stdout.strip().splitlines()[-1])
    one, default = min(times["1"]), min(times["null"])   # the fastest round of each: the least disturbed
    assert default <= 2.0 * one, f"threads: null took {default:.3f} s, one thread {one:.3f} s ({times})"


def test_a_busy_job_counts_as_another_runnable_thread():
    """The reading that `threads: null` follows: demand from other processes, read from /proc."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        readings = [others_running() for _ in range(5)]
    finally:
        busy.kill()
        busy.wait()
    assert None not in readings, "no /proc/stat on this machine"
    assert max(readings) >= 1, readings   # the busy loop is always runnable


@pytest.mark.skipif(available_cores() < 2, reason="one core: nothing to share")
def test_shared_cores_give_a_core_up_to_a_busy_job_at_once_and_take_it_back_after_two_free_readings():
    before = torch.get_num_threads()
    readings = iter([0, 1, 0, 0, 0])   # other runnable threads at each reading
    share = CoreShare(2, interval_s=0.0, read_others=lambda: next(readings))
    try:
        assert share.update(force=True) == 2 == torch.get_num_threads()   # idle at the start: every core
        assert share.update() == 1 == torch.get_num_threads()             # a job appears: give a core up
        assert share.update() == 1                                          # one free reading: not yet
        assert share.update() == 2 == torch.get_num_threads()             # two in a row: take it back
        assert share.update() == 2
    finally:
        torch.set_num_threads(before)


def test_a_reading_is_taken_at_most_once_an_interval_and_a_fixed_count_is_left_alone():
    before = torch.get_num_threads()
    calls = []
    share = CoreShare(2, interval_s=3600, read_others=lambda: calls.append(1) or 0)
    try:
        share.update(force=True)
        share.update()
        assert len(calls) == 1
        configure_threads(1)          # `threads: 1`: share_cores() must not touch it
        share_cores()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_default_students_training_is_bitwise_the_same_with_one_thread_and_two(tokenizer, task_table):
    """`threads: null` may change the thread count within a run; the default run stays reproducible
    because its student's steps do not depend on it (large reductions elsewhere can, in the last bit)."""
    from pilot.config import LMTrainConfig
    from pilot.models import build_causal_lm
    from pilot.prompts import TOY
    from pilot.training.base_lm import student_examples, train_causal_lm

    examples = student_examples(task_table[task_table["split"] == "train"].to_dict("records"), True, TOY)
    config = LMTrainConfig(steps=3, batch_size=64, warmup_steps=0)   # conf/base's student: 128 wide, 2 layers
    before, weights = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            lm = build_causal_lm(tokenizer, family="llama", hidden_size=128, num_layers=2, num_heads=4, seed=0)
            train_causal_lm(lm, examples, config, f"{threads} thread(s)")
            weights.append({name: p.detach().clone() for name, p in lm.model.named_parameters()})
    finally:
        torch.set_num_threads(before)
    assert weights[0].keys() == weights[1].keys()
    differing = [name for name in weights[0] if not torch.equal(weights[0][name], weights[1][name])]
    assert not differing, differing
