"""The trained models' life in MLflow 3 after a test-env run: each training stage's validated checkpoints
as logged models with their step and validation accuracy, the served PILOT under the alias
``champion``, system metrics on the run, and the MLflow UI listing the checkpoints (headless Chromium)."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pilot.guidance import HyperNetwork
from tests.conftest import ROOT, require_component, same_code_env
from tests.serve_check import mlflow_ui


def _client(project) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def _trained_model(project) -> dict:
    return json.loads((project / "data/08_reporting/trained_model.json").read_text())


def _logged_models(project) -> list:
    client = _client(project)
    run = client.get_run(_trained_model(project)["run_id"])
    return client.search_logged_models(experiment_ids=[run.info.experiment_id])


def test_each_stage_logs_its_validated_checkpoints_as_models_with_step_and_accuracy(finished_run):
    models = [m for m in _logged_models(finished_run) if m.model_type == "pilot-hypernet"]
    run = _client(finished_run).get_run(_trained_model(finished_run)["run_id"])
    outputs = {o.model_id: o.step for o in run.outputs.model_outputs}
    for stage in ("stage1", "stage2"):
        validation = pd.read_parquet(finished_run / f"data/07_model_output/{stage}_validation.parquet")
        accuracy = dict(zip(validation["step"], validation["val_accuracy"]))
        mine = {m.name: m for m in models if m.tags.get("pilot.stage") == stage}
        steps = sorted(int(m.params["step"]) for m in mine.values())
        training = yaml.safe_load((ROOT / f"conf/test/parameters_{stage}.yml").read_text())[stage]["training"]
        kept = [s for s in range(training["checkpoint_every"], training["steps"] + 1, training["checkpoint_every"])][-2:]
        selected = [m for m in mine.values() if m.tags["pilot.selected"] == "true"]
        assert len(selected) == 1
        best = int(selected[0].params["step"])
        assert steps == sorted(set(kept) | {best}), (stage, steps, kept, best)   # the two kept on disk, and the selected
        for name, model in mine.items():
            step = int(model.params["step"])
            assert name == f"hypernet_{stage}-step-{step}" and outputs[model.model_id] == step
            linked = {m.key: m.value for m in model.metrics}
            assert linked[f"{stage}.val_accuracy"] == pytest.approx(accuracy[step])
            assert {m.step for m in model.metrics} == {step}
        assert accuracy[best] == max(accuracy.values())
        # The selected model is the stage's output, weight for weight.
        downloaded = mlflow.artifacts.download_artifacts(artifact_uri=selected[0].artifact_location,
                                                         tracking_uri=f"sqlite:///{finished_run / 'mlflow.db'}")
        logged = HyperNetwork.load(downloaded)
        output = HyperNetwork.load(finished_run / f"data/06_models/hypernet_{stage}")
        assert all(torch.equal(a, b) for a, b in zip(logged.state_dict().values(), output.state_dict().values()))


def test_the_served_model_is_the_champion_linked_to_its_stage2_step_and_test_accuracy(finished_run):
    info = _trained_model(finished_run)
    assert info["alias"] == "champion"
    version = _client(finished_run).get_model_version_by_alias("pilot", "champion")
    assert str(version.version) == info["registered_model_version"] and version.run_id == info["run_id"]
    served = _client(finished_run).get_logged_model(info["model_id"])
    linked = {m.key: m.value for m in served.metrics}
    results = pd.read_parquet(finished_run / "data/08_reporting/results.parquet")
    row = results[(results["method"] == "pilot_stage2") & (results["task"] == "overall") & (results["split"] == "test")]
    assert linked["accuracy"] == pytest.approx(float(row["accuracy"].iloc[0]))
    validation = pd.read_parquet(finished_run / "data/07_model_output/stage2_validation.parquet")
    assert linked["stage2.val_accuracy"] == pytest.approx(validation["val_accuracy"].max())
    hypernet = _client(finished_run).get_logged_model(served.tags["pilot.hypernet_model_id"])
    assert hypernet.tags["pilot.stage"] == "stage2" and hypernet.tags["pilot.selected"] == "true"


LOAD_CHAMPION = """
import json, sys
import mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
questions = json.loads(sys.argv[2])
print("ANSWERS" + json.dumps(list(mlflow.pyfunc.load_model("models:/pilot@champion").predict(pd.DataFrame({"question": questions})))))
"""


def test_models_pilot_at_champion_loads_and_answers_like_the_evaluation(finished_run):
    tasks = pd.read_parquet(finished_run / "data/03_primary/tasks_test.parquet").head(12)
    predictions = pd.read_parquet(finished_run / "data/07_model_output/predictions.parquet")
    expected = predictions[predictions["method"] == "pilot_stage2"].set_index("id").loc[tasks["id"], "prediction"]
    done = subprocess.run([sys.executable, "-c", LOAD_CHAMPION, f"sqlite:///{finished_run / 'mlflow.db'}",
                           json.dumps(tasks["question"].tolist())], cwd=finished_run, env=same_code_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout.split("ANSWERS", 1)[1])
    # The served answers are each question's alone; the evaluation's come from padded batches of 128, whose
    # last bits may differ: nearly every answer agrees.
    agree = sum(a == e for a, e in zip(answers, expected))
    assert len(answers) == 12 and agree >= 10, (answers, list(expected))


def test_every_run_logs_system_metrics(finished_run):
    run = _client(finished_run).get_run(_trained_model(finished_run)["run_id"])
    system = {key for key in run.data.metrics if key.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, sorted(system)


def test_the_mlflow_ui_lists_the_runs_checkpoints_with_their_validation_accuracy(finished_run, tmp_path):
    from tests.test_viz import _chromium, _headless

    chromium = _chromium()
    require_component(chromium is not None,
                      "Chromium is not installed (Debian package `chromium`; `make test` installs it as root)")
    run = _client(finished_run).get_run(_trained_model(finished_run)["run_id"])
    with mlflow_ui(finished_run, tmp_path / "ui.log", same_code_env()) as port:
        if port is None:
            pytest.fail(f"the MLflow UI did not start: {(tmp_path / 'ui.log').read_text(errors='replace')[-1500:]}")
        url = f"http://127.0.0.1:{port}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        dom = _headless(chromium, tmp_path / "profile", "--dump-dom", url).stdout
        (tmp_path / "run_page.html").write_text(dom)
        models = [m for m in _logged_models(finished_run) if m.model_type == "pilot-hypernet"]
        for model in models:
            assert model.name in dom, f"{model.name} not on the run page ({tmp_path / 'run_page.html'})"
        stage1 = next(m for m in models if m.tags["pilot.stage"] == "stage1")
        assert "stage1.val_accuracy" in dom
        assert f"{stage1.metrics[0].value:g}"[:4] in dom
