"""The whole default pipeline, end to end, in the test environment, through a real KedroSession."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pilot.methods.registry import method_names
from pilot.statistics import wilson_interval
from tests.conftest import ROOT


def test_results_table_has_every_method_and_task_and_matches_the_predictions(finished_run):
    results = pd.read_parquet(finished_run / "data/08_reporting/results.parquet")
    predictions = pd.read_parquet(finished_run / "data/07_model_output/predictions.parquet")
    tasks = set(pd.read_parquet(finished_run / "data/03_primary/tasks_test.parquet")["task"])
    assert set(results["method"]) == set(method_names())
    assert set(results["task"]) == tasks | {"overall"}
    assert set(results["split"]) == {"test", "test_ood"}
    assert results["accuracy"].between(0, 1).all()
    recount = predictions.groupby(["split", "method", "task"])["correct"].agg(["mean", "size"])
    for row in results[results["task"] != "overall"].itertuples():
        assert row.accuracy == pytest.approx(recount.loc[(row.split, row.method, row.task), "mean"])
        assert row.n == recount.loc[(row.split, row.method, row.task), "size"]
    overall = predictions.groupby(["split", "method"])["correct"].agg(["sum", "size"])
    for row in results[results["task"] == "overall"].itertuples():
        hits, n = overall.loc[(row.split, row.method)]
        assert row.accuracy == pytest.approx(hits / n)
        assert (row.ci_low, row.ci_high) == pytest.approx(wilson_interval(int(hits), int(n)))


def test_every_artefact_is_written_in_a_safe_format(finished_run):
    data = finished_run / "data"
    for path in ("06_models/student/model.safetensors", "06_models/teacher/model.safetensors",
                 "06_models/hypernet_stage1/hypernet.safetensors", "06_models/hypernet_stage2/hypernet_config.json",
                 "06_models/lora_adapter/adapter_model.safetensors", "06_models/caa/model.safetensors",
                 "06_models/reft/model.safetensors", "06_models/pause_tokens/config.json",
                 "06_models/soft_thoughts/model.safetensors",
                 "05_model_input/latent_cache/manifest.json", "04_feature/teacher_plans.parquet",
                 "08_reporting/plan_gap.parquet", "08_reporting/results.md", "08_reporting/accuracy.png",
                 "08_reporting/latency.png", "08_reporting/training_curves.png"):
        assert (data / path).is_file(), path
    assert not list(data.rglob("*.pkl")) and not list(data.rglob("*.pt")) and not list(data.rglob("*.bin"))


def test_mlflow_holds_the_run_its_parameters_metrics_and_method_runs(finished_run):
    client = MlflowClient(tracking_uri=f"sqlite:///{finished_run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pilot")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1
    parent = parents[0]
    configured = yaml.safe_load((ROOT / "conf/base/parameters_stage1.yml").read_text())
    expected = configured["stage1"]["training"]["contrastive_weight"]
    assert float(parent.data.params["stage1.training.contrastive_weight"]) == expected  # flattened, comparable
    assert "base.plan_gap_chain_sum" in parent.data.metrics
    assert "evaluation.zero_shot_accuracy" in parent.data.metrics
    assert "stage1.best_val_accuracy" in parent.data.metrics
    assert len(client.get_metric_history(parent.info.run_id, "stage1.alignment")) == 16
    assert {r.data.tags["method"] for r in children} == set(method_names())
    assert all("accuracy" in r.data.metrics and "median_ms_per_query" in r.data.metrics for r in children)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.parquet", "results.md", "accuracy.png", "training_curves.png"} <= artifacts
    # Peak memory: the run's, and the nodes that raised it, in the order they ran (in this shared
    # test process earlier tests may already hold a higher peak; the hook's logic is tested below).
    by_node = json.load(open(client.download_artifacts(parent.info.run_id, "peak_memory_by_node.json")))
    assert list(by_node)[0] == "(before the first node)" and list(by_node.values()) == sorted(by_node.values())
    assert parent.data.metrics["peak_memory_gib"] >= max(by_node.values()) > 0.1


def test_memory_hooks_list_only_the_nodes_that_raised_the_peak(caplog):
    from types import SimpleNamespace

    from pilot.framework.memory import MemoryHooks

    readings = iter([1.0, 1.02, 1.5, 1.5, 2.0, 2.0])  # start, then after each node, then the run's end
    hooks = MemoryHooks(step=0.05, measure=lambda: next(readings))
    hooks.before_pipeline_run()
    with caplog.at_level("INFO", logger="pilot.framework.hooks"):
        for name in ("a", "b", "c", "d"):
            hooks.after_node_run(SimpleNamespace(name=name))
        hooks.after_pipeline_run()
    assert hooks.raised_by == {"(before the first node)": 1.0, "b": 1.5, "d": 2.0}  # a: +0.02 only, c: no rise
    assert "Peak memory 1.50 GiB, reached in node 'b'." in caplog.text
    assert "Peak memory of the run: 2.00 GiB." in caplog.text


def test_tune_report_saves_hold_one_lock_that_other_processes_wait_for(tmp_path):
    import subprocess
    import sys
    import threading
    from types import SimpleNamespace

    from pilot.framework.report_locks import SharedReportHooks

    hooks = SharedReportHooks()
    hooks.after_context_created(SimpleNamespace(project_path=tmp_path, config_loader={"globals": {"data_root": "d"}}))
    lock = tmp_path / "d" / "08_reporting" / SharedReportHooks.LOCK_NAME
    # another process (a second tune worker) trying to take the lock without waiting
    probe = [sys.executable, "-c", "import fcntl, sys; fcntl.flock(open(sys.argv[1], 'a'), fcntl.LOCK_EX | fcntl.LOCK_NB)",
             str(lock)]
    hooks.before_dataset_saved("tune_importances_plot")
    assert subprocess.run(probe, capture_output=True).returncode != 0  # held while the report is written and uploaded
    second = threading.Thread(target=hooks.before_dataset_saved, args=("tune_trials",))  # `kedro run --async`
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive()  # this process's next save waits too
    hooks.after_dataset_saved("tune_importances_plot")
    second.join(timeout=10)
    assert not second.is_alive() and subprocess.run(probe, capture_output=True).returncode != 0
    hooks.after_dataset_saved("tune_trials")
    assert subprocess.run(probe, capture_output=True).returncode == 0
    hooks.before_dataset_saved("results_table")  # the default run's reports are not shared between processes
    assert subprocess.run(probe, capture_output=True).returncode == 0
    hooks.after_dataset_saved("results_table")


def test_the_run_records_its_fully_resolved_parameters_as_one_yaml_artifact(finished_run):
    from kedro.config import OmegaConfigLoader

    from pilot.settings import CONFIG_LOADER_ARGS

    client = MlflowClient(tracking_uri=f"sqlite:///{finished_run / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("pilot").experiment_id],
                             filter_string="tags.mlflow.runName = '__default__'")[0]
    record = yaml.safe_load(open(client.download_artifacts(run.info.run_id, "resolved_parameters.yml")))
    assert record["run"]["env"] == "test"
    # the machine its numbers depend on: results repeat bit for bit on the same kind of CPU
    assert record["run"]["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert run.data.tags["machine.torch"] == torch.__version__
    assert run.data.tags["machine.cpu_capability"] == record["run"]["machine"]["cpu_capability"]
    resolved = OmegaConfigLoader(str(finished_run / "conf"), env="test", **CONFIG_LOADER_ARGS)["parameters"]
    assert record["parameters"]["stage1"]["training"] == {**record["parameters"]["stage1"]["training"],
                                                          **resolved["stage1"]["training"]}
    recorded_tasks = record["parameters"]["data"]["tasks"]  # every setting, defaults included
    assert recorded_tasks == [{**rec, **res} for rec, res in zip(recorded_tasks, resolved["data"]["tasks"])]
    assert len(recorded_tasks) == len(resolved["data"]["tasks"])
    # every flattened MLflow param agrees with the YAML
    steps = record["parameters"]["stage1"]["training"]["steps"]
    assert int(run.data.params["stage1.training.steps"]) == steps


def test_pilot_and_every_trained_baseline_train_on_the_same_rows_with_the_same_budget(finished_run):
    """The protocol: LoRA, ReFT, pause tokens, soft thoughts and PILOT's stage 2 learn from the whole
    training split, stage 1 from its kept-plan rows (a subset of it), the baselines with stage 1's
    steps and batch size; all selected on validation, their parameter counts against the budget in MLflow."""
    data = finished_run / "data"
    settings = json.loads((data / "08_reporting/method_settings.json").read_text())
    train = pd.read_parquet(data / "03_primary/tasks_train.parquet")
    plans = pd.read_parquet(data / "04_feature/teacher_plans.parquet")
    kept = plans[plans["kept"] & (plans["split"] == "train")]
    assert set(kept["id"]) <= set(train["id"])
    baselines = ("lora", "reft", "pause_tokens", "soft_thoughts")
    for method in (*baselines, "pilot_stage2"):
        assert settings[method]["training_data_rows"] == str(len(train)), method
    assert settings["pilot_stage1"]["training_data_rows"] == str(len(kept))
    curves = {}   # each baseline's validation curve, from its history
    for method in baselines:
        assert settings[method]["training_steps"] == settings["pilot_stage1"]["training_steps"], method
        history = pd.read_parquet(data / f"07_model_output/{method}_history.parquet")
        steps = int(settings["pilot_stage1"]["training_steps"])
        assert history["step"].tolist() == list(range(steps + 1))   # step 0: validated before training
        assert history["lm"].iloc[1:].notna().all() and pd.isna(history["lm"].iloc[0])
        validated = history.dropna(subset=["val_accuracy"])
        assert validated["step"].iloc[0] == 0 and validated["step"].iloc[-1] == steps and len(validated) >= 2
        curves[method] = validated.set_index("step")["val_accuracy"]
    client = MlflowClient(tracking_uri=f"sqlite:///{finished_run / 'mlflow.db'}")
    parent = [r for r in client.search_runs([client.get_experiment_by_name("pilot").experiment_id])
              if "mlflow.parentRunId" not in r.data.tags and r.info.run_name == "__default__"][0]
    metrics = parent.data.metrics
    assert "baselines.best_step" in metrics and "stage1.best_step" in metrics
    budget = metrics["baselines.hypernet_parameters"]
    for method in baselines[1:]:
        assert metrics[f"baselines.{method}.hypernet_parameters"] == budget
        assert metrics[f"baselines.{method}.parameters"] == int(settings[method]["trainable_parameters"])
        assert metrics[f"baselines.{method}.budget_ratio"] == pytest.approx(metrics[f"baselines.{method}.parameters"] / budget)
        curve = curves[method]
        assert metrics[f"baselines.{method}.best_val_accuracy"] == pytest.approx(curve.max())
        assert curve[int(metrics[f"baselines.{method}.best_step"])] == curve.max()
        logged = client.get_metric_history(parent.info.run_id, f"baselines.{method}.val_accuracy")
        assert sorted((m.step, m.value) for m in logged) == list(curve.items())
    assert abs(metrics["baselines.soft_thoughts.budget_ratio"] - 1) <= 0.1   # sized to the budget


def test_the_ablation_pipeline_retrains_each_variant_on_both_test_splits(finished_run, monkeypatch):
    """Last in this file: it adds runs to the finished project's MLflow store."""
    from tests.conftest import run

    run(finished_run, monkeypatch, "ablations")
    reporting = finished_run / "data/08_reporting"
    table = pd.read_parquet(reporting / "ablations.parquet").set_index("variant")
    assert table.index.tolist() == ["zero_shot", "plan_in_context", "reference", "film_prior_two_layers", "no_stage2"]
    assert table[["accuracy", "ood_accuracy"]].stack().between(0, 1).all()
    assert table[["val_accuracy"]].iloc[2:].stack().between(0, 1).all()    # what each variant was selected on
    assert table.loc["film_prior_two_layers", "hypernet_parameters"] > table.loc["reference", "hypernet_parameters"]
    assert table.loc["no_stage2", "stage2_best_step"] == -1 and table.loc["reference", "stage2_best_step"] >= 0
    # no_stage2 changes stage 2 only: it reuses the reference's stage 1 instead of training it again.
    assert table.loc["no_stage2", "settings"] == "no stage 2 (stage 1 of reference)"
    assert table.loc["no_stage2", "stage1_best_step"] == table.loc["reference", "stage1_best_step"]
    assert "stage 1 of" not in table.loc["film_prior_two_layers", "settings"]
    # The reference variant is the configured PILOT retrained: the default run's stage-2 numbers, exactly.
    results = pd.read_parquet(reporting / "results.parquet")
    main = results[(results["method"] == "pilot_stage2") & (results["task"] == "overall")].set_index("split")
    assert table.loc["reference", "accuracy"] == main.loc["test", "accuracy"]
    assert table.loc["reference", "ood_accuracy"] == main.loc["test_ood", "accuracy"]
    stage2_validation = pd.read_parquet(finished_run / "data/07_model_output/stage2_validation.parquet")
    assert table.loc["reference", "val_accuracy"] == stage2_validation["val_accuracy"].max()
    for reference in ("zero_shot", "plan_in_context"):
        row = results[(results["method"] == reference) & (results["task"] == "overall") & (results["split"] == "test")]
        assert table.loc[reference, "accuracy"] == row["accuracy"].item()
    markdown = (reporting / "ablations.md").read_text()
    assert markdown.startswith("# PILOT ablations") and "| film_prior_two_layers | guidance.modulation=film" in markdown

    client = MlflowClient(tracking_uri=f"sqlite:///{finished_run / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pilot").experiment_id], "tags.ablation != ''")
    assert sorted(r.data.tags["ablation"] for r in runs) == ["film_prior_two_layers", "no_stage2", "reference"]
    assert all({"val_accuracy", "accuracy", "ood_accuracy", "train_seconds"} <= set(r.data.metrics) for r in runs)
