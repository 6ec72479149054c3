"""A local Hugging Face model in place of the embedded default (docs/own_models.md)."""

from __future__ import annotations

import mlflow
import pandas as pd
import yaml

from tests.conftest import make_project, run


def test_pretrained_models_are_used_as_they_are_and_never_written(finished_run, tmp_path, monkeypatch):
    models = finished_run / "data" / "06_models"  # any local causal-LM folders would do
    project = make_project(tmp_path)
    (project / "conf" / "test" / "globals.yml").write_text(yaml.safe_dump({"models": {
        "student": {"path": str(models / "student"), "pretrained": True},
        "teacher": {"path": str(models / "teacher"), "pretrained": True},
    }}))
    files = [p for role in ("student", "teacher") for p in (models / role).iterdir()]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    try:
        for pipeline in ("data", "base", "plans"):
            run(project, monkeypatch, pipeline)
    finally:
        mlflow.set_tracking_uri(None)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before  # untouched
    assert not (project / "data/06_models/student").exists()  # nothing trained in this project
    assert pd.read_parquet(project / "data/07_model_output/student_training_history.parquet").empty
    # Downstream runs unchanged on the configured models: the same plans as the run that made them.
    plans = pd.read_parquet(project / "data/04_feature/teacher_plans.parquet")
    original = pd.read_parquet(finished_run / "data/04_feature/teacher_plans.parquet")
    pd.testing.assert_series_equal(plans["plan"], original["plan"])
    assert pd.read_parquet(project / "data/08_reporting/plan_gap.parquet")["accuracy"].between(0, 1).all()
