"""Shared tracking and tuning on real servers: PostgreSQL and an MLflow server started by
``scripts/services.sh`` on free loopback ports, several tune workers on one study, a worker killed
mid-trial, a restart, and a hyper-network fetched with nothing but the tracking URI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, make_project, run, same_code_env

SCRIPT = ROOT / "scripts" / "services.sh"
STALLING_WORKER = Path(__file__).parent / "jobs" / "stalling_tune_worker.py"
WORKERS, TRIALS_PER_WORKER = 3, 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Services:
    folder: Path
    env: dict[str, str]
    tracking_uri: str
    pg_port: int

    def storage(self, database: str = "optuna") -> str:
        return f"postgresql+psycopg://pilot@127.0.0.1:{self.pg_port}/{database}"

    def script(self, action: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), action], env=self.env, capture_output=True, text=True,
                              timeout=180)


@pytest.fixture(scope="module")
def services():
    """PostgreSQL and the MLflow server in a fresh folder (world-traversable: as root, PostgreSQL
    runs as `nobody`, who cannot enter pytest's root-only temporary folders)."""
    folder = Path(tempfile.mkdtemp(prefix="pilot-services-"))
    folder.chmod(0o755)
    pg_port, mlflow_port = free_port(), free_port()
    env = {**same_code_env(), "PILOT_SERVICES_DIR": str(folder / "services"), "PILOT_PG_PORT": str(pg_port),
           "PILOT_MLFLOW_PORT": str(mlflow_port), "MLFLOW": str(Path(sys.executable).with_name("mlflow"))}
    services = Services(folder, env, f"http://127.0.0.1:{mlflow_port}", pg_port)
    started = time.perf_counter()
    result = services.script("start")
    if result.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        if "PostgreSQL is not installed" in result.stderr or "initdb" in result.stderr:
            pytest.skip(f"PostgreSQL cannot start here: {result.stderr.strip().splitlines()[-1]}")
        pytest.fail(f"scripts/services.sh start failed:\n{result.stdout}\n{result.stderr}")
    print(f"services healthy after {time.perf_counter() - started:.1f} s (from nothing)")
    services.env["PGPASSFILE"] = str(folder / "services" / "pgpass")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("PGPASSFILE", services.env["PGPASSFILE"])  # this process reads the study too
    try:
        yield services
    finally:
        monkeypatch.undo()
        services.script("stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory, services):
    """A test-environment project with the tune pipeline's inputs, then tracking to the server."""
    monkeypatch = pytest.MonkeyPatch()
    project = make_project(tmp_path_factory.mktemp("shared"))
    try:
        for pipeline in ("data", "base", "plans", "latents"):
            run(project, monkeypatch, pipeline)
    finally:
        monkeypatch.undo()
        mlflow.set_tracking_uri(None)
    (project / "conf" / "test" / "mlflow.yml").write_text(
        f"server:\n  mlflow_tracking_uri: {services.tracking_uri}\n")
    return project


def kedro(project: Path, services: Services, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).with_name("kedro")), "run", "--env", "test", *args],
                            cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**services.env, "COLUMNS": "200"})


def _traceback(output: str) -> str:
    """A failed kedro run's traceback, both ends: the frames that tell where, the error that tells what."""
    text = output[output.find("Traceback"):]
    return text if len(text) <= 12_000 else text[:4000] + "\n[...]\n" + text[-8000:]


def tune_args(services: Services, study: str, n_trials: int, worker: str) -> list[str]:
    return ["--pipelines", "tune", "--params",
            f"tune.storage={services.storage()},tune.study_name={study},tune.n_trials={n_trials},tune.worker={worker}"]


def experiment_runs(services: Services) -> list:
    client = MlflowClient(tracking_uri=services.tracking_uri)
    return client.search_runs([client.get_experiment_by_name("pilot").experiment_id], max_results=1000)


def test_the_services_start_idempotently_and_answer(services):
    again = services.script("start")
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stdout and again.stdout.count("already running") == 2
    assert services.script("status").returncode == 0
    # one MLflow server process, not two
    assert len((services.folder / "services" / "mlflow.pid").read_text().split()) == 1


def test_parallel_workers_share_one_study_on_postgresql(project, services):
    started = time.perf_counter()
    jobs = [kedro(project, services, *tune_args(services, "shared", TRIALS_PER_WORKER, f"w{i}"))
            for i in range(WORKERS)]
    outputs = [job.communicate(timeout=600)[0] for job in jobs]
    parallel_s = time.perf_counter() - started
    failed = [output for job, output in zip(jobs, outputs) if job.returncode != 0]
    assert not failed, _traceback(failed[0])
    assert not any("database is locked" in output for output in outputs)

    study = optuna.load_study(study_name="shared", storage=services.storage())
    trials = study.get_trials()
    assert len(trials) == WORKERS * TRIALS_PER_WORKER  # none lost, none duplicated
    assert len({t.number for t in trials}) == len(trials)
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
    assert sum(bool(t.user_attrs.get("baseline")) for t in trials) == 1
    assert {t.user_attrs["worker"] for t in trials} == {f"w{i}" for i in range(WORKERS)}

    # one `tune` run per worker on the server, one nested run per trial under them
    runs = experiment_runs(services)
    tune_runs = {r.info.run_id for r in runs if r.info.run_name == "tune"}
    assert len(tune_runs) == WORKERS
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in tune_runs]
    assert len(nested) == len(trials)
    assert sorted(r.data.tags["number"] for r in nested) == sorted(str(t.number) for t in trials)
    client = MlflowClient(tracking_uri=services.tracking_uri)
    for run_id in tune_runs:  # every worker's results table, plots and configuration are on the server
        names = {a.path for a in client.list_artifacts(run_id)}
        assert {"resolved_parameters.yml", "tune_trials.parquet", "tune_history.png"} <= names, names

    # each worker's weights include the trials it waited for: never worse than its own best
    by_run = {t.user_attrs["mlflow_run_id"]: [] for t in trials}
    for t in trials:
        by_run[t.user_attrs["mlflow_run_id"]].append(t.value if t.value is not None else float("-inf"))
    for run_id in tune_runs:
        path = client.download_artifacts(run_id, "tuned_loss_weights.json", str(project / "fetched" / run_id))
        assert json.loads(Path(path).read_text())["best_val_accuracy"] >= max(by_run[run_id])
    print(f"workers that waited for the others: {sum('Waiting for' in output for output in outputs)}")

    # then the final best is written once, from the study, by a process that runs no trial
    reader = kedro(project, services, *tune_args(services, "shared", 0, "reader"))
    output = reader.communicate(timeout=600)[0]
    assert reader.returncode == 0, _traceback(output)
    assert len(optuna.load_study(study_name="shared", storage=services.storage()).trials) == len(trials)
    weights = json.loads((project / "data/06_models/tuned_loss_weights.json").read_text())
    assert weights["trial"] == study.best_trial.number and weights["best_val_accuracy"] == study.best_value
    assert weights["contrastive_weight"] == study.best_trial.params["contrastive_weight"]
    missing = kedro(project, services, *tune_args(services, "no-such-study", 0, "reader"))
    output = missing.communicate(timeout=600)[0]
    assert missing.returncode != 0 and "Study 'no-such-study' does not exist" in output

    # the same total number of trials in one worker, for the wall-time comparison
    started = time.perf_counter()
    single = kedro(project, services, *tune_args(services, "single", WORKERS * TRIALS_PER_WORKER, "solo"))
    output = single.communicate(timeout=600)[0]
    single_s = time.perf_counter() - started
    assert single.returncode == 0, output[-3000:]
    assert len(optuna.load_study(study_name="single", storage=services.storage()).trials) == WORKERS * TRIALS_PER_WORKER
    print(f"{WORKERS} workers x {TRIALS_PER_WORKER} trials: {parallel_s:.1f} s; 1 worker x "
          f"{WORKERS * TRIALS_PER_WORKER} trials: {single_s:.1f} s; ratio {parallel_s / single_s:.2f}")


def test_a_killed_workers_trial_is_failed_by_heartbeat_and_retried(services):
    storage = services.storage()
    stalled = subprocess.Popen([sys.executable, str(STALLING_WORKER), storage, "killed", "1", "600",
                                services.tracking_uri],
                               env=services.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until its trial runs (and beats)
        try:
            trials = optuna.load_study(study_name="killed", storage=storage).get_trials()
        except KeyError:  # the study does not exist yet
            trials = []
        if any(t.state == optuna.trial.TrialState.RUNNING for t in trials):
            break
        assert stalled.poll() is None, stalled.communicate()[0]
        time.sleep(0.5)
    else:
        pytest.fail("the worker never started a trial")
    time.sleep(1.5)  # at least one heartbeat recorded
    stalled.send_signal(signal.SIGKILL)
    stalled.communicate()
    running = [t for t in optuna.load_study(study_name="killed", storage=storage).get_trials()
               if t.state == optuna.trial.TrialState.RUNNING]
    assert len(running) == 1  # stuck until someone notices
    time.sleep(2.5)  # past the grace period

    rescuer = subprocess.run([sys.executable, str(STALLING_WORKER), storage, "killed", "2", "0.1",
                              services.tracking_uri],
                             env=services.env, capture_output=True, text=True, timeout=300)
    assert rescuer.returncode == 0, rescuer.stderr[-3000:]
    trials = optuna.load_study(study_name="killed", storage=storage).get_trials()
    states = {t.number: t.state for t in trials}
    assert states[running[0].number] == optuna.trial.TrialState.FAIL
    assert optuna.trial.TrialState.RUNNING not in states.values()
    retried = [t for t in trials if t.system_attrs.get("retry_history")]
    assert len(retried) == 1
    assert retried[0].system_attrs["retry_history"] == [running[0].number]
    assert retried[0].state == optuna.trial.TrialState.COMPLETE
    assert retried[0].params == running[0].params  # the same point, evaluated again
    assert len(trials) == 3  # the killed trial and the rescuer's two, the first of them the retry

    # the dead worker's MLflow run does not stay RUNNING forever: the rescuer ended it as KILLED
    client = MlflowClient(tracking_uri=services.tracking_uri)
    experiment = client.get_experiment_by_name("stalling-workers")
    statuses = {r.info.run_name: r.info.status for r in client.search_runs([experiment.experiment_id])}
    assert statuses == {"killed-1": "KILLED", "killed-2": "FINISHED"}


def test_a_runs_hypernetwork_downloads_with_only_the_tracking_uri(project, services, tmp_path):
    stage1 = kedro(project, services, "--pipelines", "stage1")
    output = stage1.communicate(timeout=600)[0]
    assert stage1.returncode == 0, output[-3000:]
    run = next(r for r in experiment_runs(services) if r.info.run_name == "stage1")

    # another process, another folder, nothing but the URI
    download = subprocess.run(
        ["mlflow", "artifacts", "download", "--run-id", run.info.run_id, "--artifact-path", "hypernet_stage1",
         "--dst-path", str(tmp_path)],
        env={**same_code_env(), "MLFLOW_TRACKING_URI": services.tracking_uri,
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert download.returncode == 0, download.stderr[-2000:]
    from pilot.guidance import HyperNetwork

    fetched = HyperNetwork.load(tmp_path / "hypernet_stage1")  # checksums verified
    local = HyperNetwork.load(project / "data/06_models/hypernet_stage1")
    for name, tensor in local.state_dict().items():
        assert torch.equal(fetched.state_dict()[name], tensor), name


def test_a_restart_keeps_every_run_and_trial(services):
    runs_before = {r.info.run_id for r in experiment_runs(services)}
    trials_before = {name: len(optuna.load_study(study_name=name, storage=services.storage()).trials)
                     for name in ("shared", "single", "killed")}
    assert runs_before and all(trials_before.values())
    stopped = services.script("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert services.script("status").returncode != 0
    started = time.perf_counter()
    restarted = services.script("start")
    assert restarted.returncode == 0, restarted.stderr
    print(f"services restarted in {time.perf_counter() - started:.1f} s")
    assert {r.info.run_id for r in experiment_runs(services)} == runs_before
    assert {name: len(optuna.load_study(study_name=name, storage=services.storage()).trials)
            for name in trials_before} == trials_before


def test_missing_services_fail_in_one_sentence_naming_make_services():
    from pilot.tracking import TrackingUnavailableError, check_tracking_store
    from pilot.tuning import StorageUnavailableError, check_storage

    port = free_port()  # nothing listens there
    with pytest.raises(StorageUnavailableError, match=r"unreachable .*`make services`"):
        check_storage(f"postgresql+psycopg://pilot@127.0.0.1:{port}/optuna", timeout_s=2)
    with pytest.raises(TrackingUnavailableError, match=r"unreachable .*`make services`"):
        check_tracking_store(f"http://127.0.0.1:{port}", timeout_s=2)


def test_a_grace_period_shorter_than_the_heartbeat_is_refused():
    from pilot.config import ParameterError, TuneParams, validate

    with pytest.raises(ParameterError, match="grace_period_s=5 must exceed heartbeat_interval_s=10"):
        validate(TuneParams, {"heartbeat_interval_s": 10, "grace_period_s": 5}, "tune")
