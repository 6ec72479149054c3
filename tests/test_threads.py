"""Threads that degrade gracefully: a Kedro run's idle OpenMP threads sleep instead of spinning, so the
default (every core) stays about as fast as one thread when another job keeps a core busy.

Measured in full by ``benchmarks/threads.py`` (BENCHMARKS.md, "Threads: idle and under load").
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pilot.runtime import available_cores
from tests.conftest import same_code_env

# The environment a user's shell gives `kedro run`: no OpenMP settings (the suite's own
# OMP_NUM_THREADS=1 would hide what the default does).
BARE = {k: v for k, v in same_code_env().items() if not k.startswith(("OMP_", "GOMP_", "KMP_"))}

# Records the wait policy in the environment at the moment torch is first imported (when torch loads
# its OpenMP runtime, which reads it once), then loads the project's settings as `kedro run` does.
PROBE = """
import importlib.abc, os, sys
seen = {}
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "torch" not in seen:
            seen["torch"] = os.environ.get("OMP_WAIT_POLICY", "unset")
        return None
sys.meta_path.insert(0, Watch())
from kedro.framework.project import configure_project, settings
configure_project("pilot")
settings.HOOKS
print(seen.get("torch", "torch not imported"))
"""


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_kedro_settings_make_openmp_threads_sleep_before_torch_loads(given, expected):
    env = {**BARE, **({"OMP_WAIT_POLICY": given} if given else {})}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == expected   # a value the user set is kept


# A small training loop (an MLP, AdamW) in a process that loads the project's settings first, as
# `kedro run` does; timed with one thread and with the default (every core), in turns, in that process
# (the thread count can change within a process, the wait policy cannot).
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
