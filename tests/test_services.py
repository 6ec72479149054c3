"""Shared tracking and tuning on real servers: PostgreSQL and an MLflow server started by
``scripts/services.sh`` on free loopback ports, several tune workers on one study, a worker killed
mid-trial, a restart, a hyper-network fetched with nothing but the tracking URI and the client
account, and the authentication both servers ask for.

Every ``kedro run`` here tracks through conf/shared/mlflow.yml (copied into the test environment),
with the URI and the credentials in the environment, as on a second machine.

Without PostgreSQL the module is skipped, except in CI (CI set), where that is a failure."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import psycopg
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
    users: dict[str, str]  # the MLflow server's accounts, name -> password (from mlflow-users)

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
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PGPASSWORD",
                 "PILOT_OPTUNA_STORAGE", "PILOT_LISTEN", "PILOT_CREDENTIALS_FILE"):
        env.pop(name, None)  # nothing from the developer's own shell
    services = Services(folder, env, f"http://127.0.0.1:{mlflow_port}", pg_port, {})
    started = time.perf_counter()
    result = services.script("start")
    if result.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        if "PostgreSQL is not installed" in result.stderr or "initdb" in result.stderr:
            reason = f"PostgreSQL cannot start here: {result.stderr.strip().splitlines()[-1]}"
            if os.environ.get("CI"):  # CI must run these tests, not skip them
                pytest.fail(f"{reason} (CI is set: install PostgreSQL, e.g. apt-get install postgresql)")
            pytest.skip(reason)
        pytest.fail(f"scripts/services.sh start failed:\n{result.stdout}\n{result.stderr}")
    print(f"services healthy after {time.perf_counter() - started:.1f} s (from nothing)")
    services.users = dict(line.split(":", 1) for line in
                          (folder / "services" / "mlflow-users").read_text().splitlines())
    services.env.update({"PGPASSFILE": str(folder / "services" / "pgpass"),
                         "MLFLOW_TRACKING_URI": services.tracking_uri,
                         "MLFLOW_TRACKING_USERNAME": "pilot",
                         "MLFLOW_TRACKING_PASSWORD": services.users["pilot"]})
    monkeypatch = pytest.MonkeyPatch()
    for name in ("PGPASSFILE", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, services.env[name])  # this process reads the study and the runs too
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
    # the shared environment's own tracking settings: the URI and the credentials from the environment
    shutil.copy(ROOT / "conf" / "shared" / "mlflow.yml", project / "conf" / "test" / "mlflow.yml")
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
    experiment = client.get_experiment_by_name("pilot")
    return client.search_runs([experiment.experiment_id], max_results=1000) if experiment else []


def test_the_services_start_idempotently_and_answer(services):
    again = services.script("start")
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stdout and again.stdout.count("already running") == 2
    assert services.script("status").returncode == 0
    # one MLflow server process, not two
    assert len((services.folder / "services" / "mlflow.pid").read_text().split()) == 1


def http_status(url: str, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_tracking_server_refuses_requests_without_the_right_credentials(services):
    search = f"{services.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    users = services.users
    assert set(users) == {"admin", "pilot"} and users["admin"] != users["pilot"]
    assert all(len(password) >= 32 for password in users.values())
    assert http_status(f"{services.tracking_uri}/health") == 200  # the only route open to anyone
    assert http_status(search) == 401
    assert http_status(search, "pilot", "wrong-password") == 401
    assert http_status(search, "admin", users["pilot"]) == 401
    assert http_status(search, "pilot", users["pilot"]) == 200
    assert http_status(search, "admin", users["admin"]) == 200
    # the client account is no admin: it cannot create users
    create = urllib.request.Request(f"{services.tracking_uri}/api/2.0/mlflow/users/create", method="POST",
                                    data=json.dumps({"username": "intruder", "password": "x" * 20}).encode(),
                                    headers={"Content-Type": "application/json", "Authorization": "Basic " +
                                             base64.b64encode(f"pilot:{users['pilot']}".encode()).decode()})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(create, timeout=60)
    assert refused.value.code == 403
    # the secrets stay private, and the server's configuration file holds none of them
    folder = services.folder / "services"
    for name in ("mlflow-users", "mlflow-secret-key", "pgpass"):
        assert (folder / name).stat().st_mode & 0o077 == 0, name
    config = (folder / "mlflow-auth.ini").read_text()
    assert "mlflow_auth" in config and not any(password in config for password in users.values())


def test_postgresql_asks_for_the_password_over_tcp(services):
    password = (services.folder / "services" / "pgpass").read_text().strip().rsplit(":", 1)[1]
    connect = dict(host="127.0.0.1", port=services.pg_port, user="pilot", dbname="optuna", connect_timeout=30)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(**connect, password="wrong-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed|no password supplied"):
        psycopg.connect(**connect, passfile=os.devnull)
    with psycopg.connect(**connect, password=password) as connection:
        # every pg_hba line asks for a SCRAM password (none trusts an address), and the stored one is SCRAM
        methods = {row[0] for row in connection.execute("SELECT auth_method FROM pg_hba_file_rules")}
        assert methods == {"scram-sha-256"}
        stored = connection.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'pilot'").fetchone()[0]
        assert stored.startswith("SCRAM-SHA-256$")


def test_listening_beyond_loopback_lets_clients_in_with_a_password_only():
    def config(**env: str) -> str:
        result = subprocess.run(["bash", str(SCRIPT), "config"], env={**os.environ, **env}, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "listen_addresses: 127.0.0.1," in config(PILOT_LISTEN="127.0.0.1")
    assert "beyond loopback (pg_hba.conf):\n  none" in config(PILOT_LISTEN="127.0.0.1")
    everywhere = config(PILOT_LISTEN="0.0.0.0")
    assert "listen_addresses: *," in everywhere
    assert "host    all    pilot    all    scram-sha-256" in everywhere
    one = config(PILOT_LISTEN="10.1.2.3", PILOT_CLIENTS="10.0.0.0/8")
    assert "listen_addresses: 127.0.0.1,10.1.2.3," in one  # loopback too, for the MLflow server
    assert "host    all    pilot    10.0.0.0/8    scram-sha-256" in one
    assert "http://10.1.2.3:" in one and "basic authentication" in one


def test_a_shared_run_is_refused_without_credentials_and_tracked_with_them(services, tmp_path):
    """`kedro run --env shared` (its data pipeline) in a fresh project: refused in one sentence
    without credentials; tracked with the URI and the credentials in the environment (another
    machine), and with the entry `start` writes into conf/shared/credentials.yml (the tracking host)."""
    project = make_project(tmp_path)
    credentials = project / "conf" / "shared" / "credentials.yml"
    credentials.unlink(missing_ok=True)  # a copy of this checkout's own, if it has one
    bare = {name: value for name, value in services.env.items()
            if not name.startswith(("MLFLOW_TRACKING_", "PGPASS"))}
    bare.update({"MLFLOW_TRACKING_URI": services.tracking_uri, "COLUMNS": "200", "KEDRO_DISABLE_TELEMETRY": "1"})

    def shared_run(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(Path(sys.executable).with_name("kedro")), "run", "--env", "shared",
                               "--pipelines", "data"], cwd=project, env={**bare, **env}, capture_output=True,
                              text=True, timeout=600)

    runs_before = len(experiment_runs(services))
    refused = shared_run()
    output = " ".join((refused.stdout + refused.stderr).split())
    assert refused.returncode != 0
    assert (f"MLflow server '{services.tracking_uri}' refused this run's credentials (UNAUTHENTICATED): "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") in output, output[-3000:]
    assert not (project / "data" / "01_raw" / "tasks_all.parquet").exists()  # no node ran

    remote = shared_run(MLFLOW_TRACKING_USERNAME="pilot", MLFLOW_TRACKING_PASSWORD=services.users["pilot"])
    assert remote.returncode == 0, _traceback(remote.stdout + remote.stderr)
    assert len(experiment_runs(services)) == runs_before + 1

    started = subprocess.run(["bash", str(SCRIPT), "start"], env={**services.env, "PILOT_CREDENTIALS_FILE": str(credentials)},
                             capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr
    assert credentials.stat().st_mode & 0o077 == 0
    assert f"MLFLOW_TRACKING_PASSWORD: {services.users['pilot']}" in credentials.read_text()
    host = shared_run()  # nothing in the environment but the URI
    assert host.returncode == 0, _traceback(host.stdout + host.stderr)
    assert len(experiment_runs(services)) == runs_before + 2


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


def test_a_runs_hypernetwork_downloads_with_only_the_tracking_uri_and_account(project, services, tmp_path):
    stage1 = kedro(project, services, "--pipelines", "stage1")
    output = stage1.communicate(timeout=600)[0]
    assert stage1.returncode == 0, output[-3000:]
    run = next(r for r in experiment_runs(services) if r.info.run_name == "stage1")

    # another process, another folder, nothing but the URI and the client account
    env = {name: value for name, value in same_code_env().items() if not name.startswith(("MLFLOW_", "PG"))}
    download = subprocess.run(
        ["mlflow", "artifacts", "download", "--run-id", run.info.run_id, "--artifact-path", "hypernet_stage1",
         "--dst-path", str(tmp_path)],
        env={**env, "MLFLOW_TRACKING_URI": services.tracking_uri, "MLFLOW_TRACKING_USERNAME": "pilot",
             "MLFLOW_TRACKING_PASSWORD": services.users["pilot"],
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
