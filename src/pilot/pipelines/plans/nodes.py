"""Nodes of the ``plans`` pipeline: teacher-plan extraction with construct-and-verify."""

from __future__ import annotations

import pandas as pd

from pilot.config import GenerationParams, PlansParams, validate
from pilot.models import CausalLM
from pilot.plans import HFTeacher, OracleTeacher, construct_and_verify, plan_report


def extract_plans(tasks_train: pd.DataFrame, tasks_val: pd.DataFrame, tasks_test: pd.DataFrame,
                  teacher: CausalLM, student: CausalLM, params: dict,
                  generation: dict) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """A plan per query from the configured teacher, kept when the student answers right with it.

    Returns:
        ``teacher_plans`` (every split), the per-task ``plan_report`` and MLflow metrics.
    """
    config = validate(PlansParams, params, "plans")
    decoding = validate(GenerationParams, generation, "generation")
    backend = (HFTeacher(teacher, max_new_tokens=config.max_plan_tokens, batch_size=decoding.batch_size)
               if config.teacher == "hf" else OracleTeacher())
    tasks = pd.concat([tasks_train, tasks_val, tasks_test], ignore_index=True)
    plans = construct_and_verify(tasks, backend, student, decoding.max_new_tokens, decoding.batch_size, config.keep)
    report = plan_report(plans)
    metrics = {}
    for row in report.itertuples():
        for name in ("kept_fraction", "verified_fraction", "oracle_agreement", "teacher_ms_per_plan"):
            metrics[f"{row.split}_{row.task}_{name}"] = {"value": float(getattr(row, name)), "step": 0}
    return plans, report, metrics
