"""What a researcher sees after a run: comparable method runs in MLflow, honest latency, and the
trained PILOT as an MLflow model that loads (and serves) outside Kedro."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pilot.config import GenerationParams
from pilot.guidance import GuidedStudent, HyperNetConfig, HyperNetwork
from pilot.latency import answerer, latency_table, measure_latency
from pilot.methods import METHOD_SETTINGS
from pilot.methods.pilot import Pilot
from pilot.methods.references import ZeroShot
from pilot.methods.registry import method_names
from pilot.models import count_parameters
from pilot.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING
from tests.conftest import ROOT, require_component, same_code_env
from tests.serve_check import mlflow_ui, post, served


def _client(project) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def _method_runs(project) -> dict:
    client = _client(project)
    experiment = client.get_experiment_by_name("pilot")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.mlflow.runName LIKE 'eval-%'")
    return {run.data.tags["method"]: run for run in runs}


# ------------------------------------------------------------------------ 1. comparable runs
def test_every_method_run_has_the_same_parameter_keys_with_sensible_values(finished_run):
    runs = _method_runs(finished_run)
    assert set(runs) == set(method_names())
    for method, run in runs.items():
        assert set(run.data.params) == set(METHOD_SETTINGS), method      # same keys: the compare view lines up
        assert {k: run.data.tags[k] for k in METHOD_SETTINGS} == run.data.params  # tags carry the same
        assert run.data.params["method"] == method
        assert run.data.params["seed"] == "0"
    params = {method: run.data.params for method, run in runs.items()}
    hypernet = HyperNetwork.load(finished_run / "data/06_models/hypernet_stage2")
    budget = count_parameters(hypernet)
    assert params["pilot_stage2"]["trainable_parameters"] == str(budget)
    assert params["zero_shot"]["trainable_parameters"] == params["plan_in_context"]["trainable_parameters"] == "0"
    assert abs(int(params["lora"]["trainable_parameters"]) - budget) <= 0.1 * budget  # matched budget
    configured = yaml.safe_load((ROOT / "conf/base/parameters.yml").read_text())["guidance"]
    for method in ("pilot_stage1", "pilot_stage2"):
        assert params[method]["guidance_inject_layer"] == str(configured["inject_layer"])
        assert params[method]["guidance_reader"] == configured["reader"]
        assert params[method]["guidance_read_layer"] == str(hypernet.config.resolved_read_layer())
    assert params["zero_shot"]["guidance_reader"] == params["lora"]["guidance_inject_layer"] == ""
    caa_scale = json.loads((finished_run / "data/06_models/caa/config.json").read_text())["scale"]
    assert float(params["caa"]["guidance_scale"]) == caa_scale
    stage1 = yaml.safe_load((ROOT / "conf/test/parameters_stage1.yml").read_text())["stage1"]["training"]["steps"]
    stage2 = yaml.safe_load((ROOT / "conf/test/parameters_stage2.yml").read_text())["stage2"]["training"]["steps"]
    assert params["pilot_stage1"]["training_steps"] == str(stage1)
    assert params["pilot_stage2"]["training_steps"] == str(stage1 + stage2)
    train = pd.read_parquet(finished_run / "data/03_primary/tasks_train.parquet")
    assert params["lora"]["training_data_rows"] == params["pilot_stage2"]["training_data_rows"] == str(len(train))
    assert 0 < int(params["pilot_stage1"]["training_data_rows"]) <= len(train)


def test_the_experiment_opens_as_model_training_not_genai(finished_run):
    experiment = _client(finished_run).get_experiment_by_name("pilot")
    assert experiment.tags.get(EXPERIMENT_KIND_TAG) == MODEL_TRAINING


# ------------------------------------------------------------------------ 2. honest latency
def test_latency_warms_every_method_up_then_interleaves_the_passes():
    calls = []
    answerers = {m: (lambda i, m=m: calls.append((m, i)) or 0.0) for m in ("a", "b", "c")}
    ticks = iter(range(10_000))
    timings = measure_latency(answerers, num_questions=2, passes=2, warmup_questions=1, clock=lambda: next(ticks))
    assert calls[:3] == [("a", 0), ("b", 0), ("c", 0)]                         # shared warm-up
    assert calls[3:9] == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1), ("c", 1)]  # round-robin
    assert calls[9:12] == [("c", 0), ("b", 0), ("a", 0)]                       # next pass: reversed order
    assert len(timings) == 6 and (timings["passes"] == 2).all() and (timings["seconds"] == 1).all()
    table = latency_table(timings, ["x", "y"])
    assert set(table["task"]) == {"x", "y", "overall"}
    assert (table["median_ms_per_query"] == 1000).all()


def test_plain_student_is_not_reported_slower_than_itself_guided_by_a_zero_vector(tiny_lm, task_table):
    """An untrained hyper-network outputs exactly zero: same answers, and the timings of the two
    must agree within noise (a loaded 2-core machine: generous bounds, best of three tries)."""
    rows = task_table.head(8)
    questions = rows["question"].tolist()
    hypernet = HyperNetwork(HyperNetConfig(hidden_size=tiny_lm.hidden_size, num_layers=tiny_lm.num_layers,
                                           reader="attention", mlp_hidden=32, attention_heads=2))
    with GuidedStudent(tiny_lm, hypernet) as guided:
        assert torch.count_nonzero(guided.guidance_vectors(questions)) == 0

    generation = GenerationParams(max_new_tokens=8)
    answerers = {"zero_shot": answerer(ZeroShot(), tiny_lm, rows, generation),
                 "zero_vector": answerer(Pilot(hypernet), tiny_lm, rows, generation)}
    ratios = []
    for _ in range(3):
        table = latency_table(measure_latency(answerers, len(questions), passes=5, warmup_questions=2),
                              ["t"] * len(questions)).set_index(["method", "task"])["median_ms_per_query"]
        ratios.append(table[("zero_shot", "overall")] / table[("zero_vector", "overall")])
        if 0.5 <= ratios[-1] <= 2.0:
            break
    assert 0.5 <= ratios[-1] <= 2.0, f"zero-shot / zero-guided latency ratios {ratios}"


def test_the_results_table_shows_the_interleaved_latency(finished_run):
    every_split = pd.read_parquet(finished_run / "data/08_reporting/results.parquet")
    results = every_split[every_split["split"] == "test"]  # latency is timed in distribution
    ood = every_split[every_split["split"] == "test_ood"]
    assert len(ood) and ood["median_ms_per_query"].isna().all() and (ood["timed_queries"] == 0).all()
    latency = pd.read_parquet(finished_run / "data/07_model_output/latency.parquet")
    merged = results.merge(latency, on=["method", "task"], suffixes=("", "_measured"))
    assert len(merged) == len(results)  # every (method, task) row was timed
    assert (merged["median_ms_per_query"] == merged["median_ms_per_query_measured"]).all()
    per_task = yaml.safe_load((ROOT / "conf/test/parameters_evaluation.yml").read_text())
    tasks = results["task"].nunique() - 1
    overall = results[results["task"] == "overall"]
    assert (overall["timed_queries"] == per_task["evaluation"]["latency"]["questions_per_task"] * tasks).all()
    assert (overall["median_ms_per_query"] > 0).all()
    assert "shared warm-up" in (finished_run / "data/08_reporting/results.md").read_text()


# ------------------------------------------------------------------------ 3. a model to load
def _pilot_stage2_answers(project, n: int) -> tuple[list[str], list[str]]:
    tasks = pd.read_parquet(project / "data/03_primary/tasks_test.parquet")
    predictions = pd.read_parquet(project / "data/07_model_output/predictions.parquet")
    pilot = predictions[predictions["method"] == "pilot_stage2"].set_index("id")
    rows = tasks.head(n)
    return rows["question"].tolist(), pilot.loc[rows["id"], "prediction"].tolist()


LOAD_AND_PREDICT = """
import json, sys
import mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
questions = json.loads(sys.argv[3])
# The signature names the `question` column: it is found by name, whatever comes before it.
by_run = mlflow.pyfunc.load_model(sys.argv[2]).predict(pd.DataFrame({"id": range(len(questions)), "question": questions}))
by_registry = mlflow.pyfunc.load_model("models:/pilot/1").predict(pd.DataFrame({"question": questions}))
print("ANSWERS" + json.dumps({"run": list(by_run), "registry": list(by_registry)}))
"""


def test_the_trained_pilot_loads_in_a_fresh_process_and_answers_like_the_evaluation(finished_run):
    info = json.loads((finished_run / "data/08_reporting/trained_model.json").read_text())
    assert info["model_uri"].endswith("/pilot") and info["registered_model_name"] == "pilot"
    versions = _client(finished_run).search_model_versions("name='pilot'")
    assert [v.run_id for v in versions] == [info["run_id"]]
    tasks = pd.read_parquet(finished_run / "data/03_primary/tasks_test.parquet")
    questions, expected = _pilot_stage2_answers(finished_run, len(tasks))  # the same batches as the evaluation
    done = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, f"sqlite:///{finished_run / 'mlflow.db'}",
                           info["model_uri"], json.dumps(questions)],
                          cwd=finished_run, env=same_code_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout.split("ANSWERS", 1)[1])
    assert answers["run"] == expected
    assert answers["registry"] == expected
    # Models from code: the logged model holds no pickled object, only files and code.
    logged = _client(finished_run).list_artifacts(info["run_id"], "pilot")
    assert "pilot/MLmodel" in {a.path for a in logged}
    assert not [a.path for a in logged if a.path.endswith((".pkl", ".pickle"))]


def test_mlflow_models_serve_answers_questions_over_http(finished_run, tmp_path):
    with served(finished_run, 1, tmp_path / "serve.log", env=same_code_env(), start_timeout=120) as port:
        if port is None:
            output = (tmp_path / "serve.log").read_text(errors="replace")[-2000:]
            pytest.skip(f"`mlflow models serve` did not start within 120 s here: {output}")
        questions, _ = _pilot_stage2_answers(finished_run, 3)
        status, body = post(port, {"inputs": questions}, timeout=60)
        assert status == 200, body
        reply = json.loads(body)
        assert set(reply) == {"predictions"}
        assert len(reply["predictions"]) == 3 and all(isinstance(a, str) for a in reply["predictions"])


def test_the_mlflow_compare_view_of_the_method_runs_renders(finished_run, tmp_path):
    """A screenshot of MLflow's compare view of the six method runs, kept with the reports."""
    from tests.test_viz import _chromium, _headless

    chromium = _chromium()
    require_component(chromium is not None,
                      "Chromium is not installed (Debian package `chromium`; `make test` installs it as root)")
    runs = _method_runs(finished_run)
    experiment_id = next(iter(runs.values())).info.experiment_id
    with mlflow_ui(finished_run, tmp_path / "ui.log", same_code_env()) as port:
        if port is None:
            pytest.fail(f"the MLflow UI did not start: {(tmp_path / 'ui.log').read_text(errors='replace')[-1500:]}")
        ids = ",".join(f'"{run.info.run_id}"' for run in runs.values())
        url = (f"http://127.0.0.1:{port}/#/compare-runs?runs=[{urllib.parse.quote(ids)}]"
               f"&experiments=[{urllib.parse.quote(json.dumps(experiment_id))}]")
        screenshot = ROOT / "data" / "08_reporting" / "mlflow_compare.png"
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.unlink(missing_ok=True)
        _headless(chromium, tmp_path / "profile", f"--screenshot={screenshot}", url)
        assert screenshot.stat().st_size > 20_000  # a rendered page, not a blank one
        if os.environ.get("PILOT_UPDATE_DOCS") == "1" or not (ROOT / "docs" / "mlflow_compare.png").exists():
            (ROOT / "docs").mkdir(exist_ok=True)
            shutil.copy(screenshot, ROOT / "docs" / "mlflow_compare.png")
