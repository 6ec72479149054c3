"""Same command, same numbers: the default run's first two trainings give identical weights at any thread
count, and under the default thread policy (`threads: null`) beside a competing process.

Each setting trains in a fresh process (tests/jobs/same_numbers_job.py) at the default run's sizes: the
embedded student (128 wide, 2 layers, batch 64) for 150 steps, then PILOT's stage 1 on it (batch 64,
latent-RL steps included, the default guidance site) for 100 steps. BENCHMARKS.md, "Threads: idle and
under load", says what each setting costs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import same_code_env

JOB = Path(__file__).parent / "jobs" / "same_numbers_job.py"


def train(threads: str, workdir: Path) -> dict[str, str]:
    env = {key: value for key, value in same_code_env().items() if key != "OMP_NUM_THREADS"}  # the job sets its own
    done = subprocess.run([sys.executable, str(JOB), threads, "150", "100", str(workdir)], capture_output=True,
                          text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores for two threads")
def test_student_and_stage1_weights_are_identical_at_one_and_two_threads_and_beside_a_busy_job(tmp_path):
    one = train("1", tmp_path / "one")
    two = train("2", tmp_path / "two")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])   # one core taken by another job
    try:
        shared = train("null", tmp_path / "shared")
    finally:
        busy.kill()
        busy.wait()
    assert one == two == shared
