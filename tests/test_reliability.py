"""Faults a user can cause or meet: bad parameters, missing inputs, tracking failures, unsafe formats,
and reproducibility. Each stops the run before any compute with one clear sentence, or is survived."""

from __future__ import annotations

import json
import random
import re
import shutil
import sqlite3
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from pilot.config import ParameterError
from pilot.framework.hooks import MissingInputError
from pilot.framework.outputs import OutputNotWritableError
from pilot.tracking import TrackingUnavailableError
from tests.conftest import ROOT, make_project, read_only, run


@pytest.fixture()
def project(tmp_path):
    yield make_project(tmp_path)
    mlflow.set_tracking_uri(None)


def _nothing_computed(project: Path) -> bool:
    return not [p for p in (project / "data").rglob("*") if p.is_file()] if (project / "data").exists() else True


@pytest.mark.parametrize("params, message", [
    ({"stage1": {"training": {"contrastive_weight": -1.0}}},
     "Parameter 'stage1.training.contrastive_weight' = -1.0 is invalid: input should be greater than or equal to 0."),
    ({"stage1": {"training": {"steps": "many"}}}, "Parameter 'stage1.training.steps' = 'many' is invalid"),
    ({"data": {"tasks": [{"name": "sudokuu", "size": 10}]}}, "Parameter 'data.tasks.0.name' = 'sudokuu' is invalid"),
    ({"guidance": {"inject_layer": 9}},
     "Parameter 'guidance.inject_layer' = 9 is outside the student's layers: allowed 0..1."),
    # `--params stage_1.training.steps=5`: a misspelt block is an error, not silently ignored
    ({"stage_1": {"training": {"steps": 5}}},
     "Parameter 'stage_1' is not a known parameter block; the closest known block is 'stage1'"),
    # `--params stage1.training.learning_rate=inf` arrives as the string 'inf'
    ({"stage1": {"training": {"learning_rate": "inf"}}},
     "Parameter 'stage1.training.learning_rate' = 'inf' is invalid: input should be a finite number."),
    ({"stage1": {"training": {"contrastive_weight": float("nan")}}},
     "Parameter 'stage1.training.contrastive_weight' = nan is invalid: input should be a finite number."),
    ({"data": {"tasks": [{"name": "chain_sum", "size": 200, "kwargs": {"min_terms": 3, "max_termz": 4}}]}},
     "Parameter 'data.tasks.0.kwargs.max_termz' = 4 is invalid: 'max_termz' is not a setting of reasoning-gym's "
     "chain_sum generator (did you mean 'max_terms'? accepted keys: allow_negation, max_digits"),
    ({"data": {"tasks": [{"name": "basic_arithmetic", "size": 200,
                          "kwargs": {"operators": ["+", "-", "/"], "allow_parentheses": False}}]}},
     "Parameter 'data.tasks.0.kwargs.operators' = ['+', '-', '/'] is invalid: with allow_parentheses: false"),
])
def test_bad_parameters_stop_the_run_before_any_compute(project, monkeypatch, params, message):
    with pytest.raises(ParameterError) as error:
        run(project, monkeypatch, params=params)
    assert str(error.value).startswith(message)
    assert _nothing_computed(project)


def test_a_stage_without_its_inputs_names_the_pipeline_to_run(project, monkeypatch):
    with pytest.raises(MissingInputError, match=r"Input 'hypernet_stage1' does not exist yet: run `kedro run --pipelines stage1` first"):
        run(project, monkeypatch, "stage2")
    with pytest.raises(MissingInputError, match=r"run `kedro run --pipelines base` first"):
        run(project, monkeypatch, "plans")


def test_a_hypernetwork_for_another_student_is_refused_before_training(finished_run, tmp_path, monkeypatch):
    project = make_project(tmp_path)
    shutil.copytree(finished_run / "data", project / "data")
    config_file = project / "data/06_models/hypernet_stage1/hypernet_config.json"
    config = json.loads(config_file.read_text())
    config["hidden_size"] = 999
    config_file.write_text(json.dumps(config))
    before = (project / "data/06_models/hypernet_stage2/hypernet.safetensors").stat().st_mtime
    try:
        with pytest.raises(ValueError, match=r"The hyper-network 'hypernet_stage1' was trained for a different "
                                             r"student: hidden size 999 != student's 48"):
            run(project, monkeypatch, "stage2")
    finally:
        mlflow.set_tracking_uri(None)
    assert (project / "data/06_models/hypernet_stage2/hypernet.safetensors").stat().st_mtime == before


def _set_tracking_uri(project: Path, uri: str) -> None:
    (project / "conf/test/mlflow.yml").write_text(yaml.safe_dump({"server": {"mlflow_tracking_uri": uri}}))


def test_an_unreachable_tracking_store_fails_before_any_compute(project, monkeypatch):
    _set_tracking_uri(project, f"sqlite:///{project / 'no/such/folder/mlflow.db'}")
    with pytest.raises(TrackingUnavailableError, match="does not exist; start it, fix the URI"):
        run(project, monkeypatch, "data")
    assert _nothing_computed(project)


def test_a_locked_tracking_store_fails_fast(project, monkeypatch):
    database = project / "mlflow.db"
    holder = sqlite3.connect(database, check_same_thread=False)
    holder.execute("CREATE TABLE IF NOT EXISTS lock (x)")
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    try:
        _set_tracking_uri(project, f"sqlite:///{database}")
        with pytest.raises(TrackingUnavailableError, match="database is locked"):
            run(project, monkeypatch, "data")
        assert _nothing_computed(project)
    finally:
        holder.rollback()
        holder.close()


def test_with_tracking_disabled_on_failure_the_run_goes_on(project, monkeypatch):
    _set_tracking_uri(project, f"sqlite:///{project / 'no/such/folder/mlflow.db'}")
    run(project, monkeypatch, "data", params={"tracking": {"on_unavailable": "disable"}})
    assert (project / "data/03_primary/tasks_train.parquet").is_file()
    assert not (project / "no").exists()


def test_an_untracked_session_after_a_tracked_one_in_the_same_process_leaves_that_run_alone(project, monkeypatch):
    """A notebook or a test runs several sessions in one process: kedro-mlflow's hook starts afresh with
    each (pilot.framework.mlflow_session), so a session with tracking disabled neither reopens nor writes
    to the run of the tracked session before it, and leaves no run active."""
    run(project, monkeypatch, "data")
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    (tracked,) = client.search_runs([client.get_experiment_by_name("pilot").experiment_id])
    _set_tracking_uri(project, f"sqlite:///{project / 'no/such/folder/mlflow.db'}")
    run(project, monkeypatch, "data", params={"tracking": {"on_unavailable": "disable"}, "data": {"seed": 1}})
    assert mlflow.active_run() is None
    after = client.get_run(tracked.info.run_id)
    assert (after.info.status, after.info.end_time) == ("FINISHED", tracked.info.end_time)
    assert after.data.params == tracked.data.params and after.data.metrics == tracked.data.metrics
    assert not (project / "no").exists()


def _corrupt_store(database: Path) -> bytes:
    """A store that looks like SQLite (its 100-byte header is intact) but whose pages are garbage:
    what a disk fault or a half-copied file leaves. Taking the write lock still works on it."""
    connection = sqlite3.connect(database)
    connection.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name TEXT)")
    connection.executemany("INSERT INTO experiments VALUES (?, ?)", [(i, "x" * 200) for i in range(100)])
    connection.commit()
    connection.close()
    data = database.read_bytes()
    noise = random.Random(0)
    corrupted = data[:100] + bytes(noise.randrange(256) for _ in range(len(data) - 100))
    database.write_bytes(corrupted)
    holder = sqlite3.connect(database)
    holder.execute("BEGIN IMMEDIATE")  # the old preflight check: passes on this file
    holder.rollback()
    holder.close()
    return corrupted


def test_a_corrupt_tracking_store_fails_before_any_compute_with_a_clear_message(project, monkeypatch):
    database = project / "mlflow.db"
    _corrupt_store(database)
    with pytest.raises(TrackingUnavailableError) as error:
        run(project, monkeypatch, "data")
    message = str(error.value)
    assert message.startswith(f"MLflow store 'sqlite:///{database}' is corrupted or not an SQLite database "
                              "(database disk image is malformed); move the file aside")
    assert "\n" not in message and "sqlalchemy" not in message.lower()
    assert _nothing_computed(project)


def test_a_corrupt_tracking_store_with_tracking_disabled_runs_untracked(project, monkeypatch):
    database = project / "mlflow.db"
    corrupted = _corrupt_store(database)
    run(project, monkeypatch, "data", params={"tracking": {"on_unavailable": "disable"}})
    for split in ("train", "val", "test"):
        assert len(pd.read_parquet(project / f"data/03_primary/tasks_{split}.parquet")) > 0
    assert database.read_bytes() == corrupted  # never opened for writing
    assert mlflow.active_run() is None


def test_an_output_folder_that_is_a_file_fails_before_any_compute(project, monkeypatch):
    # Works for any user, root included: nothing can be created under a regular file.
    (project / "data").mkdir()
    (project / "data/03_primary").write_text("not a folder")
    with pytest.raises(OutputNotWritableError) as error:
        run(project, monkeypatch, "data")
    assert str(error.value) == (
        f"Output folder '{project / 'data/03_primary'}' (catalog entry 'tasks_test') cannot be written: "
        f"'{project / 'data/03_primary'}' is a file, not a folder; fix its permissions or point that setting at a "
        "writable folder in conf/<env>/ before running again.")
    assert not (project / "data/01_raw").exists()  # tasks_all, computed first, was never generated


def test_a_read_only_data_folder_fails_before_any_compute(project, monkeypatch):
    data = project / "data"
    data.mkdir()
    with read_only(data), pytest.raises(OutputNotWritableError, match=rf"Output folder '{data}/01_raw' \(catalog "
                                                                      rf"entry 'tasks_all'\) cannot be written: "
                                                                      rf"'{data}' is not writable"):
        run(project, monkeypatch, "data")
    assert list(data.iterdir()) == []


def test_no_pickle_anywhere_in_the_code():
    offenders = []
    for path in list((ROOT / "src").rglob("*.py")) + list((ROOT / "benchmarks").rglob("*.py")):
        text = path.read_text()
        if re.search(r"\bimport pickle\b|\bpickle\.|joblib|torch\.save\(", text):
            offenders.append(str(path))
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            if "weights_only=True" not in call:
                offenders.append(f"{path}: {call}")
    assert offenders == []
    catalog = yaml.safe_load((ROOT / "conf/base/catalog.yml").read_text())
    assert not [name for name, entry in catalog.items() if "pickle" in json.dumps(entry).lower()]


def test_services_bind_to_localhost_and_base_holds_no_secrets():
    assert yaml.safe_load((ROOT / "conf/base/mlflow.yml").read_text())["ui"]["host"] == "127.0.0.1"
    readme = (ROOT / "README.md").read_text()
    for command in ("kedro viz run", "mlflow ui", "optuna-dashboard"):
        line = next(line for line in readme.splitlines() if line.startswith(command))
        assert "--host 127.0.0.1" in line, line
    # A key that names a secret (a value such as `policy: token` is a setting, not a secret).
    secret = re.compile(r"(?:^|[_-])(password|secret|token|api[_-]?key|aws_access)(?:[_-]|$)", re.IGNORECASE)
    for file in (ROOT / "conf/base").glob("*.yml"):
        keys = [line.split("#")[0].split(":")[0].strip(" -") for line in file.read_text().splitlines()
                if ":" in line.split("#")[0]]
        assert not [key for key in keys if secret.search(key)], file


def test_same_seed_same_metrics_other_seed_other_metrics(finished_run, tmp_path_factory, monkeypatch):
    def metrics(project: Path) -> pd.DataFrame:
        results = pd.read_parquet(project / "data/08_reporting/results.parquet")
        history = pd.read_parquet(project / "data/07_model_output/stage1_history.parquet")
        return results[["method", "task", "accuracy"]], history

    again = make_project(tmp_path_factory.mktemp("again"))
    other = make_project(tmp_path_factory.mktemp("other"))
    try:
        run(again, monkeypatch)
        run(other, monkeypatch, params={"seed": 1})
    finally:
        mlflow.set_tracking_uri(None)
    (first_results, first_history), (second_results, second_history) = metrics(finished_run), metrics(again)
    pd.testing.assert_frame_equal(first_results, second_results)
    pd.testing.assert_frame_equal(first_history, second_history)
    other_results, other_history = metrics(other)
    assert not first_history["total"].equals(other_history["total"])
    assert not first_results["accuracy"].equals(other_results["accuracy"])


def test_processes_starting_together_on_a_new_store_create_one_experiment(tmp_path):
    """kedro-mlflow looks the experiment up, then creates it: parallel workers on a new store raced
    (RESOURCE_ALREADY_EXISTS). ensure_experiment, run by the preflight hook first, has no window."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from pilot.tracking import ensure_experiment
    from tests.conftest import same_code_env

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ensure_experiment(uri, "warm-up")  # the schema exists before the race, as on a running server
    script = ("import sys; from pilot.tracking import ensure_experiment; "
              "ensure_experiment(sys.argv[1], 'pilot', {'mlflow.experimentKind': 'custom_model_development'})")
    workers = [subprocess.Popen([sys.executable, "-c", script, uri], env=same_code_env(), stderr=subprocess.PIPE,
                                text=True) for _ in range(4)]
    errors = [worker.communicate(timeout=120)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * 4, errors
    ensure_experiment(uri, "pilot")  # and once more, after the fact
    client = MlflowClient(tracking_uri=uri)
    experiments = [e for e in client.search_experiments() if e.name == "pilot"]
    assert len(experiments) == 1
    assert experiments[0].tags["mlflow.experimentKind"] == "custom_model_development"
