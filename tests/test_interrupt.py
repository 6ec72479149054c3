"""Runs that end cleanly: SIGTERM mid-training marks the MLflow run KILLED, keeps the checkpoints, says how
to resume and exits non-zero; the rerun resumes and ends with the uninterrupted run's predictions."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from pilot.fingerprint import fingerprint
from pilot.framework.interrupt import RunInterrupted, interruption, resume_command
from tests.conftest import make_project, same_code_env


def kedro_run(project: Path, log: Path) -> subprocess.Popen:
    """``kedro run --env test`` as its own process, its output in ``log`` (a pipe nobody reads would fill)."""
    with log.open("w") as out:
        return subprocess.Popen([str(Path(sys.executable).with_name("kedro")), "run", "--env", "test"], cwd=project,
                                stdout=out, stderr=subprocess.STDOUT, text=True,
                                env={**same_code_env(), "KEDRO_DISABLE_TELEMETRY": "1", "COLUMNS": "200"})


def _wait_for(condition, process, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"the run ended before it was interrupted:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no stage-1 checkpoint appeared in time"
        time.sleep(0.01)


def test_sigterm_mid_training_ends_the_run_killed_and_the_rerun_resumes_to_the_same_predictions(
        tmp_path, finished_run):
    project = make_project(tmp_path)
    checkpoints = project / "data/06_models/checkpoints/stage1"
    process = kedro_run(project, tmp_path / "interrupted.log")
    # Stage 1 (16 steps) checkpoints at step 8: stop the run as soon as that checkpoint is in place.
    _wait_for(lambda: any(checkpoints.glob("*/step-00000008/state.json")), process, tmp_path / "interrupted.log",
              timeout_s=600)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=300)
    output = (tmp_path / "interrupted.log").read_text()
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "interrupted by SIGTERM" in output and "rerun `kedro run --env test` to resume" in output
    assert any(checkpoints.glob("*/step-00000008/state.json"))   # kept

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pilot").experiment_id])
    assert [run.info.status for run in runs if "mlflow.parentRunId" not in run.data.tags] == ["KILLED"]
    assert all(run.info.status != "RUNNING" and run.info.end_time for run in runs)

    rerun = kedro_run(project, tmp_path / "resumed.log")
    rerun.wait(timeout=900)
    output = (tmp_path / "resumed.log").read_text()
    assert rerun.returncode == 0, output[-3000:]
    assert "Resumed from checkpoint" in output
    resumed = pd.read_parquet(project / "data/07_model_output/predictions.parquet")
    uninterrupted = pd.read_parquet(finished_run / "data/07_model_output/predictions.parquet")
    assert fingerprint(resumed) == fingerprint(uninterrupted)


def test_interruption_is_found_behind_a_wrapping_error_and_the_resume_command_is_the_one_typed():
    try:
        try:
            raise RunInterrupted(signal.SIGINT)
        except RunInterrupted as error:
            raise RuntimeError("Failed while saving data to dataset 'x'") from error
    except RuntimeError as wrapper:
        found = interruption(wrapper)
    assert found is not None and found.signal_name == "SIGINT" and found.signum == signal.SIGINT
    assert interruption(ValueError("other")) is None
    assert resume_command(["/venv/bin/kedro", "run", "--params", "a=1,b=two words"]) == \
        "kedro run --params 'a=1,b=two words'"
